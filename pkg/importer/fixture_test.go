package importer

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"vimg.dev/vimg/dvcr/client"
	"vimg.dev/vimg/dvcr/dvcrtest"
	"vimg.dev/vimg/pkg/diskimage/source"
	"vimg.dev/vimg/pkg/diskimage/testimg"
)

// The fixtures: a real DVCR in process (dvcr/server, TLS, no anonymous
// access), images made by qemu-img and the compression tools, and HTTP
// servers that serve them in the ways sources behave.

// registry is DVCR behind a handler that watches and, on demand, breaks
// uploads.
type registry struct {
	*dvcrtest.Registry
	// chunkedPatches counts blob PATCHes of unknown length: spills.
	chunkedPatches atomic.Int64
	// cutPatchAfter, when > 0, makes the next blob PATCH drop its
	// connection after that many bytes of body.
	cutPatchAfter atomic.Int64
}

func newRegistry(t testing.TB) *registry {
	t.Helper()
	reg := &registry{}
	reg.Registry = dvcrtest.StartWith(t, func(inner http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodPatch && strings.Contains(r.URL.Path, "/blobs/uploads/") {
				if r.ContentLength < 0 {
					reg.chunkedPatches.Add(1)
				}
				if n := reg.cutPatchAfter.Swap(0); n > 0 {
					io.CopyN(io.Discard, r.Body, n)
					panic(http.ErrAbortHandler) // net/http drops the connection
				}
			}
			inner.ServeHTTP(w, r)
		})
	})
	return reg
}

func (r *registry) client(t testing.TB) *client.Client {
	t.Helper()
	return r.Client(t)
}

// requireTool returns the path of tool, or skips the test saying why; in CI
// (CI set to anything) a missing tool fails it instead.
func requireTool(t testing.TB, tool string) string {
	t.Helper()
	p, err := exec.LookPath(tool)
	if err == nil {
		return p
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("%s is required in CI: %v", tool, err)
	}
	t.Skipf("skipping: %s is not installed (Debian packages qemu-utils, xz-utils, zstd, gzip)", tool)
	return ""
}

// run runs a tool, failing the test with its output if it fails.
func run(t testing.TB, tool string, args ...string) {
	t.Helper()
	requireTool(t, tool)
	testimg.Run(t, tool, args...)
}

// patternDisk writes a raw disk of size bytes with data, holes and noise.
func patternDisk(t testing.TB, size int64, seed uint64) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.raw")
	testimg.Pattern(t, p, size, seed)
	return p
}

