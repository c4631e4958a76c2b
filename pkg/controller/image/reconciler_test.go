package image

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/record"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"

	dvcrclient "vimg.dev/vimg/dvcr/client"
	"vimg.dev/vimg/dvcr/layout"
	v1 "vimg.dev/vimg/pkg/apis/virtualization/v1alpha2"
	"vimg.dev/vimg/pkg/worker/api"
)

// fakeRegistry is DVCR for the reconciler's logic: a map of references.
type fakeRegistry struct {
	mu      sync.Mutex
	images  map[string]layout.Meta
	deleted []string
	copies  []string
}

func (f *fakeRegistry) Stat(_ context.Context, ref string) (layout.Meta, string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	m, ok := f.images[ref]
	if !ok {
		return layout.Meta{}, "", fmt.Errorf("stat %s: %w", ref, dvcrclient.ErrNotFound)
	}
	return m, "sha256:0", nil
}

func (f *fakeRegistry) Copy(_ context.Context, src, dst string) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	m, ok := f.images[src]
	if !ok {
		return "", dvcrclient.ErrNotFound
	}
	f.images[dst] = m
	f.copies = append(f.copies, src+"->"+dst)
	return "sha256:0", nil
}

func (f *fakeRegistry) Delete(_ context.Context, ref string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.images, ref)
	f.deleted = append(f.deleted, ref)
	return nil
}

type fakeTokens struct{}

func (fakeTokens) PushToken(_ context.Context, repo string, _ time.Duration) (string, error) {
	return "token-for-" + repo, nil
}

type env struct {
	t   *testing.T
	c   client.Client
	reg *fakeRegistry
	vi  *Reconciler
	cvi *Reconciler
	now time.Time
	rec *record.FakeRecorder
}

func newEnv(t *testing.T, objs ...client.Object) *env {
	t.Helper()
	s := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(s); err != nil {
		t.Fatal(err)
	}
	if err := v1.AddToScheme(s); err != nil {
		t.Fatal(err)
	}
	c := fake.NewClientBuilder().WithScheme(s).WithObjects(objs...).
		WithStatusSubresource(&v1.VirtualImage{}, &v1.ClusterVirtualImage{}, &corev1.Pod{}).Build()
	e := &env{t: t, c: c, reg: &fakeRegistry{images: map[string]layout.Meta{}}, now: time.Unix(1_800_000_000, 0), rec: record.NewFakeRecorder(100)}
	cfg := Config{Namespace: "vimg-system", DVCRAddress: "dvcr.test:443", Registry: e.reg, Tokens: fakeTokens{},
		WorkerImage: "localhost/vimg/vimg:test", MaxAttempts: 3, RetryBackoff: 10 * time.Second}
	e.vi = NewVirtualImageReconciler(c, c, e.rec, cfg)
	e.cvi = NewClusterVirtualImageReconciler(c, c, e.rec, cfg)
	e.vi.now = func() time.Time { return e.now }
	e.cvi.now = e.vi.now
	return e
}

func httpVI(name string) *v1.VirtualImage {
	return &v1.VirtualImage{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "ns", UID: types.UID("uid-" + name), Generation: 1},
		Spec: v1.VirtualImageSpec{Storage: v1.StorageContainerRegistry, DataSource: v1.VirtualImageDataSource{
			Type: v1.DataSourceTypeHTTP,
			HTTP: &v1.VirtualImageHTTP{HTTPSource: v1.HTTPSource{URL: "https://images.example/disk.qcow2",
				Checksum: &v1.Checksum{SHA256: strings.Repeat("AB", 32)}}},
		}},
	}
}

func (e *env) reconcileVI(name string) ctrl.Result {
	e.t.Helper()
	res, err := e.vi.Reconcile(context.Background(), ctrl.Request{NamespacedName: types.NamespacedName{Namespace: "ns", Name: name}})
	if err != nil {
		e.t.Fatalf("reconcile %s: %v", name, err)
	}
	return res
}

