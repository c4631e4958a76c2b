package codec

import (
	"bytes"
	stdflate "compress/flate"
	stdzlib "compress/zlib"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"sync"
	"testing"

	"github.com/klauspost/compress/flate"
	"github.com/klauspost/compress/zlib"
	"github.com/klauspost/compress/zstd"

	"vimg.dev/vimg/pkg/diskimage/stream"
)

// inflaters are the deflate/zlib implementations under test: the one this
// build uses (libdeflate with cgo) and the pure-Go one, always.
func inflaters() map[string]func(bool, []byte, []byte) (int, error) {
	return map[string]func(bool, []byte, []byte) (int, error){
		Implementation(): inflate,
		"go":             goInflate,
	}
}

// decoders are every (implementation, codec) pair as a Decode-like function.
func decoders() map[string]func(c stream.Codec, dst, src []byte) (int, error) {
	m := map[string]func(stream.Codec, []byte, []byte) (int, error){}
	for name, inf := range inflaters() {
		m[name] = func(c stream.Codec, dst, src []byte) (int, error) {
			switch c {
			case stream.Deflate:
				return inf(false, dst, src)
			case stream.Zlib:
				return inf(true, dst, src)
			}
			return Decode(c, dst, src)
		}
	}
	return m
}

// samples are payloads of the kinds a disk holds.
func samples(t testing.TB) map[string][]byte {
	r := rand.New(rand.NewPCG(1, 2))
	noise := make([]byte, 64<<10)
	for i := range noise {
		noise[i] = byte(r.Uint32())
	}
	var text bytes.Buffer
	words := []string{"qcow2", "cluster", "the", "of", "refcount", "table", "zlib", "sector", "\n"}
	for text.Len() < 64<<10 {
		text.WriteString(words[r.IntN(len(words))])
		text.WriteByte(' ')
	}
	m := map[string][]byte{
		"noise": noise,
		"text":  text.Bytes()[:64<<10],
		"zeros": make([]byte, 64<<10),
		"small": []byte("hello, disk"),
		"odd":   text.Bytes()[:12345],
	}
	if bin := binaryData(t, 64<<10); bin != nil {
		m["binary"] = bin
	}
	return m
}

// binaryData returns n bytes of a real shared library, the kind of data an
// OS disk is full of, or nil if none can be read.
func binaryData(t testing.TB, n int) []byte {
	for _, p := range []string{"/usr/lib/x86_64-linux-gnu/libc.so.6", "/usr/bin/qemu-img", os.Args[0]} {
		b, err := os.ReadFile(p)
		if err == nil && len(b) >= n {
			return b[:n]
		}
	}
	return nil
}

// compressor makes a payload of one codec from data.
type compressor struct {
	name  string
	codec stream.Codec
	do    func(t testing.TB, data []byte) []byte
}

func compressors() []compressor {
	return []compressor{
		{"klauspost-flate", stream.Deflate, func(t testing.TB, d []byte) []byte {
			var b bytes.Buffer
			w, _ := flate.NewWriter(&b, 6)
			w.Write(d)
			w.Close()
			return b.Bytes()
		}},
		{"stdlib-flate-9", stream.Deflate, func(t testing.TB, d []byte) []byte {
			var b bytes.Buffer
			w, _ := stdflate.NewWriter(&b, 9)
			w.Write(d)
			w.Close()
			return b.Bytes()
		}},
		{"stdlib-flate-store", stream.Deflate, func(t testing.TB, d []byte) []byte {
			var b bytes.Buffer
			w, _ := stdflate.NewWriter(&b, stdflate.NoCompression)
			w.Write(d)
			w.Close()
			return b.Bytes()
		}},
		{"stdlib-flate-huffman", stream.Deflate, func(t testing.TB, d []byte) []byte {
			var b bytes.Buffer
			w, _ := stdflate.NewWriter(&b, stdflate.HuffmanOnly)
			w.Write(d)
			w.Close()
			return b.Bytes()
		}},
		{"klauspost-zlib", stream.Zlib, func(t testing.TB, d []byte) []byte {
			var b bytes.Buffer
			w := zlib.NewWriter(&b)
			w.Write(d)
			w.Close()
			return b.Bytes()
		}},
		{"stdlib-zlib-1", stream.Zlib, func(t testing.TB, d []byte) []byte {
			var b bytes.Buffer
			w, _ := stdzlib.NewWriterLevel(&b, 1)
			w.Write(d)
			w.Close()
			return b.Bytes()
		}},
		{"zstd-encodeall", stream.Zstd, func(t testing.TB, d []byte) []byte {
			e, _ := zstd.NewWriter(nil, zstd.WithEncoderCRC(true))
			return e.EncodeAll(d, nil)
		}},
		{"zstd-stream-nosize", stream.Zstd, func(t testing.TB, d []byte) []byte {
			// A streaming writer does not know the size up front, so the
			// frame has no content size: Decode must bound it by itself.
			var b bytes.Buffer
			e, _ := zstd.NewWriter(&b, zstd.WithEncoderConcurrency(1), zstd.WithWindowSize(1<<20))
			e.Write(d)
			e.Close()
			return b.Bytes()
		}},
	}
}

