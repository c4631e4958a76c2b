package populator

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic/dynamiclister"
	"k8s.io/client-go/kubernetes/fake"
	corelisters "k8s.io/client-go/listers/core/v1"
	storagelisters "k8s.io/client-go/listers/storage/v1"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/utils/ptr"

	v1 "vimg.dev/vimg/pkg/apis/virtualization/v1alpha2"
	"vimg.dev/vimg/pkg/worker/api"
)

// fixture is claims over a fake API server whose listers are refreshed
// from it before every sync, as informers would be.
type fixture struct {
	t     *testing.T
	kube  *fake.Clientset
	c     *claims
	idx   map[string]cache.Indexer
	cvis  []*unstructured.Unstructured
	vis   []*unstructured.Unstructured
	event *record.FakeRecorder
}

func newFixture(t *testing.T, objs ...runtime.Object) *fixture {
	kube := fake.NewSimpleClientset(objs...)
	// The API server stamps what it creates; clone.go times clones by it.
	kube.PrependReactor("create", "*", func(a k8stesting.Action) (bool, runtime.Object, error) {
		if o, ok := a.(k8stesting.CreateAction).GetObject().(metav1.Object); ok && o.GetCreationTimestamp().Time.IsZero() {
			o.SetCreationTimestamp(metav1.Now())
		}
		return false, nil, nil
	})
	ev := record.NewFakeRecorder(100)
	w := &worker{cfg: Config{Namespace: "vimg-populate", DVCRAddress: "dvcr:443", CloneTimeout: time.Minute}, kube: kube, recorder: ev, said: map[types.UID]string{}}
	f := &fixture{t: t, kube: kube, event: ev, idx: map[string]cache.Indexer{}}
	f.c = &claims{w: w}
	return f
}

// refresh reloads the listers from the fake API server.
func (f *fixture) refresh() {
	ctx := context.Background()
	pvcIdx := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc, byUID: uidIndex})
	pvcs, _ := f.kube.CoreV1().PersistentVolumeClaims("").List(ctx, metav1.ListOptions{})
	for i := range pvcs.Items {
		pvcIdx.Add(&pvcs.Items[i])
	}
	podIdx := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})
	pods, _ := f.kube.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
	for i := range pods.Items {
		podIdx.Add(&pods.Items[i])
	}
	scIdx := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{})
	scs, _ := f.kube.StorageV1().StorageClasses().List(ctx, metav1.ListOptions{})
	for i := range scs.Items {
		scIdx.Add(&scs.Items[i])
	}
	cviIdx := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{})
	for _, u := range f.cvis {
		cviIdx.Add(u)
	}
	f.c.pvcs = corelisters.NewPersistentVolumeClaimLister(pvcIdx)
	f.c.w.pods = corelisters.NewPodLister(podIdx)
	f.c.w.servePods = f.c.w.pods // the fake holds every pod
	f.c.scs = storagelisters.NewStorageClassLister(scIdx)
	f.c.cvis = dynamiclister.New(cviIdx, ClusterVirtualImageGVR)
	viIdx := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})
	for _, u := range f.vis {
		viIdx.Add(u)
	}
	f.c.vis = dynamiclister.New(viIdx, VirtualImageGVR)
	f.c.w.lookup = f.c.image
	f.c.byUID = claimsByUID(pvcIdx)
}

func (f *fixture) sync(name string) error {
	f.t.Helper()
	f.refresh()
	return f.c.sync(context.Background(), "ns", name)
}

func (f *fixture) pvc(ns, name string) *corev1.PersistentVolumeClaim {
	f.t.Helper()
	p, err := f.kube.CoreV1().PersistentVolumeClaims(ns).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		f.t.Fatal(err)
	}
	return p
}

func cviClaim(class string) *corev1.PersistentVolumeClaim {
	return &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: "disk", Namespace: "ns", UID: "c1", Annotations: map[string]string{annSelectedNode: "node-a"}},
		Spec: corev1.PersistentVolumeClaimSpec{
			StorageClassName: ptr.To(class),
			VolumeMode:       ptr.To(corev1.PersistentVolumeBlock),
			AccessModes:      []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			DataSourceRef:    &corev1.TypedObjectReference{APIGroup: ptr.To(v1.GroupName), Kind: "ClusterVirtualImage", Name: "ubuntu"},
		},
	}
}