func (e *env) getVI(name string) *v1.VirtualImage {
	e.t.Helper()
	var vi v1.VirtualImage
	if err := e.c.Get(context.Background(), types.NamespacedName{Namespace: "ns", Name: name}, &vi); err != nil {
		e.t.Fatal(err)
	}
	return &vi
}

func (e *env) pods() []corev1.Pod {
	e.t.Helper()
	var l corev1.PodList
	if err := e.c.List(context.Background(), &l, client.InNamespace("vimg-system")); err != nil {
		e.t.Fatal(err)
	}
	return l.Items
}

func (e *env) updatePod(p *corev1.Pod, mutate func(*corev1.Pod)) {
	e.t.Helper()
	mutate(p)
	st := p.Status
	if err := e.c.Update(context.Background(), p); err != nil {
		e.t.Fatal(err)
	}
	p.Status = st
	if err := e.c.Status().Update(context.Background(), p); err != nil {
		e.t.Fatal(err)
	}
}

func terminated(p *corev1.Pod, phase corev1.PodPhase, out api.Outcome, at time.Time) {
	p.Status.Phase = phase
	code := int32(0)
	if phase == corev1.PodFailed {
		code = 1
	}
	p.Status.ContainerStatuses = []corev1.ContainerStatus{{Name: "import", State: corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{
		ExitCode: code, Message: string(out.Encode()), FinishedAt: metav1.NewTime(at),
	}}}}
}

func condition(st v1.ImageStatus, typ string) metav1.Condition {
	c := meta.FindStatusCondition(st.Conditions, typ)
	if c == nil {
		return metav1.Condition{}
	}
	return *c
}

func TestImport_StartsOnePodWithAScopedRequest(t *testing.T) {
	e := newEnv(t, httpVI("img"))
	e.reconcileVI("img")
	e.reconcileVI("img") // idempotent: no second pod

	vi := e.getVI("img")
	if vi.Status.Phase != v1.ImagePhaseProvisioning || vi.Status.Progress != "0.0%" {
		t.Fatalf("phase %q progress %q, want Provisioning 0.0%%", vi.Status.Phase, vi.Status.Progress)
	}
	if len(vi.Finalizers) != 1 || vi.Finalizers[0] != Finalizer {
		t.Fatalf("finalizers %v", vi.Finalizers)
	}
	pods := e.pods()
	if len(pods) != 1 {
		t.Fatalf("%d pods, want 1", len(pods))
	}
	p := pods[0]
	if p.Labels[LabelImageUID] != "uid-img" || p.Annotations[AnnotationGeneration] != "1" || p.Spec.RestartPolicy != corev1.RestartPolicyNever {
		t.Fatalf("pod labels %v annotations %v", p.Labels, p.Annotations)
	}
	if sc := p.Spec.Containers[0].SecurityContext; sc == nil || *sc.AllowPrivilegeEscalation || !*sc.ReadOnlyRootFilesystem {
		t.Fatalf("pod security context %+v", sc)
	}
	var sec corev1.Secret
	if err := e.c.Get(context.Background(), types.NamespacedName{Namespace: "vimg-system", Name: "vimg-import-uid-img"}, &sec); err != nil {
		t.Fatal(err)
	}
	var req api.Request
	if err := json.Unmarshal(sec.Data[api.RequestFile], &req); err != nil {
		t.Fatal(err)
	}
	if req.DVCR.Ref != "vi/ns/img:uid-img" || req.DVCR.Token != "token-for-vi/ns/img" || req.Source.URL != "https://images.example/disk.qcow2" {
		t.Fatalf("request %+v", req)
	}
	if len(req.Checksums) != 1 || req.Checksums[0] != "sha256:"+strings.Repeat("ab", 32) {
		t.Fatalf("checksums %v", req.Checksums)
	}
}

