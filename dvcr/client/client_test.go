package client

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/distribution/distribution/v3/configuration"
	"github.com/distribution/distribution/v3/registry/handlers"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/filesystem"
	"github.com/sirupsen/logrus"

	"vimg.dev/vimg/dvcr/layout"
	"vimg.dev/vimg/pkg/diskimage/testimg"
)

func TestMain(m *testing.M) {
	// distribution logs through logrus, including the errors that tests
	// provoke on purpose; show them only with -v.
	flag.Parse()
	if !testing.Verbose() {
		logrus.SetOutput(io.Discard)
	}
	os.Exit(m.Run())
}

// counts records requests that carry blob data to the registry.
type counts struct {
	patch, put, mount atomic.Int64
	// failRanges makes the next n ranged GETs answer 503.
	failRanges atomic.Int64
	// noMount makes the registry decline mounts (it opens a plain upload).
	noMount atomic.Bool
	// redirectBlobs, when set, is where blob GETs are redirected to, the
	// way a registry on S3 redirects to a presigned URL.
	redirectBlobs atomic.Pointer[string]
}

type testRegistry struct {
	host string
	root string // filesystem driver root
	n    *counts
}

// newRegistry serves a real distribution v3 registry (filesystem storage,
// delete enabled) on a loopback port.
func newRegistry(t testing.TB, configure ...func(*configuration.Configuration)) *testRegistry {
	t.Helper()
	root := t.TempDir()
	cfg := &configuration.Configuration{
		Storage: configuration.Storage{
			"filesystem":  configuration.Parameters{"rootdirectory": root},
			"delete":      configuration.Parameters{"enabled": true},
			"maintenance": configuration.Parameters{"uploadpurging": map[any]any{"enabled": false}},
		},
	}
	cfg.HTTP.Secret = "test-secret"
	for _, f := range configure {
		f(cfg)
	}
	ctx, cancel := context.WithCancel(context.Background())
	app := handlers.NewApp(ctx, cfg)
	n := &counts{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.Contains(r.URL.Path, "/blobs/uploads/") {
			switch r.Method {
			case http.MethodPatch:
				n.patch.Add(1)
			case http.MethodPut:
				n.put.Add(1)
			case http.MethodPost:
				if r.URL.Query().Get("mount") != "" {
					n.mount.Add(1)
				}
			}
		}
		if n.noMount.Load() && r.URL.Query().Get("mount") != "" {
			r.URL.RawQuery = ""
		}
		if to := n.redirectBlobs.Load(); to != nil && r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/sha256:") {
			http.Redirect(w, r, *to+r.URL.Path[strings.LastIndex(r.URL.Path, "/"):], http.StatusTemporaryRedirect)
			return
		}
		if r.Method == http.MethodGet && r.Header.Get("Range") != "" && n.failRanges.Load() > 0 {
			n.failRanges.Add(-1)
			http.Error(w, "injected", http.StatusServiceUnavailable)
			return
		}
		app.ServeHTTP(w, r)
	}))
	t.Cleanup(func() { srv.Close(); cancel() })
	return &testRegistry{host: strings.TrimPrefix(srv.URL, "http://"), root: root, n: n}
}

