package populator

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/record"
	"k8s.io/utils/ptr"
)

// cloneWorld is an image stored in claim vi-img-u1 (class "fast", 68Mi,
// Bound) and a user's Filesystem claim "copy" of 1Gi of the same class
// naming it.
func cloneWorld(cloning bool) (*corev1.PersistentVolumeClaim, *corev1.PersistentVolumeClaim, *storagev1.StorageClass) {
	src := &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: "vi-img-u1", Namespace: "ns", UID: "s1"},
		Spec:       corev1.PersistentVolumeClaimSpec{StorageClassName: ptr.To("fast"), VolumeName: "pv-src"},
		Status: corev1.PersistentVolumeClaimStatus{Phase: corev1.ClaimBound,
			Capacity: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("68Mi")}},
	}
	pvc := &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: "copy", Namespace: "ns", UID: "c1", Annotations: map[string]string{annSelectedNode: "node-a"}},
		Spec: corev1.PersistentVolumeClaimSpec{
			StorageClassName: ptr.To("fast"),
			AccessModes:      []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			Resources:        corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")}},
			DataSourceRef:    &corev1.TypedObjectReference{APIGroup: ptr.To("virtualization.deckhouse.io"), Kind: "VirtualImage", Name: "img"},
		},
	}
	sc := &storagev1.StorageClass{ObjectMeta: metav1.ObjectMeta{Name: "fast"}, Provisioner: "x"}
	if cloning {
		sc.Annotations = map[string]string{AnnotationCSIClone: "true"}
	}
	return src, pvc, sc
}

func (f *fixture) prime() *corev1.PersistentVolumeClaim {
	return &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: "prime-c1", Namespace: "vimg-populate"},
		Spec: corev1.PersistentVolumeClaimSpec{
			StorageClassName: ptr.To("fast"),
			Resources:        corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")}},
		},
	}
}

// TestClone_OnlyCopiesACSICloneCanMakeAreCloned: the prime claim of a copy
// is made unbindable (no class, a selector nothing matches) exactly when a
// clone can be made; otherwise it is left as the library made it.
func TestClone_OnlyCopiesACSICloneCanMakeAreCloned(t *testing.T) {
	for name, tc := range map[string]struct {
		change func(src, pvc *corev1.PersistentVolumeClaim, sc *storagev1.StorageClass)
		clone  bool
	}{
		"same class, larger, Filesystem": {func(_, _ *corev1.PersistentVolumeClaim, _ *storagev1.StorageClass) {}, true},
		"class does not clone": {func(_, _ *corev1.PersistentVolumeClaim, sc *storagev1.StorageClass) {
			sc.Annotations = nil
		}, false},
		"Block": {func(_, pvc *corev1.PersistentVolumeClaim, _ *storagev1.StorageClass) {
			pvc.Spec.VolumeMode = ptr.To(corev1.PersistentVolumeBlock)
		}, false},
		"another class": {func(src, _ *corev1.PersistentVolumeClaim, _ *storagev1.StorageClass) {
			src.Spec.StorageClassName = ptr.To("slow")
		}, false},
		"smaller than the image's claim": {func(_, pvc *corev1.PersistentVolumeClaim, _ *storagev1.StorageClass) {
			pvc.Spec.Resources.Requests[corev1.ResourceStorage] = resource.MustParse("64Mi")
		}, false},
		"image's claim not bound": {func(src, _ *corev1.PersistentVolumeClaim, _ *storagev1.StorageClass) {
			src.Status.Phase = corev1.ClaimPending
		}, false},
		"clone given up before": {func(_, pvc *corev1.PersistentVolumeClaim, _ *storagev1.StorageClass) {
			pvc.Annotations[AnnotationCloneFailed] = "not bound within 3m"
		}, false},
	} {
		t.Run(name, func(t *testing.T) {
			src, pvc, sc := cloneWorld(true)
			tc.change(src, pvc, sc)
			f := newFixture(t, src, pvc, sc)
			f.vis = append(f.vis, pvcImage())
			f.refresh()
			got := mustMutate(t, f)
			cloned := got.Annotations[AnnotationCloneSource] == "vi-img-u1"
			if cloned != tc.clone {
				t.Fatalf("cloned = %v, want %v (prime %+v)", cloned, tc.clone, got)
			}
			if !tc.clone {
				if ptr.Deref(got.Spec.StorageClassName, "") != "fast" || got.Spec.Selector != nil {
					t.Errorf("a streamed copy's prime claim was changed: %+v", got.Spec)
				}
				return
			}
			if ptr.Deref(got.Spec.StorageClassName, "-") != "" || got.Spec.Selector == nil ||
				got.Spec.Selector.MatchLabels[LabelCloneOf] != "c1" {
				t.Errorf("a clone's prime claim can still bind or be provisioned: %+v", got.Spec)
			}
			if ns, name := claimOf(got); ns != "ns" || name != "copy" {
				t.Errorf("the prime claim serves %s/%s, want ns/copy", ns, name)
			}
		})
	}
}