func wffc() *storagev1.StorageClass {
	return &storagev1.StorageClass{ObjectMeta: metav1.ObjectMeta{Name: "wffc"}, Provisioner: "x",
		VolumeBindingMode: ptr.To(storagev1.VolumeBindingWaitForFirstConsumer)}
}

// TestClaims_ClusterImageClaimGetsAPrimeOnTheSelectedNodeAndWaits: before
// the image is Ready the claim gets its prime claim (on the node the
// scheduler chose) and the finalizer, is told it waits, and no pod runs.
func TestClaims_ClusterImageClaimGetsAPrimeOnTheSelectedNodeAndWaits(t *testing.T) {
	f := newFixture(t, cviClaim("wffc"), wffc())
	u := testImage("Provisioning", "", "")
	u.SetKind("ClusterVirtualImage")
	u.SetNamespace("")
	u.SetName("ubuntu")
	f.cvis = append(f.cvis, u)
	if err := f.sync("disk"); err != nil {
		t.Fatal(err)
	}
	prime := f.pvc("vimg-populate", "prime-c1")
	if prime.Annotations[annSelectedNode] != "node-a" || *prime.Spec.VolumeMode != corev1.PersistentVolumeBlock || prime.Labels[LabelClaimName] != "disk" {
		t.Fatalf("prime claim %+v", prime.ObjectMeta)
	}
	if !hasFinalizer(f.pvc("ns", "disk")) {
		t.Fatal("the claim has no finalizer")
	}
	// The prime claim binds; the image is still provisioning.
	prime.Spec.VolumeName = "pv-1"
	f.kube.CoreV1().PersistentVolumeClaims("vimg-populate").Update(context.Background(), prime, metav1.UpdateOptions{})
	if err := f.sync("disk"); err != errNotDone {
		t.Fatalf("sync = %v, want errNotDone (come back later)", err)
	}
	select {
	case e := <-f.event.Events:
		if e != "Normal WaitingForImage ClusterVirtualImage ubuntu is Provisioning 40%; the claim is filled once it is Ready" {
			t.Fatalf("event %q", e)
		}
	case <-time.After(time.Second):
		t.Fatal("no event")
	}
	pods, _ := f.kube.CoreV1().Pods("vimg-populate").List(context.Background(), metav1.ListOptions{})
	if len(pods.Items) != 0 {
		t.Fatalf("%d pods for an image not Ready", len(pods.Items))
	}
}

// TestClaims_ImageGoneCleansUpAndReleasesADeletedClaim: with the image
// gone, the prime claim and pod go; a claim being deleted loses the
// finalizer so that it is not stuck.
func TestClaims_ImageGoneCleansUpAndReleasesADeletedClaim(t *testing.T) {
	claim := cviClaim("wffc")
	claim.Finalizers = []string{Finalizer}
	prime := &corev1.PersistentVolumeClaim{ObjectMeta: metav1.ObjectMeta{Name: "prime-c1", Namespace: "vimg-populate"}}
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "vimg-populate-c1", Namespace: "vimg-populate"}}
	f := newFixture(t, claim, prime, pod, wffc())
	if err := f.sync("disk"); err != nil {
		t.Fatal(err)
	}
	if _, err := f.kube.CoreV1().PersistentVolumeClaims("vimg-populate").Get(context.Background(), "prime-c1", metav1.GetOptions{}); err == nil {
		t.Fatal("the prime claim is still there")
	}
	if _, err := f.kube.CoreV1().Pods("vimg-populate").Get(context.Background(), "vimg-populate-c1", metav1.GetOptions{}); err == nil {
		t.Fatal("the populate pod is still there")
	}
	if !hasFinalizer(f.pvc("ns", "disk")) {
		t.Fatal("an unbound claim that waits for its image lost its finalizer")
	}
	c := f.pvc("ns", "disk")
	c.DeletionTimestamp = ptr.To(metav1.Now())
	f.kube.CoreV1().PersistentVolumeClaims("ns").Update(context.Background(), c, metav1.UpdateOptions{})
	if err := f.sync("disk"); err != nil {
		t.Fatal(err)
	}
	if hasFinalizer(f.pvc("ns", "disk")) {
		t.Fatal("a deleted claim whose image is gone keeps the finalizer")
	}
}