func (r *testRegistry) client(t testing.TB) *Client {
	t.Helper()
	c, err := New(r.host, Options{PlainHTTP: true})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// diskBytes makes a raw disk of pattern data with holes.
func diskBytes(t testing.TB, size int64) []byte {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.raw")
	testimg.Pattern(t, p, size, 7)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

var rawMeta = layout.Meta{Format: layout.FormatRaw, SourceChecksum: "sha256:1234"}

func TestPushOpenRead_RoundTrip(t *testing.T) {
	reg := newRegistry(t)
	c := reg.client(t)
	ctx := context.Background()
	data := diskBytes(t, 5<<20+1234)
	size := int64(len(data))
	meta := rawMeta
	meta.VirtualSize = size
	ref := layout.Ref(layout.Repository("vi", "default", "ubuntu"), layout.Tag("6f1c2d9e-0000-4000-8000-000000000001"))

	var lastProgress atomic.Int64
	pushed, err := c.Push(ctx, ref, bytes.NewReader(data), size, meta, PushOptions{
		Progress: func(n int64) { lastProgress.Store(n) },
	})
	if err != nil {
		t.Fatal(err)
	}
	if !pushed.LayerUploaded || pushed.Layer.Size <= size {
		t.Errorf("pushed %+v", pushed)
	}
	if got := lastProgress.Load(); got != size {
		t.Errorf("last progress %d, want %d", got, size)
	}
	if reg.n.patch.Load() != 1 {
		t.Errorf("%d PATCH requests for one layer, want 1 streaming PATCH", reg.n.patch.Load())
	}

	im, err := c.Open(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	want := meta
	want.StoredSize = size
	want.FileName = "disk.img"
	if im.Meta != want {
		t.Errorf("Meta = %+v, want %+v", im.Meta, want)
	}
	if im.Size() != size || im.Digest != pushed.Digest {
		t.Errorf("opened size %d digest %s; pushed %d %s", im.Size(), im.Digest, size, pushed.Digest)
	}

	rc, err := im.Reader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(rc)
	rc.Close()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("Reader gave %d bytes that differ from the %d pushed", len(got), len(data))
	}

	checkReaderAt(t, im.ReaderAt(), data)
}

// checkReaderAt compares random reads, some crossing the end, with data,
// from several goroutines at once.
func checkReaderAt(t *testing.T, ra io.ReaderAt, data []byte) {
	t.Helper()
	size := int64(len(data))
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func(seed uint64) {
			defer wg.Done()
			rnd := rand.New(rand.NewPCG(seed, 1))
			for i := 0; i < 25; i++ {
				off := rnd.Int64N(size)
				n := rnd.IntN(300<<10) + 1
				if i%5 == 0 {
					off = size - int64(rnd.IntN(1000)) // crosses the end
				}
				p := make([]byte, n)
				got, err := ra.ReadAt(p, off)
				wantN := int(min(int64(n), size-off))
				if got != wantN {
					t.Errorf("ReadAt(%d bytes at %d) = %d bytes, want %d (%v)", n, off, got, wantN, err)
					return
				}
				if wantN < n && err != io.EOF {
					t.Errorf("ReadAt across the end at %d: err %v, want io.EOF", off, err)
				}
				if wantN == n && err != nil {
					t.Errorf("ReadAt(%d at %d): %v", n, off, err)
				}
				if !bytes.Equal(p[:got], data[off:off+int64(got)]) {
					t.Errorf("ReadAt(%d at %d): bytes differ", n, off)
				}
			}
		}(uint64(g))
	}
	wg.Wait()
	if n, err := ra.ReadAt(make([]byte, 10), size); n != 0 || err != io.EOF {
		t.Errorf("ReadAt at the end = %d, %v; want 0, io.EOF", n, err)
	}
}

func TestPush_IdenticalLayerIsNotUploadedAgain(t *testing.T) {
	reg := newRegistry(t)
	c := reg.client(t)
	ctx := context.Background()
	data := diskBytes(t, 1<<20)
	first, err := c.Push(ctx, "vi/ns/a:uid-1", bytes.NewReader(data), int64(len(data)), rawMeta, PushOptions{})
	if err != nil {
		t.Fatal(err)
	}
	before := reg.n.patch.Load()
	// Same repository, known digest: found by HEAD, r is never read.
	again, err := c.Push(ctx, "vi/ns/a:uid-2", failingReader{}, int64(len(data)), rawMeta, PushOptions{LayerDigest: first.Layer.Digest})
	if err != nil {
		t.Fatal(err)
	}
	// Other repository: mounted.
	other, err := c.Push(ctx, "vi/ns/b:uid-3", failingReader{}, int64(len(data)), rawMeta, PushOptions{LayerDigest: first.Layer.Digest, MountFrom: []string{"vi/ns/a"}})
	if err != nil {
		t.Fatal(err)
	}
	if again.LayerUploaded || other.LayerUploaded || reg.n.patch.Load() != before {
		t.Errorf("layer uploaded again: %v %v, PATCH count %d -> %d", again.LayerUploaded, other.LayerUploaded, before, reg.n.patch.Load())
	}
	if reg.n.mount.Load() != 1 {
		t.Errorf("%d mount requests, want 1", reg.n.mount.Load())
	}
	if again.Digest != first.Digest || other.Digest != first.Digest {
		t.Errorf("identical content gave different manifests: %s %s %s", first.Digest, again.Digest, other.Digest)
	}
	im, err := c.Open(ctx, "vi/ns/b:uid-3")
	if err != nil {
		t.Fatal(err)
	}
	checkReaderAt(t, im.ReaderAt(), data)
}

type failingReader struct{}

func (failingReader) Read([]byte) (int, error) { return 0, errors.New("the source must not be read") }

func TestPush_ChunkedUploadGivesTheSameImage(t *testing.T) {
	reg := newRegistry(t)
	c := reg.client(t)
	ctx := context.Background()
	data := diskBytes(t, 3<<20+17)
	one, err := c.Push(ctx, "cvi/one:u1", bytes.NewReader(data), int64(len(data)), rawMeta, PushOptions{})
	if err != nil {
		t.Fatal(err)
	}
	before := reg.n.patch.Load()
	chunked, err := c.Push(ctx, "cvi/two:u2", bytes.NewReader(data), int64(len(data)), rawMeta, PushOptions{ChunkSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if got := reg.n.patch.Load() - before; got != 4 {
		t.Errorf("%d PATCH requests for 1 MiB chunks of a 3 MiB layer, want 4", got)
	}
	if one.Digest != chunked.Digest {
		t.Errorf("chunked upload gave manifest %s, single %s", chunked.Digest, one.Digest)
	}
}

func TestPush_WrongSizeFailsClearly(t *testing.T) {
	reg := newRegistry(t)
	c := reg.client(t)
	ctx := context.Background()
	data := diskBytes(t, 1<<20)
	for _, tc := range []struct {
		name string
		size int64
		want string
	}{
		{"short source", int64(len(data)) + 4096, "source ended after 1048576 of 1052672 bytes"},
		{"long source", int64(len(data)) - 1, "source has more than the 1048575 bytes announced"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ref := "vi/ns/wrong:" + strings.ReplaceAll(tc.name, " ", "-")
			_, err := c.Push(ctx, ref, bytes.NewReader(data), tc.size, rawMeta, PushOptions{})
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "uploading layer") {
				t.Fatalf("Push error %v, want one saying %q", err, tc.want)
			}
			if _, err := c.Head(ctx, ref); !errors.Is(err, ErrNotFound) {
				t.Errorf("after a failed push, Head = %v, want not found", err)
			}
		})
	}
}

func TestPush_UnreachableRegistryFailsClearly(t *testing.T) {
	c, err := New("registry.invalid:5000", Options{PlainHTTP: true})
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.Push(context.Background(), "vi/ns/x:u", bytes.NewReader([]byte("x")), 1, rawMeta, PushOptions{})
	if err == nil || !strings.Contains(err.Error(), "push vi/ns/x:u: opening layer upload") || !strings.Contains(err.Error(), "registry.invalid") {
		t.Fatalf("Push to a missing host: %v", err)
	}
}

func TestCopy_MountsWithoutMovingData(t *testing.T) {
	reg := newRegistry(t)
	c := reg.client(t)
	ctx := context.Background()
	data := diskBytes(t, 2<<20+5)
	src := "vi/ns/src:u1"
	pushed, err := c.Push(ctx, src, bytes.NewReader(data), int64(len(data)), rawMeta, PushOptions{})
	if err != nil {
		t.Fatal(err)
	}
	patch, put := reg.n.patch.Load(), reg.n.put.Load()
	cp, err := c.Copy(ctx, src, "cvi/dst:u2")
	if err != nil {
		t.Fatal(err)
	}
	if reg.n.patch.Load() != patch || reg.n.put.Load() != put || cp.LayerUploaded {
		t.Errorf("Copy uploaded data: PATCH %d -> %d, PUT %d -> %d", patch, reg.n.patch.Load(), put, reg.n.put.Load())
	}
	if reg.n.mount.Load() != 2 {
		t.Errorf("%d mounts, want 2 (config and layer)", reg.n.mount.Load())
	}
	if cp.Digest != pushed.Digest {
		t.Errorf("copy digest %s, source %s", cp.Digest, pushed.Digest)
	}
	im, err := c.Open(ctx, "cvi/dst:u2")
	if err != nil {
		t.Fatal(err)
	}
	rc, err := im.Reader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("copied image reads back %d bytes (%v), differing from the %d pushed", len(got), err, len(data))
	}

	// Delete the copy: the source stays.
	if err := c.Delete(ctx, "cvi/dst:u2"); err != nil {
		t.Fatal(err)
	}
	_, err = c.Head(ctx, "cvi/dst:u2")
	if !errors.Is(err, ErrNotFound) || ErrorCode(err) != "MANIFEST_UNKNOWN" {
		t.Errorf("Head after Delete = %v (code %q), want not found, MANIFEST_UNKNOWN", err, ErrorCode(err))
	}
	if _, err := c.Open(ctx, "cvi/dst:u2"); ErrorCode(err) != "MANIFEST_UNKNOWN" {
		t.Errorf("Open after Delete = %v, want MANIFEST_UNKNOWN", err)
	}
	if desc, err := c.Head(ctx, src); err != nil || desc.Digest != pushed.Digest {
		t.Errorf("source after deleting the copy: %+v, %v", desc, err)
	}
	if err := c.Delete(ctx, "cvi/dst:u2"); !errors.Is(err, ErrNotFound) {
		t.Errorf("second Delete = %v, want not found", err)
	}
}