// TestClone_CloneClaimIsMadeThenItsVolumeHandedToThePrimeClaim walks the
// clone through: the clone claim beside the user's, on the chosen node;
// its volume handed to the prime claim once bound; the clone claim
// deleted once the prime claim holds the volume.
func TestClone_CloneClaimIsMadeThenItsVolumeHandedToThePrimeClaim(t *testing.T) {
	src, pvc, sc := cloneWorld(true)
	f := newFixture(t, src, pvc, sc)
	f.vis = append(f.vis, pvcImage())
	f.refresh()
	prime := mustMutate(t, f)
	prime.UID = "p1"
	if _, err := f.kube.CoreV1().PersistentVolumeClaims("vimg-populate").Create(context.Background(), prime, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	if err := f.sync("copy"); !errors.Is(err, errNotDone) {
		t.Fatalf("sync = %v, want errNotDone while the clone is pending", err)
	}
	cl := f.pvc("ns", "vimg-clone-c1")
	if ds := cl.Spec.DataSource; ds == nil || ds.Kind != "PersistentVolumeClaim" || ds.Name != "vi-img-u1" {
		t.Errorf("clone claim's data source = %+v, want claim vi-img-u1", ds)
	}
	if ptr.Deref(cl.Spec.StorageClassName, "") != "fast" || ptr.Deref(cl.Spec.VolumeMode, "") != corev1.PersistentVolumeFilesystem ||
		cl.Annotations[annSelectedNode] != "node-a" || cl.Labels[LabelComponent] != componentClone {
		t.Errorf("clone claim = %+v", cl)
	}
	if len(cl.OwnerReferences) != 1 || cl.OwnerReferences[0].UID != "c1" {
		t.Errorf("clone claim's owners = %+v, want the user's claim", cl.OwnerReferences)
	}

	// Provisioned: the volume goes to the prime claim.
	cl.UID = "k1"
	cl.Spec.VolumeName = "pv-clone"
	cl.Status.Phase = corev1.ClaimBound
	if _, err := f.kube.CoreV1().PersistentVolumeClaims("ns").Update(context.Background(), cl, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	pv := &corev1.PersistentVolume{ObjectMeta: metav1.ObjectMeta{Name: "pv-clone"},
		Spec: corev1.PersistentVolumeSpec{ClaimRef: &corev1.ObjectReference{Namespace: "ns", Name: "vimg-clone-c1", UID: "k1"}}}
	if _, err := f.kube.CoreV1().PersistentVolumes().Create(context.Background(), pv, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := f.sync("copy"); !errors.Is(err, errNotDone) {
		t.Fatalf("sync = %v, want errNotDone until the prime claim is bound", err)
	}
	pv, _ = f.kube.CoreV1().PersistentVolumes().Get(context.Background(), "pv-clone", metav1.GetOptions{})
	if cr := pv.Spec.ClaimRef; cr.Namespace != "vimg-populate" || cr.Name != "prime-c1" || cr.UID != "p1" {
		t.Errorf("cloned volume's claimRef = %+v, want the prime claim", cr)
	}
	if pv.Annotations[AnnotationClonedFrom] != "ns/vi-img-u1" {
		t.Errorf("cloned volume's annotations = %v", pv.Annotations)
	}

	// Bound to the prime claim: the clone claim, now Lost, goes.
	prime.Spec.VolumeName = "pv-clone"
	if _, err := f.kube.CoreV1().PersistentVolumeClaims("vimg-populate").Update(context.Background(), prime, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := f.sync("copy"); err != nil {
		t.Fatal(err)
	}
	if _, err := f.kube.CoreV1().PersistentVolumeClaims("ns").Get(context.Background(), "vimg-clone-c1", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("clone claim left behind: %v", err)
	}
}

// TestClone_ACloneNeverBoundFallsBackToAStreamedCopy: past the timeout the
// clone is given up, the user is told why, and the next prime claim is an
// ordinary one.
func TestClone_ACloneNeverBoundFallsBackToAStreamedCopy(t *testing.T) {
	src, pvc, sc := cloneWorld(true)
	f := newFixture(t, src, pvc, sc)
	f.c.w.cfg.CloneTimeout = time.Minute
	f.vis = append(f.vis, pvcImage())
	f.refresh()
	prime := mustMutate(t, f)
	if _, err := f.kube.CoreV1().PersistentVolumeClaims("vimg-populate").Create(context.Background(), prime, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := f.sync("copy"); !errors.Is(err, errNotDone) {
		t.Fatalf("sync = %v, want errNotDone", err)
	}
	cl := f.pvc("ns", "vimg-clone-c1")
	cl.CreationTimestamp = metav1.NewTime(time.Now().Add(-2 * time.Minute))
	if _, err := f.kube.CoreV1().PersistentVolumeClaims("ns").Update(context.Background(), cl, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := f.sync("copy"); err != nil {
		t.Fatal(err)
	}
	got := f.pvc("ns", "copy")
	if why := got.Annotations[AnnotationCloneFailed]; !strings.Contains(why, "vimg-clone-c1") || !strings.Contains(why, "1m0s") {
		t.Errorf("%s = %q, want the clone claim and the timeout", AnnotationCloneFailed, why)
	}
	for _, key := range []string{"ns/vimg-clone-c1", "vimg-populate/prime-c1"} {
		ns, name, _ := strings.Cut(key, "/")
		if _, err := f.kube.CoreV1().PersistentVolumeClaims(ns).Get(context.Background(), name, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
			t.Errorf("%s left behind: %v", key, err)
		}
	}
	if ev := drain(f.event); !strings.Contains(ev, ReasonCloneFailed) {
		t.Errorf("events %q, want %s", ev, ReasonCloneFailed)
	}
	f.refresh()
	next := mustMutate(t, f)
	if next.Annotations[AnnotationCloneSource] != "" || ptr.Deref(next.Spec.StorageClassName, "") != "fast" {
		t.Errorf("the next prime claim is still a clone's: %+v", next)
	}

	// A pass that still sees the deleted prime claim in its cache makes
	// no clone.
	if err := f.c.clone(context.Background(), f.pvc("ns", "copy"), prime); err != nil {
		t.Fatal(err)
	}
	if _, err := f.kube.CoreV1().PersistentVolumeClaims("ns").Get(context.Background(), "vimg-clone-c1", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("a clone claim was made for a prime claim that is gone: %v", err)
	}
	// And a clone claim left over all the same goes once the ordinary
	// prime claim is there.
	if _, err := f.kube.CoreV1().PersistentVolumeClaims("ns").Create(context.Background(), cl, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.kube.CoreV1().PersistentVolumeClaims("vimg-populate").Create(context.Background(), next, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := f.sync("copy"); err != nil {
		t.Fatal(err)
	}
	if _, err := f.kube.CoreV1().PersistentVolumeClaims("ns").Get(context.Background(), "vimg-clone-c1", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("the clone claim left over is still there: %v", err)
	}
}

func drain(r *record.FakeRecorder) string {
	var out []string
	for {
		select {
		case e := <-r.Events:
			out = append(out, e)
		default:
			return strings.Join(out, "\n")
		}
	}
}

func mustMutate(t *testing.T, f *fixture) *corev1.PersistentVolumeClaim {
	t.Helper()
	p, err := f.c.mutatePrime(f.prime())
	if err != nil {
		t.Fatal(err)
	}
	return p
}
