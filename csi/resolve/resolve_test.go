package resolve

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	kubefake "k8s.io/client-go/kubernetes/fake"
	"k8s.io/utils/ptr"

	"vimg.dev/vimg/csi/driver"
	"vimg.dev/vimg/dvcr/dvcrtest"
	"vimg.dev/vimg/dvcr/layout"
	v1 "vimg.dev/vimg/pkg/apis/virtualization/v1alpha2"
)

// imageObject is a VirtualImage (namespace set) or ClusterVirtualImage as
// the API server serves it.
func imageObject(namespace, name, phase, storage, registryURL string) *unstructured.Unstructured {
	kind := "ClusterVirtualImage"
	if namespace != "" {
		kind = "VirtualImage"
	}
	u := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": v1.SchemeGroupVersion.String(),
		"kind":       kind,
		"metadata":   map[string]any{"name": name, "uid": "5f0c1a2b-uid"},
		"spec":       map[string]any{"storage": storage},
		"status": map[string]any{
			"phase":  phase,
			"target": map[string]any{"registryURL": registryURL},
		},
	}}
	if namespace != "" {
		u.SetNamespace(namespace)
	}
	return u
}

// newResolver starts DVCR and returns a Resolver of it with no objects
// yet: the objects name DVCR's address, known once it runs.
func newResolver(t *testing.T) *Resolver {
	t.Helper()
	c := dvcrtest.Start(t)
	return &Resolver{Dynamic: withImages(), Kube: kubefake.NewClientset(), DVCR: c, DVCRAddress: c.Registry()}
}

// withImages is a dynamic client serving these VirtualImages and
// ClusterVirtualImages.
func withImages(objects ...runtime.Object) *dynamicfake.FakeDynamicClient {
	return dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), map[schema.GroupVersionResource]string{
		VirtualImageGVR:        "VirtualImageList",
		ClusterVirtualImageGVR: "ClusterVirtualImageList",
	}, objects...)
}

func wantCode(t *testing.T, err error, code codes.Code, contains string) {
	t.Helper()
	if err == nil {
		t.Fatalf("got no error, want %s", code)
	}
	st, ok := status.FromError(err)
	if !ok {
		t.Fatalf("error %v carries no gRPC status, want %s", err, code)
	}
	if st.Code() != code {
		t.Fatalf("code %s (%s), want %s", st.Code(), st.Message(), code)
	}
	if !strings.Contains(st.Message(), contains) {
		t.Errorf("message %q does not say %q", st.Message(), contains)
	}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestResolve_ReadyImagesPinWhatDVCRHolds(t *testing.T) {
	r := newResolver(t)
	vi := pushDisk(t, r.DVCR, layout.KindVirtualImage, "ns", "ubuntu", 64<<10)
	cvi := pushDisk(t, r.DVCR, layout.KindClusterVirtualImage, "", "debian", 96<<10)
	r.Dynamic = withImages(
		imageObject("ns", "ubuntu", "Ready", "ContainerRegistry", r.DVCRAddress+"/"+vi.tagged),
		imageObject("", "debian", "Ready", "", r.DVCRAddress+"/"+cvi.tagged),
	)
	for _, tc := range []struct {
		kind, namespace, name string
		want                  driver.Pin
	}{
		{driver.KindVirtualImage, "ns", "ubuntu", vi.pin},
		{driver.KindClusterVirtualImage, "", "debian", cvi.pin},
	} {
		t.Run(tc.kind, func(t *testing.T) {
			got, err := r.Resolve(ctxT(t), tc.kind, tc.namespace, tc.name)
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Errorf("pin %+v, want %+v", got, tc.want)
			}
			if !strings.Contains(got.Ref, "@sha256:") || got.File != "disk.img" {
				t.Errorf("pin %+v: want a digest ref and disk.img", got)
			}
		})
	}
}