func TestImport_ProgressIsMonotonicAndBelow100UntilReady(t *testing.T) {
	e := newEnv(t, httpVI("img"))
	e.reconcileVI("img")
	for _, f := range []float64{0.25, 0.10, 1.0} {
		p := e.pods()[0]
		e.updatePod(&p, func(p *corev1.Pod) {
			p.Status.Phase = corev1.PodRunning
			p.Annotations[api.AnnotationProgress] = api.Progress{Fraction: f, SourceRead: 10, SourceTotal: 40, AvgSpeed: 1 << 20}.Encode()
		})
		e.reconcileVI("img")
	}
	vi := e.getVI("img")
	if vi.Status.Progress != "99.9%" {
		t.Fatalf("progress %q, want 99.9%% (never 100%% before Ready, never going back)", vi.Status.Progress)
	}
	if vi.Status.DownloadSpeed == nil || vi.Status.DownloadSpeed.Avg != "1.0Mi/s" || vi.Status.DownloadSpeed.AvgBytes != "1048576" {
		t.Fatalf("download speed %+v", vi.Status.DownloadSpeed)
	}
}

func TestImport_SucceededPodMakesTheImageReadyFromTheRegistry(t *testing.T) {
	e := newEnv(t, httpVI("img"))
	e.reconcileVI("img")
	e.reg.images["vi/ns/img:uid-img"] = layout.Meta{Format: "iso", VirtualSize: 3 << 20, StoredSize: 3 << 20}
	p := e.pods()[0]
	e.updatePod(&p, func(p *corev1.Pod) {
		terminated(p, corev1.PodSucceeded, api.Outcome{Result: &api.Result{Format: "iso", VirtualSize: 3 << 20, StoredSize: 3 << 20}}, e.now)
	})
	e.reconcileVI("img")
	vi := e.getVI("img")
	st := vi.Status
	if st.Phase != v1.ImagePhaseReady || st.Progress != "100%" || st.Format != "iso" || !st.CDROM ||
		st.Size.Unpacked != "3.0Mi" || st.Size.UnpackedBytes != "3145728" || st.Target.RegistryURL != "dvcr.test:443/vi/ns/img:uid-img" {
		t.Fatalf("status %+v", st)
	}
	if c := condition(st.ImageStatus, v1.ConditionReady); c.Status != metav1.ConditionTrue || c.Reason != v1.ReasonReady {
		t.Fatalf("Ready condition %+v", c)
	}
	if n := len(e.pods()); n != 0 {
		t.Fatalf("%d pods left after success", n)
	}
	err := e.c.Get(context.Background(), types.NamespacedName{Namespace: "vimg-system", Name: "vimg-import-uid-img"}, &corev1.Secret{})
	if !apierrors.IsNotFound(err) {
		t.Fatalf("import secret still there: %v", err)
	}
	// A later pass keeps it Ready without importing again.
	e.reconcileVI("img")
	if n := len(e.pods()); n != 0 || e.getVI("img").Status.Phase != v1.ImagePhaseReady {
		t.Fatalf("a Ready image started %d pods", n)
	}
}

func TestImport_PermanentFailureIsFailedWithTheWorkersReason(t *testing.T) {
	e := newEnv(t, httpVI("img"))
	e.reconcileVI("img")
	p := e.pods()[0]
	e.updatePod(&p, func(p *corev1.Pod) {
		terminated(p, corev1.PodFailed, api.Outcome{Reason: "SourceNotFound", Message: "HTTP 404 Not Found: check the URL", Permanent: true}, e.now)
	})
	e.reconcileVI("img")
	e.reconcileVI("img")
	st := e.getVI("img").Status
	c := condition(st.ImageStatus, v1.ConditionReady)
	if st.Phase != v1.ImagePhaseFailed || c.Reason != v1.ReasonProvisioningFailed || !strings.Contains(c.Message, "SourceNotFound: HTTP 404") {
		t.Fatalf("phase %s condition %+v", st.Phase, c)
	}
	if n := len(e.pods()); n != 0 {
		t.Fatalf("%d pods after a permanent failure, want 0 (no retry)", n)
	}
}

