package image

import (
	"context"
	"encoding/json"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "vimg.dev/vimg/pkg/apis/virtualization/v1alpha2"
	"vimg.dev/vimg/pkg/worker/api"
)

func pvcVI(name string, class *string) *v1.VirtualImage {
	vi := httpVI(name)
	vi.Spec.Storage = v1.StoragePersistentVolumeClaim
	if class != nil {
		vi.Spec.PersistentVolumeClaim = &v1.VirtualImagePersistentVolumeClaim{StorageClassName: class}
	}
	return vi
}

func storageClass(name string, isDefault bool, mode storagev1.VolumeBindingMode) *storagev1.StorageClass {
	sc := &storagev1.StorageClass{ObjectMeta: metav1.ObjectMeta{Name: name}, Provisioner: "test.csi", VolumeBindingMode: &mode}
	if isDefault {
		sc.Annotations = map[string]string{annotationDefaultClass: "true"}
	}
	return sc
}

func readyNode(name string, ready bool) *corev1.Node {
	st := corev1.ConditionTrue
	if !ready {
		st = corev1.ConditionFalse
	}
	return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name},
		Status: corev1.NodeStatus{Conditions: []corev1.NodeCondition{{Type: corev1.NodeReady, Status: st}}}}
}

func (e *env) claim(name string) *corev1.PersistentVolumeClaim {
	e.t.Helper()
	var c corev1.PersistentVolumeClaim
	err := e.c.Get(context.Background(), types.NamespacedName{Namespace: "ns", Name: name}, &c)
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		e.t.Fatal(err)
	}
	return &c
}

// probed runs the image's probe pod to success with a qcow2 of virtual
// bytes and returns the claim the controller made from it.
func (e *env) probed(name string, virtual int64) *corev1.PersistentVolumeClaim {
	e.t.Helper()
	e.reconcileVI(name)
	pods := e.pods()
	if len(pods) != 1 {
		e.t.Fatalf("%d probe pods, want 1", len(pods))
	}
	if cmd := strings.Join(pods[0].Spec.Containers[0].Command, " "); !strings.HasSuffix(cmd, "worker probe") {
		e.t.Fatalf("the pod runs %q, want the probe", cmd)
	}
	e.updatePod(&pods[0], func(p *corev1.Pod) {
		terminated(p, corev1.PodSucceeded, api.Outcome{Result: &api.Result{Format: "qcow2", VirtualSize: virtual, SourceSize: virtual / 3}}, e.now)
	})
	e.reconcileVI(name)
	vi := e.getVI(name)
	c := e.claim(api.ImageClaimName(name, string(vi.UID)))
	if c == nil {
		e.t.Fatalf("no claim after the probe; status %+v", vi.Status)
	}
	return c
}

func TestPVC_MissingClassIsPendingUntilItAppears(t *testing.T) {
	e := newEnv(t, pvcVI("img", ptr.To("fast")), readyNode("n1", true))
	e.reconcileVI("img")
	st := e.getVI("img").Status
	c := condition(st.ImageStatus, v1.ConditionStorageClassReady)
	if st.Phase != v1.ImagePhasePending || c.Status != metav1.ConditionFalse || c.Reason != reasonStorageClassNotFound || !strings.Contains(c.Message, `StorageClass "fast" not found`) {
		t.Fatalf("phase %s StorageClassReady %+v", st.Phase, c)
	}
	if n := len(e.pods()); n != 0 {
		t.Fatalf("%d pods started without a class", n)
	}
	if err := e.c.Create(context.Background(), storageClass("fast", false, storagev1.VolumeBindingImmediate)); err != nil {
		t.Fatal(err)
	}
	e.reconcileVI("img")
	st = e.getVI("img").Status
	if c := condition(st.ImageStatus, v1.ConditionStorageClassReady); c.Status != metav1.ConditionTrue || st.StorageClassName != "fast" || len(e.pods()) != 1 {
		t.Fatalf("StorageClassReady %+v class %q pods %d", c, st.StorageClassName, len(e.pods()))
	}
}

