#!/usr/bin/env bash
# Deploys vimg into the local cluster, the way an installation does it:
# our one image (vimg, dvcr, vimg-controller, vimg-populator, vimg-csi) is built here and imported
# into the node's containerd, then `kubectl apply -k deploy` runs with the
# image tag set to the content hash of the binaries, so a changed build
# always rolls out and an unchanged one is a no-op.
#
#   tests/cluster/deploy.sh          build, load, apply, wait until ready
#   tests/cluster/deploy.sh delete   delete every image, then everything applied
set -euo pipefail
source "$(dirname "$0")/lib.sh"

IMAGE=localhost/vimg/vimg
# The external-provisioner's image, tagged by its binary's content.
PROVISIONER_IMAGE=localhost/vimg-lab/csi-provisioner:$(sha256sum "$BIN/csi-provisioner" | cut -c1-16)
OVERLAY=$LAB/deploy
UPLOAD_NODE_PORT=30443

cluster_up || die "the cluster is not up: run make cluster-up"

if [ "${1:-}" = delete ]; then
	if kubectl_lab get crd virtualimages.virtualization.deckhouse.io >/dev/null 2>&1; then
		# Images first, while the controller still runs to release their
		# finalizers (and delete their data).
		kubectl_lab delete vi --all -A --wait=true --timeout=120s || true
		kubectl_lab delete cvi --all --wait=true --timeout=120s || true
	fi
	if [ -d "$OVERLAY" ]; then
		kubectl_lab delete -k "$OVERLAY" --ignore-not-found --wait=true --timeout=180s
	else
		kubectl_lab delete -k "$REPO/deploy" --ignore-not-found --wait=true --timeout=180s
	fi
	log "vimg removed from the cluster"
	exit 0
fi

cd "$REPO"
make --no-print-directory build >&2
mkdir -p "$IMAGES" "$OVERLAY"
tag=$(cat bin/vimg bin/dvcr bin/vimg-controller bin/vimg-populator bin/vimg-csi | sha256sum | cut -c1-16)
# The worker fetches HTTPS sources, so the image carries the CA roots.
"$BIN/imgtool" -ref "$IMAGE:$tag" -out "$IMAGES/vimg.tar" -user 65532:65532 \
	-file bin/vimg:/usr/bin/vimg -file bin/dvcr:/usr/bin/dvcr -file bin/vimg-controller:/usr/bin/vimg-controller -file bin/vimg-populator:/usr/bin/vimg-populator -file bin/vimg-csi:/usr/bin/vimg-csi \
	-file /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt -entrypoint /usr/bin/vimg
ctr --address "$CTR_SOCK" -n k8s.io images import "$IMAGES/vimg.tar" >/dev/null
log "loaded $IMAGE:$tag"
# The CSI driver's external-provisioner, from the binary up.sh runs too.
"$BIN/imgtool" -ref "$PROVISIONER_IMAGE" -out "$IMAGES/csi-provisioner.tar" -user 65532:65532 \
	-file "$BIN/csi-provisioner:/csi-provisioner" -entrypoint /csi-provisioner
ctr --address "$CTR_SOCK" -n k8s.io images import "$IMAGES/csi-provisioner.tar" >/dev/null

# kustomize takes bases by relative path only.
base=$(realpath --relative-to="$OVERLAY" "$REPO/deploy")
cat >"$OVERLAY/kustomization.yaml" <<YAML
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
- $base
images:
- name: $IMAGE
  newTag: "$tag"
- name: registry.k8s.io/sig-storage/csi-provisioner
  newName: ${PROVISIONER_IMAGE%:*}
  newTag: ${PROVISIONER_IMAGE##*:}
# The upload gateway is reached from this machine (vimg upload, the demo) on
# a NodePort of the node's address, which the controller publishes as the
# external upload URL (and puts in the gateway's certificate).
patches:
- target: {kind: Service, name: vimg-upload}
  patch: |-
    - {op: add, path: /spec/type, value: NodePort}
    - {op: add, path: /spec/ports/0/nodePort, value: $UPLOAD_NODE_PORT}
- target: {kind: Deployment, name: vimg-controller}
  patch: |-
    - {op: add, path: /spec/template/spec/containers/0/args/-, value: "--upload-external-url=https://$NODE_IP:$UPLOAD_NODE_PORT"}
# The kubelet's directory and the CSI node plugin's state are the lab's.
- target: {kind: DaemonSet, name: vimg-csi-node}
  patch: |-
    - {op: replace, path: /spec/template/spec/volumes/0/hostPath/path, value: "$KUBELET_ROOT"}
    - {op: replace, path: /spec/template/spec/containers/0/volumeMounts/0/mountPath, value: "$KUBELET_ROOT"}
    - {op: replace, path: /spec/template/spec/volumes/1/hostPath/path, value: "$LAB/vimg-csi"}
    - {op: replace, path: /spec/template/spec/containers/0/volumeMounts/1/mountPath, value: "$LAB/vimg-csi"}
    - {op: replace, path: /spec/template/spec/containers/0/args/1, value: "--endpoint=unix://$KUBELET_ROOT/plugins/images.vimg.dev/csi.sock"}
    - {op: replace, path: /spec/template/spec/containers/0/args/2, value: "--registration-dir=$KUBELET_ROOT/plugins_registry"}
    - {op: replace, path: /spec/template/spec/containers/0/args/3, value: "--state-dir=$LAB/vimg-csi"}
    - {op: add, path: /spec/template/spec/containers/0/args/-, value: "--v=2"}
# Tests give up a clone the driver refuses sooner than a cluster would.
- target: {kind: Deployment, name: vimg-populator}
  patch: |-
    - {op: add, path: /spec/template/spec/containers/0/args, value: ["--clone-timeout=20s"]}
YAML
# CRDs first: deploy/ also holds objects of kinds they define
# (VolumePopulator), which a single apply cannot map before they exist.
kubectl_lab apply -f "$REPO/deploy/crds" >&2
kubectl_lab wait --for condition=established --timeout=60s -f "$REPO/deploy/crds" >&2
kubectl_lab apply -k "$OVERLAY" >&2
kubectl_lab -n vimg-system rollout status deploy/vimg-controller --timeout=180s >&2
kubectl_lab -n vimg-system rollout status deploy/vimg-dvcr --timeout=180s >&2
kubectl_lab -n vimg-system rollout status deploy/vimg-populator --timeout=180s >&2
kubectl_lab -n vimg-system rollout status deploy/vimg-upload --timeout=180s >&2
kubectl_lab -n vimg-csi rollout status deploy/vimg-csi-controller --timeout=180s >&2
kubectl_lab -n vimg-csi rollout status daemonset/vimg-csi-node --timeout=180s >&2
log "vimg is deployed (image $IMAGE:$tag)"
