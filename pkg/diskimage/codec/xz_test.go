package codec

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"testing/iotest"

	"vimg.dev/vimg/pkg/diskimage/stream"
	"vimg.dev/vimg/pkg/diskimage/testimg"
)

// xzFixture is a 12 MiB test pattern compressed the ways that give
// liblzma's threaded decoder work: many blocks with their sizes in the
// headers (xz -T), and several streams one after another.
type xzFixture struct {
	raw    []byte
	blocks []byte // one stream, 1 MiB blocks
	concat []byte // three streams (one empty) with stream padding between
}

var (
	xzFixtureOnce sync.Once
	xzFixtureData *xzFixture
	xzFixtureErr  string
)

func makeXZFixture(t *testing.T) *xzFixture {
	t.Helper()
	testimg.Require(t, "xz")
	xzFixtureOnce.Do(func() {
		dir, err := os.MkdirTemp("", "vimg-xz-test-")
		if err != nil {
			xzFixtureErr = err.Error()
			return
		}
		defer os.RemoveAll(dir)
		raw := filepath.Join(dir, "raw")
		testimg.Pattern(t, raw, 12<<20+512, 11)
		testimg.Run(t, "sh", "-c", "cd "+dir+` &&
			xz -T2 --block-size=1MiB -c raw > blocks.xz &&
			head -c 5242880 raw | xz -T2 --block-size=1MiB -c > concat.xz &&
			printf '\0\0\0\0\0\0\0\0' >> concat.xz &&
			xz -c < /dev/null >> concat.xz &&
			tail -c +5242881 raw | xz -T2 --block-size=1MiB --check=sha256 -c >> concat.xz`)
		// The point is many blocks; make sure xz made them.
		out := string(testimg.Run(t, "xz", "--robot", "--list", filepath.Join(dir, "blocks.xz")))
		for _, l := range strings.Split(out, "\n") {
			if f := strings.Split(l, "\t"); f[0] == "totals" && len(f) > 2 {
				if n, _ := strconv.Atoi(f[2]); n < 10 {
					xzFixtureErr = "xz -T2 --block-size=1MiB made " + f[2] + " blocks, want at least 10"
					return
				}
			}
		}
		var fx xzFixture
		for _, f := range []struct {
			p    *[]byte
			name string
		}{{&fx.raw, "raw"}, {&fx.blocks, "blocks.xz"}, {&fx.concat, "concat.xz"}} {
			if *f.p, err = os.ReadFile(filepath.Join(dir, f.name)); err != nil {
				xzFixtureErr = err.Error()
				return
			}
		}
		xzFixtureData = &fx
	})
	if xzFixtureData == nil {
		t.Fatalf("making the xz fixture: %s", xzFixtureErr)
	}
	return xzFixtureData
}

// readSized reads r to its end in reads of size bytes.
func readSized(r io.Reader, size int) ([]byte, error) {
	var out []byte
	buf := make([]byte, size)
	for {
		n, err := r.Read(buf)
		out = append(out, buf[:n]...)
		if err == io.EOF {
			return out, nil
		}
		if err != nil {
			return out, err
		}
	}
}

