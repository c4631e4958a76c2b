package importer

import (
	"bytes"
	"context"
	"crypto/md5"
	"encoding/hex"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"vimg.dev/vimg/dvcr/layout"
	"vimg.dev/vimg/pkg/diskimage"
	"vimg.dev/vimg/pkg/diskimage/source"
)

// diskSize is the guest size of the test images: big enough for several
// clusters, tables and read buffers, small enough for a 2-core machine.
const diskSize = 6 << 20

func testRef(name string) string {
	return layout.Ref(layout.Repository(layout.KindVirtualImage, "tests", name), "0b6c3d4e-0000-4000-8000-00000000000a")
}

func testRepo(name string) string { return layout.Repository(layout.KindVirtualImage, "tests", name) }

// timeout bounds every import of the tests: a deadlock fails the test
// instead of hanging it.
func timeout(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func TestImport_UncompressedImagesArePushedDirectlyAsTheyAre(t *testing.T) {
	reg := newRegistry(t)
	c := reg.client(t)
	for _, tc := range []struct {
		format string
		size   int64
		want   diskimage.Format
	}{
		{"raw", diskSize + 1234, diskimage.Raw}, // not a multiple of a sector
		{"qcow2", diskSize, diskimage.QCOW2},
		{"vmdk", diskSize, diskimage.VMDK},
		{"vdi", diskSize, diskimage.VDI},
		{"iso", diskSize, diskimage.ISO},
	} {
		t.Run(tc.format, func(t *testing.T) {
			img := makeImage(t, tc.format, tc.size)
			src := openHTTP(t, serve(t, readFile(t, img), serveOpts{}), source.HTTPOptions{})
			ref := testRef("direct-" + tc.format)
			spills := reg.chunkedPatches.Load()
			res, err := Import(timeout(t), Request{Source: src, Client: c, Ref: ref})
			if err != nil {
				t.Fatal(err)
			}
			checkStored(t, c, ref, res, img, layoutFormat(tc.want), qemuVirtualSize(t, img))
			st, _ := os.Stat(img)
			if res.Format != tc.want || res.Compression != diskimage.NoCompression || res.SourceSize != st.Size() ||
				res.SourceChecksum != fileSHA256(t, img) || res.CDROM != (tc.want == diskimage.ISO) {
				t.Errorf("result %+v: want format %s, no compression, %d source bytes with %s", res, tc.want, st.Size(), fileSHA256(t, img))
			}
			if n := reg.chunkedPatches.Load() - spills; n != 0 {
				t.Errorf("%d spills for a source of known size", n)
			}
			checkNoLeaks(t)
		})
	}
}

func TestImport_CompressedQcow2IsStoredDecompressed(t *testing.T) {
	reg := newRegistry(t)
	c := reg.client(t)
	img := makeImage(t, "qcow2", diskSize)
	virtual := qemuVirtualSize(t, img)
	for _, tool := range []string{"gzip", "xz", "zstd"} {
		t.Run(tool, func(t *testing.T) {
			packed := compress(t, tool, img)
			src := openHTTP(t, serve(t, readFile(t, packed), serveOpts{}), source.HTTPOptions{})
			name := "qcow2-" + tool
			spills := reg.chunkedPatches.Load()
			res, err := Import(timeout(t), Request{Source: src, Client: c, Ref: testRef(name)})
			if err != nil {
				t.Fatal(err)
			}
			checkStored(t, c, testRef(name), res, img, layout.FormatQcow2, virtual)
			st, _ := os.Stat(packed)
			if res.Format != diskimage.QCOW2 || string(res.Compression) != map[string]string{"gzip": "gzip", "xz": "xz", "zstd": "zstd"}[tool] ||
				res.SourceSize != st.Size() || res.SourceChecksum != fileSHA256(t, packed) {
				t.Errorf("result %+v: want qcow2 from %s, %d source bytes with checksum %s (of the compressed file)", res, tool, st.Size(), fileSHA256(t, packed))
			}
			if n := reg.chunkedPatches.Load() - spills; n != 1 {
				t.Errorf("%d spills for a compressed source, want 1", n)
			}
			checkNoBlob(t, c, testRepo(name), img)
			checkNoLeaks(t)
		})
	}
}

func TestImport_CompressedRawVMDKVDIAndISOAreStoredDecompressed(t *testing.T) {
	reg := newRegistry(t)
	c := reg.client(t)
	for _, tc := range []struct {
		format, tool string
		want         diskimage.Format
	}{
		{"raw", "zstd", diskimage.Raw},
		{"vmdk", "gzip", diskimage.VMDK},
		{"vdi", "xz", diskimage.VDI},
		{"iso", "xz", diskimage.ISO},
	} {
		t.Run(tc.format+"."+tc.tool, func(t *testing.T) {
			img := makeImage(t, tc.format, diskSize)
			packed := compress(t, tc.tool, img)
			src := openHTTP(t, serve(t, readFile(t, packed), serveOpts{}), source.HTTPOptions{})
			name := tc.format + "-" + tc.tool
			res, err := Import(timeout(t), Request{Source: src, Client: c, Ref: testRef(name)})
			if err != nil {
				t.Fatal(err)
			}
			checkStored(t, c, testRef(name), res, img, layoutFormat(tc.want), qemuVirtualSize(t, img))
			if res.CDROM != (tc.want == diskimage.ISO) {
				t.Errorf("CDROM %v for %s", res.CDROM, tc.want)
			}
			checkNoBlob(t, c, testRepo(name), img)
		})
	}
	checkNoLeaks(t)
}

func TestImport_StreamOfUnknownLengthSpillsAndIsStoredWhole(t *testing.T) {
	reg := newRegistry(t)
	c := reg.client(t)
	img := makeImage(t, "qcow2", diskSize)
	virtual := qemuVirtualSize(t, img)

	t.Run("chunked HTTP", func(t *testing.T) {
		src := openHTTP(t, serve(t, readFile(t, img), serveOpts{chunked: true}), source.HTTPOptions{})
		if src.Size() != -1 {
			t.Fatalf("the chunked server's source has size %d; the test needs an unknown one", src.Size())
		}
		spills := reg.chunkedPatches.Load()
		res, err := Import(timeout(t), Request{Source: src, Client: c, Ref: testRef("chunked")})
		if err != nil {
			t.Fatal(err)
		}
		checkStored(t, c, testRef("chunked"), res, img, layout.FormatQcow2, virtual)
		if n := reg.chunkedPatches.Load() - spills; n != 1 {
			t.Errorf("%d spills for a stream of unknown length, want 1", n)
		}
		checkNoBlob(t, c, testRepo("chunked"), img)
	})
	t.Run("upload body", func(t *testing.T) {
		f, err := os.Open(img)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		// An upload body is a plain reader: no size, no random access.
		src := source.FromReader(io.MultiReader(f), "upload")
		res, err := Import(timeout(t), Request{Source: src, Client: c, Ref: testRef("upload")})
		if err != nil {
			t.Fatal(err)
		}
		checkStored(t, c, testRef("upload"), res, img, layout.FormatQcow2, virtual)
		checkNoBlob(t, c, testRepo("upload"), img)
	})
	checkNoLeaks(t)
}

func TestImport_ChecksumIsOverTheBytesReceived(t *testing.T) {
	reg := newRegistry(t)
	c := reg.client(t)
	img := makeImage(t, "qcow2", diskSize)
	packed := compress(t, "xz", img)
	data := readFile(t, packed)
	sum := md5.Sum(data)
	want := diskimage.Checksum{Algorithm: "md5", Hex: hex.EncodeToString(sum[:])}
	src := openHTTP(t, serve(t, data, serveOpts{}), source.HTTPOptions{})
	// As a user may write it: the comparison ignores case.
	asGiven := diskimage.Checksum{Algorithm: "MD5", Hex: strings.ToUpper(want.Hex)}
	res, err := Import(timeout(t), Request{Source: src, Client: c, Ref: testRef("md5"), Checksum: &asGiven})
	if err != nil {
		t.Fatal(err)
	}
	if res.SourceChecksum != want.String() {
		t.Errorf("source checksum %q, want the requested %q", res.SourceChecksum, want.String())
	}
	checkStored(t, c, testRef("md5"), res, img, layout.FormatQcow2, qemuVirtualSize(t, img))
}

func TestImport_ChecksumMismatchFailsWithoutManifest(t *testing.T) {
	reg := newRegistry(t)
	c := reg.client(t)
	img := makeImage(t, "qcow2", diskSize)
	wrong := diskimage.Checksum{Algorithm: "sha256", Hex: strings.Repeat("ab", 32)}
	for _, tc := range []struct {
		name string
		path string
	}{
		{"direct", img},
		{"spilled", compress(t, "gzip", img)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := openHTTP(t, serve(t, readFile(t, tc.path), serveOpts{}), source.HTTPOptions{})
			ref := testRef("mismatch-" + tc.name)
			_, err := Import(timeout(t), Request{Source: src, Client: c, Ref: ref, Checksum: &wrong})
			actual := strings.TrimPrefix(fileSHA256(t, tc.path), "sha256:")
			checkClass(t, err, ReasonChecksumMismatch, true, wrong.Hex, actual)
			checkNoImage(t, c, ref)
			checkNoBlob(t, c, testRepo("mismatch-"+tc.name), img)
			checkNoLeaks(t)
		})
	}
}