func TestReader_CorruptLayerFailsAtTheEnd(t *testing.T) {
	reg := newRegistry(t)
	c := reg.client(t)
	ctx := context.Background()
	data := diskBytes(t, 1<<20)
	pushed, err := c.Push(ctx, "vi/ns/c:u", bytes.NewReader(data), int64(len(data)), rawMeta, PushOptions{})
	if err != nil {
		t.Fatal(err)
	}
	im, err := c.Open(ctx, "vi/ns/c:u")
	if err != nil {
		t.Fatal(err)
	}
	// Flip one disk byte in the stored blob, behind the registry's back.
	hex := pushed.Layer.Digest.Encoded()
	blob := filepath.Join(reg.root, "docker/registry/v2/blobs/sha256", hex[:2], hex, "data")
	f, err := os.OpenFile(blob, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{data[1000] ^ 0xff}, im.Offset+1000); err != nil {
		t.Fatal(err)
	}
	f.Close()
	rc, err := im.Reader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	got, err := io.ReadAll(rc)
	if err == nil || !strings.Contains(err.Error(), "layer digest is") {
		t.Fatalf("reading a corrupt layer: %v, want a digest mismatch", err)
	}
	if len(got) != len(data) {
		t.Errorf("got %d bytes before the error, want all %d", len(got), len(data))
	}
}

