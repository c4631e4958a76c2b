package codec

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"testing/iotest"

	"vimg.dev/vimg/pkg/diskimage/stream"
	"vimg.dev/vimg/pkg/diskimage/testimg"
)

// wrapped is a file compressed by a real tool, and what it holds.
type wrapped struct {
	name, kind string
	path       string
}

// makeWrapped compresses a 3 MiB test pattern with gzip, xz and zstd in the
// ways people do (levels, threads, checks, concatenation) and returns the
// raw file and the compressed ones.
func makeWrapped(t *testing.T) (string, []wrapped) {
	dir := t.TempDir()
	raw := filepath.Join(dir, "disk.raw")
	testimg.Pattern(t, raw, 3<<20+4096, 7)
	sh := func(script string) { testimg.Run(t, "sh", "-c", "cd "+dir+" && "+script) }
	for _, tool := range []string{"gzip", "xz", "zstd"} {
		testimg.Require(t, tool)
	}
	sh("gzip -c disk.raw > plain.gz")
	sh("gzip -1 -c disk.raw > fast.gz")
	sh("head -c 1000000 disk.raw | gzip -c > multi.gz && tail -c +1000001 disk.raw | gzip -9 -c >> multi.gz")
	sh("xz -c disk.raw > plain.xz")
	sh("xz -0 --check=crc32 -c disk.raw > crc32.xz")
	sh("xz -1 --check=none -c disk.raw > nocheck.xz")
	sh("xz -2 --check=sha256 -c disk.raw > sha256.xz")
	sh("xz -T2 --block-size=262144 -c disk.raw > blocks.xz")
	sh("xz -e -9 -c < disk.raw > stdin.xz")
	sh("head -c 1000000 disk.raw | xz -c > multi.xz && printf '\\0\\0\\0\\0\\0\\0\\0\\0' >> multi.xz && tail -c +1000001 disk.raw | xz -c >> multi.xz")
	sh("zstd -q -c disk.raw > plain.zst")
	sh("zstd -q -19 --check -c < disk.raw > stdin.zst")
	sh("zstd -q --long=27 -T2 -c disk.raw > long.zst")
	sh("zstd -q --no-check -1 -c disk.raw > nocheck.zst")
	sh("head -c 1000000 disk.raw | zstd -q -c > multi.zst && tail -c +1000001 disk.raw | zstd -q -c >> multi.zst")
	var out []wrapped
	for _, n := range []string{"plain.gz", "fast.gz", "multi.gz", "plain.xz", "crc32.xz", "nocheck.xz", "sha256.xz", "blocks.xz", "stdin.xz", "multi.xz", "plain.zst", "stdin.zst", "long.zst", "nocheck.zst", "multi.zst"} {
		kind := map[string]string{".gz": "gzip", ".xz": "xz", ".zst": "zstd"}[filepath.Ext(n)]
		out = append(out, wrapped{n, kind, filepath.Join(dir, n)})
	}
	return raw, out
}

func TestNewReader(t *testing.T) {
	raw, files := makeWrapped(t)
	want, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range files {
		t.Run(w.name, func(t *testing.T) {
			data, err := os.ReadFile(w.path)
			if err != nil {
				t.Fatal(err)
			}
			if got := DetectWrapper(data[:16]); got != w.kind {
				t.Fatalf("DetectWrapper = %q, want %q", got, w.kind)
			}
			// One byte at a time from the source, so that no decoder can
			// lean on getting whole structures in one Read.
			for _, src := range []io.Reader{bytes.NewReader(data), iotest.OneByteReader(bytes.NewReader(data))} {
				r, err := NewReader(w.kind, src)
				if err != nil {
					t.Fatal(err)
				}
				got, err := io.ReadAll(r)
				if err != nil {
					t.Fatal(err)
				}
				if err := r.Close(); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, want) {
					t.Fatalf("decompressed %d bytes that differ from the %d raw bytes", len(got), len(want))
				}
			}
			// Truncated anywhere: an error wrapping ErrCorrupt, never a
			// clean end.
			for _, cut := range []int{0, 3, 13, 40, len(data) / 3, len(data) - 40, len(data) - 1} {
				r, err := NewReader(w.kind, bytes.NewReader(data[:cut]))
				if err == nil {
					_, err = io.Copy(io.Discard, r)
				}
				if !errors.Is(err, stream.ErrCorrupt) {
					t.Fatalf("cut at %d of %d: err=%v, want ErrCorrupt", cut, len(data), err)
				}
			}
			// A damaged byte in the middle: an error (checksums) or, for
			// streams without a check, at worst different output.
			bad := append([]byte{}, data...)
			bad[len(bad)/2] ^= 0x55
			if r, err := NewReader(w.kind, bytes.NewReader(bad)); err == nil {
				got, err := io.ReadAll(r)
				if err == nil && bytes.Equal(got, want) {
					t.Fatalf("a damaged stream decompressed to the original")
				}
				if err != nil && !errors.Is(err, stream.ErrCorrupt) {
					t.Fatalf("damaged: err=%v, want ErrCorrupt", err)
				}
			}
		})
	}
}