func TestPVC_NoClassAnywhereSaysSo(t *testing.T) {
	e := newEnv(t, pvcVI("img", nil), storageClass("other", false, storagev1.VolumeBindingImmediate))
	e.reconcileVI("img")
	c := condition(e.getVI("img").Status.ImageStatus, v1.ConditionStorageClassReady)
	if c.Reason != reasonNoDefaultClass || !strings.Contains(c.Message, "no default StorageClass") {
		t.Fatalf("StorageClassReady %+v", c)
	}
}

func TestPVC_ProbeMakesTheClaimOnANodeAndHandsOverTheSource(t *testing.T) {
	e := newEnv(t, pvcVI("img", nil), storageClass("old-default", true, storagev1.VolumeBindingImmediate),
		storageClass("local", true, storagev1.VolumeBindingWaitForFirstConsumer),
		readyNode("a-down", false), readyNode("b-up", true), readyNode("c-up", true))
	// The newest default class wins, as the API server picks it.
	var sc storagev1.StorageClass
	_ = e.c.Get(context.Background(), types.NamespacedName{Name: "local"}, &sc)
	sc.CreationTimestamp = metav1.Unix(2_000_000_000, 0)
	if err := e.c.Update(context.Background(), &sc); err != nil {
		t.Fatal(err)
	}
	c := e.probed("img", 100<<20)

	want := api.FilesystemClaimSize(100<<20, api.DefaultFilesystemOverhead)
	if q := c.Spec.Resources.Requests[corev1.ResourceStorage]; q.Value() != want || want < 100<<20 {
		t.Fatalf("claim requests %s, want %d bytes", q.String(), want)
	}
	if r := c.Spec.DataSourceRef; r == nil || *r.APIGroup != v1.GroupName || r.Kind != "VirtualImage" || r.Name != "img" {
		t.Fatalf("dataSourceRef %+v", c.Spec.DataSourceRef)
	}
	if *c.Spec.StorageClassName != "local" || c.Annotations[annotationSelectedNode] != "b-up" || *c.Spec.VolumeMode != corev1.PersistentVolumeFilesystem {
		t.Fatalf("class %s node %q mode %s", *c.Spec.StorageClassName, c.Annotations[annotationSelectedNode], *c.Spec.VolumeMode)
	}
	vi := e.getVI("img")
	if !metav1.IsControlledBy(c, vi) {
		t.Fatalf("claim owners %+v", c.OwnerReferences)
	}
	if vi.Status.Target.PersistentVolumeClaimName != c.Name || vi.Status.StorageClassName != "local" || vi.Status.Phase != v1.ImagePhaseProvisioning || vi.Status.Format != "qcow2" {
		t.Fatalf("status %+v", vi.Status)
	}
	var sec corev1.Secret
	if err := e.c.Get(context.Background(), types.NamespacedName{Namespace: "vimg-populate", Name: api.SourceSecretName("uid-img")}, &sec); err != nil {
		t.Fatal(err)
	}
	var req api.Request
	if err := json.Unmarshal(sec.Data[api.RequestFile], &req); err != nil {
		t.Fatal(err)
	}
	if req.Source.URL != "https://images.example/disk.qcow2" || len(req.Checksums) != 1 {
		t.Fatalf("source request %+v", req)
	}
	if _, ok := sec.Data[api.SourceTrustedCAKey]; !ok {
		t.Fatalf("the source secret has no %s key (the pod mounts it)", api.SourceTrustedCAKey)
	}
	if n := len(e.pods()); n != 0 {
		t.Fatalf("%d probe pods left once the claim exists", n)
	}
	e.reconcileVI("img") // idempotent
	if n := len(e.pods()); n != 0 {
		t.Fatalf("a second probe started: %d pods", n)
	}
}