func TestImport_TransientFailuresRetryWithBackoffThenGiveUp(t *testing.T) {
	e := newEnv(t, httpVI("img"))
	e.reconcileVI("img")
	for attempt := 1; attempt <= 3; attempt++ {
		pods := e.pods()
		if len(pods) != 1 || attemptOf(&pods[0]) != attempt {
			t.Fatalf("attempt %d: pods %d (attempt %d)", attempt, len(pods), attemptOf(&pods[0]))
		}
		e.updatePod(&pods[0], func(p *corev1.Pod) {
			terminated(p, corev1.PodFailed, api.Outcome{Reason: "Transient", Message: "connection reset by peer"}, e.now)
		})
		res := e.reconcileVI("img")
		if attempt == 3 {
			break
		}
		if want := 10 * time.Second << (attempt - 1); res.RequeueAfter != want {
			t.Fatalf("attempt %d: requeue after %v, want %v", attempt, res.RequeueAfter, want)
		}
		if c := condition(e.getVI("img").Status.ImageStatus, v1.ConditionReady); !strings.Contains(c.Message, "Retrying") {
			t.Fatalf("condition while waiting to retry: %+v", c)
		}
		e.now = e.now.Add(res.RequeueAfter)
		e.reconcileVI("img")
	}
	st := e.getVI("img").Status
	c := condition(st.ImageStatus, v1.ConditionReady)
	if st.Phase != v1.ImagePhaseFailed || !strings.Contains(c.Message, "gave up after 3 attempts") {
		t.Fatalf("phase %s condition %+v", st.Phase, c)
	}
}

func TestImport_SpecChangeBeforeReadyRestartsProvisioning(t *testing.T) {
	e := newEnv(t, httpVI("img"))
	e.reconcileVI("img")
	vi := e.getVI("img")
	vi.Spec.DataSource.HTTP.URL = "https://images.example/other.qcow2"
	vi.Generation = 2 // the fake client does not bump generations
	if err := e.c.Update(context.Background(), vi); err != nil {
		t.Fatal(err)
	}
	e.reconcileVI("img")
	pods := e.pods()
	if len(pods) != 1 || pods[0].Annotations[AnnotationGeneration] != "2" {
		t.Fatalf("pods after the spec change: %d, generation %v", len(pods), pods[0].Annotations)
	}
	if got := e.getVI("img").Status.ObservedGeneration; got != 2 {
		t.Fatalf("observedGeneration %d", got)
	}
}

func TestDelete_RemovesPodsAndRegistryDataThenTheFinalizer(t *testing.T) {
	e := newEnv(t, httpVI("img"))
	e.reconcileVI("img")
	e.reg.images["vi/ns/img:uid-img"] = layout.Meta{Format: "raw"}
	if err := e.c.Delete(context.Background(), e.getVI("img")); err != nil {
		t.Fatal(err)
	}
	e.reconcileVI("img")
	if err := e.c.Get(context.Background(), types.NamespacedName{Namespace: "ns", Name: "img"}, &v1.VirtualImage{}); !apierrors.IsNotFound(err) {
		t.Fatalf("image still there: %v", err)
	}
	if len(e.reg.deleted) != 1 || e.reg.deleted[0] != "vi/ns/img:uid-img" {
		t.Fatalf("registry deletes %v", e.reg.deleted)
	}
	if n := len(e.pods()); n != 0 {
		t.Fatalf("%d pods left", n)
	}
}

func TestObjectRef_CopiesAReadyImageInsideDVCR(t *testing.T) {
	src := httpVI("src")
	dst := &v1.VirtualImage{
		ObjectMeta: metav1.ObjectMeta{Name: "dst", Namespace: "ns", UID: "uid-dst", Generation: 1},
		Spec: v1.VirtualImageSpec{DataSource: v1.VirtualImageDataSource{Type: v1.DataSourceTypeObjectRef,
			ObjectRef: &v1.VirtualImageObjectRef{Kind: v1.ObjectRefKindVirtualImage, Name: "src"}}},
	}
	e := newEnv(t, src, dst)
	e.reconcileVI("dst")
	st := e.getVI("dst").Status
	if c := condition(st.ImageStatus, v1.ConditionReady); st.Phase != v1.ImagePhasePending || c.Reason != v1.ReasonDatasourceNotReady || !strings.Contains(c.Message, "VirtualImage/ns/src") {
		t.Fatalf("before the source is ready: phase %s condition %+v", st.Phase, c)
	}
	s := e.getVI("src")
	s.Status.Phase = v1.ImagePhaseReady
	if err := e.c.Status().Update(context.Background(), s); err != nil {
		t.Fatal(err)
	}
	e.reg.images["vi/ns/src:uid-src"] = layout.Meta{Format: "qcow2", VirtualSize: 1 << 30, StoredSize: 5 << 20}
	e.reconcileVI("dst")
	st = e.getVI("dst").Status
	if st.Phase != v1.ImagePhaseReady || st.Format != "qcow2" || st.Size.Unpacked != "1.0Gi" || st.SourceUID == nil || *st.SourceUID != "uid-src" {
		t.Fatalf("status %+v", st)
	}
	if len(e.reg.copies) != 1 || e.reg.copies[0] != "vi/ns/src:uid-src->vi/ns/dst:uid-dst" {
		t.Fatalf("copies %v", e.reg.copies)
	}
	if n := len(e.pods()); n != 0 {
		t.Fatalf("a copy started %d pods", n)
	}
}

