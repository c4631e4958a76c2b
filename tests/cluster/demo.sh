#!/usr/bin/env bash
# The main job, end to end, on the local cluster: vimg deployed the way an
# installation is, a disk image made with qemu-img served over HTTP from
# this machine and imported into DVCR as a VirtualImage, a Debian ISO
# uploaded with `vimg upload` as a ClusterVirtualImage, a copy of it made
# inside DVCR, a VirtualImage stored in a claim of its own (filled straight
# from HTTP), and a Block PersistentVolumeClaim filled from the VirtualImage
# in DVCR by the volume populator, read by a pod; and the ISO as a CD-ROM
# volume of the CSI driver images.vimg.dev, read by a pod.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

"$HERE/deploy.sh"

DEMO=$LAB/demo
mkdir -p "$DEMO/www"
if [ ! -f "$DEMO/www/cirros-like.qcow2" ]; then
	log "making a 256 MiB qcow2 with qemu-img (some data, mostly holes)"
	qemu-img create -q -f qcow2 "$DEMO/www/cirros-like.qcow2" 256M
	qemu-io -f qcow2 -c 'write -P 0x5a 0 8M' -c 'write -P 0xa5 128M 4M' "$DEMO/www/cirros-like.qcow2" >/dev/null
	xz -T2 -k -c "$DEMO/www/cirros-like.qcow2" >"$DEMO/www/cirros-like.qcow2.xz"
	cp /usr/lib/grub-rescue/grub-rescue-cdrom.iso "$DEMO/www/rescue.iso"
fi
# A plain HTTP server on the node's bridge address, where pods reach it.
if ! is_running demo-httpd; then
	start demo-httpd busybox httpd -f -p "$NODE_IP:8099" -h "$DEMO/www"
fi
base=http://$NODE_IP:8099
kubectl_lab create namespace vimg-demo --dry-run=client -o yaml | kubectl_lab apply -f - >/dev/null
kubectl_lab apply -f - <<YAML
apiVersion: virtualization.deckhouse.io/v1alpha2
kind: VirtualImage
metadata:
  name: cirros-like
  namespace: vimg-demo
spec:
  storage: ContainerRegistry
  dataSource:
    type: HTTP
    http:
      url: $base/cirros-like.qcow2.xz
---
apiVersion: virtualization.deckhouse.io/v1alpha2
kind: VirtualImage
metadata:
  name: cirros-like-pvc
  namespace: vimg-demo
spec:
  storage: PersistentVolumeClaim
  dataSource:
    type: HTTP
    http:
      url: $base/cirros-like.qcow2.xz
---
apiVersion: virtualization.deckhouse.io/v1alpha2
kind: VirtualImage
metadata:
  name: rescue-iso-copy
  namespace: vimg-demo
spec:
  storage: ContainerRegistry
  dataSource:
    type: ObjectRef
    objectRef:
      kind: ClusterVirtualImage
      name: rescue-iso
YAML
# The ISO by upload, through the gateway's external URL (a NodePort here),
# trusting the CA the controller made.
kubectl_lab -n vimg-system get configmap vimg-dvcr-ca -o jsonpath='{.data.ca\.crt}' >"$DEMO/ca.crt"
if [ "$(kubectl_lab get cvi rescue-iso -o jsonpath='{.status.phase}' 2>/dev/null)" != Ready ]; then
	"$REPO/bin/vimg" upload --create --cluster --kubeconfig "$ADMIN_KUBECONFIG" --cacert "$DEMO/ca.crt" \
		rescue-iso "$DEMO/www/rescue.iso"
fi
for i in $(seq 1 120); do
	phases=$(kubectl_lab get vi -n vimg-demo -o jsonpath='{.items[*].status.phase}'; echo -n ' '; kubectl_lab get cvi rescue-iso -o jsonpath='{.status.phase}')
	case "$phases" in *Failed*) break ;; esac
	[ "$(echo "$phases" | tr ' ' '\n' | grep -c '^Ready$')" = 4 ] && break
	sleep 1
done
echo
echo "== kubectl get vi,cvi -o wide (tests/cluster/kubectl talks to the cluster; make cluster-down stops it)"
kubectl_lab get vi -n vimg-demo -o wide
echo
kubectl_lab get cvi -o wide
echo
kubectl_lab get vi -n vimg-demo cirros-like -o jsonpath='{.status}' | head -c 2000; echo
case "$phases" in *Failed*) die "an image failed" ;; esac

