package gc

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"
)

const testGrace = 10 * time.Minute

func newFakeClockEnv(t *testing.T) (*env, *fakeClock) {
	clock := &fakeClock{now: time.Now()}
	return newEnv(t, Options{Grace: testGrace, Interval: time.Minute, Now: clock.Now}), clock
}

func randomImage(t *testing.T, extra ...v1.Layer) v1.Image {
	t.Helper()
	img, err := random.Image(2048, 1)
	if err != nil {
		t.Fatal(err)
	}
	if len(extra) > 0 {
		img, err = mutate.AppendLayers(img, extra...)
		if err != nil {
			t.Fatal(err)
		}
	}
	return img
}

func randomLayer(t *testing.T) v1.Layer {
	t.Helper()
	l, err := random.Layer(4096, types.OCIUncompressedLayer)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func TestNew_RejectsUnsafeOptions(t *testing.T) {
	e, _ := newFakeClockEnv(t)
	for _, tc := range []struct {
		name string
		opts Options
	}{
		{"no grace", Options{Interval: time.Minute}},
		{"negative grace", Options{Grace: -time.Second, Interval: time.Minute}},
		{"no interval", Options{Grace: time.Minute}},
	} {
		if _, err := New(e.gc.driver, tc.opts); err == nil {
			t.Errorf("%s: New accepted %+v", tc.name, tc.opts)
		}
	}
	if _, err := New(nil, Options{Grace: time.Minute, Interval: time.Minute}); err == nil {
		t.Error("New accepted a nil driver")
	}
}

func TestCollect_DeletedImageFreesUniqueBlobsKeepsShared(t *testing.T) {
	e, clock := newFakeClockEnv(t)
	shared := randomLayer(t)
	live := randomImage(t, shared)
	gone := randomImage(t, shared)
	liveRef := e.mustPush("vi/ns/live", "uid-live", live)
	goneRef := e.mustPush("vi/ns/gone", "uid-gone", gone)

	sharedDigest, _ := shared.Digest()
	isShared := map[digest.Digest]bool{digest.Digest(sharedDigest.String()): true}
	var unique []digest.Digest
	var uniqueBytes int64
	for _, d := range imageBlobs(t, gone) {
		if !isShared[d] {
			unique = append(unique, d)
			uniqueBytes += e.blobSize(d)
		}
	}
	e.mustDelete(goneRef)

	// Within the grace nothing goes: a pusher may still reference it.
	st, err := e.gc.Collect(context.Background())
	if err != nil {
		t.Fatalf("Collect within grace: %v", err)
	}
	if st.BlobsDeleted != 0 {
		t.Fatalf("within the grace %d blobs were deleted", st.BlobsDeleted)
	}
	for _, d := range unique {
		if !e.blobOnDisk(d) {
			t.Fatalf("blob %s deleted within the grace", d)
		}
	}

	clock.Advance(testGrace + time.Minute)
	st, err = e.gc.Collect(context.Background())
	if err != nil {
		t.Fatalf("Collect: %v", err)
	}
	for _, d := range unique {
		if e.blobOnDisk(d) {
			t.Errorf("blob %s of the deleted image is still on disk", d)
		}
	}
	if st.BlobsDeleted != len(unique) || st.BytesFreed != uniqueBytes {
		t.Errorf("pass deleted %d blobs / %d bytes, want %d / %d", st.BlobsDeleted, st.BytesFreed, len(unique), uniqueBytes)
	}
	for _, d := range imageBlobs(t, live) {
		if !e.blobOnDisk(d) {
			t.Errorf("blob %s of the live image was deleted", d)
		}
	}
	if err := verifyPull(context.Background(), liveRef); err != nil {
		t.Errorf("live image no longer pulls: %v", err)
	}
	if st.RepositoriesRemoved != 1 {
		t.Errorf("removed %d repositories, want the emptied vi/ns/gone only", st.RepositoriesRemoved)
	}
	if _, err := os.Stat(e.repoDir("vi/ns/gone")); !os.IsNotExist(err) {
		t.Errorf("emptied repository still on disk: %v", err)
	}
	if _, err := os.Stat(e.repoDir("vi/ns/live")); err != nil {
		t.Errorf("live repository: %v", err)
	}
	if got := e.metric("dvcr_gc_blobs_deleted_total", ""); got != float64(len(unique)) {
		t.Errorf("blobs_deleted_total = %v, want %d", got, len(unique))
	}
	if got := e.metric("dvcr_gc_freed_bytes_total", ""); got != float64(uniqueBytes) {
		t.Errorf("freed_bytes_total = %v, want %d", got, uniqueBytes)
	}
	if got := e.metric("dvcr_gc_passes_total", "success"); got != 2 {
		t.Errorf("passes_total{result=success} = %v, want 2", got)
	}

	// Pushing the deleted image again restores it completely.
	again := e.mustPush("vi/ns/gone", "uid-gone", gone)
	if err := verifyPull(context.Background(), again); err != nil {
		t.Errorf("re-pushed image does not pull: %v", err)
	}
}

// The targeted race: a blob unreferenced for longer than the grace is found
// "already there" by a pusher and referenced by its manifest after the sweep
// chose it for deletion but before it deleted it.
func TestCollect_BlobReusedWhileSweepRunsSurvives(t *testing.T) {
	e, clock := newFakeClockEnv(t)
	ctx := context.Background()
	reused := randomLayer(t)
	first := randomImage(t, reused)
	e.mustDelete(e.mustPush("vi/ns/img", "uid-1", first))
	rd, _ := reused.Digest()
	reusedDigest := digest.Digest(rd.String())

	clock.Advance(testGrace + time.Minute)

	second := randomImage(t, reused)
	var (
		secondRef  = e.repo("vi/ns/img").Digest("sha256:0000000000000000000000000000000000000000000000000000000000000000")
		pushErr    = fmt.Errorf("the sweep never considered the reused blob")
		pushedAt   int
		candidates []digest.Digest
	)
	e.gc.beforeDelete = func(d digest.Digest) {
		candidates = append(candidates, d)
		if d != reusedDigest {
			return
		}
		pushedAt = e.requestCount()
		secondRef, pushErr = e.push(ctx, "vi/ns/img", "uid-2", second)
	}
	st, err := e.gc.Collect(ctx)
	if err != nil {
		t.Fatalf("Collect: %v", err)
	}
	if pushErr != nil {
		t.Fatalf("push during the sweep: %v", pushErr)
	}
	// The race is only exercised if the pusher relied on the old blob
	// instead of uploading it again.
	for _, r := range e.requestsSince(pushedAt) {
		if strings.HasPrefix(r, "PUT ") && strings.Contains(r, "digest="+string(reusedDigest)) {
			t.Fatalf("pusher uploaded the reused blob again (%s); the race was not exercised", r)
		}
	}
	if !e.blobOnDisk(reusedDigest) {
		t.Fatal("the reused blob was deleted under the manifest that references it")
	}
	if err := verifyPull(ctx, secondRef); err != nil {
		t.Fatalf("image pushed during the sweep does not pull: %v", err)
	}
	// The first image's manifest, config and own layer were candidates
	// too and are gone.
	if st.BlobsDeleted != 3 || len(candidates) != 4 {
		t.Errorf("deleted %d of %d candidates, want 3 of 4 (all but the reused layer)", st.BlobsDeleted, len(candidates))
	}

	// Later passes see the manifest and keep the blob for good.
	e.gc.beforeDelete = nil
	clock.Advance(2 * testGrace)
	if _, err := e.gc.Collect(ctx); err != nil {
		t.Fatalf("Collect: %v", err)
	}
	if err := verifyPull(ctx, secondRef); err != nil {
		t.Fatalf("image does not pull after a later pass: %v", err)
	}
}

// A manifest PUT that arrives while the sweep deletes its blob waits for the
// deletion and then fails with BLOB_UNKNOWN rather than being accepted.
func TestGuard_ManifestPutDuringDeletionFailsCleanly(t *testing.T) {
	e, clock := newFakeClockEnv(t)
	ctx := context.Background()
	layer := randomLayer(t)
	first := randomImage(t, layer)
	e.mustDelete(e.mustPush("vi/ns/img", "uid-1", first))
	ld, _ := layer.Digest()
	layerDigest := digest.Digest(ld.String())
	clock.Advance(testGrace + time.Minute)

	// A manifest referencing the layer, prepared by a pusher that checked
	// the blob long ago (its lease expired with the grace).
	second := randomImage(t, layer)
	cfgName, _ := second.ConfigName()
	rawCfg, _ := second.RawConfigFile()
	putBlob(t, e, "vi/ns/img", digest.Digest(cfgName.String()), rawCfg)
	secondLayers, _ := second.Layers()
	for _, l := range secondLayers {
		if d, _ := l.Digest(); d.String() == layerDigest.String() {
			continue
		}
		rc, _ := l.Compressed()
		data, err := io.ReadAll(rc)
		rc.Close()
		if err != nil {
			t.Fatal(err)
		}
		putBlob(t, e, "vi/ns/img", digest.FromBytes(data), data)
	}
	rawManifest, _ := second.RawManifest()
	mt, _ := second.MediaType()

	putDone := make(chan *http.Response, 1)
	seen := e.requestCount()
	e.gc.mu.Lock() // stand in for the sweep holding the write lock
	go func() {
		req, _ := http.NewRequest(http.MethodPut, "http://"+e.host+"/v2/vi/ns/img/manifests/uid-2", strings.NewReader(string(rawManifest)))
		req.Header.Set("Content-Type", string(mt))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Error(err)
			putDone <- nil
			return
		}
		putDone <- resp
	}()
	// Once the PUT has reached the server it must wait for the sweep: give
	// it ample time to (wrongly) complete, then delete the blob as the
	// sweep would and let the PUT through.
	for e.requestCount() == seen {
		time.Sleep(time.Millisecond)
	}
	select {
	case resp := <-putDone:
		e.gc.mu.Unlock()
		t.Fatalf("manifest PUT completed while the sweep held the write lock: %v", resp)
	case <-time.After(300 * time.Millisecond):
	}
	ok, _, err := e.gc.deleteBlobLocked(ctx, layerDigest, []string{"vi/ns/img"}, clock.Now().Add(-testGrace))
	e.gc.mu.Unlock()
	if err != nil || !ok {
		t.Fatalf("deleting the layer: ok=%v err=%v", ok, err)
	}
	resp := <-putDone
	if resp == nil {
		t.FailNow()
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode < 400 || !strings.Contains(string(body), "BLOB_UNKNOWN") || !strings.Contains(string(body), layerDigest.String()) {
		t.Fatalf("manifest PUT after its blob was deleted: %d %s, want BLOB_UNKNOWN for %s", resp.StatusCode, body, layerDigest)
	}
	ms, err := e.storedManifests()
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 0 {
		t.Fatalf("manifests stored: %v, want none", ms)
	}
}

func putBlob(t *testing.T, e *env, repo string, d digest.Digest, data []byte) {
	t.Helper()
	resp, err := http.Post("http://"+e.host+"/v2/"+repo+"/blobs/uploads/", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("starting upload: %s", resp.Status)
	}
	loc := resolve(e, resp.Header.Get("Location"))
	req, _ := http.NewRequest(http.MethodPut, withQuery(loc, "digest="+d.String()), strings.NewReader(string(data)))
	req.Header.Set("Content-Type", "application/octet-stream")
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("uploading blob %s: %s", d, resp.Status)
	}
}