// makeImage converts a pattern disk of size bytes to format ("raw",
// "qcow2", "vmdk", "vdi", or "iso", a raw disk that carries an ISO 9660
// volume descriptor) and returns its path.
func makeImage(t testing.TB, format string, size int64) string {
	t.Helper()
	requireTool(t, "qemu-img")
	raw := patternDisk(t, size, 11)
	switch format {
	case "raw":
		return raw
	case "iso":
		f, err := os.OpenFile(raw, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		// A primary volume descriptor at sector 16 of 2 KiB.
		if _, err := f.WriteAt([]byte("\x01CD001\x01"), 16*2048); err != nil {
			t.Fatal(err)
		}
		return raw
	}
	out := filepath.Join(t.TempDir(), "disk."+format)
	run(t, "qemu-img", "convert", "-f", "raw", "-O", format, raw, out)
	return out
}

// compress wraps path with tool ("gzip", "xz", "zstd") and returns the
// compressed file's path.
func compress(t testing.TB, tool, path string) string {
	t.Helper()
	dir := t.TempDir()
	in := filepath.Join(dir, filepath.Base(path))
	copyFile(t, path, in)
	switch tool {
	case "gzip":
		run(t, "gzip", "-k", "-f", in)
		return in + ".gz"
	case "xz":
		run(t, "xz", "-k", "-f", "-T2", in)
		return in + ".xz"
	case "zstd":
		run(t, "zstd", "-q", "-f", in, "-o", in+".zst")
		return in + ".zst"
	}
	t.Fatalf("unknown compression tool %s", tool)
	return ""
}

func copyFile(t testing.TB, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// qemuVirtualSize is what qemu-img info says the virtual size is.
func qemuVirtualSize(t testing.TB, path string) int64 {
	t.Helper()
	requireTool(t, "qemu-img")
	out, err := exec.Command("qemu-img", "info", "--output", "json", path).Output()
	if err != nil {
		t.Fatalf("qemu-img info %s: %v", path, err)
	}
	var info struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	if err := json.Unmarshal(out, &info); err != nil {
		t.Fatal(err)
	}
	return info.VirtualSize
}

func fileSHA256(t testing.TB, path string) string {
	t.Helper()
	return "sha256:" + testimg.SHA256File(t, path)
}

func readFile(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// serveOpts shape how a test server serves a file.
type serveOpts struct {
	// chunked sends no Content-Length and ignores Range: a stream of
	// unknown length that cannot be resumed.
	chunked bool
	// dropAt, when > 0, drops the first response's connection after that
	// many bytes of body (the file is then served normally, with Range).
	dropAt int64
	// delay is slept before every write of the body, to keep a transfer
	// going long enough to interfere with it.
	delay time.Duration
	// status, when set, is answered instead of the file.
	status int
	// sent, when set, counts the bytes of body the server wrote.
	sent *atomic.Int64
	// holdAt, when > 0, stops each response after that many bytes of body
	// until the client goes away (or holdFor passes): a source whose rest
	// is still to come, whatever the machine's load, so that a test can
	// tell whether the client stopped reading by itself.
	holdAt int64
}

// holdFor bounds a hold, so that a client that never stops fails its
// test instead of hanging it.
const holdFor = 2 * time.Minute

// serve serves data over HTTP and returns its URL.
func serve(t testing.TB, data []byte, o serveOpts) string {
	t.Helper()
	var dropped atomic.Bool
	ts := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if o.status != 0 {
			http.Error(w, http.StatusText(o.status), o.status)
			return
		}
		sw := &slowWriter{ResponseWriter: w, delay: o.delay, cutAt: -1, sent: o.sent, holdAt: o.holdAt, gone: r.Context().Done()}
		if o.dropAt > 0 && dropped.CompareAndSwap(false, true) {
			sw.cutAt = o.dropAt
		}
		if !o.chunked {
			http.ServeContent(sw, r, "disk", time.Unix(1700000000, 0), bytes.NewReader(data))
			return
		}
		for off := 0; off < len(data); off += 64 << 10 {
			if _, err := sw.Write(data[off:min(off+64<<10, len(data))]); err != nil {
				return
			}
			w.(http.Flusher).Flush()
		}
	}))
	ts.Config.ErrorLog = log.New(io.Discard, "", 0) // the connections tests cut on purpose
	ts.Start()
	t.Cleanup(ts.Close)
	return ts.URL + "/images/disk"
}

// slowWriter delays every write, and drops the connection once cutAt bytes
// went by.
type slowWriter struct {
	http.ResponseWriter
	delay time.Duration
	cutAt int64
	n     int64
	sent  *atomic.Int64
	// holdAt and gone: see serveOpts.holdAt.
	holdAt int64
	gone   <-chan struct{}
	held   bool
}

func (s *slowWriter) Write(p []byte) (int, error) {
	if s.delay > 0 {
		time.Sleep(s.delay)
	}
	if s.holdAt > 0 && !s.held && s.n+int64(len(p)) > s.holdAt {
		s.held = true
		head := p[:s.holdAt-s.n]
		n, err := s.ResponseWriter.Write(head)
		s.n += int64(n)
		if s.sent != nil {
			s.sent.Add(int64(n))
		}
		if err != nil {
			return n, err
		}
		s.ResponseWriter.(http.Flusher).Flush()
		select {
		case <-s.gone:
			return n, http.ErrAbortHandler
		case <-time.After(holdFor):
		}
		m, err := s.Write(p[len(head):])
		return n + m, err
	}
	if s.cutAt >= 0 && s.n+int64(len(p)) > s.cutAt {
		s.ResponseWriter.Write(p[:s.cutAt-s.n])
		s.ResponseWriter.(http.Flusher).Flush()
		panic(http.ErrAbortHandler)
	}
	n, err := s.ResponseWriter.Write(p)
	s.n += int64(n)
	if s.sent != nil {
		s.sent.Add(int64(n))
	}
	return n, err
}

