# Shared settings and helpers of the local cluster scripts (sourced).
# Every address is on loopback or on the cluster's own bridge; see README.md.

LAB=${VIMG_LAB:-/var/lib/vimg-lab}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
BUILD_BINARIES=$HERE/build-binaries.sh

NODE_NAME=vimg-node
BRIDGE=vimg0
NODE_IP=10.244.0.1            # the bridge's address: API server, kubelet
NODE_POD_CIDR=10.244.0.0/24   # pods of the one node, on the bridge
POD_CIDR=10.244.0.0/16
SERVICE_CIDR=10.96.0.0/12
API_SERVICE_IP=10.96.0.1
DNS_SERVICE_IP=10.96.0.10
API_PORT=6443
API_URL=https://$NODE_IP:$API_PORT

PKI=$LAB/pki
RUN=$LAB/run        # pid files
LOGS=$LAB/logs
BIN=$LAB/bin        # links to cached upstream binaries + our helpers
IMAGES=$LAB/images
CTR_SOCK=$LAB/containerd/containerd.sock
KUBELET_ROOT=$LAB/kubelet
CSI_DRIVER=hostpath.test.vimg.dev
CSI_SOCK=$LAB/csi/hostpath/csi.sock
ADMIN_KUBECONFIG=$LAB/admin.kubeconfig
SYSCTL_ORIG=$LAB/sysctl-orig.txt
# The sysctls the kubelet, kube-proxy and the bridge change; down.sh restores them.
SYSCTLS=(net.ipv4.ip_forward net.bridge.bridge-nf-call-iptables vm.overcommit_memory kernel.panic kernel.panic_on_oops)

log() { printf '[cluster %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

kubectl_lab() { "$BIN/kubectl" --kubeconfig="$ADMIN_KUBECONFIG" "$@"; }

# start NAME CMD... runs CMD in its own session (process group = its pid),
# output in $LOGS/NAME.log, pid in $RUN/NAME.pid, so that down.sh stops
# exactly what we started, children included.
start() {
	local name=$1; shift
	if is_running "$name"; then log "$name already running (pid $(cat "$RUN/$name.pid"))"; return; fi
	mkdir -p "$RUN" "$LOGS"
	setsid "$@" >>"$LOGS/$name.log" 2>&1 </dev/null &
	echo $! >"$RUN/$name.pid"
}

# supervise NAME CMD... is start with a restart loop, for sidecars that exit
# by design when their peer goes away (csi-provisioner does).
supervise() {
	local name=$1; shift
	start "$name" bash -c 'while :; do "$@"; echo "exited with $?; restarting in 1s"; sleep 1; done' "$name" "$@"
}

is_running() {
	local pid
	[ -f "$RUN/$1.pid" ] && pid=$(cat "$RUN/$1.pid") && kill -0 "$pid" 2>/dev/null
}

# wait_for WHAT SECONDS CMD...: poll CMD until it succeeds.
wait_for() {
	local what=$1 secs=$2; shift 2
	local deadline=$((SECONDS + secs))
	until "$@" >/dev/null 2>&1; do
		[ $SECONDS -lt $deadline ] || die "$what not ready after ${secs}s (logs: $LOGS)"
		sleep 0.5
	done
}

# cluster_up: our API server runs and is ready.
cluster_up() {
	is_running kube-apiserver && https_ok "$API_URL/readyz" "$PKI/admin.crt" "$PKI/admin.key" >/dev/null 2>&1
}

https_ok() { # URL [client-cert client-key]
	if [ $# -ge 3 ]; then
		curl -fsS --max-time 3 --cacert "$PKI/ca.crt" --cert "$2" --key "$3" "$1"
	else
		curl -fsSk --max-time 3 "$1"
	fi
}