// TestXZMultiBlock decodes multi-block and concatenated streams with reads
// of every size class (the caller's buffer, the small-read buffer, sizes
// that split blocks anywhere) and from a source that trickles.
func TestXZMultiBlock(t *testing.T) {
	fx := makeXZFixture(t)
	t.Logf("xz decoder: %s", XZImplementation())
	for _, c := range []struct {
		name string
		data []byte
	}{{"blocks", fx.blocks}, {"concat", fx.concat}} {
		for _, size := range []int{1 << 20, 3<<20 + 7, 100<<10 + 1, 4097, 1} {
			if size == 1 && c.name == "blocks" {
				continue // one byte at a time is slow; once is enough
			}
			t.Run(c.name+"/read"+strconv.Itoa(size), func(t *testing.T) {
				r, err := NewReader("xz", bytes.NewReader(c.data))
				if err != nil {
					t.Fatal(err)
				}
				defer r.Close()
				got, err := readSized(r, size)
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, fx.raw) {
					t.Fatalf("decoded %d bytes that differ from the %d raw bytes", len(got), len(fx.raw))
				}
				// The end stays the end.
				if n, err := r.Read(make([]byte, 10)); n != 0 || err != io.EOF {
					t.Fatalf("Read after the end = %d, %v; want 0, EOF", n, err)
				}
			})
		}
	}
	t.Run("concat/trickle", func(t *testing.T) {
		r, err := NewReader("xz", iotest.OneByteReader(bytes.NewReader(fx.concat)))
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		got, err := io.ReadAll(r)
		if err != nil || !bytes.Equal(got, fx.raw) {
			t.Fatalf("err=%v, decoded %d bytes, equal=%v", err, len(got), bytes.Equal(got, fx.raw))
		}
	})
}

// TestXZTruncated cuts a multi-block stream anywhere: in a header, inside a
// block, between blocks, in the index and footer, and between streams. It
// must fail with ErrCorrupt, never end cleanly, and what it decoded before
// failing must be the start of the disk.
func TestXZTruncated(t *testing.T) {
	fx := makeXZFixture(t)
	for _, c := range []struct {
		name string
		data []byte
	}{{"blocks", fx.blocks}, {"concat", fx.concat}} {
		cuts := []int{0, 1, 6, 11, 12, 13, 24, 100, 4096, len(c.data) - 1, len(c.data) - 4, len(c.data) - 12, len(c.data) - 13, len(c.data) - 40}
		for i := 1; i < 16; i++ {
			cuts = append(cuts, len(c.data)*i/16)
		}
		if c.name == "concat" {
			// Inside the stream padding after the first stream, and
			// inside the (32-byte) empty stream.
			second := bytes.Index(c.data[12:], []byte{0xfd, '7', 'z', 'X', 'Z', 0}) + 12
			cuts = append(cuts, second-6, second-7, second+12, second+31)
			// Cut between whole streams, the input is a shorter valid
			// file, as for xz -d.
			for _, end := range []int{second - 8, second - 4, second, second + 32} {
				r, err := NewReader("xz", bytes.NewReader(c.data[:end]))
				if err != nil {
					t.Fatal(err)
				}
				got, err := io.ReadAll(r)
				r.Close()
				if err != nil || !bytes.Equal(got, fx.raw[:5<<20]) {
					t.Fatalf("cut between streams at %d: err=%v, %d bytes; want the first 5 MiB", end, err, len(got))
				}
			}
		}
		for _, cut := range cuts {
			r, err := NewReader("xz", bytes.NewReader(c.data[:cut]))
			var got []byte
			if err == nil {
				got, err = io.ReadAll(r)
				r.Close()
			}
			if !errors.Is(err, stream.ErrCorrupt) {
				t.Fatalf("%s cut at %d of %d: err=%v, want ErrCorrupt", c.name, cut, len(c.data), err)
			}
			if !bytes.HasPrefix(fx.raw, got) {
				t.Fatalf("%s cut at %d: the %d bytes decoded before the error are not the start of the disk", c.name, cut, len(got))
			}
		}
	}
}

// TestXZCorrupt damages single bytes across a multi-block stream: every
// byte of an .xz file is covered by a CRC or a structure check, so each
// must fail, as corrupt or (a damaged filter ID or flags) unsupported.
func TestXZCorrupt(t *testing.T) {
	fx := makeXZFixture(t)
	for i := 0; i < 40; i++ {
		pos := 6 + (len(fx.blocks)-7)*i/39
		bad := bytes.Clone(fx.blocks)
		bad[pos] ^= 0x55
		r, err := NewReader("xz", bytes.NewReader(bad))
		if err == nil {
			_, err = io.Copy(io.Discard, r)
			r.Close()
		}
		if err == nil {
			t.Fatalf("byte %d of %d damaged: no error", pos, len(bad))
		}
		if !errors.Is(err, stream.ErrCorrupt) && !errors.Is(err, stream.ErrUnsupported) {
			t.Fatalf("byte %d damaged: err=%v, want ErrCorrupt or ErrUnsupported", pos, err)
		}
	}
}