func TestRoundTrip(t *testing.T) {
	for _, c := range compressors() {
		for dname, data := range samples(t) {
			payload := c.do(t, data)
			for iname, dec := range decoders() {
				t.Run(fmt.Sprintf("%s/%s/%s", c.name, dname, iname), func(t *testing.T) {
					// Exact size.
					dst := make([]byte, len(data))
					n, err := dec(c.codec, dst, payload)
					if err != nil || n != len(data) || !bytes.Equal(dst, data) {
						t.Fatalf("exact: n=%d err=%v equal=%v, want n=%d", n, err, bytes.Equal(dst[:n], data), len(data))
					}
					// Short output: room for more than the payload holds.
					dst = make([]byte, len(data)+4096)
					n, err = dec(c.codec, dst, payload)
					if err != nil || n != len(data) || !bytes.Equal(dst[:n], data) {
						t.Fatalf("short: n=%d err=%v, want n=%d and no error", n, err, len(data))
					}
					// Trailing garbage after the stream, as in a qcow2 sector.
					for _, tail := range [][]byte{make([]byte, 511), []byte("\x01\x02garbage that is not a stream\xff\xff\xff")} {
						dst = make([]byte, len(data))
						n, err = dec(c.codec, dst, append(append([]byte{}, payload...), tail...))
						if err != nil || n != len(data) || !bytes.Equal(dst, data) {
							t.Fatalf("trailing %q...: n=%d err=%v", tail[:2], n, err)
						}
					}
					// Bomb: the payload is more than the buffer can take.
					if len(data) > 1 {
						dst = make([]byte, len(data)/2)
						n, err = dec(c.codec, dst, payload)
						if !errors.Is(err, ErrTooLarge) || !errors.Is(err, stream.ErrCorrupt) {
							t.Fatalf("half-size buffer: n=%d err=%v, want ErrTooLarge", n, err)
						}
					}
					// Truncated: an error wrapping ErrCorrupt, never a short
					// result, at any cut.
					step := len(payload)/17 + 1
					for cut := 0; cut < len(payload); cut += step {
						dst = make([]byte, len(data))
						n, err = dec(c.codec, dst, payload[:cut])
						if !errors.Is(err, stream.ErrCorrupt) {
							t.Fatalf("cut at %d of %d: n=%d err=%v, want ErrCorrupt", cut, len(payload), n, err)
						}
					}
					// And missing just the last byte.
					n, err = dec(c.codec, make([]byte, len(data)), payload[:len(payload)-1])
					if !errors.Is(err, stream.ErrCorrupt) {
						t.Fatalf("last byte cut: n=%d err=%v, want ErrCorrupt", n, err)
					}
				})
			}
		}
	}
}

