package diskimage_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"vimg.dev/vimg/pkg/diskimage"
	"vimg.dev/vimg/pkg/diskimage/source"
	"vimg.dev/vimg/pkg/diskimage/stream"
	"vimg.dev/vimg/pkg/diskimage/testimg"
)

// peakHeap runs fn while sampling the heap, and returns the most it grew.
func peakHeap(fn func()) uint64 {
	runtime.GC()
	var base runtime.MemStats
	runtime.ReadMemStats(&base)
	var (
		peak uint64
		mu   sync.Mutex
		done = make(chan struct{})
		wg   sync.WaitGroup
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(2 * time.Millisecond)
		defer t.Stop()
		for {
			var m runtime.MemStats
			runtime.ReadMemStats(&m)
			mu.Lock()
			if m.HeapAlloc > base.HeapAlloc && m.HeapAlloc-base.HeapAlloc > peak {
				peak = m.HeapAlloc - base.HeapAlloc
			}
			mu.Unlock()
			select {
			case <-done:
				return
			case <-t.C:
			}
		}
	}()
	fn()
	close(done)
	wg.Wait()
	return peak
}

// hostileCase is an input that must be refused with a specific error.
type hostileCase struct {
	name string
	make func(t *testing.T, dir string) string // returns the input path
	opts diskimage.Options
	want string // substring of the error
	is   error  // sentinel the error must wrap
}

func sh(t *testing.T, script string) {
	t.Helper()
	testimg.Run(t, "sh", "-c", script)
}

func patchFile(t *testing.T, path string, off int64, value []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(value, off); err != nil {
		t.Fatal(err)
	}
}

func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }
func be64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