// TestXZTrailing: after the last stream only stream padding (zeros, a
// multiple of four bytes) may follow, as for xz -d.
func TestXZTrailing(t *testing.T) {
	fx := makeXZFixture(t)
	for _, c := range []struct {
		tail string
		ok   bool
	}{
		{"\x00\x00\x00\x00", true},
		{"\x00\x00\x00\x00\x00\x00\x00\x00", true},
		{"\x00\x00", false},
		{"\x00\x00\x00\x00\x00", false},
		{"hello", false},
		{"garbage!", false},
		{"\x00\x00\x00\x00garbage!", false},
		{"\xfd7zXZ\x00", false}, // the start of a stream that never comes
	} {
		data := append(bytes.Clone(fx.blocks), c.tail...)
		r, err := NewReader("xz", bytes.NewReader(data))
		var got []byte
		if err == nil {
			got, err = io.ReadAll(r)
			r.Close()
		}
		if c.ok {
			if err != nil || !bytes.Equal(got, fx.raw) {
				t.Errorf("tail %q: err=%v, equal=%v; want the disk", c.tail, err, bytes.Equal(got, fx.raw))
			}
		} else if !errors.Is(err, stream.ErrCorrupt) {
			t.Errorf("tail %q: err=%v, want ErrCorrupt", c.tail, err)
		}
	}
}

// failingReader returns its data and then err, with the last bytes in the
// same call as the error.
type failingReader struct {
	data []byte
	err  error
}

func (f *failingReader) Read(p []byte) (int, error) {
	n := copy(p, f.data)
	f.data = f.data[n:]
	if len(f.data) == 0 {
		return n, f.err
	}
	return n, nil
}

// TestXZSourceError: the source failing anywhere in a multi-block stream
// (header, a block, the index) comes back as the source's error.
func TestXZSourceError(t *testing.T) {
	fx := makeXZFixture(t)
	boom := errors.New("disk on fire")
	for _, cut := range []int{5, 12, 30, len(fx.blocks) / 7, len(fx.blocks) / 2, len(fx.blocks) - 30, len(fx.blocks) - 1} {
		for i, src := range []io.Reader{
			io.MultiReader(bytes.NewReader(fx.blocks[:cut]), iotest.ErrReader(boom)),
			&failingReader{data: fx.blocks[:cut], err: boom},
		} {
			r, err := NewReader("xz", src)
			if err == nil {
				_, err = io.Copy(io.Discard, r)
				// Reading on returns the same error.
				if _, again := r.Read(make([]byte, 100)); !errors.Is(again, boom) {
					t.Errorf("cut %d, source %d: Read after the error: %v, want the source's error", cut, i, again)
				}
				r.Close()
			}
			if !errors.Is(err, boom) || errors.Is(err, stream.ErrCorrupt) {
				t.Fatalf("cut %d, source %d: err=%v, want the source's error", cut, i, err)
			}
		}
	}
}