func TestPVC_PopulatorProgressThenResultIsReadyAndLosingTheClaimIsPVCLost(t *testing.T) {
	e := newEnv(t, pvcVI("img", ptr.To("fast")), storageClass("fast", false, storagev1.VolumeBindingImmediate))
	c := e.probed("img", 64<<20)
	c.Annotations[api.ClaimAnnotationProgress] = "42.5%"
	if err := e.c.Update(context.Background(), c); err != nil {
		t.Fatal(err)
	}
	// The class going away no longer concerns a claim that exists.
	if err := e.c.Delete(context.Background(), storageClass("fast", false, storagev1.VolumeBindingImmediate)); err != nil {
		t.Fatal(err)
	}
	e.reconcileVI("img")
	if st := e.getVI("img").Status; st.Progress != "42.5%" || st.Phase != v1.ImagePhaseProvisioning {
		t.Fatalf("phase %s progress %q", st.Phase, st.Progress)
	}
	res, _ := json.Marshal(api.PopulateResult{VirtualSize: 64 << 20, DiskSize: 64 << 20, Format: "qcow2", SourceSize: 20 << 20})
	c = e.claim(c.Name)
	c.Annotations[api.ClaimAnnotationResult] = string(res)
	c.Annotations[api.ClaimAnnotationProgress] = "100%"
	bound := corev1.PersistentVolumeClaimStatus{Phase: corev1.ClaimBound,
		Capacity: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("69Mi")}}
	if err := e.c.Update(context.Background(), c); err != nil {
		t.Fatal(err)
	}
	c.Status = bound
	if err := e.c.Status().Update(context.Background(), c); err != nil {
		t.Fatal(err)
	}
	e.reconcileVI("img")
	st := e.getVI("img").Status
	if st.Phase != v1.ImagePhaseReady || st.Progress != "100%" || st.Format != "qcow2" || st.Size.UnpackedBytes != "67108864" || st.Size.Stored != "69.0Mi" {
		t.Fatalf("status %+v", st)
	}
	err := e.c.Get(context.Background(), types.NamespacedName{Namespace: "vimg-populate", Name: api.SourceSecretName("uid-img")}, &corev1.Secret{})
	if !apierrors.IsNotFound(err) {
		t.Fatalf("the source secret outlived the import: %v", err)
	}
	if err := e.c.Delete(context.Background(), c); err != nil {
		t.Fatal(err)
	}
	e.reconcileVI("img")
	st = e.getVI("img").Status
	if c := condition(st.ImageStatus, v1.ConditionReady); st.Phase != v1.ImagePhasePVCLost || c.Reason != v1.ReasonPVCLost {
		t.Fatalf("phase %s Ready %+v", st.Phase, c)
	}
	if n := len(e.pods()); n != 0 || e.claim(c.Name) != nil {
		t.Fatalf("PVCLost imported again: %d pods", n)
	}
}

func TestPVC_PopulatorErrorIsFailedAndTheClaimGoes(t *testing.T) {
	e := newEnv(t, pvcVI("img", ptr.To("fast")), storageClass("fast", false, storagev1.VolumeBindingImmediate))
	c := e.probed("img", 64<<20)
	c.Annotations[api.ClaimAnnotationError] = "ChecksumMismatch: the source's sha256 is 00…, not ab…"
	if err := e.c.Update(context.Background(), c); err != nil {
		t.Fatal(err)
	}
	e.reconcileVI("img")
	e.reconcileVI("img")
	st := e.getVI("img").Status
	if c := condition(st.ImageStatus, v1.ConditionReady); st.Phase != v1.ImagePhaseFailed || !strings.Contains(c.Message, "ChecksumMismatch") {
		t.Fatalf("phase %s Ready %+v", st.Phase, c)
	}
	if e.claim(c.Name) != nil || len(e.pods()) != 0 {
		t.Fatal("a Failed image kept its claim or started a pod")
	}
}

