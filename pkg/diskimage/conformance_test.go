package diskimage_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"vimg.dev/vimg/pkg/diskimage"
	"vimg.dev/vimg/pkg/diskimage/sink"
	"vimg.dev/vimg/pkg/diskimage/source"
	"vimg.dev/vimg/pkg/diskimage/testimg"
)

// debianISO is a real hybrid ISO 9660 image from Debian's grub-rescue-pc.
const debianISO = "/usr/lib/grub-rescue/grub-rescue-cdrom.iso"

// sample is one input image of the conformance matrix.
type sample struct {
	name   string
	path   string // the image, uncompressed
	format diskimage.Format
}

// conformanceSize is not a multiple of any cluster or grain size, so every
// reader has to get the tail right.
const conformanceSize = 24<<20 + 512

func makeSamples(t *testing.T) []sample {
	t.Helper()
	dir := t.TempDir()
	raw := filepath.Join(dir, "base.raw")
	testimg.Pattern(t, raw, conformanceSize, 42)
	out := []sample{{"raw", raw, diskimage.Raw}}
	conv := func(name string, f diskimage.Format, args ...string) {
		p := filepath.Join(dir, name)
		testimg.QemuImg(t, append(append([]string{"convert", "-O"}, args...), raw, p)...)
		out = append(out, sample{name, p, f})
	}
	conv("v2.qcow2", diskimage.QCOW2, "qcow2", "-o", "compat=0.10")
	conv("v3.qcow2", diskimage.QCOW2, "qcow2", "-o", "compat=1.1")
	conv("c4k.qcow2", diskimage.QCOW2, "qcow2", "-o", "cluster_size=4096")
	conv("c2m.qcow2", diskimage.QCOW2, "qcow2", "-o", "cluster_size=2M")
	conv("zlib.qcow2", diskimage.QCOW2, "qcow2", "-c")
	conv("zlib-v2.qcow2", diskimage.QCOW2, "qcow2", "-c", "-o", "compat=0.10")
	conv("zstd.qcow2", diskimage.QCOW2, "qcow2", "-c", "-o", "compression_type=zstd")
	conv("extl2.qcow2", diskimage.QCOW2, "qcow2", "-o", "extended_l2=on,cluster_size=128k")
	conv("prealloc-meta.qcow2", diskimage.QCOW2, "qcow2", "-o", "preallocation=metadata")
	conv("prealloc-full.qcow2", diskimage.QCOW2, "qcow2", "-o", "preallocation=full")
	conv("sparse.vmdk", diskimage.VMDK, "vmdk", "-o", "subformat=monolithicSparse")
	conv("stream.vmdk", diskimage.VMDK, "vmdk", "-o", "subformat=streamOptimized")
	conv("dynamic.vdi", diskimage.VDI, "vdi")
	conv("static.vdi", diskimage.VDI, "vdi", "-o", "static=on")
	iso := testimg.RequireFile(t, debianISO, "grub-rescue-pc")
	out = append(out, sample{"debian.iso", iso, diskimage.ISO})
	return out
}

// wrap compresses path with the real tool and returns the new file.
func wrap(t *testing.T, path, kind string) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), filepath.Base(path)+"."+kind)
	f, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var cmd []string
	switch kind {
	case "gz":
		cmd = []string{"gzip", "-c", "-1"}
	case "xz":
		cmd = []string{"xz", "-c", "-0", "-T1"}
	case "zst":
		cmd = []string{"zstd", "-c", "-q", "-3"}
	}
	testimg.Require(t, cmd[0])
	out := testimg.Run(t, "sh", "-c", strings.Join(cmd, " ")+" < '"+path+"'")
	if _, err := f.Write(out); err != nil {
		t.Fatal(err)
	}
	return dst
}

// serve starts an HTTP server for path, with or without Range support.
func serve(t *testing.T, path string, ranges bool) string {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f, err := os.Open(path)
		if err != nil {
			http.Error(w, err.Error(), 500)
			return
		}
		defer f.Close()
		if ranges {
			st, _ := f.Stat()
			http.ServeContent(w, r, "", st.ModTime(), f)
			return
		}
		io.Copy(w, f) // no Content-Length, no Accept-Ranges: chunked
	}))
	t.Cleanup(srv.Close)
	return srv.URL + "/image"
}

type via struct {
	name string
	open func(t *testing.T, path string) source.Source
}

