//go:build cgo

package codec

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"vimg.dev/vimg/pkg/diskimage/stream"
	"vimg.dev/vimg/pkg/diskimage/testimg"
)

// TestXZMemoryLimit: when a block needs more than liblzma may use even on
// one thread, the reader fails with ErrUnsupported saying so. The guard
// keeps dictionaries far below the real limit, so the test lowers it.
func TestXZMemoryLimit(t *testing.T) {
	dir := t.TempDir()
	testimg.Pattern(t, filepath.Join(dir, "in"), 1<<20, 4)
	testimg.Run(t, "sh", "-c", "cd "+dir+" && xz --lzma2=dict=8MiB -c in > in.xz")
	data, err := os.ReadFile(filepath.Join(dir, "in.xz"))
	if err != nil {
		t.Fatal(err)
	}
	defer func(old uint64) { xzMemoryLimit = old }(xzMemoryLimit)
	xzMemoryLimit = 4 << 20
	r, err := NewReader("xz", bytes.NewReader(data))
	if err == nil {
		_, err = io.Copy(io.Discard, r)
		r.Close()
	}
	if !errors.Is(err, stream.ErrUnsupported) || !strings.Contains(err.Error(), "more than the 4 MiB memory limit") {
		t.Fatalf("err=%v, want ErrUnsupported naming the memory limit", err)
	}
}

// TestXZSingleThreadFallback: blocks too big for the threads' memory are
// decoded in the calling thread, with the same result.
func TestXZSingleThreadFallback(t *testing.T) {
	fx := makeXZFixture(t)
	defer func(old uint64) { xzThreadMemory = old }(xzThreadMemory)
	xzThreadMemory = 1
	for _, data := range [][]byte{fx.blocks, fx.concat} {
		r, err := NewReader("xz", bytes.NewReader(data))
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(r)
		r.Close()
		if err != nil || !bytes.Equal(got, fx.raw) {
			t.Fatalf("err=%v, equal=%v", err, bytes.Equal(got, fx.raw))
		}
	}
	// And truncation is still told apart from the end.
	r, err := NewReader("xz", bytes.NewReader(fx.blocks[:len(fx.blocks)/2]))
	if err == nil {
		_, err = io.Copy(io.Discard, r)
		r.Close()
	}
	if !errors.Is(err, stream.ErrCorrupt) {
		t.Fatalf("truncated: err=%v, want ErrCorrupt", err)
	}
}