func resolve(e *env, loc string) string {
	if strings.HasPrefix(loc, "/") {
		return "http://" + e.host + loc
	}
	return loc
}

func withQuery(u, q string) string {
	if strings.Contains(u, "?") {
		return u + "&" + q
	}
	return u + "?" + q
}

func TestCollect_LeavesUploadInProgressAlone(t *testing.T) {
	e, clock := newFakeClockEnv(t)
	ctx := context.Background()
	data := []byte(strings.Repeat("disk image bytes ", 4096))
	half := len(data) / 2

	resp, err := http.Post("http://"+e.host+"/v2/vi/ns/upload/blobs/uploads/", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("starting upload: %s", resp.Status)
	}
	loc := resolve(e, resp.Header.Get("Location"))
	patch := func(chunk []byte, from int) {
		t.Helper()
		req, _ := http.NewRequest(http.MethodPatch, loc, strings.NewReader(string(chunk)))
		req.Header.Set("Content-Type", "application/octet-stream")
		req.Header.Set("Content-Range", fmt.Sprintf("%d-%d", from, from+len(chunk)-1))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusAccepted {
			t.Fatalf("PATCH at %d: %s", from, resp.Status)
		}
		loc = resolve(e, resp.Header.Get("Location"))
	}
	patch(data[:half], 0)

	uploads := filepath.Join(e.repoDir("vi/ns/upload"), "_uploads")
	before := dirFiles(t, uploads)
	if len(before) == 0 {
		t.Fatal("no upload session on disk")
	}

	// Far past the grace: the session is old but still in progress.
	clock.Advance(10 * testGrace)
	st, err := e.gc.Collect(ctx)
	if err != nil {
		t.Fatalf("Collect: %v", err)
	}
	if st.RepositoriesRemoved != 0 {
		t.Errorf("pass removed %d repositories during an upload", st.RepositoriesRemoved)
	}
	after := dirFiles(t, uploads)
	for f, size := range before {
		if got, ok := after[f]; !ok || got != size {
			t.Errorf("upload file %s changed by the pass: %d bytes before, %d (present=%v) after", f, size, got, ok)
		}
	}

	patch(data[half:], half)
	d := digest.FromBytes(data)
	req, _ := http.NewRequest(http.MethodPut, withQuery(loc, "digest="+d.String()), nil)
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("committing upload after the pass: %s", resp.Status)
	}
	if !e.blobOnDisk(d) {
		t.Fatal("committed blob not on disk")
	}
	got, err := os.ReadFile(e.blobFile(d))
	if err != nil || string(got) != string(data) {
		t.Fatalf("committed blob differs from the uploaded data (err=%v)", err)
	}
}