func TestPVC_CopyOfAReadyImageSizesTheClaimWithoutAProbe(t *testing.T) {
	src := httpVI("src")
	src.Status = v1.VirtualImageStatus{Phase: v1.ImagePhaseReady, ImageStatus: v1.ImageStatus{Format: "iso", CDROM: true,
		Size: v1.ImageSize{UnpackedBytes: "10485760"}}}
	vi := pvcVI("copy", ptr.To("fast"))
	vi.Spec.DataSource = v1.VirtualImageDataSource{Type: v1.DataSourceTypeObjectRef,
		ObjectRef: &v1.VirtualImageObjectRef{Kind: v1.ObjectRefKindVirtualImage, Name: "src"}}
	e := newEnv(t, src, vi, storageClass("fast", false, storagev1.VolumeBindingImmediate))
	e.reconcileVI("copy")
	c := e.claim(api.ImageClaimName("copy", "uid-copy"))
	if c == nil || len(e.pods()) != 0 {
		t.Fatalf("claim %v, %d pods; want a claim and no probe", c, len(e.pods()))
	}
	if q := c.Spec.Resources.Requests[corev1.ResourceStorage]; q.Value() != api.FilesystemClaimSize(10<<20, api.DefaultFilesystemOverhead) {
		t.Fatalf("claim requests %s", q.String())
	}
	if st := e.getVI("copy").Status; !st.CDROM || st.Format != "iso" || st.SourceUID == nil || *st.SourceUID != "uid-src" {
		t.Fatalf("status %+v", st)
	}
}

func TestPVC_DeletingTheImageDeletesItsClaimAndSource(t *testing.T) {
	e := newEnv(t, pvcVI("img", ptr.To("fast")), storageClass("fast", false, storagev1.VolumeBindingImmediate))
	c := e.probed("img", 64<<20)
	if err := e.c.Delete(context.Background(), e.getVI("img")); err != nil {
		t.Fatal(err)
	}
	e.reconcileVI("img")
	if e.claim(c.Name) != nil {
		t.Fatal("the claim outlived its image")
	}
	var secrets corev1.SecretList
	if err := e.c.List(context.Background(), &secrets, client.InNamespace("vimg-populate")); err != nil || len(secrets.Items) != 0 {
		t.Fatalf("source secrets left: %d (%v)", len(secrets.Items), err)
	}
}

func TestPVC_AnImageInAClaimCopiesAnotherOnlyIntoAClaim(t *testing.T) {
	src := pvcVI("src", ptr.To("fast"))
	src.Status = v1.VirtualImageStatus{Phase: v1.ImagePhaseReady, ImageStatus: v1.ImageStatus{Format: "qcow2", Size: v1.ImageSize{UnpackedBytes: "10485760"}}}
	ref := v1.VirtualImageDataSource{Type: v1.DataSourceTypeObjectRef, ObjectRef: &v1.VirtualImageObjectRef{Kind: v1.ObjectRefKindVirtualImage, Name: "src"}}
	inClaim := pvcVI("in-claim", ptr.To("fast"))
	inClaim.Spec.DataSource = ref
	inDVCR := httpVI("in-dvcr")
	inDVCR.Spec.DataSource = ref
	e := newEnv(t, src, inClaim, inDVCR, storageClass("fast", false, storagev1.VolumeBindingImmediate))
	e.reconcileVI("in-claim")
	if c := e.claim(api.ImageClaimName("in-claim", "uid-in-claim")); c == nil {
		t.Fatalf("no claim for a copy of an image stored in a claim; status %+v", e.getVI("in-claim").Status)
	}
	e.reconcileVI("in-dvcr")
	st := e.getVI("in-dvcr").Status
	if c := condition(st.ImageStatus, v1.ConditionDatasourceReady); st.Phase != v1.ImagePhasePending || c.Reason != reasonNotSupported {
		t.Fatalf("a DVCR copy of an image in a claim: phase %s %+v", st.Phase, c)
	}
}