func TestResolve_ImagesThatCannotBeServed(t *testing.T) {
	r := newResolver(t)
	a := r.DVCRAddress
	other := "dvcr.elsewhere.example:443"
	r.Dynamic = withImages(
		imageObject("ns", "importing", "Provisioning", "ContainerRegistry", ""),
		imageObject("ns", "fresh", "", "ContainerRegistry", ""),
		imageObject("ns", "on-pvc", "Ready", "PersistentVolumeClaim", ""),
		imageObject("ns", "elsewhere", "Ready", "ContainerRegistry", other+"/vi/ns/elsewhere:5f0c1a2b-uid"),
		imageObject("ns", "prefix", "Ready", "ContainerRegistry", a+"x/vi/ns/prefix:5f0c1a2b-uid"),
		imageObject("ns", "lost", "Ready", "ContainerRegistry", a+"/vi/ns/lost:5f0c1a2b-uid"),
		imageObject("", "failed", "Failed", "ContainerRegistry", ""),
		imageObject("", "lost", "Ready", "ContainerRegistry", a+"/cvi/lost:5f0c1a2b-uid"),
	)
	for _, tc := range []struct {
		test, kind, namespace, name string
		code                        codes.Code
		says                        string
	}{
		{"missing VirtualImage", driver.KindVirtualImage, "ns", "nope", codes.NotFound, "VirtualImage ns/nope not found"},
		{"VirtualImage of another namespace", driver.KindVirtualImage, "other", "importing", codes.NotFound, "VirtualImage other/importing not found"},
		{"missing ClusterVirtualImage", driver.KindClusterVirtualImage, "", "nope", codes.NotFound, "ClusterVirtualImage nope not found"},
		{"importing", driver.KindVirtualImage, "ns", "importing", codes.Unavailable, "VirtualImage ns/importing is Provisioning; the volume is published once it is Ready"},
		{"no phase yet", driver.KindVirtualImage, "ns", "fresh", codes.Unavailable, "is Pending; the volume is published once it is Ready"},
		{"failed", driver.KindClusterVirtualImage, "", "failed", codes.Unavailable, "ClusterVirtualImage failed is Failed"},
		{"stored in a claim", driver.KindVirtualImage, "ns", "on-pvc", codes.FailedPrecondition, "is stored in a PersistentVolumeClaim: only images in DVCR can be CD-ROM volumes"},
		{"in another registry", driver.KindVirtualImage, "ns", "elsewhere", codes.FailedPrecondition, "not in DVCR"},
		{"address is only a prefix", driver.KindVirtualImage, "ns", "prefix", codes.FailedPrecondition, "not in DVCR"},
		{"not in DVCR (VirtualImage)", driver.KindVirtualImage, "ns", "lost", codes.Unavailable, "DVCR has no image vi/ns/lost:5f0c1a2b-uid"},
		{"not in DVCR (ClusterVirtualImage)", driver.KindClusterVirtualImage, "", "lost", codes.Unavailable, "DVCR has no image"},
		{"unknown kind", "DataVolume", "ns", "x", codes.InvalidArgument, "DataVolume"},
		{"VirtualImage without namespace", driver.KindVirtualImage, "", "x", codes.InvalidArgument, "namespace"},
	} {
		t.Run(tc.test, func(t *testing.T) {
			_, err := r.Resolve(ctxT(t), tc.kind, tc.namespace, tc.name)
			wantCode(t, err, tc.code, tc.says)
		})
	}
}

func TestResolve_DVCRUnreachableIsUnavailable(t *testing.T) {
	r := newResolver(t)
	vi := pushDisk(t, r.DVCR, layout.KindVirtualImage, "ns", "ubuntu", 64<<10)
	r.Dynamic = withImages(imageObject("ns", "ubuntu", "Ready", "ContainerRegistry", r.DVCRAddress+"/"+vi.tagged))
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // every request to DVCR fails
	_, err := r.Resolve(ctx, driver.KindVirtualImage, "ns", "ubuntu")
	wantCode(t, err, codes.Unavailable, "VirtualImage ns/ubuntu")
}

// primeOf is a prime claim of the populator's in vimg-populate serving
// claim ns/name of UID uid.
func primeOf(ns, name, uid string) *corev1.PersistentVolumeClaim {
	return &corev1.PersistentVolumeClaim{ObjectMeta: metav1.ObjectMeta{
		Namespace: "vimg-populate", Name: "prime-" + uid,
		Labels:      map[string]string{labelClaimNamespace: ns, labelClaimUID: uid},
		Annotations: map[string]string{annotationClaimName: name},
	}}
}

