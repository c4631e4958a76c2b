package gc

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/distribution/distribution/v3/configuration"
	"github.com/distribution/distribution/v3/registry/handlers"
	"github.com/distribution/distribution/v3/registry/storage/driver/filesystem"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"
)

func TestMain(m *testing.M) {
	// distribution logs every request through logrus; keep test output
	// readable. klog output of the collector stays.
	logrus.SetOutput(io.Discard)
	os.Exit(m.Run())
}

// fakeClock lets tests age blobs and leases without sleeping.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// env is a real distribution registry on a filesystem driver, wrapped with
// Guard and served over HTTP, plus the collector working on the same files.
type env struct {
	t        *testing.T
	root     string
	host     string
	gc       *Collector
	metrics  *prometheus.Registry
	mu       sync.Mutex
	requests []string // "METHOD path?query" seen by the registry
}

func newEnv(t *testing.T, opts Options) *env {
	t.Helper()
	root := t.TempDir()
	drv := filesystem.New(filesystem.DriverParameters{RootDirectory: root, MaxThreads: 100})
	e := &env{t: t, root: root, metrics: prometheus.NewRegistry()}
	opts.Registerer = e.metrics
	c, err := New(drv, opts)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	e.gc = c

	cfg := &configuration.Configuration{
		Storage: configuration.Storage{
			"filesystem": configuration.Parameters{"rootdirectory": root},
			"delete":     configuration.Parameters{"enabled": true},
			// The purger would race the assertions about uploads.
			"maintenance": configuration.Parameters{"uploadpurging": map[any]any{"enabled": false}},
		},
	}
	cfg.HTTP.Secret = "gc-test-secret"
	ctx, cancel := context.WithCancel(context.Background())
	app := handlers.NewApp(ctx, cfg)
	record := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		e.mu.Lock()
		e.requests = append(e.requests, r.Method+" "+r.URL.RequestURI())
		e.mu.Unlock()
		c.Guard(app).ServeHTTP(w, r)
	})
	srv := httptest.NewServer(record)
	t.Cleanup(func() {
		srv.Close()
		_ = app.Shutdown()
		cancel()
	})
	e.host = strings.TrimPrefix(srv.URL, "http://")
	return e
}

func (e *env) repo(name_ string) name.Repository {
	e.t.Helper()
	r, err := name.NewRepository(e.host + "/" + name_)
	if err != nil {
		e.t.Fatalf("parsing repository %s: %v", name_, err)
	}
	return r
}

// push writes img under a UID-like tag, as DVCR does, and returns its
// digest reference.
func (e *env) push(ctx context.Context, repo, tag string, img v1.Image, opts ...remote.Option) (name.Digest, error) {
	r, err := name.NewRepository(e.host + "/" + repo)
	if err != nil {
		return name.Digest{}, err
	}
	if err := remote.Write(r.Tag(tag), img, append([]remote.Option{remote.WithContext(ctx)}, opts...)...); err != nil {
		return name.Digest{}, fmt.Errorf("pushing %s:%s: %w", repo, tag, err)
	}
	d, err := img.Digest()
	if err != nil {
		return name.Digest{}, err
	}
	return r.Digest(d.String()), nil
}

func (e *env) mustPush(repo, tag string, img v1.Image) name.Digest {
	e.t.Helper()
	ref, err := e.push(context.Background(), repo, tag, img)
	if err != nil {
		e.t.Fatal(err)
	}
	return ref
}

func (e *env) mustDelete(ref name.Digest) {
	e.t.Helper()
	if err := remote.Delete(ref); err != nil {
		e.t.Fatalf("deleting %s: %v", ref, err)
	}
}