// TestXZConcurrent runs eight decoders at once: each has its own liblzma
// stream and threads, and none may disturb another.
func TestXZConcurrent(t *testing.T) {
	fx := makeXZFixture(t)
	want := sha256.Sum256(fx.raw)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := 0; i < 8; i++ {
		data := fx.blocks
		if i%2 == 1 {
			data = fx.concat
		}
		wg.Go(func() {
			r, err := NewReader("xz", bytes.NewReader(data))
			if err != nil {
				errs <- err
				return
			}
			defer r.Close()
			h := sha256.New()
			if _, err := io.CopyBuffer(h, r, make([]byte, 256<<10+i*4099)); err != nil {
				errs <- err
				return
			}
			if got := h.Sum(nil); !bytes.Equal(got, want[:]) {
				errs <- errors.New("reader " + strconv.Itoa(i) + " decoded different bytes")
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// TestXZClose: Close may come at any point, more than once, and Read after
// it fails rather than touching a freed decoder.
func TestXZClose(t *testing.T) {
	fx := makeXZFixture(t)
	for _, readFirst := range []int{0, 1, 1 << 20, len(fx.raw)} {
		r, err := NewReader("xz", bytes.NewReader(fx.blocks))
		if err != nil {
			t.Fatal(err)
		}
		if readFirst > 0 {
			// Midway, liblzma's threads are busy with blocks ahead.
			if _, err := io.ReadFull(r, make([]byte, readFirst)); err != nil {
				t.Fatal(err)
			}
		}
		if err := r.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
		if err := r.Close(); err != nil {
			t.Fatalf("second Close: %v", err)
		}
		for _, size := range []int{1, 1 << 20} {
			if n, err := r.Read(make([]byte, size)); n != 0 || err == nil || err == io.EOF {
				t.Fatalf("Read(%d) after Close = %d, %v; want an error", size, n, err)
			}
		}
	}
}

// TestXZOneCPU: with GOMAXPROCS=1 the decoder runs without worker threads
// (liblzma's direct mode) and gives the same bytes.
func TestXZOneCPU(t *testing.T) {
	fx := makeXZFixture(t)
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	r, err := NewReader("xz", bytes.NewReader(fx.concat))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	got, err := io.ReadAll(r)
	if err != nil || !bytes.Equal(got, fx.raw) {
		t.Fatalf("err=%v, equal=%v", err, bytes.Equal(got, fx.raw))
	}
}

// TestXZReservedCheck: a stream whose check ID is one the format reserves
// (here 2, a 4-byte check like CRC32) cannot be verified and is refused,
// not decoded unchecked.
func TestXZReservedCheck(t *testing.T) {
	dir := t.TempDir()
	testimg.Pattern(t, filepath.Join(dir, "in"), 256<<10, 6)
	testimg.Run(t, "sh", "-c", "cd "+dir+" && xz --check=crc32 -c in > in.xz")
	data, err := os.ReadFile(filepath.Join(dir, "in.xz"))
	if err != nil {
		t.Fatal(err)
	}
	// The flags sit in the header (bytes 6-7, CRC32 at 8) and the footer
	// (bytes -4..-3, CRC32 of backward size and flags at -12).
	data[7], data[len(data)-3] = 2, 2
	binary.LittleEndian.PutUint32(data[8:], crc32.ChecksumIEEE(data[6:8]))
	f := data[len(data)-12:]
	binary.LittleEndian.PutUint32(f, crc32.ChecksumIEEE(f[4:10]))
	r, err := NewReader("xz", bytes.NewReader(data))
	if err == nil {
		_, err = io.Copy(io.Discard, r)
		r.Close()
	}
	if !errors.Is(err, stream.ErrUnsupported) && !errors.Is(err, stream.ErrCorrupt) {
		t.Fatalf("err=%v, want a refusal", err)
	}
	t.Log(err)
}

// BenchmarkXZ decodes a multi-block stream like those xz -T0 writes.
func BenchmarkXZ(b *testing.B) {
	testimg.Require(b, "xz")
	dir := b.TempDir()
	testimg.Pattern(b, filepath.Join(dir, "raw"), 96<<20, 5)
	testimg.Run(b, "sh", "-c", "cd "+dir+" && xz -T2 -3 -c raw > raw.xz")
	data, err := os.ReadFile(filepath.Join(dir, "raw.xz"))
	if err != nil {
		b.Fatal(err)
	}
	b.Logf("xz decoder: %s", XZImplementation())
	b.SetBytes(96 << 20)
	buf := make([]byte, 1<<20)
	for b.Loop() {
		r, err := NewReader("xz", bytes.NewReader(data))
		if err != nil {
			b.Fatal(err)
		}
		if _, err := io.CopyBuffer(io.Discard, struct{ io.Reader }{r}, buf); err != nil {
			b.Fatal(err)
		}
		r.Close()
	}
}