// TestNewReaderSourceError: an I/O error from the source comes back as it
// is, not dressed up as corruption.
func TestNewReaderSourceError(t *testing.T) {
	dir := t.TempDir()
	testimg.Pattern(t, filepath.Join(dir, "in"), 1<<20, 5)
	testimg.Run(t, "sh", "-c", "cd "+dir+" && gzip -k in && xz -k in && zstd -q in")
	boom := errors.New("disk on fire")
	for _, w := range []wrapped{{"in.gz", "gzip", "in.gz"}, {"in.xz", "xz", "in.xz"}, {"in.zst", "zstd", "in.zst"}} {
		data, err := os.ReadFile(filepath.Join(dir, w.path))
		if err != nil {
			t.Fatal(err)
		}
		r, err := NewReader(w.kind, io.MultiReader(bytes.NewReader(data[:len(data)/2]), iotest.ErrReader(boom)))
		if err == nil {
			_, err = io.Copy(io.Discard, r)
		}
		if !errors.Is(err, boom) || errors.Is(err, stream.ErrCorrupt) {
			t.Fatalf("%s: err=%v, want the source's error", w.name, err)
		}
	}
	for _, kind := range []string{"gzip", "xz", "zstd"} {
		_, err := NewReader(kind, iotest.ErrReader(boom))
		if !errors.Is(err, boom) {
			t.Fatalf("%s: err=%v, want the source's error", kind, err)
		}
	}
}

// TestNewReaderHugeWindow: streams that would need gigabytes of history are
// refused up front with a message that says why, before any of it is
// allocated.
func TestNewReaderHugeWindow(t *testing.T) {
	dir := t.TempDir()
	in := filepath.Join(dir, "small")
	testimg.Pattern(t, in, 200<<10, 3)
	sh := func(script string) { testimg.Run(t, "sh", "-c", "cd "+dir+" && "+script) }
	testimg.Require(t, "xz")
	testimg.Require(t, "zstd")
	sh("xz --lzma2=dict=1536MiB -c small > huge.xz")
	// From stdin, so zstd cannot shrink the window to the input's size.
	sh("zstd -q --long=31 -c < small > huge.zst")
	sh("xz --lzma2=dict=" + "192MiB -c small > ok.xz") // under the limit: opens
	for _, c := range []struct{ file, kind, want string }{
		{"huge.xz", "xz", "1536 MiB LZMA2 dictionary, more than the 256 MiB limit"},
		{"huge.zst", "zstd", "2048 MiB window, more than the 256 MiB limit"},
		{"ok.xz", "xz", ""},
	} {
		t.Run(c.file, func(t *testing.T) {
			data, err := os.ReadFile(filepath.Join(dir, c.file))
			if err != nil {
				t.Fatal(err)
			}
			runtime.GC()
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			r, err := NewReader(c.kind, bytes.NewReader(data))
			if err == nil {
				_, err = io.Copy(io.Discard, r)
			}
			runtime.ReadMemStats(&after)
			if c.want == "" {
				if err != nil {
					t.Fatalf("err=%v, want none", err)
				}
				return
			}
			if !errors.Is(err, stream.ErrUnsupported) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("err=%v, want ErrUnsupported saying %q", err, c.want)
			}
			if a := after.TotalAlloc - before.TotalAlloc; a > 16<<20 {
				t.Fatalf("allocated %d MiB before refusing", a>>20)
			}
			t.Log(err)
		})
	}
}

func TestDetectWrapper(t *testing.T) {
	for hdr, want := range map[string]string{
		"\x1f\x8b\x08\x00":              "gzip",
		"\xfd7zXZ\x00\x00\x04":          "xz",
		"\x28\xb5\x2f\xfd\x04":          "zstd",
		"QFI\xfb":                       "",
		"\xfd7zXZ":                      "", // too short to tell
		"":                              "",
		"\x1f":                          "",
		"KDMV\x01\x00\x00\x00":          "",
		"\x28\xb5\x2f\xfe":              "",
		"<<< Oracle VM VirtualBox Disk": "",
	} {
		if got := DetectWrapper([]byte(hdr)); got != want {
			t.Errorf("DetectWrapper(%q) = %q, want %q", hdr, got, want)
		}
	}
	if _, err := NewReader("bzip2", bytes.NewReader(nil)); !errors.Is(err, stream.ErrUnsupported) {
		t.Errorf("bzip2: err=%v, want ErrUnsupported", err)
	}
}

// FuzzXZGuard feeds damaged xz streams through the guard and the decoder:
// errors are fine, panics, hangs and unbounded allocation are not.
func FuzzXZGuard(f *testing.F) {
	dir := f.TempDir()
	in := filepath.Join(dir, "in")
	testimg.Pattern(f, in, 300<<10, 9)
	testimg.Run(f, "sh", "-c", "cd "+dir+" && xz -T2 --block-size=65536 -c in > a.xz && xz -0 --check=none -c in > b.xz")
	for _, n := range []string{"a.xz", "b.xz"} {
		b, err := os.ReadFile(filepath.Join(dir, n))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := NewReader("xz", bytes.NewReader(data))
		if err != nil {
			return
		}
		defer r.Close() // the cgo decoder holds threads and C memory
		n, _ := io.Copy(io.Discard, io.LimitReader(r, 64<<20))
		_ = n
	})
}
