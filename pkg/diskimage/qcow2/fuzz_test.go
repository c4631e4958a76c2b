package qcow2

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"vimg.dev/vimg/pkg/diskimage/stream"
	"vimg.dev/vimg/pkg/diskimage/testimg"
)

// maxFuzzInput bounds the files the fuzz targets look at: enough for every
// seed, small enough to keep an iteration fast.
const maxFuzzInput = 2 << 20

// fuzzSeeds are small qemu-img images, one per variant the readers handle.
// They hold little data and mostly small clusters: the fuzzer should mutate
// metadata rather than payload, and it minimizes every new interesting
// input, which for a large one takes its whole time budget.
var fuzzSeeds = []struct {
	size int64
	args []string
}{
	{1 << 20, nil},
	{1 << 20, []string{"-c"}},
	{1 << 20, []string{"-c", "-o", "compression_type=zstd,cluster_size=4096"}},
	{1 << 20, []string{"-o", "cluster_size=4096"}},
	{1 << 20, []string{"-c", "-o", "cluster_size=4096"}},
	{1 << 20, []string{"-o", "cluster_size=512"}},
	{1 << 20, []string{"-c", "-o", "cluster_size=512,compression_type=zstd"}},
	{1 << 20, []string{"-o", "extended_l2=on,cluster_size=16k"}},
	{1 << 20, []string{"-o", "compat=0.10,cluster_size=4096"}},
	{1 << 20, []string{"-c", "-o", "compat=0.10,cluster_size=4096"}},
}

// sparseRaw writes a raw disk of size bytes holding a few KiB: text, noise,
// a few scattered bytes, and a marker in the last sector.
func sparseRaw(f testing.TB, path string, size int64, seed uint64) {
	r := rand.New(rand.NewPCG(seed, 1))
	noise := make([]byte, 3000)
	for i := range noise {
		noise[i] = byte(r.Uint32())
	}
	pieces := []struct {
		off  int64
		data []byte
	}{
		{size / 4, bytes.Repeat([]byte("vimg fuzz seed "), 300)},
		{size/2 - 1000, noise}, // straddles a cluster boundary
		{size*3/4 + 777, []byte{1, 2, 3}},
		{size - 11, []byte("end-of-disk")},
	}
	w, err := os.Create(path)
	if err != nil {
		f.Fatal(err)
	}
	defer w.Close()
	if err := w.Truncate(size); err != nil {
		f.Fatal(err)
	}
	for _, p := range pieces {
		if _, err := w.WriteAt(p.data, p.off); err != nil {
			f.Fatal(err)
		}
	}
}

func addFuzzSeeds(f *testing.F) {
	testimg.Require(f, "qemu-img")
	dir := f.TempDir()
	for i, s := range fuzzSeeds {
		raw := filepath.Join(dir, "seed.raw")
		sparseRaw(f, raw, s.size, uint64(i))
		out := filepath.Join(dir, "seed.qcow2")
		testimg.QemuImg(f, append(append([]string{"convert", "-O", "qcow2"}, s.args...), raw, out)...)
		b, err := os.ReadFile(out)
		if err != nil {
			f.Fatal(err)
		}
		if len(b) > maxFuzzInput {
			f.Fatalf("seed %v is %d bytes, more than the fuzz targets read", s.args, len(b))
		}
		f.Add(b)
	}
	// Images without data.
	for _, args := range [][]string{
		{"-o", "cluster_size=512"},
		{"-o", "cluster_size=16k,extended_l2=on"},
	} {
		out := filepath.Join(dir, "empty.qcow2")
		testimg.QemuImg(f, append(append([]string{"create", "-f", "qcow2"}, args...), out, "1M")...)
		b, err := os.ReadFile(out)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
}

// checkSentinel fails unless err says what kind of problem the input has.
// The inputs live in memory, so there is no I/O error to excuse another.
func checkSentinel(t *testing.T, what string, err error) {
	t.Helper()
	if !errors.Is(err, stream.ErrCorrupt) && !errors.Is(err, stream.ErrUnsupported) {
		t.Fatalf("%s: error wraps neither ErrCorrupt nor ErrUnsupported: %v", what, err)
	}
}

// FuzzOpen opens arbitrary bytes for random access and, when that succeeds,
// reads the whole disk and walks its extents. Nothing may panic, every error
// must be classified, no extent reported Zero may hold data (the engine
// skips those), and where the one-pass decoder also succeeds both readers
// must agree on every byte.
func FuzzOpen(f *testing.F) {
	addFuzzSeeds(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) > maxFuzzInput {
			t.Skip("input larger than 2 MiB")
		}
		img, err := Open(bytes.NewReader(b), int64(len(b)))
		if err != nil {
			checkSentinel(t, "Open", err)
			return
		}
		defer img.Close()
		if img.Size() > 64<<20 {
			return
		}
		disk, err := readImage(img)
		if err != nil {
			// Reading may fail (a compressed cluster that does not
			// decode), but only for a reason the error names.
			checkSentinel(t, "reading the opened image", err)
			return
		}
		// The stream decoder may refuse what Open accepts (it cannot go
		// back), but must never read it differently.
		got, err := decodeAll(onlyReader{bytes.NewReader(b)}, StreamOptions{}, true)
		if err == nil && !bytes.Equal(got, disk) {
			i := 0
			for i < len(got) && got[i] == disk[i] {
				i++
			}
			t.Fatalf("stream and random access differ first at byte %d", i)
		}
	})
}

// FuzzDecoder streams arbitrary bytes through the one-pass decoder and
// decodes every chunk, stopping after 64 MiB of output. Nothing may panic,
// every chunk must keep the stream.Chunk contract and every error must be
// classified.
func FuzzDecoder(f *testing.F) {
	addFuzzSeeds(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) > maxFuzzInput {
			t.Skip("input larger than 2 MiB")
		}
		dec, h, err := NewDecoder(onlyReader{bytes.NewReader(b)}, StreamOptions{})
		if err != nil {
			checkSentinel(t, "NewDecoder", err)
			return
		}
		s := &checkSink{size: dec.Size(), maxLen: 2 * h.ClusterSize, limit: 64 << 20}
		err = dec.Run(s)
		if s.broken != nil {
			t.Fatalf("chunk contract: %v", s.broken)
		}
		if err != nil && !errors.Is(err, errSinkLimit) {
			checkSentinel(t, "Run", err)
		}
	})
}
