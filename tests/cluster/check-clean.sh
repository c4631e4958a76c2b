#!/usr/bin/env bash
# After down.sh: proves the cluster left nothing behind on the machine.
# Prints one line per check and a closing "N passed, N failed" line.
set -uo pipefail
source "$(dirname "$0")/lib.sh"
pass=0 fail=0
check() { # DESCRIPTION OUTPUT-THAT-MUST-BE-EMPTY
	if [ -z "$2" ]; then echo "ok    $1"; pass=$((pass + 1))
	else echo "FAIL  $1:"; sed 's/^/        /' <<<"$2"; fail=$((fail + 1)); fi
}

procs=$(ps -eo pid,args | grep -E "$LAB/|$CTR_SOCK" | grep -vE "grep|check-clean" || true)
for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy csi-provisioner vimg-test-csi coredns; do
	procs+=$(pgrep -a -x "${b:0:15}" || true) # the kernel keeps 15 characters of a name
done
check "no process of the cluster" "$procs"
check "no listener on the cluster's ports" "$(ss -Htlnu 2>/dev/null | awk '{print $5}' | grep -E ':(2379|2380|2381|6443|10248|10249|10250|10256|10257|10259)$' || true)"
check "no mount below $LAB or of a CNI netns" "$(awk -v lab="$LAB/" 'index($5, lab) == 1 || $5 ~ "/netns/cni-" {print $5}' /proc/self/mountinfo)"
check "no loop device backed by the lab" "$(losetup -a 2>/dev/null | grep -F "$LAB/" || true)"
check "no bridge $BRIDGE and no veth on it" "$(ip -o link show "$BRIDGE" 2>/dev/null; ip -o link show master "$BRIDGE" 2>/dev/null)"
check "no blackhole route of the cluster" "$(ip route show type blackhole | grep -E "$SERVICE_CIDR|$POD_CIDR" || true)"
rules=""
for cmd in iptables ip6tables; do
	for t in filter nat mangle; do rules+=$($cmd-save -t "$t" 2>/dev/null | grep -E 'KUBE-|CNI-|vimg-lab' || true); done
done
check "no iptables rule or chain of the cluster" "$rules"
check "no kubepods or k8s.io cgroup" "$(ls -d /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/*/k8s.io /sys/fs/cgroup/kubepods 2>/dev/null || true)"
diffs=""
if [ -f "$SYSCTL_ORIG" ]; then
	while IFS== read -r k v; do
		now=$(sysctl -n "$k" 2>/dev/null)
		[ "$now" = "$v" ] || diffs+="$k is $now, was $v"$'\n'
	done <"$SYSCTL_ORIG"
else
	diffs="no record of the original sysctls in $SYSCTL_ORIG"
fi
check "sysctls restored" "${diffs%$'\n'}"
check "no network namespace of the cluster" "$(ls /run/netns 2>/dev/null | grep '^cni-' || true)"

echo "clean-check: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
