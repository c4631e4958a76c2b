package populator

import (
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"

	v1 "vimg.dev/vimg/pkg/apis/virtualization/v1alpha2"
	"vimg.dev/vimg/pkg/worker/api"
)

func testImage(phase, storage, url string) *unstructured.Unstructured {
	u := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "virtualization.deckhouse.io/v1alpha2", "kind": "VirtualImage",
		"metadata": map[string]any{"name": "img", "namespace": "ns", "uid": "u1"},
		"spec":     map[string]any{"storage": storage},
		"status":   map[string]any{"phase": phase, "progress": "40%", "target": map[string]any{"registryURL": url}},
	}}
	return u
}

// pvcImage is a Ready image stored in its claim "vi-img-u1" (64 MiB).
func pvcImage() *unstructured.Unstructured {
	u := testImage("Ready", "PersistentVolumeClaim", "")
	st := u.Object["status"].(map[string]any)
	st["target"] = map[string]any{"persistentVolumeClaimName": "vi-img-u1"}
	st["size"] = map[string]any{"unpackedBytes": "67108864"}
	return u
}

func TestImage_NotUsableSaysWhyAndWhetherToWait(t *testing.T) {
	const dvcr = "vimg-dvcr.vimg-system.svc:443"
	for name, tc := range map[string]struct {
		u        *unstructured.Unstructured
		wait     bool
		contains string
	}{
		"ready":                     {testImage("Ready", "ContainerRegistry", dvcr+"/vi/ns/img:u1"), false, ""},
		"provisioning":              {testImage("Provisioning", "ContainerRegistry", ""), true, "Provisioning 40%"},
		"no phase yet":              {testImage("", "ContainerRegistry", ""), true, "is Pending"},
		"failed":                    {testImage("Failed", "ContainerRegistry", ""), true, "is Failed"},
		"pvc storage, no claim yet": {testImage("Ready", "PersistentVolumeClaim", ""), true, "names no claim"},
		"pvc storage":               {pvcImage(), false, ""},
		"elsewhere url":             {testImage("Ready", "ContainerRegistry", "other:5000/vi/ns/img:u1"), true, "not in DVCR"},
	} {
		t.Run(name, func(t *testing.T) {
			why, wait := imageOf(tc.u).notUsable(dvcr)
			if (why == "") != (tc.contains == "") || !strings.Contains(why, tc.contains) || wait != tc.wait {
				t.Fatalf("notUsable = %q, %v; want %q, %v", why, wait, tc.contains, tc.wait)
			}
		})
	}
	if got := imageOf(testImage("Ready", "", dvcr+"/vi/ns/img:u1")).ref(dvcr); got != "vi/ns/img:u1" {
		t.Fatalf("ref %q", got)
	}
}

func TestWorker_TooSmallCountsTheFileSystemOverhead(t *testing.T) {
	w := &worker{cfg: Config{FilesystemOverhead: 0.055}}
	const mi = 1 << 20
	if msg := w.tooSmall(true, 64*mi, 64*mi); msg != "" {
		t.Errorf("a block claim of exactly the virtual size is too small: %s", msg)
	}
	if msg := w.tooSmall(true, 63*mi, 64*mi); !strings.Contains(msg, "at least 64Mi") {
		t.Errorf("block message %q", msg)
	}
	// 66 MiB less 5.5% is 62 MiB: too small for 64 MiB; the answer is a
	// claim whose usable part holds it.
	msg := w.tooSmall(false, 66*mi, 64*mi)
	if !strings.Contains(msg, "leaves 62Mi for disk.img") || !strings.Contains(msg, "at least 68Mi") {
		t.Errorf("filesystem message %q", msg)
	}
	if msg := w.tooSmall(false, 68*mi, 64*mi); msg != "" {
		t.Errorf("the size the message asks for is still too small: %s", msg)
	}
}

func TestWorker_PodsHaveNoPrivilegesBeyondTheirVolume(t *testing.T) {
	w := &worker{cfg: Config{Namespace: "vimg-populate", WorkerImage: "img", WorkerServiceAccount: "vimg-worker"}}
	pvc := &corev1.PersistentVolumeClaim{ObjectMeta: metav1.ObjectMeta{Name: "c", Namespace: "ns", UID: "u"}}
	prime := &corev1.PersistentVolumeClaim{ObjectMeta: metav1.ObjectMeta{Name: "prime-u", Namespace: "vimg-populate", UID: "p"}}
	fs := w.buildPod(pvc, prime, false, 1, "")
	if sc := fs.Spec.SecurityContext; *sc.RunAsUser != 107 || !*sc.RunAsNonRoot || *sc.FSGroup != 107 {
		t.Errorf("filesystem pod security %+v", sc)
	}
	block := w.buildPod(pvc, prime, true, 1, "")
	c := block.Spec.Containers[0]
	if len(c.VolumeDevices) != 1 || len(c.VolumeMounts) != 1 {
		t.Errorf("block pod attaches %v %v", c.VolumeDevices, c.VolumeMounts)
	}
	for _, p := range []*corev1.Pod{fs, block} {
		c := p.Spec.Containers[0]
		if c.SecurityContext.Privileged != nil || *c.SecurityContext.AllowPrivilegeEscalation ||
			len(c.SecurityContext.Capabilities.Drop) != 1 || c.SecurityContext.Capabilities.Add != nil {
			t.Errorf("container security %+v", c.SecurityContext)
		}
		if p.OwnerReferences[0].UID != "p" || p.Labels[LabelClaimUID] != "u" {
			t.Errorf("pod owner %v labels %v", p.OwnerReferences, p.Labels)
		}
	}
}