func userClaim(ns, name, uid string, ref *corev1.TypedObjectReference) *corev1.PersistentVolumeClaim {
	return &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID(uid)},
		Spec:       corev1.PersistentVolumeClaimSpec{DataSourceRef: ref},
	}
}

func imageRef(kind, name string) *corev1.TypedObjectReference {
	return &corev1.TypedObjectReference{APIGroup: ptr.To(v1.GroupName), Kind: kind, Name: name}
}

// A prime claim is followed to the claim it serves, whose dataSourceRef
// names the image; claims anywhere else, and prime claims whose claim is
// gone or names no image, are refused.
func TestResolve_PrimeClaimsResolveToTheImageTheirClaimNames(t *testing.T) {
	r := newResolver(t)
	r.PopulateNamespace = "vimg-populate"
	vi := pushDisk(t, r.DVCR, layout.KindVirtualImage, "ns", "ubuntu", 64<<10)
	cvi := pushDisk(t, r.DVCR, layout.KindClusterVirtualImage, "", "debian", 32<<10)
	r.Dynamic = withImages(
		imageObject("ns", "ubuntu", "Ready", "ContainerRegistry", r.DVCRAddress+"/"+vi.tagged),
		imageObject("", "debian", "Ready", "ContainerRegistry", r.DVCRAddress+"/"+cvi.tagged),
	)
	otherNS := imageRef("VirtualImage", "ubuntu")
	otherNS.Namespace = ptr.To("elsewhere")
	r.Kube = kubefake.NewClientset(
		userClaim("ns", "cd", "u1", imageRef("VirtualImage", "ubuntu")), primeOf("ns", "cd", "u1"),
		userClaim("ns", "cluster", "u2", imageRef("ClusterVirtualImage", "debian")), primeOf("ns", "cluster", "u2"),
		primeOf("ns", "gone", "u3"),
		userClaim("ns", "recreated", "u4-new", imageRef("VirtualImage", "ubuntu")), primeOf("ns", "recreated", "u4"),
		userClaim("ns", "plain", "u5", nil), primeOf("ns", "plain", "u5"),
		userClaim("ns", "crossns", "u6", otherNS), primeOf("ns", "crossns", "u6"),
		&corev1.PersistentVolumeClaim{ObjectMeta: metav1.ObjectMeta{Namespace: "vimg-populate", Name: "unlabelled"}},
		userClaim("ns", "direct", "u7", nil),
	)
	for name, want := range map[string]driver.Pin{"prime-u1": vi.pin, "prime-u2": cvi.pin} {
		got, err := r.Resolve(ctxT(t), driver.KindPersistentVolumeClaim, "vimg-populate", name)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if got != want {
			t.Errorf("%s: pin %+v, want %+v", name, got, want)
		}
	}
	for _, tc := range []struct {
		ns, name string
		code     codes.Code
		says     string
	}{
		{"vimg-populate", "prime-missing", codes.NotFound, "PersistentVolumeClaim vimg-populate/prime-missing not found"},
		{"vimg-populate", "prime-u3", codes.NotFound, "PersistentVolumeClaim ns/gone, which PersistentVolumeClaim vimg-populate/prime-u3 serves, not found"},
		{"vimg-populate", "prime-u4", codes.NotFound, "since deleted"},
		{"vimg-populate", "prime-u5", codes.FailedPrecondition, "names no image"},
		{"vimg-populate", "prime-u6", codes.FailedPrecondition, "another namespace"},
		{"vimg-populate", "unlabelled", codes.FailedPrecondition, "names no claim it serves"},
		{"ns", "direct", codes.InvalidArgument, "needs a dataSourceRef naming a VirtualImage or ClusterVirtualImage"},
	} {
		t.Run(tc.ns+"/"+tc.name, func(t *testing.T) {
			_, err := r.Resolve(ctxT(t), driver.KindPersistentVolumeClaim, tc.ns, tc.name)
			wantCode(t, err, tc.code, tc.says)
		})
	}
}
