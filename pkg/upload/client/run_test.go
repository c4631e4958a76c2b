package client

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	k8stesting "k8s.io/client-go/testing"

	v1 "vimg.dev/vimg/pkg/apis/virtualization/v1alpha2"
)

// cluster is a fake API server holding images, and a fake controller that
// moves them along the way the real one does: an upload Secret and URLs
// (WaitForUserUpload), Provisioning once the gateway says the upload is
// done, then Ready (or Failed with failMessage).
type cluster struct {
	t           *testing.T
	g           *gateway
	dyn         *dynamicfake.FakeDynamicClient
	external    bool
	failMessage string
	uids        atomic.Int64
	mu          sync.Mutex
	urls        map[string]string // by image UID
}

func newCluster(t *testing.T, g *gateway, objects ...runtime.Object) *cluster {
	c := &cluster{t: t, g: g, external: true, urls: map[string]string{}}
	c.dyn = dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), map[schema.GroupVersionResource]string{
		VirtualImages: "VirtualImageList", ClusterVirtualImages: "ClusterVirtualImageList",
	}, objects...)
	// The API server gives every object a UID.
	c.dyn.PrependReactor("create", "*", func(a k8stesting.Action) (bool, runtime.Object, error) {
		if u, ok := a.(k8stesting.CreateAction).GetObject().(*unstructured.Unstructured); ok && u.GetUID() == "" {
			u.SetUID(types.UID(fmt.Sprintf("1a2b3c4d-0000-4000-8000-%012d", c.uids.Add(1))))
		}
		return false, nil, nil
	})
	return c
}

// image builds an image object as a user would write it.
func image(ref ImageRef, uid string, dsType v1.DataSourceType) *unstructured.Unstructured {
	u := &unstructured.Unstructured{Object: map[string]any{
		"spec": map[string]any{"dataSource": map[string]any{"type": string(dsType)}},
	}}
	if ref.Cluster {
		u.SetGroupVersionKind(v1.SchemeGroupVersion.WithKind("ClusterVirtualImage"))
	} else {
		u.SetGroupVersionKind(v1.SchemeGroupVersion.WithKind("VirtualImage"))
		u.SetNamespace(ref.Namespace)
	}
	u.SetName(ref.Name)
	u.SetUID(types.UID(uid))
	return u
}

// control runs the fake controller for ref until the test ends.
func (c *cluster) control(ref ImageRef) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	c.t.Cleanup(func() { cancel(); <-done })
	res := NewImages(c.dyn).(dynamicImages).resource(ref)
	go func() {
		defer close(done)
		provisioning := map[string]time.Time{}
		for ctx.Err() == nil {
			time.Sleep(20 * time.Millisecond)
			u, err := res.Get(ctx, ref.Name, metav1.GetOptions{})
			if err != nil {
				continue
			}
			uid := string(u.GetUID())
			phase, _, _ := unstructured.NestedString(u.Object, "status", "phase")
			switch phase {
			case "":
				url := c.g.addUpload(uid, time.Time{})
				urls := map[string]any{"inCluster": url}
				if c.external {
					urls["external"] = url
				}
				unstructured.SetNestedField(u.Object, string(v1.ImagePhaseWaitForUserUpload), "status", "phase")
				unstructured.SetNestedField(u.Object, urls, "status", "imageUploadURLs")
			case string(v1.ImagePhaseWaitForUserUpload):
				if !c.g.state(uid).Done {
					continue
				}
				unstructured.SetNestedField(u.Object, string(v1.ImagePhaseProvisioning), "status", "phase")
				unstructured.SetNestedField(u.Object, "50.0%", "status", "progress")
			case string(v1.ImagePhaseProvisioning):
				// Long enough for a poll to see the import's progress.
				if since, ok := provisioning[uid]; !ok {
					provisioning[uid] = time.Now()
					continue
				} else if time.Since(since) < 200*time.Millisecond {
					continue
				}
				if c.failMessage != "" {
					unstructured.SetNestedField(u.Object, string(v1.ImagePhaseFailed), "status", "phase")
					unstructured.SetNestedSlice(u.Object, []any{map[string]any{
						"type": v1.ConditionReady, "status": "False", "reason": v1.ReasonProvisioningFailed, "message": c.failMessage,
						"lastTransitionTime": "2026-01-01T00:00:00Z",
					}}, "status", "conditions")
				} else {
					unstructured.SetNestedField(u.Object, string(v1.ImagePhaseReady), "status", "phase")
					unstructured.SetNestedField(u.Object, "100%", "status", "progress")
					unstructured.SetNestedField(u.Object, "qcow2", "status", "format")
				}
			default:
				continue
			}
			res.Update(ctx, u, metav1.UpdateOptions{})
		}
	}()
}

func (c *cluster) options(ref ImageRef, log *[]string) Options {
	var mu sync.Mutex
	return Options{
		Images: NewImages(c.dyn), Sender: c.g.sender(nil), Image: ref, PollInterval: 20 * time.Millisecond,
		Log: func(m string) {
			mu.Lock()
			defer mu.Unlock()
			if log != nil {
				*log = append(*log, m)
			}
		},
	}
}

