#!/usr/bin/env bash
# Shows the local cluster: its processes, node, storage classes and pods.
set -uo pipefail
source "$(dirname "$0")/lib.sh"
up=0
for c in etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet kube-proxy vimg-test-csi csi-provisioner; do
	if is_running "$c"; then printf '  %-24s running (pid %s)\n' "$c" "$(cat "$RUN/$c.pid")"; up=$((up + 1))
	else printf '  %-24s stopped\n' "$c"; fi
done
[ "$up" -gt 0 ] || { echo "cluster is down"; exit 3; }
kubectl_lab get nodes -o wide && echo && kubectl_lab get storageclass && echo && kubectl_lab get pods -A -o wide