func TestObjectRef_VirtualDiskIsPendingNotSupported(t *testing.T) {
	vi := &v1.VirtualImage{
		ObjectMeta: metav1.ObjectMeta{Name: "linux-vm-root", Namespace: "ns", UID: "u", Generation: 1},
		Spec: v1.VirtualImageSpec{DataSource: v1.VirtualImageDataSource{Type: v1.DataSourceTypeObjectRef,
			ObjectRef: &v1.VirtualImageObjectRef{Kind: v1.ObjectRefKindVirtualDisk, Name: "linux-vm-root"}}},
	}
	e := newEnv(t, vi)
	e.reconcileVI("linux-vm-root")
	st := e.getVI("linux-vm-root").Status
	c := condition(st.ImageStatus, v1.ConditionDatasourceReady)
	if st.Phase != v1.ImagePhasePending || c.Reason != reasonNotSupported || !strings.Contains(c.Message, "not supported yet") {
		t.Fatalf("phase %s condition %+v", st.Phase, c)
	}
}

func TestImport_MissingAuthSecretWaitsWithAClearReason(t *testing.T) {
	vi := httpVI("img")
	vi.Spec.DataSource.HTTP.AuthSecretRef = &v1.LocalSecretReference{Name: "creds"}
	e := newEnv(t, vi)
	res := e.reconcileVI("img")
	st := e.getVI("img").Status
	c := condition(st.ImageStatus, v1.ConditionDatasourceReady)
	if st.Phase != v1.ImagePhasePending || c.Reason != reasonSecretNotFound || !strings.Contains(c.Message, "ns/creds") || res.RequeueAfter == 0 {
		t.Fatalf("phase %s condition %+v requeue %v", st.Phase, c, res.RequeueAfter)
	}
	if n := len(e.pods()); n != 0 {
		t.Fatalf("%d pods without credentials", n)
	}
	sec := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "creds", Namespace: "ns"}, Data: map[string][]byte{"username": []byte("u"), "password": []byte("p")}}
	if err := e.c.Create(context.Background(), sec); err != nil {
		t.Fatal(err)
	}
	e.reconcileVI("img")
	if n := len(e.pods()); n != 1 {
		t.Fatalf("%d pods once the secret exists", n)
	}
}

func TestReady_LostRegistryDataIsImageLost(t *testing.T) {
	e := newEnv(t, httpVI("img"))
	e.reconcileVI("img")
	e.reg.images["vi/ns/img:uid-img"] = layout.Meta{Format: "raw", VirtualSize: 1, StoredSize: 1}
	p := e.pods()[0]
	e.updatePod(&p, func(p *corev1.Pod) { terminated(p, corev1.PodSucceeded, api.Outcome{Result: &api.Result{}}, e.now) })
	e.reconcileVI("img")
	delete(e.reg.images, "vi/ns/img:uid-img")
	e.reconcileVI("img")
	st := e.getVI("img").Status
	if st.Phase != v1.ImagePhaseImageLost || condition(st.ImageStatus, v1.ConditionReady).Reason != v1.ReasonImageLost {
		t.Fatalf("status %+v", st)
	}
}