func TestImport_HostileOrBrokenImagesAreRefusedWithoutManifest(t *testing.T) {
	reg := newRegistry(t)
	c := reg.client(t)
	requireTool(t, "qemu-img")
	dir := t.TempDir()
	base, top := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2")
	run(t, "qemu-img", "create", "-f", "qcow2", base, "8M")
	run(t, "qemu-img", "create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)

	good := readFile(t, makeImage(t, "qcow2", diskSize))
	truncated := good[:len(good)*6/10]

	// A compressed qcow2 with garbage a quarter in: the engine finds it
	// while the upload is under way; the source holds its second half back
	// until the client goes, so the rest of the file is still to come
	// however slow the machine is.
	compressedQcow2 := filepath.Join(dir, "c.qcow2")
	run(t, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", patternDisk(t, 16<<20, 5), compressedQcow2)
	corrupt := readFile(t, compressedQcow2)
	for i := len(corrupt) / 4; i < len(corrupt)/4+256<<10; i++ {
		corrupt[i] = 0xff
	}
	hold := int64(len(corrupt) / 2)

	for _, tc := range []struct {
		name string
		data []byte
		o    serveOpts
		says string
	}{
		{"backing file", readFile(t, top), serveOpts{}, "backing file"},
		{"truncated", truncated, serveOpts{}, "qcow2"},
		{"truncated stream", truncated, serveOpts{chunked: true}, "qcow2"},
		{"corrupt cluster mid-stream", corrupt, serveOpts{holdAt: hold}, "corrupt"},
		{"corrupt cluster mid-stream, spilled", corrupt, serveOpts{holdAt: hold, chunked: true}, "corrupt"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var sent atomic.Int64
			tc.o.sent = &sent
			src := openHTTP(t, serve(t, tc.data, tc.o), source.HTTPOptions{})
			ref := testRef("refused-" + strings.ReplaceAll(strings.ReplaceAll(tc.name, " ", "-"), ",", ""))
			_, err := Import(timeout(t), Request{Source: src, Client: c, Ref: ref})
			checkClass(t, err, ReasonInvalidImage, true, tc.says)
			checkNoImage(t, c, ref)
			checkNoLeaks(t)
			if tc.o.holdAt > 0 && sent.Load() >= int64(len(tc.data)) {
				t.Errorf("the source was read to its end (%d bytes): the refusal did not stop the transfer", sent.Load())
			}
			t.Logf("the source sent %d of %d bytes", sent.Load(), len(tc.data))
		})
	}
}

func TestImport_NestedCompressionIsUnsupported(t *testing.T) {
	reg := newRegistry(t)
	c := reg.client(t)
	twice := compress(t, "gzip", compress(t, "xz", makeImage(t, "qcow2", diskSize)))
	src := openHTTP(t, serve(t, readFile(t, twice), serveOpts{}), source.HTTPOptions{})
	_, err := Import(timeout(t), Request{Source: src, Client: c, Ref: testRef("nested")})
	checkClass(t, err, ReasonUnsupportedFormat, true, "xz inside gzip")
	checkNoImage(t, c, testRef("nested"))
	checkNoLeaks(t)
}

func TestImport_DiskOverMaxSizeIsTooLarge(t *testing.T) {
	reg := newRegistry(t)
	c := reg.client(t)
	qcow2 := makeImage(t, "qcow2", diskSize)
	raw := makeImage(t, "raw", diskSize)
	for _, tc := range []struct {
		name string
		path string
		o    serveOpts
	}{
		{"qcow2 header", qcow2, serveOpts{}},
		{"raw of known size", raw, serveOpts{}},
		{"raw stream", raw, serveOpts{chunked: true}},
		{"compressed raw", compress(t, "zstd", raw), serveOpts{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := openHTTP(t, serve(t, readFile(t, tc.path), tc.o), source.HTTPOptions{})
			ref := testRef("large-" + strings.ReplaceAll(tc.name, " ", "-"))
			_, err := Import(timeout(t), Request{Source: src, Client: c, Ref: ref, MaxSize: diskSize / 2})
			checkClass(t, err, ReasonTooLarge, true, "limit")
			checkNoImage(t, c, ref)
			checkNoLeaks(t)
		})
	}
}

func TestImport_SourceErrorsAreClassified(t *testing.T) {
	ctx := timeout(t)
	open := func(url string) error {
		src, err := source.OpenHTTP(ctx, url, source.HTTPOptions{Retries: -1, Timeout: 5 * time.Second})
		if err == nil {
			src.Close()
			t.Fatalf("opening %s succeeded", url)
		}
		return err
	}
	t.Run("404", func(t *testing.T) {
		checkClass(t, open(serve(t, nil, serveOpts{status: 404})), ReasonSourceNotFound, true, "check the URL")
	})
	t.Run("403", func(t *testing.T) {
		checkClass(t, open(serve(t, nil, serveOpts{status: 403})), ReasonSourceUnauthorized, true, "authSecretRef")
	})
	t.Run("503", func(t *testing.T) {
		checkClass(t, open(serve(t, nil, serveOpts{status: 503})), ReasonTransient, false)
	})
	t.Run("unknown host", func(t *testing.T) {
		checkClass(t, open("http://does-not-exist.invalid/x"), ReasonSourceUnreachable, true, "check the URL's host")
	})
	t.Run("connection refused", func(t *testing.T) {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := l.Addr().String()
		l.Close()
		checkClass(t, open("http://"+addr+"/x"), ReasonSourceUnreachable, false)
	})
	t.Run("self-signed TLS", func(t *testing.T) {
		reg := newRegistry(t) // any TLS server with a certificate of its own
		checkClass(t, open("https://"+reg.Host+"/v2/"), ReasonTLSError, true, "caBundle", "insecureSkipVerify")
	})
}

func TestImport_SurvivesADroppedConnectionByResuming(t *testing.T) {
	reg := newRegistry(t)
	c := reg.client(t)
	img := makeImage(t, "qcow2", diskSize)
	virtual := qemuVirtualSize(t, img)
	for _, tc := range []struct {
		name string
		path string
	}{
		{"direct", img},
		{"spilled", compress(t, "xz", img)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			data := readFile(t, tc.path)
			src := openHTTP(t, serve(t, data, serveOpts{dropAt: int64(len(data)) / 2}), source.HTTPOptions{})
			ref := testRef("resumed-" + tc.name)
			res, err := Import(timeout(t), Request{Source: src, Client: c, Ref: ref})
			if err != nil {
				t.Fatal(err)
			}
			checkStored(t, c, ref, res, img, layout.FormatQcow2, virtual)
			if res.SourceSize != int64(len(data)) || res.SourceChecksum != fileSHA256(t, tc.path) {
				t.Errorf("after the resume: %d source bytes with %s, want %d with %s", res.SourceSize, res.SourceChecksum, len(data), fileSHA256(t, tc.path))
			}
		})
	}
	checkNoLeaks(t)
}