func TestParkingQueue_DropsBackoffOfFailedClaimsOnly(t *testing.T) {
	q := newQueue("test", 50*time.Millisecond, func(key string) bool { return key == "pvc/ns/failed" })
	defer q.ShutDown()
	q.AddRateLimited("pvc/ns/failed")
	q.AddRateLimited("pvc/ns/waiting")
	item, _ := q.Get()
	if item != "pvc/ns/waiting" {
		t.Fatalf("got %v first, want the waiting claim", item)
	}
	q.Done(item)
	q.Add("pvc/ns/failed") // an event still brings it back
	if item, _ := q.Get(); item != "pvc/ns/failed" {
		t.Fatalf("got %v, want the failed claim after an event", item)
	}
	if q.Len() != 0 {
		t.Fatalf("%d items left", q.Len())
	}
}

func TestClaimImageIndex(t *testing.T) {
	group := v1.GroupName
	other := "example.com"
	for _, tc := range []struct {
		ref  *corev1.TypedObjectReference
		want string
	}{
		{&corev1.TypedObjectReference{APIGroup: &group, Kind: "VirtualImage", Name: "a"}, "VirtualImage/ns/a"},
		{&corev1.TypedObjectReference{APIGroup: &group, Kind: "ClusterVirtualImage", Name: "b"}, "ClusterVirtualImage//b"},
		{&corev1.TypedObjectReference{APIGroup: &other, Kind: "VirtualImage", Name: "c"}, ""},
		{nil, ""},
	} {
		pvc := &corev1.PersistentVolumeClaim{ObjectMeta: metav1.ObjectMeta{Namespace: "ns"}, Spec: corev1.PersistentVolumeClaimSpec{DataSourceRef: tc.ref}}
		keys, _ := claimImageIndex(pvc)
		if got := strings.Join(keys, ","); got != tc.want {
			t.Errorf("index of %v = %q, want %q", tc.ref, got, tc.want)
		}
	}
}

func TestImage_OwnsOnlyTheClaimTheControllerMadeForIt(t *testing.T) {
	u := testImage("Provisioning", "PersistentVolumeClaim", "")
	im := imageOf(u)
	own := func(name string, owner types.UID) *corev1.PersistentVolumeClaim {
		return &corev1.PersistentVolumeClaim{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "ns",
			OwnerReferences: []metav1.OwnerReference{{Kind: "VirtualImage", Name: "img", UID: owner, Controller: ptr.To(true)}}}}
	}
	if !im.ownsClaim(own(api.ImageClaimName("img", "u1"), "u1"), u) {
		t.Error("the image's own claim is not recognised")
	}
	if im.ownsClaim(own("mine", "u1"), u) {
		t.Error("a claim of another name counts as the image's")
	}
	if im.ownsClaim(own(api.ImageClaimName("img", "u1"), "someone-else"), u) {
		t.Error("a claim controlled by another object counts as the image's")
	}
	dvcr := imageOf(testImage("Ready", "ContainerRegistry", ""))
	if dvcr.ownsClaim(own(api.ImageClaimName("img", "u1"), "u1"), u) {
		t.Error("an image stored in DVCR owns a claim")
	}
}

func TestImage_CopiedImageIsResolvedInTheRightScope(t *testing.T) {
	u := testImage("Pending", "PersistentVolumeClaim", "")
	u.Object["spec"].(map[string]any)["dataSource"] = map[string]any{"type": "ObjectRef", "objectRef": map[string]any{"kind": "VirtualImage", "name": "base"}}
	if im := imageOf(u); im.refKind != "VirtualImage" || im.refNamespace != "ns" || im.refName != "base" {
		t.Fatalf("VirtualImage ref %+v", im)
	}
	u.Object["spec"].(map[string]any)["dataSource"] = map[string]any{"type": "ObjectRef", "objectRef": map[string]any{"kind": "ClusterVirtualImage", "name": "base"}}
	if im := imageOf(u); im.refKind != "ClusterVirtualImage" || im.refNamespace != "" {
		t.Fatalf("ClusterVirtualImage ref %+v", im)
	}
}

