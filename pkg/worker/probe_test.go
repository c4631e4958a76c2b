package worker

import (
	"bytes"
	"compress/gzip"
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"vimg.dev/vimg/pkg/diskimage/testimg"
	"vimg.dev/vimg/pkg/importer"
	"vimg.dev/vimg/pkg/worker/api"
)

// serveHTTP serves data over HTTP with Range support, as a web server
// serves an image file, and returns an import request for it (checksums
// as the user gives them); the request names no DVCR, which neither a
// probe nor a populate from an HTTP source needs.
func serveHTTP(t *testing.T, data []byte, checksums ...string) string {
	t.Helper()
	modified := time.Now()
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.ServeContent(w, r, "disk", modified, bytes.NewReader(data))
	}))
	t.Cleanup(ts.Close)
	return writeRequest(t, api.Request{
		Source:    api.SourceSpec{Type: api.SourceHTTP, URL: ts.URL + "/disk"},
		Checksums: checksums,
	})
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func gzipped(t *testing.T, data []byte) []byte {
	t.Helper()
	var b bytes.Buffer
	zw := gzip.NewWriter(&b)
	if _, err := zw.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// probeOutcome runs Probe as a probe pod does and returns what it left in
// the termination message, and its error.
func probeOutcome(t *testing.T, request string) (api.Outcome, error) {
	t.Helper()
	msg := filepath.Join(t.TempDir(), "termination-log")
	err := Probe(context.Background(), Config{RequestPath: request, TerminationMessagePath: msg})
	out, derr := api.DecodeOutcome(string(readFile(t, msg)))
	if derr != nil {
		t.Fatal(derr)
	}
	return out, err
}

// TestProbe_CompressedQcow2OverHTTP: the probe tells a compressed qcow2's
// format and virtual size from its header.
func TestProbe_CompressedQcow2OverHTTP(t *testing.T) {
	raw, path := compressedQcow2(t)
	qcow := readFile(t, path)
	out, err := probeOutcome(t, serveHTTP(t, qcow))
	if err != nil || out.Result == nil {
		t.Fatalf("probe failed: %v, outcome %+v", err, out)
	}
	want := api.Result{Format: "qcow2", VirtualSize: int64(len(raw)), SourceSize: int64(len(qcow))}
	if *out.Result != want {
		t.Fatalf("result %+v, want %+v", *out.Result, want)
	}
}

// TestProbe_UnusableSourceIsPermanent: a source that is no image vimg
// imports fails the probe for good, saying why.
func TestProbe_UnusableSourceIsPermanent(t *testing.T) {
	dir := t.TempDir()
	testimg.QemuImg(t, "create", "-f", "raw", filepath.Join(dir, "base.raw"), "1M")
	testimg.QemuImg(t, "create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", filepath.Join(dir, "overlay.qcow2"))
	junk := bytes.Repeat([]byte{0xa5}, 4096)
	for name, tc := range map[string]struct {
		data   []byte
		reason string
		says   string
	}{
		"backing file":       {readFile(t, filepath.Join(dir, "overlay.qcow2")), importer.ReasonInvalidImage, "backing file"},
		"corrupt qcow2":      {append([]byte("QFI\xfb\x00\x00\x00\x03"), make([]byte, 4096)...), importer.ReasonInvalidImage, "cluster_bits"},
		"nested compression": {gzipped(t, gzipped(t, junk)), importer.ReasonInvalidImage, "one level of compression"},
		"empty":              {nil, importer.ReasonInvalidImage, "empty"},
	} {
		t.Run(name, func(t *testing.T) {
			out, err := probeOutcome(t, serveHTTP(t, tc.data))
			if err == nil || out.Result != nil || !out.Permanent || out.Reason != tc.reason || !strings.Contains(out.Message, tc.says) {
				t.Fatalf("probe: %v, outcome %+v; want a permanent %s saying %q", err, out, tc.reason, tc.says)
			}
		})
	}
}