// TestHostileInputs runs inputs that break the rules of their format (or of
// the request) through the whole engine, from a file and from a pipe. Each
// must fail with a specific error, keep the heap growth bounded, and leave
// nothing behind but the target in the output directory.
func TestHostileInputs(t *testing.T) {
	testimg.Require(t, "qemu-img")
	base := func(t *testing.T, dir string) string {
		p := filepath.Join(dir, "base.raw")
		testimg.Pattern(t, p, 4<<20, 3)
		return p
	}
	qcow := func(t *testing.T, dir string, args ...string) string {
		p := filepath.Join(dir, "img.qcow2")
		testimg.QemuImg(t, append(append([]string{"convert", "-O", "qcow2"}, args...), base(t, dir), p)...)
		return p
	}
	cases := []hostileCase{
		{name: "checksum sha256 mismatch", make: func(t *testing.T, dir string) string { return qcow(t, dir) },
			opts: diskimage.Options{Checksum: &diskimage.Checksum{Algorithm: "sha256", Hex: strings.Repeat("ab", 32)}},
			want: "checksum mismatch: source sha256 is", is: diskimage.ErrChecksum},
		{name: "checksum md5 mismatch on xz", make: func(t *testing.T, dir string) string {
			p := base(t, dir)
			sh(t, "xz -0 -T1 '"+p+"'")
			return p + ".xz"
		}, opts: diskimage.Options{Checksum: &diskimage.Checksum{Algorithm: "md5", Hex: strings.Repeat("0", 32)}},
			want: "checksum mismatch: source md5 is", is: diskimage.ErrChecksum},
		{name: "gzip bomb past the size limit", make: func(t *testing.T, dir string) string {
			p := filepath.Join(dir, "bomb.raw.gz")
			sh(t, "head -c 64M /dev/zero | gzip -9 > '"+p+"'")
			return p
		}, opts: diskimage.Options{MaxSize: 16 << 20}, want: "grows past the 16777216 byte limit", is: stream.ErrCorrupt},
		{name: "qcow2 larger than the size limit", make: func(t *testing.T, dir string) string { return qcow(t, dir) },
			opts: diskimage.Options{MaxSize: 1 << 20}, want: "virtual size 4194304 exceeds the 1048576 byte limit", is: stream.ErrUnsupported},
		{name: "nested compression", make: func(t *testing.T, dir string) string {
			p := base(t, dir)
			sh(t, "xz -0 -T1 -c '"+p+"' | gzip -1 > '"+p+".xz.gz'")
			return p + ".xz.gz"
		}, want: "xz inside gzip: only one level of compression", is: stream.ErrUnsupported},
		{name: "truncated gzip", make: func(t *testing.T, dir string) string {
			p := base(t, dir)
			sh(t, "gzip -1 -c '"+p+"' | head -c 100000 > '"+p+".gz'")
			return p + ".gz"
		}, want: "gzip: stream is truncated", is: stream.ErrCorrupt},
		{name: "xz with a 1.5 GiB dictionary", make: func(t *testing.T, dir string) string {
			p := base(t, dir)
			sh(t, "xz -T1 --lzma2=dict=1536MiB -c '"+p+"' > '"+p+".xz'")
			return p + ".xz"
		}, want: "1536 MiB", is: stream.ErrUnsupported},
		{name: "zstd with a 2 GiB window", make: func(t *testing.T, dir string) string {
			p := base(t, dir)
			// From a pipe, so zstd cannot shrink the window to the input size.
			sh(t, "cat '"+p+"' | zstd -q --long=31 -c > '"+p+".zst'")
			return p + ".zst"
		}, want: "2048 MiB window", is: stream.ErrUnsupported},
		{name: "qcow2 with a backing file, gzip-wrapped", make: func(t *testing.T, dir string) string {
			q := qcow(t, dir)
			top := filepath.Join(dir, "top.qcow2")
			testimg.QemuImg(t, "create", "-f", "qcow2", "-b", q, "-F", "qcow2", top)
			sh(t, "gzip -1 '"+top+"'")
			return top + ".gz"
		}, want: "backing file", is: stream.ErrUnsupported},
		{name: "qcow2 with an external data file", make: func(t *testing.T, dir string) string {
			p := filepath.Join(dir, "ext.qcow2")
			testimg.QemuImg(t, "create", "-f", "qcow2", "-o", "data_file="+filepath.Join(dir, "data.raw"), p, "4M")
			return p
		}, want: "external data file", is: stream.ErrUnsupported},
		{name: "qcow2 L1 table of 4 billion entries", make: func(t *testing.T, dir string) string {
			p := qcow(t, dir)
			patchFile(t, p, 36, be32(0xffffffff))
			return p
		}, want: "exceeds the 33554432 byte limit", is: stream.ErrCorrupt},
		{name: "qcow2 cluster_bits 30", make: func(t *testing.T, dir string) string {
			p := qcow(t, dir)
			patchFile(t, p, 20, be32(30))
			return p
		}, want: "cluster_bits 30 out of range", is: stream.ErrCorrupt},
		{name: "qcow2 metadata after the data, streamed with a small spill limit", make: func(t *testing.T, dir string) string {
			// Move the L1 table to the end of the file: qemu reads it fine,
			// a one-pass reader must hold every cluster before it.
			p := qcow(t, dir)
			b, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			l1 := binary.BigEndian.Uint64(b[40:])
			l1size := binary.BigEndian.Uint32(b[36:])
			table := bytes.Clone(b[l1 : l1+uint64(l1size)*8])
			clear(b[l1 : l1+uint64(l1size)*8])
			end := (uint64(len(b)) + 65535) / 65536 * 65536
			b = append(b, make([]byte, end-uint64(len(b)))...)
			b = append(b, table...)
			b = append(b, make([]byte, 65536-len(table))...)
			binary.BigEndian.PutUint64(b[40:], end)
			if err := os.WriteFile(p, b, 0o644); err != nil {
				t.Fatal(err)
			}
			return p
		}, opts: diskimage.Options{Sequential: true, SpillLimit: 1 << 20}, want: "seekable source", is: stream.ErrUnsupported},
		{name: "vmdk descriptor naming an extent outside the image", make: func(t *testing.T, dir string) string {
			p := filepath.Join(dir, "flat.vmdk")
			testimg.QemuImg(t, "create", "-f", "vmdk", "-o", "subformat=monolithicFlat", p, "4M")
			return p
		}, want: "outside the image", is: stream.ErrUnsupported},
		{name: "vdi block map entry out of range", make: func(t *testing.T, dir string) string {
			p := filepath.Join(dir, "img.vdi")
			testimg.QemuImg(t, "convert", "-O", "vdi", base(t, dir), p)
			b, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			bmap := binary.LittleEndian.Uint32(b[0x154:])
			patchFile(t, p, int64(bmap), binary.LittleEndian.AppendUint32(nil, 1000))
			return p
		}, want: "block map", is: stream.ErrCorrupt},
	}
	for _, c := range cases {
		for _, via := range []string{"file", "stdin"} {
			t.Run(c.name+"/"+via, func(t *testing.T) {
				in := c.make(t, t.TempDir())
				var src source.Source
				if via == "file" {
					s, err := source.OpenFile(in)
					if err != nil {
						t.Fatal(err)
					}
					src = s
				} else {
					f, err := os.Open(in)
					if err != nil {
						t.Fatal(err)
					}
					defer f.Close()
					src = source.FromReader(onlyRead{f}, "-")
				}
				defer src.Close()
				outDir := t.TempDir()
				dst := filepath.Join(outDir, "out.raw")
				var err error
				peak := peakHeap(func() { _, err = convertTo(t, src, dst, c.opts) })
				if err == nil {
					t.Fatalf("converted without error; want one containing %q", c.want)
				}
				if !strings.Contains(err.Error(), c.want) {
					t.Fatalf("error %q, want it to contain %q", err, c.want)
				}
				if c.is != nil && !errors.Is(err, c.is) {
					t.Fatalf("error %q does not wrap %v", err, c.is)
				}
				if peak > 128<<20 {
					t.Fatalf("heap grew by %d MiB while refusing the input; the bound is 128 MiB", peak>>20)
				}
				entries, _ := os.ReadDir(outDir)
				for _, e := range entries {
					if e.Name() != "out.raw" {
						t.Fatalf("conversion left %s in the output directory", e.Name())
					}
				}
				t.Logf("refused: %v (heap +%d KiB)", err, peak>>10)
			})
		}
	}
}