func TestReaderAt_RetriesTransientFailures(t *testing.T) {
	reg := newRegistry(t)
	c := reg.client(t)
	ctx := context.Background()
	data := diskBytes(t, 256<<10)
	if _, err := c.Push(ctx, "vi/ns/r:u", bytes.NewReader(data), int64(len(data)), rawMeta, PushOptions{}); err != nil {
		t.Fatal(err)
	}
	im, err := c.Open(ctx, "vi/ns/r:u")
	if err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 4096)
	reg.n.failRanges.Store(2)
	if n, err := im.ReaderAt().ReadAt(p, 5000); err != nil || n != len(p) || !bytes.Equal(p, data[5000:5000+4096]) {
		t.Fatalf("ReadAt after 2 injected 503s = %d, %v", n, err)
	}
	reg.n.failRanges.Store(readAttempts)
	_, err = im.ReaderAt().ReadAt(p, 0)
	if err == nil || ErrorCode(err) != "SERVICE_UNAVAILABLE" {
		t.Fatalf("ReadAt with the registry failing every attempt = %v, want SERVICE_UNAVAILABLE", err)
	}
}

// BenchmarkPushUpload compares one streaming PATCH with chunked PATCHes
// against the in-process registry (filesystem storage) on loopback:
//
//	go test -run NONE -bench PushUpload -benchtime 3x ./dvcr/client
func BenchmarkPushUpload(b *testing.B) {
	const size = 256 << 20
	data := make([]byte, size)
	for i := range data {
		data[i] = byte(i ^ i>>13)
	}
	for _, chunk := range []int64{0, 8 << 20, 64 << 20} {
		name := "single-PATCH"
		if chunk > 0 {
			name = fmt.Sprintf("chunks-%dMiB", chunk>>20)
		}
		b.Run(name, func(b *testing.B) {
			reg := newRegistry(b)
			c := reg.client(b)
			b.SetBytes(size)
			for i := 0; b.Loop(); i++ {
				ref := fmt.Sprintf("vi/bench/disk:u%d", i)
				if _, err := c.Push(context.Background(), ref, bytes.NewReader(data), size, rawMeta, PushOptions{ChunkSize: chunk}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func TestDelete_KeepsAnotherTagOfTheSameManifest(t *testing.T) {
	reg := newRegistry(t)
	c := reg.client(t)
	ctx := context.Background()
	data := diskBytes(t, 64<<10)
	// An object re-created under the same name: same content, new UID.
	for _, ref := range []string{"vi/ns/same:old-uid", "vi/ns/same:new-uid"} {
		if _, err := c.Push(ctx, ref, bytes.NewReader(data), int64(len(data)), rawMeta, PushOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Delete(ctx, "vi/ns/same:old-uid"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Head(ctx, "vi/ns/same:old-uid"); !errors.Is(err, ErrNotFound) {
		t.Errorf("deleted tag: %v, want not found", err)
	}
	if _, err := c.Open(ctx, "vi/ns/same:new-uid"); err != nil {
		t.Errorf("the other tag of the same manifest went too: %v", err)
	}
	// The last tag goes by digest.
	if err := c.Delete(ctx, "vi/ns/same:new-uid"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Head(ctx, "vi/ns/same:new-uid"); !errors.Is(err, ErrNotFound) {
		t.Errorf("deleted tag: %v, want not found", err)
	}
}

func TestCopy_StreamsWhenTheRegistryDeclinesTheMount(t *testing.T) {
	reg := newRegistry(t)
	c := reg.client(t)
	ctx := context.Background()
	data := diskBytes(t, 1<<20+3)
	pushed, err := c.Push(ctx, "vi/ns/m:u1", bytes.NewReader(data), int64(len(data)), rawMeta, PushOptions{})
	if err != nil {
		t.Fatal(err)
	}
	reg.n.noMount.Store(true)
	put := reg.n.put.Load()
	cp, err := c.Copy(ctx, "vi/ns/m:u1", "vi/other/m:u2")
	if err != nil {
		t.Fatal(err)
	}
	if !cp.LayerUploaded || reg.n.put.Load()-put != 2 || cp.Digest != pushed.Digest {
		t.Errorf("Copy without mounts: uploaded %v, %d blob PUTs (want 2), digest %s (want %s)", cp.LayerUploaded, reg.n.put.Load()-put, cp.Digest, pushed.Digest)
	}
	im, err := c.Open(ctx, "vi/other/m:u2")
	if err != nil {
		t.Fatal(err)
	}
	checkReaderAt(t, im.ReaderAt(), data)
}

// TestReaderAt_FollowsRedirectsWithoutLeakingCredentials redirects blob
// GETs to an object store stand-in that serves the stored blob files with
// Range support.
func TestReaderAt_FollowsRedirectsWithoutLeakingCredentials(t *testing.T) {
	reg := newRegistry(t)
	c, err := New(reg.host, Options{PlainHTTP: true, Token: "registry-secret-token"})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	data := diskBytes(t, 512<<10+1)
	if _, err := c.Push(ctx, "vi/ns/s3:u", bytes.NewReader(data), int64(len(data)), rawMeta, PushOptions{}); err != nil {
		t.Fatal(err)
	}
	var served, leaked atomic.Int64
	store := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "" {
			leaked.Add(1)
		}
		hex := strings.TrimPrefix(r.URL.Path, "/sha256:")
		f, err := os.Open(filepath.Join(reg.root, "docker/registry/v2/blobs/sha256", hex[:2], hex, "data"))
		if err != nil {
			http.NotFound(w, r)
			return
		}
		defer f.Close()
		served.Add(1)
		http.ServeContent(w, r, "", time.Time{}, f)
	}))
	defer store.Close()
	// 127.0.0.1 and localhost are different hosts to net/http.
	to := strings.Replace(store.URL, "127.0.0.1", "localhost", 1)
	reg.n.redirectBlobs.Store(&to)
	im, err := c.Open(ctx, "vi/ns/s3:u")
	if err != nil {
		t.Fatal(err)
	}
	checkReaderAt(t, im.ReaderAt(), data)
	rc, err := im.Reader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("Reader through the redirect: %d bytes, %v", len(got), err)
	}
	if served.Load() < 100 {
		t.Errorf("object store served %d requests; the redirects were not followed", served.Load())
	}
	if leaked.Load() != 0 {
		t.Errorf("%d requests to the object store carried the registry's Authorization header", leaked.Load())
	}
}