func TestWorker_FromSourcePodsGetTheImportRequestAndTrustedCAs(t *testing.T) {
	w := &worker{cfg: Config{Namespace: "vimg-populate", WorkerImage: "img"}}
	pvc := &corev1.PersistentVolumeClaim{ObjectMeta: metav1.ObjectMeta{Name: "c", Namespace: "ns", UID: "u"}}
	prime := &corev1.PersistentVolumeClaim{ObjectMeta: metav1.ObjectMeta{Name: "prime-u", Namespace: "vimg-populate", UID: "p"}}
	p := w.buildPod(pvc, prime, false, 1, api.SourceSecretName("img-uid"))
	mounts := map[string]string{}
	for _, m := range p.Spec.Containers[0].VolumeMounts {
		mounts[m.MountPath] = m.Name
	}
	secrets := map[string]string{}
	for _, v := range p.Spec.Volumes {
		if v.Secret != nil && v.Secret.SecretName == api.SourceSecretName("img-uid") {
			secrets[v.Name] = v.Secret.Items[0].Key
		}
	}
	if secrets[mounts[api.RequestDir]] != api.RequestFile || secrets[mounts[api.TrustedCADir]] != api.SourceTrustedCAKey {
		t.Fatalf("mounts %v, source secret volumes %v", mounts, secrets)
	}
	var certDir string
	for _, e := range p.Spec.Containers[0].Env {
		if e.Name == "SSL_CERT_DIR" {
			certDir = e.Value
		}
	}
	if !strings.Contains(certDir, api.TrustedCADir) {
		t.Fatalf("SSL_CERT_DIR %q", certDir)
	}
}

func TestWorker_ServePodsReadTheImageClaimWithoutPrivileges(t *testing.T) {
	w := &worker{cfg: Config{Namespace: "vimg-populate", WorkerImage: "img"}}
	pvc := &corev1.PersistentVolumeClaim{ObjectMeta: metav1.ObjectMeta{Name: "disk", Namespace: "ns", UID: "u"}}
	p := w.buildServePod(pvc, imageOf(pvcImage()), "secret-token")
	if p.Namespace != "ns" || p.OwnerReferences[0].UID != "u" || p.Labels[LabelComponent] != componentServe {
		t.Fatalf("serve pod %s/%s owners %v labels %v", p.Namespace, p.Name, p.OwnerReferences, p.Labels)
	}
	if v := p.Spec.Volumes; len(v) != 1 || v[0].PersistentVolumeClaim == nil || v[0].PersistentVolumeClaim.ClaimName != "vi-img-u1" || !v[0].PersistentVolumeClaim.ReadOnly {
		t.Fatalf("volumes %+v", v)
	}
	c := p.Spec.Containers[0]
	if len(c.VolumeMounts) != 1 || !c.VolumeMounts[0].ReadOnly || envOf(p, api.ServeTokenEnv) != "secret-token" || envOf(p, api.ServeSizeEnv) != "67108864" {
		t.Fatalf("mounts %+v env %+v", c.VolumeMounts, c.Env)
	}
	// What the restricted Pod Security level asks.
	sc := p.Spec.SecurityContext
	if *p.Spec.AutomountServiceAccountToken || !*sc.RunAsNonRoot || *sc.RunAsUser != 107 || sc.SeccompProfile == nil ||
		*c.SecurityContext.AllowPrivilegeEscalation || c.SecurityContext.Capabilities.Drop[0] != "ALL" {
		t.Fatalf("serve pod security %+v / %+v", sc, c.SecurityContext)
	}
}

func TestWorker_ClaimsWithNamesLongerThanALabelAreStillFound(t *testing.T) {
	w := &worker{cfg: Config{Namespace: "vimg-populate", WorkerImage: "img"}}
	long := "vi-" + strings.Repeat("a", 40) + "-0f8e2a3c-1111-2222-3333-444455556666"
	pvc := &corev1.PersistentVolumeClaim{ObjectMeta: metav1.ObjectMeta{Name: long, Namespace: "ns", UID: "u"}}
	prime := &corev1.PersistentVolumeClaim{ObjectMeta: metav1.ObjectMeta{Name: "prime-u", Namespace: "vimg-populate", UID: "p"}}
	p := w.buildPod(pvc, prime, false, 1, "")
	if _, ok := p.Labels[LabelClaimName]; ok {
		t.Fatalf("a %d-character name went into a label: %v", len(long), p.Labels)
	}
	if ns, name := claimOf(p); ns != "ns" || name != long {
		t.Fatalf("claimOf = %q, %q", ns, name)
	}
	short := &corev1.PersistentVolumeClaim{ObjectMeta: metav1.ObjectMeta{Name: "disk", Namespace: "ns", UID: "u"}}
	if l := w.buildPod(short, prime, false, 1, "").Labels[LabelClaimName]; l != "disk" {
		t.Fatalf("a short name is not in its label: %q", l)
	}
}