var vias = []via{
	{"file", func(t *testing.T, path string) source.Source {
		s, err := source.OpenFile(path)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}},
	{"stdin", func(t *testing.T, path string) source.Source {
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		pr, pw := io.Pipe()
		go func() { _, err := io.Copy(pw, f); f.Close(); pw.CloseWithError(err) }()
		return source.FromReader(pr, "-")
	}},
	{"http-range", func(t *testing.T, path string) source.Source {
		s, err := source.OpenHTTP(context.Background(), serve(t, path, true), source.HTTPOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if s.ReaderAt() == nil {
			t.Fatal("server supports Range but the source offers no random access")
		}
		return s
	}},
	{"http-norange", func(t *testing.T, path string) source.Source {
		s, err := source.OpenHTTP(context.Background(), serve(t, path, false), source.HTTPOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if s.ReaderAt() != nil {
			t.Fatal("server without Range support offers random access")
		}
		return s
	}},
}

func convertTo(t *testing.T, src source.Source, dst string, opts diskimage.Options) (*diskimage.Result, error) {
	t.Helper()
	var target sink.Target
	opts.OpenTarget = func(size int64) (diskimage.Target, error) {
		tg, err := sink.Open(dst, size)
		target = tg
		return tg, err
	}
	res, err := diskimage.Convert(context.Background(), src, opts)
	if target != nil {
		if cerr := target.Close(); cerr != nil && err == nil {
			err = cerr
		}
	}
	return res, err
}

type qemuInfo struct {
	Format      string `json:"format"`
	VirtualSize int64  `json:"virtual-size"`
}

func qemuInfoOf(t *testing.T, path string) qemuInfo {
	var qi qemuInfo
	if err := json.Unmarshal(testimg.QemuImg(t, "info", "--output=json", path), &qi); err != nil {
		t.Fatal(err)
	}
	return qi
}

// TestConformance converts every sample, plain and wrapped in gzip, xz and
// zstd, from a file, a pipe, and HTTP with and without Range, and compares the
// result with `qemu-img convert -O raw` of the same image byte for byte; info
// must agree with `qemu-img info`.
func TestConformance(t *testing.T) {
	testimg.Require(t, "qemu-img")
	for _, s := range makeSamples(t) {
		ref := testimg.RawOf(t, s.path)
		refSum := testimg.SHA256File(t, ref)
		qi := qemuInfoOf(t, s.path)
		inputs := map[string]string{"": s.path}
		for _, kind := range []string{"gz", "xz", "zst"} {
			inputs[kind] = wrap(t, s.path, kind)
		}
		for _, wrapper := range []string{"", "gz", "xz", "zst"} {
			in := inputs[wrapper]
			for _, v := range vias {
				name := fmt.Sprintf("%s/%s/%s", s.name, map[string]string{"": "plain"}[wrapper]+wrapper, v.name)
				t.Run(name, func(t *testing.T) {
					src := v.open(t, in)
					defer src.Close()
					dst := filepath.Join(t.TempDir(), "out.raw")
					res, err := convertTo(t, src, dst, diskimage.Options{})
					if err != nil {
						t.Fatalf("convert: %v", err)
					}
					if got := testimg.SHA256File(t, dst); got != refSum {
						testimg.SameContent(t, ref, dst) // says how it differs
						t.Fatalf("sha256 %s, qemu-img gives %s", got, refSum)
					}
					if res.Info.Format != s.format {
						t.Errorf("format %q, want %q", res.Info.Format, s.format)
					}
					if res.Info.VirtualSize != qi.VirtualSize {
						t.Errorf("virtual size %d, qemu-img info says %d", res.Info.VirtualSize, qi.VirtualSize)
					}
					wantCompression := map[string]diskimage.Compression{"": "", "gz": "gzip", "xz": "xz", "zst": "zstd"}[wrapper]
					if res.Info.Compression != wantCompression {
						t.Errorf("compression %q, want %q", res.Info.Compression, wantCompression)
					}
				})
			}
			t.Run(fmt.Sprintf("%s/%s/info", s.name, map[string]string{"": "plain"}[wrapper]+wrapper), func(t *testing.T) {
				src, err := source.OpenFile(in)
				if err != nil {
					t.Fatal(err)
				}
				defer src.Close()
				info, err := diskimage.Inspect(context.Background(), src)
				if err != nil {
					t.Fatal(err)
				}
				st, _ := os.Stat(in)
				wantFormat := qi.Format
				if s.format == diskimage.ISO {
					wantFormat = "raw" // qemu-img has no ISO format; vimg tells them apart
				}
				if string(info.Format) != wantFormat && !(s.format == diskimage.ISO && info.Format == diskimage.ISO) {
					t.Errorf("format %q, qemu-img says %q", info.Format, qi.Format)
				}
				if info.VirtualSize != qi.VirtualSize || info.FileSize != st.Size() || info.CDROM != (s.format == diskimage.ISO) {
					t.Errorf("info %+v: want virtualSize %d (qemu-img), fileSize %d, cdrom %v", info, qi.VirtualSize, st.Size(), s.format == diskimage.ISO)
				}
			})
		}
	}
}
