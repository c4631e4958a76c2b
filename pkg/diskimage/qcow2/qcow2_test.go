package qcow2

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"vimg.dev/vimg/pkg/diskimage/codec"
	"vimg.dev/vimg/pkg/diskimage/stream"
	"vimg.dev/vimg/pkg/diskimage/testimg"
)

// variants are qemu-img option sets covering what the issue lists.
var variants = []struct {
	name string
	args []string
}{
	{"v2-64k", []string{"-o", "compat=0.10"}},
	{"v3-64k", []string{"-o", "compat=1.1"}},
	{"v3-4k", []string{"-o", "cluster_size=4096"}},
	{"v3-512", []string{"-o", "cluster_size=512"}},
	{"v3-2m", []string{"-o", "cluster_size=2M"}},
	{"zlib", []string{"-c"}},
	{"zlib-v2", []string{"-c", "-o", "compat=0.10"}},
	{"zlib-4k", []string{"-c", "-o", "cluster_size=4096"}},
	{"zstd", []string{"-c", "-o", "compression_type=zstd"}},
	{"extl2", []string{"-o", "extended_l2=on,cluster_size=128k"}},
	{"prealloc-metadata", []string{"-o", "preallocation=metadata"}},
	{"prealloc-full", []string{"-o", "preallocation=full"}},
}

func makeImage(t *testing.T, dir string, size int64, args []string) (src, ref string) {
	raw := filepath.Join(dir, "disk.raw")
	testimg.Pattern(t, raw, size, uint64(size))
	src = filepath.Join(dir, "disk.qcow2")
	testimg.QemuImg(t, append(append([]string{"convert", "-O", "qcow2"}, args...), raw, src)...)
	return src, testimg.RawOf(t, src)
}

// collect is a stream.Sink that decodes chunks into an in-memory disk.
type collect struct {
	mu   sync.Mutex
	disk []byte
}

func (c *collect) Put(ch stream.Chunk) error {
	buf := make([]byte, ch.Len)
	n, err := codec.Decode(ch.Codec, buf, ch.Payload)
	if err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if ch.Off >= int64(len(c.disk)) {
		return nil
	}
	copy(c.disk[ch.Off:], buf[:n])
	return nil
}

// onlyReader hides ReadAt and Seek, as a pipe would.
type onlyReader struct{ r io.Reader }

func (o onlyReader) Read(p []byte) (int, error) { return o.r.Read(p) }

func TestConformance(t *testing.T) {
	for _, v := range variants {
		for _, size := range []int64{5<<20 + 512, 64 << 20} {
			t.Run(fmt.Sprintf("%s/%d", v.name, size), func(t *testing.T) {
				src, ref := makeImage(t, t.TempDir(), size, v.args)
				want, err := os.ReadFile(ref)
				if err != nil {
					t.Fatal(err)
				}
				f, err := os.Open(src)
				if err != nil {
					t.Fatal(err)
				}
				defer f.Close()
				st, _ := f.Stat()
				img, err := Open(f, st.Size())
				if err != nil {
					t.Fatalf("Open: %v", err)
				}
				if img.Size() != int64(len(want)) {
					t.Fatalf("size %d, want %d", img.Size(), len(want))
				}
				got := make([]byte, img.Size())
				var wg sync.WaitGroup
				const step = 3<<20 + 4096
				for off := int64(0); off < img.Size(); off += step {
					wg.Add(1)
					go func(off int64) {
						defer wg.Done()
						end := min(off+step, img.Size())
						if _, err := img.ReadAt(got[off:end], off); err != nil && !errors.Is(err, io.EOF) {
							t.Errorf("ReadAt(%d): %v", off, err)
						}
					}(off)
				}
				wg.Wait()
				if !bytes.Equal(got, want) {
					t.Fatalf("random access: content differs from qemu-img convert")
				}

				if _, err := f.Seek(0, 0); err != nil {
					t.Fatal(err)
				}
				dec, _, err := NewDecoder(onlyReader{f}, StreamOptions{})
				if err != nil {
					t.Fatalf("NewDecoder: %v", err)
				}
				c := &collect{disk: make([]byte, dec.Size())}
				if err := dec.Run(c); err != nil {
					t.Fatalf("Run: %v", err)
				}
				if !bytes.Equal(c.disk, want) {
					t.Fatalf("stream: content differs from qemu-img convert")
				}
			})
		}
	}
}
