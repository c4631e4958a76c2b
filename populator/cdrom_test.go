package populator

import (
	"context"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/utils/ptr"
)

// cdromWorld is a user's claim "cd" of class vimg-cdrom (provisioned by
// the vimg CSI driver) naming VirtualImage img.
func cdromWorld() (*corev1.PersistentVolumeClaim, *storagev1.StorageClass) {
	pvc := &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: "cd", Namespace: "ns", UID: "c1"},
		Spec: corev1.PersistentVolumeClaimSpec{
			StorageClassName: ptr.To("vimg-cdrom"),
			AccessModes:      []corev1.PersistentVolumeAccessMode{corev1.ReadOnlyMany},
			Resources:        corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Mi")}},
			DataSourceRef:    &corev1.TypedObjectReference{APIGroup: ptr.To("virtualization.deckhouse.io"), Kind: "VirtualImage", Name: "img"},
		},
	}
	return pvc, &storagev1.StorageClass{ObjectMeta: metav1.ObjectMeta{Name: "vimg-cdrom"}, Provisioner: CSIDriver}
}

func cdromPrime() *corev1.PersistentVolumeClaim {
	return &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: "prime-c1", Namespace: "vimg-populate"},
		Spec:       corev1.PersistentVolumeClaimSpec{StorageClassName: ptr.To("vimg-cdrom")},
	}
}

// A Ready image in DVCR: the prime claim keeps the driver's class, names
// its claim (the driver's CreateVolume follows it back) and is marked
// served, so no pod is run for it and it is complete once bound.
func TestCDROM_PrimeClaimIsServedByTheDriverNotCopied(t *testing.T) {
	pvc, sc := cdromWorld()
	f := newFixture(t, pvc, sc)
	f.vis = append(f.vis, testImage("Ready", "ContainerRegistry", "dvcr:443/vi/ns/img:u1"))
	f.refresh()
	prime, err := f.c.mutatePrime(cdromPrime())
	if err != nil {
		t.Fatal(err)
	}
	if prime.Annotations[AnnotationServedBy] != CSIDriver || ptr.Deref(prime.Spec.StorageClassName, "") != "vimg-cdrom" {
		t.Fatalf("prime claim = %+v, want class vimg-cdrom served by %s", prime.ObjectMeta, CSIDriver)
	}
	if ns, name := claimOf(prime); ns != "ns" || name != "cd" || prime.Labels[LabelClaimUID] != "c1" {
		t.Errorf("the prime claim names %s/%s (uid %q), want ns/cd (c1)", ns, name, prime.Labels[LabelClaimUID])
	}

	ctx := context.Background()
	prime.Spec.VolumeName = "pv-1"
	if _, err := f.kube.CoreV1().PersistentVolumeClaims("vimg-populate").Create(ctx, prime, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	f.refresh()
	u, _ := f.c.image("VirtualImage", "ns", "img")
	if err := f.c.w.populate(ctx, pvc, prime, u); err != nil {
		t.Fatal(err)
	}
	if pods, _ := f.kube.CoreV1().Pods("").List(ctx, metav1.ListOptions{}); len(pods.Items) != 0 {
		t.Errorf("pods %v were started for a served claim", pods.Items)
	}
	done, err := f.c.w.complete(ctx, pvc, prime)
	if err != nil || !done {
		t.Fatalf("complete = %v, %v; want done once the prime claim is bound", done, err)
	}
	if got := f.pvc("ns", "cd").Annotations[AnnotationProgress]; got != "100%" {
		t.Errorf("progress = %q, want 100%%", got)
	}
	f.expectEvent(ReasonServing)
}

// An image not Ready yet, or stored in a claim, gets no prime claim: the
// user is told why, and the library tries again later.
func TestCDROM_NoPrimeClaimUntilTheImageCanBeServed(t *testing.T) {
	for name, tc := range map[string]struct {
		image        *unstructured.Unstructured
		reason, says string
	}{
		"importing":     {testImage("Provisioning", "ContainerRegistry", ""), ReasonWaitingForImage, "is Provisioning"},
		"stored in PVC": {pvcImage(), ReasonImageNotUsable, "stored in a PersistentVolumeClaim"},
	} {
		t.Run(name, func(t *testing.T) {
			pvc, sc := cdromWorld()
			f := newFixture(t, pvc, sc)
			f.vis = append(f.vis, tc.image)
			f.refresh()
			_, err := f.c.mutatePrime(cdromPrime())
			if err == nil || !strings.Contains(err.Error(), tc.says) {
				t.Fatalf("mutatePrime = %v, want an error saying %q", err, tc.says)
			}
			f.expectEvent(tc.reason)
		})
	}
}

// A ClusterVirtualImage claim of the driver's class (cluster.go): no prime
// claim while the image imports; then a served one, no pod, and once it is
// bound its volume is rebound to the claim.
func TestCDROM_ClusterImageClaimIsServedOnceTheImageIsReady(t *testing.T) {
	pvc, sc := cdromWorld()
	pvc.Spec.DataSourceRef.Kind, pvc.Spec.DataSourceRef.Name = "ClusterVirtualImage", "ubuntu"
	f := newFixture(t, pvc, sc, &corev1.PersistentVolume{ObjectMeta: metav1.ObjectMeta{Name: "pv-1"}})
	cvi := func(phase string) *unstructured.Unstructured {
		u := testImage(phase, "ContainerRegistry", "dvcr:443/cvi/ubuntu:u1")
		u.SetKind("ClusterVirtualImage")
		u.SetNamespace("")
		u.SetName("ubuntu")
		return u
	}
	ctx := context.Background()
	f.cvis = []*unstructured.Unstructured{cvi("Provisioning")}
	if err := f.sync("cd"); err != nil {
		t.Fatal(err)
	}
	if _, err := f.kube.CoreV1().PersistentVolumeClaims("vimg-populate").Get(ctx, "prime-c1", metav1.GetOptions{}); err == nil {
		t.Fatal("a prime claim was made for an image not Ready")
	}
	f.expectEvent(ReasonWaitingForImage)

	f.cvis = []*unstructured.Unstructured{cvi("Ready")}
	if err := f.sync("cd"); err != nil {
		t.Fatal(err)
	}
	prime := f.pvc("vimg-populate", "prime-c1")
	if prime.Annotations[AnnotationServedBy] != CSIDriver || ptr.Deref(prime.Spec.StorageClassName, "") != "vimg-cdrom" {
		t.Fatalf("prime claim = %+v", prime)
	}
	prime.Spec.VolumeName = "pv-1"
	if _, err := f.kube.CoreV1().PersistentVolumeClaims("vimg-populate").Update(ctx, prime, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := f.sync("cd"); err != nil {
		t.Fatal(err)
	}
	pv, err := f.kube.CoreV1().PersistentVolumes().Get(ctx, "pv-1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if cr := pv.Spec.ClaimRef; cr == nil || cr.UID != "c1" {
		t.Errorf("volume's claimRef = %+v, want the user's claim", cr)
	}
	if pods, _ := f.kube.CoreV1().Pods("").List(ctx, metav1.ListOptions{}); len(pods.Items) != 0 {
		t.Errorf("pods %v were started for a served claim", pods.Items)
	}
}

// expectEvent waits for an event of reason among those recorded.
func (f *fixture) expectEvent(reason string) {
	f.t.Helper()
	for {
		select {
		case e := <-f.event.Events:
			if strings.Contains(e, " "+reason+" ") {
				return
			}
		case <-time.After(time.Second):
			f.t.Fatalf("no %s event", reason)
		}
	}
}