// TestBomb: a payload that inflates to many times its cluster fails with
// ErrTooLarge and allocates next to nothing.
func TestBomb(t *testing.T) {
	const size = 64 << 10
	big := make([]byte, 100*size)
	copy(big, "not all zeros")
	for _, c := range compressors() {
		payload := c.do(t, big)
		for iname, dec := range decoders() {
			t.Run(c.name+"/"+iname, func(t *testing.T) {
				dst := make([]byte, size)
				dec(c.codec, dst, payload) // warm the pools
				var before, after runtime.MemStats
				runtime.ReadMemStats(&before)
				const runs = 20
				for range runs {
					n, err := dec(c.codec, dst, payload)
					if !errors.Is(err, ErrTooLarge) {
						t.Fatalf("n=%d err=%v, want ErrTooLarge", n, err)
					}
				}
				runtime.ReadMemStats(&after)
				// zstd without a content size may overshoot by one 128 KiB
				// block before it notices; nothing may be near 100x.
				per := (after.TotalAlloc - before.TotalAlloc) / runs
				if limit := uint64(2*size + 256<<10); per > limit {
					t.Fatalf("allocated %d bytes per call, want at most %d", per, limit)
				}
				t.Logf("%d bytes allocated per call", per)
			})
		}
	}
}

func TestCorrupt(t *testing.T) {
	data := samples(t)["text"]
	deflated := compressors()[0].do(t, data)
	zlibbed := compressors()[4].do(t, data)
	zstded := compressors()[6].do(t, data)
	flip := func(b []byte, i int) []byte {
		b = append([]byte{}, b...)
		b[i] ^= 0xff
		return b
	}
	cases := []struct {
		name  string
		codec stream.Codec
		src   []byte
	}{
		{"deflate reserved block type", stream.Deflate, []byte{0x07, 0, 0, 0}},
		{"deflate stored length mismatch", stream.Deflate, []byte{0x01, 0x05, 0x00, 0x05, 0x00, 'h', 'e', 'l', 'l', 'o'}},
		{"deflate empty", stream.Deflate, nil},
		{"zlib bad header", stream.Zlib, flip(zlibbed, 0)},
		{"zlib bad adler32", stream.Zlib, flip(zlibbed, len(zlibbed)-1)},
		{"zlib preset dictionary", stream.Zlib, []byte{0x78, 0xbb, 0, 0, 0, 1, 0x03, 0x00}},
		{"zstd not a frame", stream.Zstd, []byte("hello world")},
		{"zstd reserved block type", stream.Zstd, []byte{0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x00, 0x07, 0x00, 0x00}},
		{"zstd bad checksum", stream.Zstd, flip(zstded, len(zstded)-1)},
		{"zstd empty", stream.Zstd, nil},
		{"unknown codec", stream.Codec(9), deflated},
	}
	for _, c := range cases {
		for iname, dec := range decoders() {
			t.Run(c.name+"/"+iname, func(t *testing.T) {
				n, err := dec(c.codec, make([]byte, len(data)), c.src)
				if !errors.Is(err, stream.ErrCorrupt) {
					t.Fatalf("n=%d err=%v, want ErrCorrupt", n, err)
				}
				t.Log(err)
			})
		}
	}
	// Bit flips all over a deflate stream: an error or some output, never
	// a panic, and both implementations agree on which.
	for i := 0; i < len(deflated); i += 7 {
		differential(t, stream.Deflate, flip(deflated, i), len(data))
	}
}

// differential decodes src with every implementation and fails if they
// disagree on the result: success, length and bytes. Which error a bad
// stream gets may differ (both wrap ErrCorrupt): libdeflate reads a cut
// stream on as if zeros followed and may run out of room first, reporting
// ErrTooLarge where Go reports the truncation.
func differential(t *testing.T, c stream.Codec, src []byte, size int) {
	t.Helper()
	type result struct {
		n        int
		ok       bool
		checksum string
	}
	var first *result
	var firstName string
	for name, dec := range decoders() {
		dst := make([]byte, size)
		n, err := dec(c, dst, src)
		r := &result{n: n, ok: err == nil}
		if err != nil && !errors.Is(err, stream.ErrCorrupt) {
			t.Fatalf("%s: error %v does not wrap ErrCorrupt", name, err)
		}
		if err == nil {
			r.checksum = fmt.Sprintf("%x", dst[:n])
		} else {
			r.n = 0
		}
		if first == nil {
			first, firstName = r, name
		} else if *r != *first {
			t.Fatalf("%s and %s disagree on % x: n=%d ok=%v vs n=%d ok=%v",
				firstName, name, src[:min(len(src), 32)], first.n, first.ok, r.n, r.ok)
		}
	}
}