func TestUpload_CreatesTheImageUploadsAndWaitsForReady(t *testing.T) {
	for _, ref := range []ImageRef{{Namespace: "ns", Name: "disk"}, {Name: "shared", Cluster: true}} {
		t.Run(ref.String(), func(t *testing.T) {
			g := newGateway(t, nil)
			c := newCluster(t, g)
			c.control(ref)
			_, data := testFile(t, 1<<20+3, 11)
			var log []string
			o := c.options(ref, &log)
			o.Create = true
			importing := ""
			o.Importing = func(p string) { importing = p }
			out, err := Upload(context.Background(), o, Source{Name: "disk.img", File: bytes.NewReader(data), Size: int64(len(data))})
			if err != nil {
				t.Fatalf("Upload: %v (log %q)", err, log)
			}
			if out.Uploaded == nil || out.Uploaded.Digest != sha(data) || out.Image.Phase != v1.ImagePhaseReady || out.Image.Status.Format != "qcow2" {
				t.Fatalf("outcome %+v", out)
			}
			if importing != "50.0%" {
				t.Errorf("import progress seen: %q", importing)
			}
			u, err := NewImages(c.dyn).(dynamicImages).resource(ref).Get(context.Background(), ref.Name, metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			ds, _, _ := unstructured.NestedString(u.Object, "spec", "dataSource", "type")
			storage, _, _ := unstructured.NestedString(u.Object, "spec", "storage")
			if ds != "Upload" || (!ref.Cluster && storage != "ContainerRegistry") {
				t.Errorf("created spec %v", u.Object["spec"])
			}
			if !strings.Contains(strings.Join(log, "\n"), "Creating "+ref.String()) {
				t.Errorf("log %q", log)
			}
		})
	}
}

func TestUpload_ExistingImageFromAStream(t *testing.T) {
	g := newGateway(t, nil)
	ref := ImageRef{Namespace: "ns", Name: "piped"}
	c := newCluster(t, g, image(ref, "1a2b3c4d-0000-4000-8000-999999999999", v1.DataSourceTypeUpload))
	c.control(ref)
	_, data := testFile(t, 300000, 12)
	out, err := Upload(context.Background(), c.options(ref, nil), Source{Name: "stdin", Stream: bytes.NewReader(data)})
	if err != nil || out.Uploaded.Digest != sha(data) {
		t.Fatalf("Upload = %+v, %v", out, err)
	}
}

func TestUpload_FailedImportIsAnErrorWithTheImagesMessage(t *testing.T) {
	g := newGateway(t, nil)
	ref := ImageRef{Namespace: "ns", Name: "bad"}
	c := newCluster(t, g)
	c.failMessage = "the image is not a disk image: qcow2 header is corrupt"
	c.control(ref)
	o := c.options(ref, nil)
	o.Create = true
	_, err := Upload(context.Background(), o, Source{Name: "bad.qcow2", File: bytes.NewReader([]byte("QFI\xfbjunk")), Size: 8})
	if err == nil || !strings.Contains(err.Error(), c.failMessage) || !strings.Contains(err.Error(), v1.ReasonProvisioningFailed) {
		t.Fatalf("Upload of a failing image = %v", err)
	}
}

func TestUpload_WithoutExternalURLSaysToUseTheInClusterOne(t *testing.T) {
	g := newGateway(t, nil)
	ref := ImageRef{Namespace: "ns", Name: "inside"}
	c := newCluster(t, g)
	c.external = false
	c.control(ref)
	o := c.options(ref, nil)
	o.Create = true
	src := Source{Name: "x", File: bytes.NewReader([]byte("data")), Size: 4}
	if _, err := Upload(context.Background(), o, src); err == nil || !strings.Contains(err.Error(), "--in-cluster-url") {
		t.Fatalf("Upload without an external URL = %v", err)
	}
	o.InCluster = true
	if out, err := Upload(context.Background(), o, src); err != nil || out.Uploaded.Size != 4 {
		t.Fatalf("Upload to the in-cluster URL = %+v, %v", out, err)
	}
}

func TestUpload_RefusesWhatCannotTakeAnUpload(t *testing.T) {
	g := newGateway(t, nil)
	missing := ImageRef{Namespace: "ns", Name: "missing"}
	httpImage := ImageRef{Namespace: "ns", Name: "fromhttp"}
	ready := ImageRef{Name: "done", Cluster: true}
	readyObj := image(ready, "1a2b3c4d-0000-4000-8000-888888888888", v1.DataSourceTypeUpload)
	unstructured.SetNestedField(readyObj.Object, "Ready", "status", "phase")
	c := newCluster(t, g, image(httpImage, "1a2b3c4d-0000-4000-8000-777777777777", v1.DataSourceTypeHTTP), readyObj)
	src := Source{Name: "disk.img", File: bytes.NewReader([]byte("x")), Size: 1}
	for _, tc := range []struct {
		ref  ImageRef
		want string
	}{
		{missing, "not found: create it with dataSource type Upload, or pass --create"},
		{httpImage, "has dataSource type HTTP, not Upload"},
		{ready, "is Ready with an earlier upload"},
	} {
		if _, err := Upload(context.Background(), c.options(tc.ref, nil), src); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Upload to %s = %v, want %q", tc.ref, err, tc.want)
		}
	}
}

func TestUpload_TimesOutWaitingForTheURL(t *testing.T) {
	g := newGateway(t, nil)
	ref := ImageRef{Namespace: "ns", Name: "pending"}
	c := newCluster(t, g, image(ref, "1a2b3c4d-0000-4000-8000-666666666666", v1.DataSourceTypeUpload))
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err := Upload(ctx, c.options(ref, nil), Source{Name: "x", File: bytes.NewReader([]byte("x")), Size: 1})
	if err == nil || !strings.Contains(err.Error(), "waiting for the upload URL") {
		t.Fatalf("Upload to an image that never waits for one = %v", err)
	}
}