func TestClusterImage_PullSecretFromItsNamespace(t *testing.T) {
	cvi := &v1.ClusterVirtualImage{
		ObjectMeta: metav1.ObjectMeta{Name: "img", UID: "uid-c", Generation: 1},
		Spec: v1.ClusterVirtualImageSpec{DataSource: v1.ClusterVirtualImageDataSource{Type: v1.DataSourceTypeContainerImage,
			ContainerImage: &v1.ClusterVirtualImageContainerImage{
				ContainerImageSource: v1.ContainerImageSource{Image: "registry.example:5000/disks/ubuntu:22.04"},
				ImagePullSecret:      &v1.SecretReference{Name: "pull", Namespace: "team"},
			}}},
	}
	cfg := `{"auths":{"registry.example:5000":{"auth":"` + "dTpw" + `"}}}` // u:p
	sec := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "pull", Namespace: "team"}, Type: corev1.SecretTypeDockerConfigJson,
		Data: map[string][]byte{corev1.DockerConfigJsonKey: []byte(cfg)}}
	e := newEnv(t, cvi, sec)
	if _, err := e.cvi.Reconcile(context.Background(), ctrl.Request{NamespacedName: types.NamespacedName{Name: "img"}}); err != nil {
		t.Fatal(err)
	}
	var got v1.ClusterVirtualImage
	if err := e.c.Get(context.Background(), types.NamespacedName{Name: "img"}, &got); err != nil {
		t.Fatal(err)
	}
	if got.Status.Phase != v1.ImagePhaseProvisioning {
		t.Fatalf("status %+v", got.Status)
	}
	var s corev1.Secret
	if err := e.c.Get(context.Background(), types.NamespacedName{Namespace: "vimg-system", Name: "vimg-import-uid-c"}, &s); err != nil {
		t.Fatal(err)
	}
	var req api.Request
	if err := json.Unmarshal(s.Data[api.RequestFile], &req); err != nil {
		t.Fatal(err)
	}
	if req.Source.Type != api.SourceRegistry || string(req.Source.DockerConfig) != cfg || req.DVCR.Ref != "cvi/img:uid-c" {
		t.Fatalf("request %+v", req)
	}
	if l := e.pods()[0].Labels; l[LabelImageKind] != "cvi" || l[LabelImageNamespace] != "" {
		t.Fatalf("labels %v", l)
	}
}

func uploadVI(name string) *v1.VirtualImage {
	return &v1.VirtualImage{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "ns", UID: types.UID("uid-" + name), Generation: 1},
		Spec: v1.VirtualImageSpec{DataSource: v1.VirtualImageDataSource{Type: v1.DataSourceTypeUpload,
			Upload: &v1.DataSourceUpload{Checksum: &v1.Checksum{MD5: strings.Repeat("a", 32)}}}},
	}
}

func (e *env) uploadSecret(name string) *corev1.Secret {
	e.t.Helper()
	var s corev1.Secret
	if err := e.c.Get(context.Background(), types.NamespacedName{Namespace: "vimg-uploads", Name: "vimg-upload-uid-" + name}, &s); err != nil {
		e.t.Fatal(err)
	}
	return &s
}

