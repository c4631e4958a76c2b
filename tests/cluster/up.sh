#!/usr/bin/env bash
# Brings up a real single-node Kubernetes: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, containerd, kubelet, kube-proxy,
# CoreDNS, and CSI storage (our test driver behind the real external-provisioner).
# Idempotent: a cluster that is already up is left as it is.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

[ "$(id -u)" = 0 ] || die "the cluster needs root (mounts, bridge, iptables, cgroups)"
for tool in containerd runc ctr iptables ip losetup openssl curl busybox; do
	command -v "$tool" >/dev/null || die "$tool is missing: run .ci/run once, or apt-get install the packages listed in tests/cluster/README.md"
done

if cluster_up && is_running kubelet; then
	log "cluster already up ($API_URL)"
	exit 0
fi
# A cluster whose processes all died (a killed session, a reboot) leaves
# mounts, the bridge and iptables rules behind: clear them before starting.
stale=0
for f in "$RUN"/*.pid; do [ -f "$f" ] && stale=1; done
for f in "$RUN"/*.pid; do [ -f "$f" ] && is_running "$(basename "$f" .pid)" && stale=0; done
if [ "$stale" = 1 ]; then
	log "cleaning up after a cluster whose processes are gone"
	"$HERE/down.sh"
fi
t0=$SECONDS

# --- binaries: upstream ones from the version-keyed cache, ours built now ---
"$BUILD_BINARIES" cluster
mkdir -p "$BIN" "$LOGS" "$RUN" "$IMAGES"
for d in k8s etcd provisioner coredns; do
	dir=$("$BUILD_BINARIES" --print-dir $d)
	for b in "$dir"/*; do ln -sf "$b" "$BIN/"; done
done
(cd "$REPO" && CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o "$BIN/" \
	./tests/cluster/cmd/imgtool ./tests/cluster/cmd/pause ./tests/cluster/cmd/vimg-test-csi)

# --- host network: a bridge of our own, and safety rules -------------------
if [ ! -f "$SYSCTL_ORIG" ]; then
	for s in "${SYSCTLS[@]}"; do echo "$s=$(sysctl -n "$s")"; done >"$SYSCTL_ORIG"
fi
[ -d /run/netns ] || touch "$LAB/created-run-netns"
[ -d /run/containerd ] || touch "$LAB/created-run-containerd"
if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
	ip link add "$BRIDGE" type bridge
	ip addr add "$NODE_IP/24" dev "$BRIDGE"
fi
ip link set "$BRIDGE" up
# Service and pod addresses never leave the machine: what kube-proxy does
# not translate and the bridge does not hold falls into a blackhole.
ip route replace blackhole "$SERVICE_CIDR"
ip route replace blackhole "$POD_CIDR"
# Pods never reach beyond the bridge. In mangle, before any filter rule
# kube-proxy or the kubelet may insert ahead of ours.
iptables -t mangle -C FORWARD -i "$BRIDGE" ! -o "$BRIDGE" -j DROP -m comment --comment vimg-lab 2>/dev/null ||
	iptables -t mangle -I FORWARD -i "$BRIDGE" ! -o "$BRIDGE" -j DROP -m comment --comment vimg-lab
sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1

# --- certificates ----------------------------------------------------------
"$HERE/pki.sh"

# --- control plane ---------------------------------------------------------
start etcd "$BIN/etcd" --name vimg-lab --data-dir "$LAB/etcd" \
	--listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
	--listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
	--initial-cluster vimg-lab=http://127.0.0.1:2380 --listen-metrics-urls http://127.0.0.1:2381 \
	--unsafe-no-fsync --log-level warn
wait_for etcd 30 curl -fsS http://127.0.0.1:2379/health

start kube-apiserver "$BIN/kube-apiserver" --bind-address="$NODE_IP" --advertise-address="$NODE_IP" \
	--secure-port="$API_PORT" --etcd-servers=http://127.0.0.1:2379 \
	--client-ca-file="$PKI/ca.crt" --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
	--kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
	--kubelet-certificate-authority="$PKI/ca.crt" --kubelet-preferred-address-types=InternalIP \
	--service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
	--service-account-issuer=https://kubernetes.default.svc.cluster.local \
	--authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
	--service-cluster-ip-range="$SERVICE_CIDR" --allow-privileged=true --profiling=false \
	--cert-dir="$LAB/apiserver-certs"
wait_for kube-apiserver 60 https_ok "$API_URL/readyz" "$PKI/admin.crt" "$PKI/admin.key"

start kube-controller-manager "$BIN/kube-controller-manager" --kubeconfig="$LAB/controller-manager.kubeconfig" \
	--authentication-kubeconfig="$LAB/controller-manager.kubeconfig" --authorization-kubeconfig="$LAB/controller-manager.kubeconfig" \
	--bind-address=127.0.0.1 --secure-port=10257 --use-service-account-credentials=true \
	--service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
	--cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
	--controllers='*,bootstrapsigner,tokencleaner' --leader-elect=false --allocate-node-cidrs=false \
	--service-cluster-ip-range="$SERVICE_CIDR" --profiling=false
start kube-scheduler "$BIN/kube-scheduler" --kubeconfig="$LAB/scheduler.kubeconfig" \
	--authentication-kubeconfig="$LAB/scheduler.kubeconfig" --authorization-kubeconfig="$LAB/scheduler.kubeconfig" \
	--bind-address=127.0.0.1 --secure-port=10259 --leader-elect=false --profiling=false
wait_for kube-controller-manager 30 https_ok https://127.0.0.1:10257/healthz
wait_for kube-scheduler 30 https_ok https://127.0.0.1:10259/healthz

# --- node: containerd, CNI, kubelet, kube-proxy ------------------------------
mkdir -p "$LAB/containerd" "$LAB/cni/net.d" "$KUBELET_ROOT" "$LAB/pod-logs"
sed -e "s|@LAB@|$LAB|g" "$HERE/config/containerd.toml" >"$LAB/containerd/config.toml"
sed -e "s|@LAB@|$LAB|g; s|@BRIDGE@|$BRIDGE|g; s|@NODE_POD_CIDR@|$NODE_POD_CIDR|g; s|@NODE_IP@|$NODE_IP|g" \
	"$HERE/config/cni-bridge.conflist" >"$LAB/cni/net.d/10-vimg-lab.conflist"
start containerd containerd --config "$LAB/containerd/config.toml"
wait_for containerd 30 ctr --address "$CTR_SOCK" version

# Images: built here from local binaries, imported, never pulled.
"$BIN/imgtool" -ref localhost/vimg-lab/pause:3.10 -out "$IMAGES/pause.tar" -file "$BIN/pause:/pause" -entrypoint /pause
links=(); for a in $(busybox --list | grep -vx busybox); do links+=(-symlink "/bin/$a=/bin/busybox"); done
"$BIN/imgtool" -ref localhost/vimg-lab/busybox:1.35 -out "$IMAGES/busybox.tar" -file /bin/busybox:/bin/busybox "${links[@]}" -entrypoint /bin/sh
"$BIN/imgtool" -ref localhost/vimg-lab/coredns:1.14 -out "$IMAGES/coredns.tar" -file "$BIN/coredns:/coredns" -entrypoint /coredns
for i in "$IMAGES"/*.tar; do ctr --address "$CTR_SOCK" -n k8s.io images import "$i" >/dev/null; done

# The CSI driver images.vimg.dev mounts volumes for the kubelet from a pod,
# with Bidirectional propagation, which needs the kubelet's directory to be
# a shared mount (on systemd hosts / is; here it may be private).
mountpoint -q "$KUBELET_ROOT" || mount --bind "$KUBELET_ROOT" "$KUBELET_ROOT"
mount --make-rshared "$KUBELET_ROOT"
sed -e "s|@LAB@|$LAB|g; s|@NODE_IP@|$NODE_IP|g; s|@DNS_SERVICE_IP@|$DNS_SERVICE_IP|g; s|@PKI@|$PKI|g" \
	"$HERE/config/kubelet.yaml" >"$LAB/kubelet-config.yaml"
start kubelet "$BIN/kubelet" --config="$LAB/kubelet-config.yaml" --kubeconfig="$LAB/kubelet.kubeconfig" \
	--root-dir="$KUBELET_ROOT" --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" --v=1
wait_for "node $NODE_NAME" 60 kubectl_lab wait --for=condition=Ready "node/$NODE_NAME" --timeout=2s

sed -e "s|@LAB@|$LAB|g; s|@POD_CIDR@|$POD_CIDR|g; s|@NODE_IP@|$NODE_IP|g; s|@NODE_NAME@|$NODE_NAME|g" \
	"$HERE/config/kube-proxy.yaml" >"$LAB/kube-proxy-config.yaml"
start kube-proxy "$BIN/kube-proxy" --config="$LAB/kube-proxy-config.yaml" --v=1
wait_for kube-proxy 30 curl -fsS http://127.0.0.1:10256/healthz
wait_for "serviceaccount default" 30 kubectl_lab get serviceaccount default

# --- storage: our test CSI driver behind the real external-provisioner -----
mkdir -p "$(dirname "$CSI_SOCK")" "$LAB/csi-data"
start vimg-test-csi "$BIN/vimg-test-csi" --endpoint="$CSI_SOCK" --data-dir="$LAB/csi-data" \
	--node-id="$NODE_NAME" --registration-dir="$KUBELET_ROOT/plugins_registry" --v=2
wait_for "CSI driver socket" 30 test -S "$CSI_SOCK"
supervise csi-provisioner "$BIN/csi-provisioner" --csi-address="$CSI_SOCK" --kubeconfig="$ADMIN_KUBECONFIG" \
	--leader-election=false --extra-create-metadata=true --feature-gates=Topology=true \
	--node-deployment=false --timeout=30s --v=2
kubectl_lab apply -f "$HERE/manifests/storage.yaml" >/dev/null
wait_for "CSINode registration" 60 bash -c "'$BIN/kubectl' --kubeconfig='$ADMIN_KUBECONFIG' get csinode '$NODE_NAME' -o jsonpath='{.spec.drivers[*].name}' | grep -q '$CSI_DRIVER'"

# --- cluster DNS ---------------------------------------------------------------
sed -e "s|@DNS_SERVICE_IP@|$DNS_SERVICE_IP|g" "$HERE/manifests/coredns.yaml" | kubectl_lab apply -f - >/dev/null
wait_for coredns 120 kubectl_lab -n kube-system rollout status deployment/coredns --timeout=2s

log "cluster up in $((SECONDS - t0))s: kubectl is tests/cluster/kubectl, API $API_URL"