# A claim filled from the image, as a VM's disk would be: a Block volume of
# any class whose dataSourceRef names the VirtualImage. The first consumer
# (a pod reading the disk's first bytes) picks the node.
kubectl_lab -n vimg-demo delete pod disk-reader --ignore-not-found >/dev/null
kubectl_lab apply -f - <<YAML
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: cirros-like-disk
  namespace: vimg-demo
spec:
  storageClassName: local-wffc
  volumeMode: Block
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 300Mi}}
  dataSourceRef:
    apiGroup: virtualization.deckhouse.io
    kind: VirtualImage
    name: cirros-like
---
apiVersion: v1
kind: Pod
metadata:
  name: disk-reader
  namespace: vimg-demo
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
  - name: read
    image: localhost/vimg-lab/busybox:1.35
    imagePullPolicy: Never
    command: [/bin/sh, -c, 'echo "disk: \$(blockdev --getsize64 /dev/xvda) bytes, first bytes:"; head -c 16 /dev/xvda | od -An -tx1']
    volumeDevices: [{name: disk, devicePath: /dev/xvda}]
  volumes:
  - name: disk
    persistentVolumeClaim: {claimName: cirros-like-disk}
YAML
for i in $(seq 1 180); do
	phase=$(kubectl_lab -n vimg-demo get pod disk-reader -o jsonpath='{.status.phase}')
	case "$phase" in Succeeded | Failed) break ;; esac
	sleep 1
done
echo
echo "== kubectl -n vimg-demo get pvc (cirros-like-pvc's own claim, and a claim filled from cirros-like by the populator)"
kubectl_lab -n vimg-demo get pvc -o wide
kubectl_lab -n vimg-demo get pvc cirros-like-disk -o jsonpath='{.metadata.annotations.vimg\.dev/populate-progress}{"\n"}'
kubectl_lab -n vimg-demo logs disk-reader
[ "$phase" = Succeeded ] || die "the disk reader did not succeed (pod phase ${phase:-unknown})"

# The uploaded ISO as a VM's CD-ROM: a claim of class vimg-cdrom naming the
# ClusterVirtualImage. Nothing is copied: the CSI driver images.vimg.dev
# serves it read-only from the node's cache, filled once from DVCR.
kubectl_lab -n vimg-demo delete pod cdrom-reader --ignore-not-found >/dev/null
kubectl_lab apply -f - <<YAML
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: rescue-cdrom
  namespace: vimg-demo
spec:
  storageClassName: vimg-cdrom
  accessModes: [ReadOnlyMany]
  resources: {requests: {storage: 1Mi}}
  dataSourceRef:
    apiGroup: virtualization.deckhouse.io
    kind: ClusterVirtualImage
    name: rescue-iso
---
apiVersion: v1
kind: Pod
metadata:
  name: cdrom-reader
  namespace: vimg-demo
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
  - name: read
    image: localhost/vimg-lab/busybox:1.35
    imagePullPolicy: Never
    command: [/bin/sh, -c, 'ls -ln /cdrom; echo "sha256 in the pod: \$(sha256sum /cdrom/disk.img | cut -d" " -f1)"; if echo x >> /cdrom/disk.img; then echo "write: accepted"; else echo "write: refused"; fi']
    volumeMounts: [{name: cdrom, mountPath: /cdrom, readOnly: true}]
  volumes:
  - name: cdrom
    persistentVolumeClaim: {claimName: rescue-cdrom, readOnly: true}
YAML
for i in $(seq 1 180); do
	phase=$(kubectl_lab -n vimg-demo get pod cdrom-reader -o jsonpath='{.status.phase}')
	case "$phase" in Succeeded | Failed) break ;; esac
	sleep 1
done
echo
echo "== the ISO as a CD-ROM volume (class vimg-cdrom, driver images.vimg.dev)"
kubectl_lab -n vimg-demo get pvc rescue-cdrom -o wide
kubectl_lab -n vimg-demo logs cdrom-reader 2>&1
echo "sha256 of the ISO:    $(sha256sum "$DEMO/www/rescue.iso" | cut -d' ' -f1)"
[ "$phase" = Succeeded ] || die "the CD-ROM reader did not succeed (pod phase ${phase:-unknown})"
kubectl_lab -n vimg-demo logs cdrom-reader | grep -q "write: refused" || die "the CD-ROM accepted a write"
kubectl_lab -n vimg-demo logs cdrom-reader | grep -q "sha256 in the pod: $(sha256sum "$DEMO/www/rescue.iso" | cut -d' ' -f1)" ||
	die "the CD-ROM does not hold the ISO"