func TestUpload_WaitsWithURLsThenImportsTheUploadedBlob(t *testing.T) {
	e := newEnv(t, uploadVI("up"))
	e.vi.cfg.UploadInClusterURL, e.vi.cfg.UploadExternalURL = "https://vimg-upload.vimg-system.svc", "https://uploads.example.com"
	res := e.reconcileVI("up")
	st := e.getVI("up").Status
	sec := e.uploadSecret("up")
	token := string(sec.Data[api.UploadKeyToken])
	if st.Phase != v1.ImagePhaseWaitForUserUpload || st.ImageUploadURLs == nil || len(token) != 64 ||
		st.ImageUploadURLs.InCluster != "https://vimg-upload.vimg-system.svc/upload/uid-up/"+token ||
		st.ImageUploadURLs.External != "https://uploads.example.com/upload/uid-up/"+token {
		t.Fatalf("phase %s urls %+v token %q", st.Phase, st.ImageUploadURLs, token)
	}
	if string(sec.Data[api.UploadKeyRepository]) != "vi/ns/up" || string(sec.Data[api.UploadKeyDVCRToken]) != "token-for-vi/ns/up" {
		t.Fatalf("upload secret %v", sec.Data)
	}
	if res.RequeueAfter != time.Hour {
		t.Fatalf("requeue after %v, want the upload timeout", res.RequeueAfter)
	}
	if n := len(e.pods()); n != 0 {
		t.Fatalf("%d pods before the upload", n)
	}

	// The gateway receives half of it, then all of it.
	for _, u := range []api.UploadState{{Received: 50, Total: 100}, {Received: 100, Total: 100, Done: true, Digest: "sha256:" + strings.Repeat("1", 64), Size: 100}} {
		sec := e.uploadSecret("up")
		sec.Annotations = map[string]string{api.AnnotationUploadState: u.Encode()}
		if err := e.c.Update(context.Background(), sec); err != nil {
			t.Fatal(err)
		}
		e.reconcileVI("up")
		if !u.Done {
			if st := e.getVI("up").Status; st.Phase != v1.ImagePhaseProvisioning || st.Progress != "25.0%" {
				t.Fatalf("while receiving: phase %s progress %s, want Provisioning 25.0%% (the upload is the first half)", st.Phase, st.Progress)
			}
		}
	}
	pods := e.pods()
	if len(pods) != 1 {
		t.Fatalf("%d import pods after the upload, want 1", len(pods))
	}
	var s corev1.Secret
	if err := e.c.Get(context.Background(), types.NamespacedName{Namespace: "vimg-system", Name: "vimg-import-uid-up"}, &s); err != nil {
		t.Fatal(err)
	}
	var req api.Request
	if err := json.Unmarshal(s.Data[api.RequestFile], &req); err != nil {
		t.Fatal(err)
	}
	if req.Source.Type != api.SourceDVCRBlob || req.Source.URL != "sha256:"+strings.Repeat("1", 64) || req.Source.Size != 100 ||
		len(req.Checksums) != 1 || req.Checksums[0] != "md5:"+strings.Repeat("a", 32) {
		t.Fatalf("import request %+v", req)
	}

	// The import finishes: Ready, URLs gone, the upload Secret deleted.
	e.reg.images["vi/ns/up:uid-up"] = layout.Meta{Format: "raw", VirtualSize: 100, StoredSize: 100}
	p := pods[0]
	e.updatePod(&p, func(p *corev1.Pod) { terminated(p, corev1.PodSucceeded, api.Outcome{Result: &api.Result{}}, e.now) })
	e.reconcileVI("up")
	if st := e.getVI("up").Status; st.Phase != v1.ImagePhaseReady || st.ImageUploadURLs != nil {
		t.Fatalf("after the import: phase %s urls %+v", st.Phase, st.ImageUploadURLs)
	}
	err := e.c.Get(context.Background(), types.NamespacedName{Namespace: "vimg-uploads", Name: "vimg-upload-uid-up"}, &corev1.Secret{})
	if !apierrors.IsNotFound(err) {
		t.Fatalf("upload secret after Ready: %v", err)
	}
}

func TestUpload_NoUploadInTimeIsFailedWithItsOwnReason(t *testing.T) {
	e := newEnv(t, uploadVI("up"))
	e.reconcileVI("up")
	e.now = e.now.Add(time.Hour + time.Second)
	e.reconcileVI("up")
	st := e.getVI("up").Status
	c := condition(st.ImageStatus, v1.ConditionReady)
	if st.Phase != v1.ImagePhaseFailed || c.Reason != v1.ReasonWaitForUserUploadTimeout || !strings.Contains(c.Message, "re-create") || st.ImageUploadURLs != nil {
		t.Fatalf("phase %s condition %+v urls %+v", st.Phase, c, st.ImageUploadURLs)
	}
	err := e.c.Get(context.Background(), types.NamespacedName{Namespace: "vimg-uploads", Name: "vimg-upload-uid-up"}, &corev1.Secret{})
	if !apierrors.IsNotFound(err) {
		t.Fatalf("upload secret after the timeout: %v", err)
	}
}