// openHTTP opens url as an import source, with few retries so that failures
// show quickly.
func openHTTP(t *testing.T, url string, opts source.HTTPOptions) source.Source {
	t.Helper()
	src, err := source.OpenHTTP(context.Background(), url, opts)
	if err != nil {
		t.Fatalf("opening %s: %v", url, err)
	}
	t.Cleanup(func() { src.Close() })
	return src
}

// checkStored pulls ref back and compares it with what should be there:
// the metadata, and the disk file byte for byte with want.
func checkStored(t *testing.T, c *client.Client, ref string, res *Result, want, format string, virtual int64) {
	t.Helper()
	ctx := context.Background()
	im, err := c.Open(ctx, ref)
	if err != nil {
		t.Fatalf("opening the imported image: %v", err)
	}
	st, err := os.Stat(want)
	if err != nil {
		t.Fatal(err)
	}
	if im.Meta.Format != format || im.Meta.VirtualSize != virtual || im.Meta.StoredSize != st.Size() {
		t.Errorf("stored metadata %+v: want format %s, virtual size %d (qemu-img's), stored size %d", im.Meta, format, virtual, st.Size())
	}
	if im.Meta.SourceChecksum != res.SourceChecksum {
		t.Errorf("stored source checksum %q, result says %q", im.Meta.SourceChecksum, res.SourceChecksum)
	}
	if res.ManifestDigest != im.Digest.String() || res.VirtualSize != virtual || res.StoredSize != st.Size() {
		t.Errorf("result %+v does not describe the stored image (manifest %s)", res, im.Digest)
	}
	rc, err := im.Reader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	h := sha256.New()
	if _, err := io.Copy(h, rc); err != nil {
		t.Fatalf("pulling the disk file: %v", err)
	}
	if got, want := "sha256:"+hex.EncodeToString(h.Sum(nil)), fileSHA256(t, want); got != want {
		t.Errorf("pulled disk file has %s, the input %s", got, want)
	}
}

// checkNoImage fails unless ref has no manifest.
func checkNoImage(t *testing.T, c *client.Client, ref string) {
	t.Helper()
	if d, err := c.Head(context.Background(), ref); !errors.Is(err, client.ErrNotFound) {
		t.Errorf("after a failed import, Head(%s) = %+v, %v; want not found", ref, d, err)
	}
}

// checkNoBlob fails unless repo has no blob with the sha256 of path: the
// spilled copy of a disk file.
func checkNoBlob(t *testing.T, c *client.Client, repo, path string) {
	t.Helper()
	d := digest.Digest(fileSHA256(t, path))
	if n, err := c.HeadBlob(context.Background(), repo, d); !errors.Is(err, client.ErrNotFound) {
		t.Errorf("the spilled blob %s is still in %s (%d bytes, %v)", d, repo, n, err)
	}
}

// checkClass fails unless err classifies as reason with the given
// permanence, and says what it says.
func checkClass(t *testing.T, err error, reason string, permanent bool, says ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("no error; want %s", reason)
	}
	e := Classify(err)
	t.Logf("%s (permanent %v): %s", e.Reason, e.Permanent, e.Message)
	if e.Reason != reason || e.Permanent != permanent {
		t.Fatalf("Classify(%v) = %s (permanent %v); want %s (permanent %v)", err, e.Reason, e.Permanent, reason, permanent)
	}
	for _, s := range says {
		if !strings.Contains(e.Message, s) {
			t.Errorf("message %q does not say %q", e.Message, s)
		}
	}
}

// checkNoLeaks waits a little for goroutines of the import's machinery to
// end and fails listing those that do not: importer, engine, DVCR client
// and pipes. (Counting all goroutines would also count idle connections
// the transports keep, which are not leaks.)
func checkNoLeaks(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		left := importGoroutines()
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("%d goroutines of the import still run:\n\n%s", len(left), strings.Join(left, "\n\n"))
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func importGoroutines() []string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	var out []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "testing.tRunner") {
			continue // a test itself
		}
		for _, pkg := range []string{"vimg.dev/vimg/pkg/importer.", "vimg.dev/vimg/pkg/diskimage", "vimg.dev/vimg/dvcr/client.", "vimg.dev/vimg/dvcr/internal/pipe."} {
			if strings.Contains(g, pkg) {
				out = append(out, g)
				break
			}
		}
	}
	return out
}
