#!/usr/bin/env bash
# Stops exactly what up.sh started (by pid file and by the lab's own paths),
# unmounts, and undoes every change up.sh and the components made to the
# machine: bridge, routes, iptables chains, cgroups, loop devices, sysctls.
# Keeps the logs and the recorded sysctls; check-clean.sh verifies the result.
set -uo pipefail
source "$(dirname "$0")/lib.sh"
[ "$(id -u)" = 0 ] || die "needs root"
[ -d "$LAB" ] || { log "nothing to stop: $LAB does not exist"; exit 0; }

stop() { # NAME: TERM the process group, KILL it after 10s
	local f=$RUN/$1.pid pid
	[ -f "$f" ] || return 0
	pid=$(cat "$f")
	if kill -0 "$pid" 2>/dev/null; then
		kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
		for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
		kill -KILL -- "-$pid" 2>/dev/null || true
	fi
	rm -f "$f"
}

# Node side first, so nothing restarts containers while they are removed.
for c in demo-httpd csi-provisioner kube-proxy kubelet vimg-test-csi; do stop "$c"; done

# Containers: every process in the kubepods cgroups is a container of ours.
for cg in /sys/fs/cgroup/*/kubepods; do
	[ -d "$cg" ] && find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null
done | sort -u | xargs -r kill -KILL 2>/dev/null
stop containerd
# Shims outlive containerd; ours are the ones serving our containerd's socket.
pgrep -f -- "containerd-shim-runc-v2 .*-address $CTR_SOCK" | xargs -r kill -KILL 2>/dev/null
for c in kube-scheduler kube-controller-manager kube-apiserver etcd; do stop "$c"; done
sleep 0.5

# Mounts: everything below $LAB (volumes, overlay rootfs, shm, netns) and the
# network namespaces our containerd made, deepest first.
unmount_all() {
	awk -v lab="$LAB/" '{ if (index($5, lab) == 1 || $5 ~ "^/run/netns/cni-" || $5 ~ "^/var/run/netns/cni-") print $5 }' /proc/self/mountinfo |
		sort -r | while read -r m; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; done
}
unmount_all; unmount_all
rm -f /run/netns/cni-* 2>/dev/null

# Loop devices backed by files of ours (Block volumes).
losetup -a 2>/dev/null | awk -F: -v lab="$LAB/" 'index($0, lab) { print $1 }' | xargs -r -n1 losetup -d 2>/dev/null

# Network.
for v in $(ip -o link show master "$BRIDGE" 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do ip link del "$v" 2>/dev/null; done
ip link del "$BRIDGE" 2>/dev/null
ip route del blackhole "$SERVICE_CIDR" 2>/dev/null
ip route del blackhole "$POD_CIDR" 2>/dev/null
while iptables -t mangle -D FORWARD -i "$BRIDGE" ! -o "$BRIDGE" -j DROP -m comment --comment vimg-lab 2>/dev/null; do :; done
# The kubelet's and kube-proxy's KUBE-* chains and the CNI plugins' CNI-*
# chains, with every rule that jumps to them; other rules stay as they are.
for cmd in iptables ip6tables; do
	for table in filter nat mangle; do
		dump=$($cmd-save -t "$table" 2>/dev/null) || continue
		grep -qE 'KUBE-|CNI-' <<<"$dump" || continue
		grep -vE '^:(KUBE|CNI)-|^-A (KUBE|CNI)-|-j (KUBE|CNI)-' <<<"$dump" | $cmd-restore -T "$table" 2>/dev/null ||
			log "could not clean $cmd $table"
	done
done

# Cgroups the kubelet and containerd made.
for top in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/*/k8s.io /sys/fs/cgroup/kubepods /sys/fs/cgroup/k8s.io; do
	[ -d "$top" ] && find "$top" -depth -type d -exec rmdir {} + 2>/dev/null
done

# Sysctls back to what they were before the first up.sh.
if [ -f "$SYSCTL_ORIG" ]; then
	while IFS== read -r k v; do sysctl -qw "$k=$v" 2>/dev/null || log "could not restore $k=$v"; done <"$SYSCTL_ORIG"
fi

# Directories containerd and CNI create outside $LAB, if we created them.
[ -f "$LAB/created-run-containerd" ] && find /run/containerd -depth -type d -empty -delete 2>/dev/null
[ -f "$LAB/created-run-netns" ] && rmdir /run/netns 2>/dev/null

# State: deleted only when nothing is mounted below $LAB any more, and never
# across a file-system boundary.
if awk -v lab="$LAB/" 'index($5, lab) == 1 { found = 1 } END { exit !found }' /proc/self/mountinfo; then
	log "something is still mounted below $LAB: state kept, see /proc/self/mountinfo"
	exit 1
fi
find "$LAB" -mindepth 1 -maxdepth 1 ! -name logs ! -name sysctl-orig.txt -exec rm -rf --one-file-system {} +
log "cluster down"
