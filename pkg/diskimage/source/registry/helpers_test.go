package registry

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/compression"
	"github.com/google/go-containerregistry/pkg/name"
	ggcrregistry "github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// requireTool returns tool's path or skips the test, naming the Debian
// package to install. With CI set, a missing tool fails the test instead:
// nothing may be skipped there.
func requireTool(t testing.TB, tool, pkg string) string {
	t.Helper()
	p, err := exec.LookPath(tool)
	if err == nil {
		return p
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("%s is required in CI (Debian package %s): %v", tool, pkg, err)
	}
	t.Skipf("skipping: %s is not installed (Debian package %s)", tool, pkg)
	return ""
}

func run(t testing.TB, pkg, tool string, args ...string) []byte {
	t.Helper()
	bin := requireTool(t, tool, pkg)
	out, err := exec.Command(bin, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", tool, strings.Join(args, " "), err, out)
	}
	return out
}

// qcow2Disk makes a real qcow2 image with qemu-img and writes 1 MiB of 0xab
// into it with qemu-io, and returns its bytes.
func qcow2Disk(t testing.TB) []byte {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.qcow2")
	run(t, "qemu-utils", "qemu-img", "create", "-q", "-f", "qcow2", p, "16M")
	run(t, "qemu-utils", "qemu-io", "-c", "write -P 0xab 0 1M", p)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func randomBytes(t testing.TB, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// entry is one tar entry of a test layer.
type entry struct {
	name string
	typ  byte
	body []byte
	link string
	size int64 // header size when body is nil and size is set (a lying header)
}

func dir(name string) entry              { return entry{name: name, typ: tar.TypeDir} }
func file(name string, b []byte) entry   { return entry{name: name, typ: tar.TypeReg, body: b} }
func symlink(name, target string) entry  { return entry{name: name, typ: tar.TypeSymlink, link: target} }
func hardlink(name, target string) entry { return entry{name: name, typ: tar.TypeLink, link: target} }

// tarOf builds a tar stream in memory (test layers are small).
func tarOf(t testing.TB, entries ...entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := &tar.Header{Name: e.name, Typeflag: e.typ, Linkname: e.link, Mode: 0o644, Uid: 107, Gid: 107, ModTime: time.Unix(0, 0)}
		switch e.typ {
		case tar.TypeDir:
			h.Mode = 0o755
		case tar.TypeReg:
			h.Size = int64(len(e.body))
		case tar.TypeChar, tar.TypeBlock:
			h.Devmajor, h.Devminor = 1, 3
		}
		if e.body == nil && e.size != 0 {
			// A header claiming more data than follows: write the header
			// alone and stop, as a hostile layer would.
			h.Size = e.size
			if err := tw.WriteHeader(h); err != nil {
				t.Fatal(err)
			}
			buf.Write(make([]byte, 1024))
			return buf.Bytes()
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(e.body); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

type layerKind string

const (
	gzipLayer  layerKind = "gzip"
	zstdLayer  layerKind = "zstd"
	plainLayer layerKind = "uncompressed"
)

// layerOf makes a layer of the tar tb, compressed as kind says.
func layerOf(t testing.TB, kind layerKind, tb []byte) v1.Layer {
	t.Helper()
	opener := func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(tb)), nil }
	var l v1.Layer
	var err error
	switch kind {
	case gzipLayer:
		l, err = tarball.LayerFromOpener(opener, tarball.WithCompressedCaching)
	case zstdLayer:
		l, err = tarball.LayerFromOpener(opener, tarball.WithCompression(compression.ZStd),
			tarball.WithMediaType(types.OCILayerZStd), tarball.WithCompressedCaching)
	case plainLayer:
		l = static.NewLayer(tb, types.OCIUncompressedLayer)
	default:
		t.Fatalf("unknown layer kind %q", kind)
	}
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// imageOf stacks layers (first is lowest) on an empty image, with an OCI
// manifest when oci is set and a docker v2 schema2 one otherwise.
func imageOf(t testing.TB, oci bool, platform string, layers ...v1.Layer) v1.Image {
	t.Helper()
	base := empty.Image
	if oci {
		base = mutate.ConfigMediaType(mutate.MediaType(base, types.OCIManifestSchema1), types.OCIConfigJSON)
	}
	img, err := mutate.AppendLayers(base, layers...)
	if err != nil {
		t.Fatal(err)
	}
	if platform != "" {
		p, err := v1.ParsePlatform(platform)
		if err != nil {
			t.Fatal(err)
		}
		cf, err := img.ConfigFile()
		if err != nil {
			t.Fatal(err)
		}
		cf = cf.DeepCopy()
		cf.OS, cf.Architecture, cf.Variant = p.OS, p.Architecture, p.Variant
		if img, err = mutate.ConfigFile(img, cf); err != nil {
			t.Fatal(err)
		}
	}
	return img
}

// diskImage is the usual containerDisk: one layer with disk/ and the file.
func diskImage(t testing.TB, kind layerKind, oci bool, diskName string, disk []byte) v1.Image {
	t.Helper()
	return imageOf(t, oci, "", layerOf(t, kind, tarOf(t, dir("disk/"), file(diskName, disk))))
}

// pusher writes images to a test registry.
type pusher struct {
	host string
	rt   http.RoundTripper
	auth authn.Authenticator
}

func (p pusher) ref(t testing.TB, repoTag string) name.Reference {
	t.Helper()
	r, err := name.ParseReference(p.host+"/"+repoTag, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func (p pusher) opts() []remote.Option {
	o := []remote.Option{remote.WithContext(context.Background())}
	if p.rt != nil {
		o = append(o, remote.WithTransport(p.rt))
	}
	if p.auth != nil {
		o = append(o, remote.WithAuth(p.auth))
	}
	return o
}

// push writes img as repoTag and returns the full reference.
func (p pusher) push(t testing.TB, repoTag string, img v1.Image) string {
	t.Helper()
	r := p.ref(t, repoTag)
	if err := remote.Write(r, img, p.opts()...); err != nil {
		t.Fatalf("push %s: %v", r, err)
	}
	return r.String()
}

func (p pusher) pushIndex(t testing.TB, repoTag string, idx v1.ImageIndex) string {
	t.Helper()
	r := p.ref(t, repoTag)
	if err := remote.WriteIndex(r, idx, p.opts()...); err != nil {
		t.Fatalf("push index %s: %v", r, err)
	}
	return r.String()
}

// inProcessRegistry is go-containerregistry's registry behind httptest,
// over plain HTTP, with wrap (when set) in front of it.
func inProcessRegistry(t testing.TB, wrap func(http.Handler) http.Handler) (host string) {
	t.Helper()
	var h http.Handler = ggcrregistry.New(ggcrregistry.Logger(log.New(io.Discard, "", 0)))
	if wrap != nil {
		h = wrap(h)
	}
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

// basicAuth answers 401 with a Basic challenge unless the request carries
// user and pass.
func basicAuth(user, pass string) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			u, p, ok := r.BasicAuth()
			if !ok || u != user || p != pass {
				w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(http.StatusUnauthorized)
				io.WriteString(w, `{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}`)
				return
			}
			next.ServeHTTP(w, r)
		})
	}
}

// dockerRegistry runs Debian's docker-registry (distribution 2.8) on a free
// loopback port over plain HTTP, with htpasswd auth when htpasswd is set.
func dockerRegistry(t testing.TB, htpasswd []byte) (host string) {
	t.Helper()
	bin := requireTool(t, "docker-registry", "docker-registry")
	dir := t.TempDir()
	auth := ""
	if htpasswd != nil {
		p := filepath.Join(dir, "htpasswd")
		if err := os.WriteFile(p, htpasswd, 0o600); err != nil {
			t.Fatal(err)
		}
		auth = fmt.Sprintf("auth:\n  htpasswd:\n    realm: vimg-test\n    path: %s\n", p)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	cfg := fmt.Sprintf(`version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: %s
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: %s
  secret: test-secret
%s`, filepath.Join(dir, "data"), addr, auth)
	cfgPath := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	var out syncBuffer
	cmd := exec.Command(bin, "serve", cfgPath)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("docker-registry output:\n%s", out.String())
		}
	})
	hc := &http.Client{Timeout: 2 * time.Second}
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := hc.Get("http://" + addr + "/v2/")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK || resp.StatusCode == http.StatusUnauthorized {
				return addr
			}
			err = errors.New(resp.Status)
		}
		select {
		case <-exited:
			t.Fatalf("docker-registry exited:\n%s", out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("docker-registry did not come up on %s (last: %v):\n%s", addr, err, out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// syncBuffer is a bytes.Buffer a child process and the test may share.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// readAll opens ref and streams the disk, returning the Image, the bytes'
// sha256 and the first error (from Open or from the stream).
func readAll(t testing.TB, ref string, opts Options) (*Image, string, int64, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	src, err := Open(ctx, ref, opts)
	if err != nil {
		return nil, "", 0, err
	}
	defer src.Close()
	rc, err := src.Stream()
	if err != nil {
		return src, "", 0, err
	}
	defer rc.Close()
	h := sha256.New()
	n, err := io.Copy(h, rc)
	return src, hex.EncodeToString(h.Sum(nil)), n, err
}