// onlyRead hides every method but Read, as a pipe would.
type onlyRead struct{ r *os.File }

func (o onlyRead) Read(p []byte) (int, error) { return o.r.Read(p) }

// TestChecksumMatchIsAccepted is the positive control of the checksum cases:
// each algorithm, computed by the real tools, passes on both paths.
func TestChecksumMatchIsAccepted(t *testing.T) {
	dir := t.TempDir()
	raw := filepath.Join(dir, "d.raw")
	testimg.Pattern(t, raw, 3<<20, 9)
	img := filepath.Join(dir, "d.qcow2")
	testimg.QemuImg(t, "convert", "-c", "-O", "qcow2", raw, img)
	for _, tool := range []string{"md5", "sha1", "sha256", "sha512"} {
		sum := strings.Fields(string(testimg.Run(t, tool+"sum", img)))[0]
		c, err := diskimage.NewChecksum(tool, strings.ToUpper(sum))
		if err != nil {
			t.Fatal(err)
		}
		src, err := source.OpenFile(img)
		if err != nil {
			t.Fatal(err)
		}
		dst := filepath.Join(t.TempDir(), "out.raw")
		res, err := convertTo(t, src, dst, diskimage.Options{Checksum: &c})
		src.Close()
		if err != nil {
			t.Fatalf("%s: %v", tool, err)
		}
		if !res.Sequential || res.Digest != c.String() {
			t.Fatalf("%s: result %+v: want a sequential pass that checked %s", tool, res, c)
		}
		testimg.SameContent(t, raw, dst)
	}
	if _, err := diskimage.ParseChecksum("sha256:abc"); err == nil || !strings.Contains(err.Error(), "want 64 hex digits") {
		t.Fatalf("short sha256 accepted or unclear: %v", err)
	}
	if _, err := diskimage.ParseChecksum("crc32:00000000"); err == nil || !strings.Contains(err.Error(), "want md5, sha1, sha256 or sha512") {
		t.Fatalf("unknown algorithm accepted or unclear: %v", err)
	}
}