// TestWorker_CopyOfAnImageStoredInAClaimGoesThroughAServePod drives the
// steps the library calls for a claim naming an image stored in a claim.
func TestWorker_CopyOfAnImageStoredInAClaimGoesThroughAServePod(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	pvc := &corev1.PersistentVolumeClaim{ObjectMeta: metav1.ObjectMeta{Name: "disk", Namespace: "ns", UID: "c1"},
		Spec: corev1.PersistentVolumeClaimSpec{VolumeMode: ptr.To(corev1.PersistentVolumeBlock)}}
	prime := &corev1.PersistentVolumeClaim{ObjectMeta: metav1.ObjectMeta{Name: "prime-c1", Namespace: "vimg-populate", UID: "p1"},
		Status: corev1.PersistentVolumeClaimStatus{Capacity: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("64Mi")}}}
	for _, c := range []*corev1.PersistentVolumeClaim{pvc, prime} {
		if _, err := f.kube.CoreV1().PersistentVolumeClaims(c.Namespace).Create(ctx, c, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	populate := func() {
		t.Helper()
		f.refresh()
		if err := f.c.w.populate(ctx, pvc, prime, pvcImage()); err != nil {
			t.Fatal(err)
		}
	}
	populate()
	serve, err := f.kube.CoreV1().Pods("ns").Get(ctx, servePodName(pvc), metav1.GetOptions{})
	if err != nil {
		t.Fatalf("no serve pod in the image's namespace: %v", err)
	}
	if _, err := f.kube.CoreV1().Pods("vimg-populate").Get(ctx, podName(pvc), metav1.GetOptions{}); err == nil {
		t.Fatal("a populate pod started before the serve pod was ready")
	}
	serve.Status = corev1.PodStatus{PodIP: "10.1.2.3", Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}}
	if _, err := f.kube.CoreV1().Pods("ns").UpdateStatus(ctx, serve, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	populate()
	pod, err := f.kube.CoreV1().Pods("vimg-populate").Get(ctx, podName(pvc), metav1.GetOptions{})
	if err != nil {
		t.Fatalf("no populate pod once the serve pod is ready: %v", err)
	}
	sec, err := f.kube.CoreV1().Secrets("vimg-populate").Get(ctx, copySecretName(pvc), metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var src api.Request
	if err := json.Unmarshal(sec.Data[api.RequestFile], &src); err != nil {
		t.Fatal(err)
	}
	if src.Source.URL != "http://10.1.2.3:8080/disk" || src.Source.Headers["Authorization"] != "Bearer "+envOf(serve, api.ServeTokenEnv) || len(envOf(serve, api.ServeTokenEnv)) < 32 {
		t.Fatalf("copy request %+v", src.Source)
	}
	var mounted bool
	for _, v := range pod.Spec.Volumes {
		mounted = mounted || (v.Secret != nil && v.Secret.SecretName == copySecretName(pvc))
	}
	if !mounted {
		t.Fatalf("the populate pod does not mount %s: %+v", copySecretName(pvc), pod.Spec.Volumes)
	}
	// Written: the serve pod goes.
	pod.Status = corev1.PodStatus{Phase: corev1.PodSucceeded, ContainerStatuses: []corev1.ContainerStatus{{State: corev1.ContainerState{
		Terminated: &corev1.ContainerStateTerminated{Message: string(api.Outcome{Populated: &api.PopulateResult{VirtualSize: 64 << 20, DiskSize: 64 << 20}}.Encode())}}}}}
	if _, err := f.kube.CoreV1().Pods("vimg-populate").UpdateStatus(ctx, pod, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	f.refresh()
	if done, err := f.c.w.complete(ctx, pvc, prime); !done || err != nil {
		t.Fatalf("complete = %v, %v", done, err)
	}
	if _, err := f.kube.CoreV1().Pods("ns").Get(ctx, servePodName(pvc), metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Fatalf("the serve pod outlived the copy: %v", err)
	}
}