func TestImport_ProgressGrowsAndReachesOneOnlyAtTheEnd(t *testing.T) {
	reg := newRegistry(t)
	c := reg.client(t)
	img := makeImage(t, "qcow2", diskSize)
	for _, tc := range []struct {
		name string
		path string
	}{
		{"direct", img},
		{"spilled", compress(t, "gzip", img)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			data := readFile(t, tc.path)
			src := openHTTP(t, serve(t, data, serveOpts{delay: 2 * time.Millisecond}), source.HTTPOptions{})
			var reports []Progress
			res, err := Import(timeout(t), Request{Source: src, Client: c, Ref: testRef("progress-" + tc.name),
				Progress: func(p Progress) { reports = append(reports, p) }, ProgressInterval: 10 * time.Millisecond})
			if err != nil {
				t.Fatal(err)
			}
			if len(reports) < 3 {
				t.Fatalf("%d progress reports for a transfer of many intervals", len(reports))
			}
			prev := Progress{Fraction: -1}
			for i, p := range reports {
				last := i == len(reports)-1
				switch {
				case p.Fraction < prev.Fraction || p.SourceRead < prev.SourceRead || p.Stored < prev.Stored || p.Copied < prev.Copied:
					t.Errorf("report %d went back: %+v after %+v", i, p, prev)
				case !last && p.Fraction >= 1:
					t.Errorf("report %d of %d says %v done", i, len(reports), p.Fraction)
				case p.SourceTotal != int64(len(data)):
					t.Errorf("report %d: total %d, want %d", i, p.SourceTotal, len(data))
				}
				prev = p
			}
			end := reports[len(reports)-1]
			if end.Fraction != 1 || end.SourceRead != int64(len(data)) || end.Stored != res.StoredSize || end.AvgBytesPerSecond <= 0 {
				t.Errorf("last report %+v: want fraction 1, %d read, %d stored, a speed", end, len(data), res.StoredSize)
			}
			mid := reports[len(reports)/2]
			if mid.Fraction <= 0 || mid.SourceRead <= 0 {
				t.Errorf("report in the middle %+v shows no progress", mid)
			}
		})
	}
}