func dirFiles(t *testing.T, dir string) map[string]int64 {
	t.Helper()
	out := map[string]int64{}
	err := filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		if !fi.IsDir() {
			out[p] = fi.Size()
		}
		return nil
	})
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	return out
}

func TestRun_CollectsEveryIntervalUntilCancelled(t *testing.T) {
	clock := &fakeClock{now: time.Now()}
	e := newEnv(t, Options{Grace: testGrace, Interval: 10 * time.Millisecond, Now: clock.Now})
	img := randomImage(t)
	e.mustDelete(e.mustPush("cvi/gone", "uid", img))
	clock.Advance(testGrace + time.Minute)

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		e.gc.Run(ctx)
		close(done)
	}()
	blobs := imageBlobs(t, img)
	deadline := time.Now().Add(20 * time.Second)
	for e.blobOnDisk(blobs[0]) || e.metric("dvcr_gc_passes_total", "success") < 2 {
		if time.Now().After(deadline) {
			cancel()
			t.Fatalf("Run did not collect: blob on disk=%v, passes=%v", e.blobOnDisk(blobs[0]), e.metric("dvcr_gc_passes_total", "success"))
		}
		time.Sleep(5 * time.Millisecond)
	}
	cancel()
	<-done
	for _, d := range blobs {
		if e.blobOnDisk(d) {
			t.Errorf("blob %s of the deleted image survived Run", d)
		}
	}
	if ts := e.metric("dvcr_gc_last_success_timestamp_seconds", ""); !(ts > 0) {
		t.Errorf("last_success_timestamp_seconds = %v after successful passes", ts)
	}
}