func TestRaw(t *testing.T) {
	dst := make([]byte, 8)
	if n, err := Decode(stream.Raw, dst, []byte("abc")); n != 3 || err != nil || string(dst[:3]) != "abc" {
		t.Fatalf("n=%d err=%v", n, err)
	}
	if _, err := Decode(stream.Raw, dst, make([]byte, 9)); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("err=%v, want ErrTooLarge", err)
	}
}

// TestZstdFrames covers what qemu's zstd reader accepts around frames:
// several frames filling one cluster, skippable frames, and an empty frame.
func TestZstdFrames(t *testing.T) {
	e, _ := zstd.NewWriter(nil)
	a, b := bytes.Repeat([]byte("a"), 1000), bytes.Repeat([]byte("b"), 24)
	skippable := []byte{0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 'x', 'y', 'z'}
	src := append(append(append(e.EncodeAll(a, nil), skippable...), e.EncodeAll(b, nil)...), 0, 0, 0)
	dst := make([]byte, 1024)
	n, err := Decode(stream.Zstd, dst, src)
	if err != nil || n != 1024 || !bytes.Equal(dst, append(a, b...)) {
		t.Fatalf("two frames: n=%d err=%v", n, err)
	}
	// Once the cluster is full, what follows is not looked at (qemu stops
	// there too).
	n, err = Decode(stream.Zstd, dst, append(src[:len(src)-3], e.EncodeAll(b, nil)...))
	if err != nil || n != 1024 {
		t.Fatalf("frame after a full cluster: n=%d err=%v", n, err)
	}
	// A skippable frame that claims more than the payload holds.
	if _, err := Decode(stream.Zstd, dst, []byte{0x50, 0x2a, 0x4d, 0x18, 0xff, 0xff, 0, 0, 1}); !errors.Is(err, stream.ErrCorrupt) {
		t.Fatalf("oversized skippable frame: err=%v", err)
	}
	// An empty frame is a short (empty) payload.
	if n, err := Decode(stream.Zstd, dst, e.EncodeAll(nil, nil)); err != nil || n != 0 {
		t.Fatalf("empty frame: n=%d err=%v", n, err)
	}
}

func TestConcurrent(t *testing.T) {
	type job struct {
		c       stream.Codec
		payload []byte
		want    []byte
	}
	var jobs []job
	for _, c := range compressors() {
		for _, data := range samples(t) {
			jobs = append(jobs, job{c.codec, c.do(t, data), data})
		}
	}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(g), 0))
			for range 300 {
				j := jobs[r.IntN(len(jobs))]
				dst := make([]byte, len(j.want))
				n, err := Decode(j.c, dst, j.payload)
				if err != nil || n != len(j.want) || !bytes.Equal(dst, j.want) {
					errs <- fmt.Errorf("goroutine %d, %v: n=%d err=%v", g, j.c, n, err)
					return
				}
				// Also a bomb now and then, so pooled state sees errors.
				if _, err := Decode(j.c, dst[:len(dst)/2], j.payload); len(dst) > 1 && !errors.Is(err, ErrTooLarge) {
					errs <- fmt.Errorf("goroutine %d, %v bomb: err=%v", g, j.c, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestImplementationName(t *testing.T) {
	if got := Implementation(); got != wantImplementation {
		t.Fatalf("Implementation() = %q, want %q", got, wantImplementation)
	}
	if got := XZImplementation(); got != wantXZImplementation {
		t.Fatalf("XZImplementation() = %q, want %q", got, wantXZImplementation)
	}
}

// FuzzDecode holds the implementations against each other: on any input
// they must agree on success, length and bytes, and must not panic.
func FuzzDecode(f *testing.F) {
	for _, c := range compressors() {
		for _, data := range samples(f) {
			if len(data) <= 4096 || c.codec == stream.Zstd {
				f.Add(uint8(c.codec), uint16(len(data)), c.do(f, data))
			}
		}
		f.Add(uint8(c.codec), uint16(1000), c.do(f, samples(f)["text"][:2000]))
	}
	f.Fuzz(func(t *testing.T, codec uint8, size uint16, src []byte) {
		differential(t, stream.Codec(codec%4), src, int(size))
	})
}