func TestImport_RegistryFailureMidUploadStopsEverything(t *testing.T) {
	reg := newRegistry(t)
	c := reg.client(t)
	img := makeImage(t, "qcow2", 16<<20)
	for _, tc := range []struct {
		name string
		path string
	}{
		{"direct", img},
		{"spilled", compress(t, "zstd", img)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var sent atomic.Int64
			data := readFile(t, tc.path)
			src := openHTTP(t, serve(t, data, serveOpts{delay: 4 * time.Millisecond, sent: &sent}), source.HTTPOptions{})
			ref := testRef("dvcr-fails-" + tc.name)
			reg.cutPatchAfter.Store(1 << 20)
			_, err := Import(timeout(t), Request{Source: src, Client: c, Ref: ref})
			checkClass(t, err, ReasonTransient, false, "DVCR")
			checkNoImage(t, c, ref)
			checkNoLeaks(t)
			if sent.Load() >= int64(len(data)) {
				t.Errorf("the source was read to its end (%d bytes): DVCR's failure did not stop the transfer", sent.Load())
			}
			t.Logf("the source sent %d of %d bytes", sent.Load(), len(data))
		})
	}
}

func TestImport_CancelStopsEverything(t *testing.T) {
	reg := newRegistry(t)
	c := reg.client(t)
	img := makeImage(t, "qcow2", 16<<20)
	for _, tc := range []struct {
		name string
		path string
	}{
		{"direct", img},
		{"spilled", compress(t, "gzip", img)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(timeout(t))
			src, err := source.OpenHTTP(ctx, serve(t, readFile(t, tc.path), serveOpts{delay: 2 * time.Millisecond}), source.HTTPOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer src.Close()
			ref := testRef("cancelled-" + tc.name)
			var reported bool
			_, err = Import(ctx, Request{Source: src, Client: c, Ref: ref, ProgressInterval: 10 * time.Millisecond,
				Progress: func(p Progress) {
					if p.SourceRead > 1<<20 && !reported {
						reported = true
						cancel()
					}
				}})
			checkClass(t, err, ReasonTransient, false)
			checkNoImage(t, c, ref)
			checkNoLeaks(t)
		})
	}
}