// verifyPull pulls ref and checks the manifest, config and every layer
// against their digests and sizes.
func verifyPull(ctx context.Context, ref name.Digest) error {
	desc, err := remote.Get(ref, remote.WithContext(ctx))
	if err != nil {
		return fmt.Errorf("pulling manifest %s: %w", ref, err)
	}
	if got := desc.Digest.String(); got != ref.DigestStr() {
		return fmt.Errorf("manifest %s has digest %s", ref, got)
	}
	m, err := v1.ParseManifest(bytes.NewReader(desc.Manifest))
	if err != nil {
		return fmt.Errorf("parsing manifest %s: %w", ref, err)
	}
	for _, b := range append([]v1.Descriptor{m.Config}, m.Layers...) {
		l, err := remote.Layer(ref.Context().Digest(b.Digest.String()), remote.WithContext(ctx))
		if err != nil {
			return fmt.Errorf("pulling blob %s of %s: %w", b.Digest, ref, err)
		}
		rc, err := l.Compressed()
		if err != nil {
			return fmt.Errorf("pulling blob %s of %s: %w", b.Digest, ref, err)
		}
		h := sha256.New()
		n, err := io.Copy(h, rc)
		rc.Close()
		if err != nil {
			return fmt.Errorf("reading blob %s of %s: %w", b.Digest, ref, err)
		}
		if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != b.Digest.String() || n != b.Size {
			return fmt.Errorf("blob %s of %s: got %s, %d bytes, want %d bytes", b.Digest, ref, got, n, b.Size)
		}
	}
	return nil
}

// imageBlobs lists the registry blobs an image consists of: manifest,
// config and layers.
func imageBlobs(t *testing.T, img v1.Image) []digest.Digest {
	t.Helper()
	out, err := imageBlobDigests(img)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func imageBlobDigests(img v1.Image) ([]digest.Digest, error) {
	m, err := img.Manifest()
	if err != nil {
		return nil, err
	}
	d, err := img.Digest()
	if err != nil {
		return nil, err
	}
	out := []digest.Digest{digest.Digest(d.String()), digest.Digest(m.Config.Digest.String())}
	for _, l := range m.Layers {
		out = append(out, digest.Digest(l.Digest.String()))
	}
	return out, nil
}

func (e *env) blobFile(d digest.Digest) string {
	return filepath.Join(e.root, filepath.FromSlash(blobDataPath(d)))
}

func (e *env) blobOnDisk(d digest.Digest) bool {
	_, err := os.Stat(e.blobFile(d))
	return err == nil
}

func (e *env) blobSize(d digest.Digest) int64 {
	e.t.Helper()
	fi, err := os.Stat(e.blobFile(d))
	if err != nil {
		e.t.Fatalf("blob %s: %v", d, err)
	}
	return fi.Size()
}

func (e *env) repoDir(repo string) string {
	return filepath.Join(e.root, filepath.FromSlash(repoPath(repo)))
}

func (e *env) requestsSince(n int) []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]string(nil), e.requests[n:]...)
}

func (e *env) requestCount() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.requests)
}

// storedManifests lists every manifest revision on disk as repo@digest.
func (e *env) storedManifests() ([]name.Digest, error) {
	var out []name.Digest
	base := filepath.Join(e.root, filepath.FromSlash(reposRoot))
	err := filepath.Walk(base, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			if os.IsNotExist(err) {
				return nil
			}
			return err
		}
		rel := filepath.ToSlash(strings.TrimPrefix(p, base+string(filepath.Separator)))
		repo, rest, ok := strings.Cut(rel, "/_manifests/revisions/")
		if !ok || fi.IsDir() {
			return nil
		}
		d, ok := digestFromLinkPath("/" + rest)
		if !ok {
			return nil
		}
		r, err := name.NewRepository(e.host + "/" + repo)
		if err != nil {
			return err
		}
		out = append(out, r.Digest(d.String()))
		return nil
	})
	return out, err
}

// metric reads a counter or gauge from the registry the collector registered
// on; result selects the "result" label when not empty. NaN when absent.
func (e *env) metric(name, result string) float64 {
	e.t.Helper()
	families, err := e.metrics.Gather()
	if err != nil {
		e.t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
		for _, m := range f.GetMetric() {
			if result != "" {
				match := false
				for _, l := range m.GetLabel() {
					match = match || (l.GetName() == "result" && l.GetValue() == result)
				}
				if !match {
					continue
				}
			}
			if m.GetCounter() != nil {
				return m.GetCounter().GetValue()
			}
			return m.GetGauge().GetValue()
		}
	}
	return math.NaN()
}