func TestImport_EmptySourceIsRefused(t *testing.T) {
	reg := newRegistry(t)
	c := reg.client(t)
	_, err := Import(timeout(t), Request{Source: source.FromReader(bytes.NewReader(nil), "empty"), Client: c, Ref: testRef("empty")})
	checkClass(t, err, ReasonInvalidImage, true, "empty")
	checkNoImage(t, c, testRef("empty"))
}

func TestImport_BadRequestsAreRefusedUpFront(t *testing.T) {
	reg := newRegistry(t)
	c := reg.client(t)
	src := source.FromReader(bytes.NewReader([]byte("x")), "x")
	for name, req := range map[string]Request{
		"no source":     {Client: c, Ref: testRef("x")},
		"no client":     {Source: src, Ref: testRef("x")},
		"no tag":        {Source: src, Client: c, Ref: testRepo("x")},
		"digest":        {Source: src, Client: c, Ref: testRepo("x") + "@sha256:" + strings.Repeat("0", 64)},
		"bad checksum":  {Source: src, Client: c, Ref: testRef("x"), Checksum: &diskimage.Checksum{Algorithm: "crc32", Hex: "00"}},
		"negative size": {Source: src, Client: c, Ref: testRef("x"), MaxSize: -1},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := Import(context.Background(), Request(req))
			checkClass(t, err, ReasonInternal, true)
		})
	}
}

// BenchmarkImport imports a 256 MiB disk (qcow2, served with Range, so
// pushed directly; and the same qcow2 as xz, which spills) from a loopback
// HTTP server into the in-process DVCR over TLS:
//
//	go test -run NONE -bench Import -benchtime 2x ./pkg/importer
func BenchmarkImport(b *testing.B) {
	const size = 256 << 20
	raw := patternDisk(b, size, 3)
	img := filepath.Join(b.TempDir(), "disk.qcow2")
	run(b, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, img)
	for _, tc := range []struct {
		name string
		path string
	}{
		{"qcow2-direct", img},
		{"qcow2.xz-spilled", compress(b, "xz", img)},
	} {
		b.Run(tc.name, func(b *testing.B) {
			reg := newRegistry(b)
			c := reg.client(b)
			data := readFile(b, tc.path)
			url := serve(b, data, serveOpts{})
			b.SetBytes(size)
			for i := 0; b.Loop(); i++ {
				src, err := source.OpenHTTP(context.Background(), url, source.HTTPOptions{})
				if err != nil {
					b.Fatal(err)
				}
				ref := layout.Ref(testRepo("bench"), "u"+strings.Repeat("0", i+1))
				if _, err := Import(context.Background(), Request{Source: src, Client: c, Ref: ref}); err != nil {
					b.Fatal(err)
				}
				src.Close()
			}
		})
	}
}
