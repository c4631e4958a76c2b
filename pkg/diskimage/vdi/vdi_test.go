package vdi

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"testing/iotest"

	"vimg.dev/vimg/pkg/diskimage/stream"
	"vimg.dev/vimg/pkg/diskimage/testimg"
)

// makeVDI converts raw to a VDI with qemu-img and returns its path.
func makeVDI(t testing.TB, raw string, static bool) string {
	t.Helper()
	dst := raw + ".vdi"
	args := []string{"convert", "-f", "raw", "-O", "vdi"}
	if static {
		dst = raw + ".static.vdi"
		args = append(args, "-o", "static=on")
	}
	testimg.QemuImg(t, append(args, raw, dst)...)
	return dst
}

// patternVDI makes a raw disk of size bytes with testimg.Pattern and converts it.
func patternVDI(t testing.TB, size int64, seed uint64, static bool) string {
	t.Helper()
	raw := filepath.Join(t.TempDir(), fmt.Sprintf("p%d-%d.raw", size, seed))
	testimg.Pattern(t, raw, size, seed)
	return makeVDI(t, raw, static)
}

// sparseVDI makes a big raw disk with a few pieces of data and converts it.
func sparseVDI(t testing.TB, size int64, static bool) string {
	t.Helper()
	raw := filepath.Join(t.TempDir(), "sparse.raw")
	f, err := os.Create(raw)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for i, off := range []int64{0, 1<<20 - 7, 700 << 20, size/2 + 12345, size - 4096} {
		piece := bytes.Repeat([]byte(fmt.Sprintf("piece %d at %d;", i, off)), 300)
		piece = piece[:min(int64(len(piece)), size-off)]
		if _, err := f.WriteAt(piece, off); err != nil {
			t.Fatal(err)
		}
	}
	return makeVDI(t, raw, static)
}

func openVDI(t testing.TB, path string) *Image {
	t.Helper()
	f, size := testimg.Open(t, path)
	img, err := Open(f, size)
	if err != nil {
		t.Fatalf("Open(%s): %v", path, err)
	}
	return img
}

// qemuVirtualSize returns the virtual size `qemu-img info` reports.
func qemuVirtualSize(t testing.TB, path string) int64 {
	t.Helper()
	var info struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	out := testimg.QemuImg(t, "info", "--output=json", "-f", "vdi", path)
	if err := json.Unmarshal(out, &info); err != nil {
		t.Fatalf("qemu-img info: %v\n%s", err, out)
	}
	return info.VirtualSize
}

// compareAt reads got in pieces of chunk bytes and compares with the file
// ref, which must be exactly size bytes long.
func compareAt(t testing.TB, ref string, got io.ReaderAt, size int64, chunk int) {
	t.Helper()
	f, err := os.Open(ref)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if st, _ := f.Stat(); st.Size() != size {
		t.Fatalf("reference %s has %d bytes, image says %d", ref, st.Size(), size)
	}
	want := make([]byte, chunk)
	have := make([]byte, chunk)
	for off := int64(0); off < size; off += int64(chunk) {
		n := int(min(int64(chunk), size-off))
		if _, err := io.ReadFull(io.NewSectionReader(f, off, int64(n)), want[:n]); err != nil {
			t.Fatal(err)
		}
		k, err := got.ReadAt(have[:n], off)
		if k != n || (err != nil && !(err == io.EOF && off+int64(n) == size)) {
			t.Fatalf("ReadAt(%d bytes at %d) = %d, %v", n, off, k, err)
		}
		if !bytes.Equal(want[:n], have[:n]) {
			i := 0
			for want[i] == have[i] {
				i++
			}
			t.Fatalf("content differs at disk offset %d: got %#x, want %#x", off+int64(i), have[i], want[i])
		}
	}
	// Past the end: EOF, nothing read.
	if n, err := got.ReadAt(make([]byte, 1), size); n != 0 || err != io.EOF {
		t.Fatalf("ReadAt at the end = %d, %v; want 0, EOF", n, err)
	}
}

// plainReader hides every method but Read (Seek, ReadAt, WriteTo...).
type plainReader struct{ r io.Reader }

func (p plainReader) Read(b []byte) (int, error) { return p.r.Read(b) }

// chunkSet collects a decoder's chunks and reads them back as a disk.
type chunkSet struct {
	size   int64
	chunks []stream.Chunk
	byOff  map[int64]bool
	limit  int64 // stop after this many payload bytes, 0 = no limit
	total  int64
}

var errEnough = errors.New("test sink: enough")

func (s *chunkSet) Put(c stream.Chunk) error {
	switch {
	case c.Codec != stream.Raw:
		return fmt.Errorf("chunk at %d has codec %v", c.Off, c.Codec)
	case c.Len != len(c.Payload) || c.Len <= 0:
		return fmt.Errorf("chunk at %d: Len %d, payload %d bytes", c.Off, c.Len, len(c.Payload))
	case c.Off < 0 || c.End() > s.size:
		return fmt.Errorf("chunk %d+%d outside the %d byte disk", c.Off, c.Len, s.size)
	case c.Off%blockSize != 0:
		return fmt.Errorf("chunk at %d is not block aligned", c.Off)
	case s.byOff[c.Off]:
		return fmt.Errorf("two chunks at %d", c.Off)
	}
	if s.byOff == nil {
		s.byOff = map[int64]bool{}
	}
	s.byOff[c.Off] = true
	s.chunks = append(s.chunks, c)
	s.total += int64(c.Len)
	if s.limit > 0 && s.total > s.limit {
		return errEnough
	}
	return nil
}

func (s *chunkSet) sort() {
	slices.SortFunc(s.chunks, func(a, b stream.Chunk) int { return int(a.Off/blockSize - b.Off/blockSize) })
}

// ReadAt reads the disk the chunks describe (zeros elsewhere). Call sort first.
func (s *chunkSet) ReadAt(p []byte, off int64) (int, error) {
	if off >= s.size {
		return 0, io.EOF
	}
	var eof error
	if int64(len(p)) > s.size-off {
		p, eof = p[:s.size-off], io.EOF
	}
	clear(p)
	end := off + int64(len(p))
	i, _ := slices.BinarySearchFunc(s.chunks, off/blockSize, func(c stream.Chunk, b int64) int { return int(c.Off/blockSize - b) })
	for ; i < len(s.chunks) && s.chunks[i].Off < end; i++ {
		c := s.chunks[i]
		lo, hi := max(c.Off, off), min(c.End(), end)
		if lo < hi {
			copy(p[lo-off:hi-off], c.Payload[lo-c.Off:hi-c.Off])
		}
	}
	return len(p), eof
}

// decodeFile streams path through NewDecoder as a plain reader giving short
// reads and returns the collected chunks.
func decodeFile(t testing.TB, path string) (*chunkSet, Info) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dec, info, err := NewDecoder(plainReader{iotest.HalfReader(f)})
	if err != nil {
		t.Fatalf("NewDecoder(%s): %v", path, err)
	}
	if dec.Size() != info.VirtualSize {
		t.Fatalf("decoder Size %d, Info.VirtualSize %d", dec.Size(), info.VirtualSize)
	}
	set := &chunkSet{size: dec.Size()}
	if err := dec.Run(set); err != nil {
		t.Fatalf("Run(%s): %v", path, err)
	}
	if n, _ := f.Read(make([]byte, 1)); n != 0 {
		t.Fatalf("Run left input unread")
	}
	set.sort()
	return set, info
}

// qemuDataRanges returns the ranges qemu-img map reports as data, merged.
func qemuDataRanges(t testing.TB, path string) [][2]int64 {
	t.Helper()
	var m []struct {
		Start, Length int64
		Data          bool
	}
	out := testimg.QemuImg(t, "map", "--output=json", "-f", "vdi", path)
	if err := json.Unmarshal(out, &m); err != nil {
		t.Fatalf("qemu-img map: %v\n%s", err, out)
	}
	var r [][2]int64
	for _, e := range m {
		if e.Data {
			r = appendRange(r, e.Start, e.Length)
		}
	}
	return r
}

func appendRange(r [][2]int64, start, length int64) [][2]int64 {
	if n := len(r); n > 0 && r[n-1][0]+r[n-1][1] == start {
		r[n-1][1] += length
		return r
	}
	return append(r, [2]int64{start, length})
}

// walkExtents walks Extent over the whole disk, checks that the extents tile
// it, and returns the stored (allocated, non-zero) ranges and the number of
// extents.
func walkExtents(t testing.TB, img *Image) ([][2]int64, int) {
	t.Helper()
	var r [][2]int64
	n := 0
	for off := int64(0); off < img.Size(); n++ {
		e, err := img.Extent(off, img.Size()-off)
		if err != nil {
			t.Fatalf("Extent(%d): %v", off, err)
		}
		if e.Start != off || e.Length <= 0 || e.Start+e.Length > img.Size() || e.Compressed {
			t.Fatalf("Extent(%d) = %+v", off, e)
		}
		if !e.Allocated && !e.Zero {
			t.Fatalf("Extent(%d) = %+v: unallocated but not zero", off, e)
		}
		if e.Allocated && !e.Zero {
			r = appendRange(r, e.Start, e.Length)
		}
		off += e.Length
	}
	return r, n
}

type imageCase struct {
	name   string
	make   func(t testing.TB) string
	static bool
	big    bool // skip the slower checks
}

func imageCases() []imageCase {
	return []imageCase{
		{"dynamic-5MiB+512", func(t testing.TB) string { return patternVDI(t, 5<<20+512, 1, false) }, false, false},
		{"static-5MiB+512", func(t testing.TB) string { return patternVDI(t, 5<<20+512, 2, true) }, true, false},
		{"dynamic-8MiB", func(t testing.TB) string { return patternVDI(t, 8<<20, 3, false) }, false, false},
		{"static-3MiB", func(t testing.TB) string { return patternVDI(t, 3<<20, 4, true) }, true, false},
		{"dynamic-1000B", func(t testing.TB) string { return patternVDI(t, 1000, 5, false) }, false, false},
		{"static-1000B", func(t testing.TB) string { return patternVDI(t, 1000, 6, true) }, true, false},
		{"dynamic-empty-4MiB", func(t testing.TB) string {
			raw := filepath.Join(t.TempDir(), "empty.raw")
			if err := os.WriteFile(raw, nil, 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.Truncate(raw, 4<<20); err != nil {
				t.Fatal(err)
			}
			return makeVDI(t, raw, false)
		}, false, false},
		{"dynamic-2GiB-sparse", func(t testing.TB) string { return sparseVDI(t, 2<<30, false) }, false, true},
	}
}

func TestImages(t *testing.T) {
	testimg.Require(t, "qemu-img")
	for _, tc := range imageCases() {
		t.Run(tc.name, func(t *testing.T) {
			path := tc.make(t)
			ref := testimg.RawOf(t, path)
			img := openVDI(t, path)
			defer img.Close()

			info := img.Info()
			if want := qemuVirtualSize(t, path); info.VirtualSize != want || img.Size() != want {
				t.Fatalf("VirtualSize %d, Size %d; qemu-img info says %d", info.VirtualSize, img.Size(), want)
			}
			if info.Static != tc.static || info.BlockSize != 1<<20 || img.Type() != "vdi" || img.Readable() != nil {
				t.Fatalf("Info %+v, Type %q, Readable %v", info, img.Type(), img.Readable())
			}
			hdr := make([]byte, 512)
			if _, err := img.ra.ReadAt(hdr, 0); err != nil || !Probe(hdr) {
				t.Fatalf("Probe of a qemu-made header is false (%v)", err)
			}

			t.Run("ReadAt", func(t *testing.T) {
				compareAt(t, ref, img, img.Size(), 3<<20+1)
				if tc.big {
					return
				}
				compareAt(t, ref, img, img.Size(), 4095)
				// Several goroutines at once, each with its own odd piece size.
				t.Run("concurrent", func(t *testing.T) {
					for _, chunk := range []int{1<<20 + 7, 333333, 65537, 511} {
						t.Run(fmt.Sprint(chunk), func(t *testing.T) {
							t.Parallel()
							compareAt(t, ref, img, img.Size(), chunk)
						})
					}
				})
			})

			t.Run("Decoder", func(t *testing.T) {
				set, dinfo := decodeFile(t, path)
				if dinfo != info {
					t.Fatalf("decoder Info %+v, Open Info %+v", dinfo, info)
				}
				compareAt(t, ref, set, set.size, 4<<20+3)
			})

			t.Run("Extent", func(t *testing.T) {
				ours, n := walkExtents(t, img)
				if tc.static {
					if n != 1 || len(ours) != 1 || ours[0] != [2]int64{0, img.Size()} {
						t.Fatalf("static image: %d extents, stored %v; want one stored extent", n, ours)
					}
				} else if want := qemuDataRanges(t, path); !slices.Equal(ours, want) {
					t.Fatalf("stored ranges %v, qemu-img map data ranges %v", ours, want)
				}
				// Clipping to the asked range, and bounds.
				if img.Size() > 1<<20+1100 {
					e, err := img.Extent(1<<20+100, 1000)
					if err != nil || e.Start != 1<<20+100 || e.Length != 1000 {
						t.Fatalf("Extent(1MiB+100, 1000) = %+v, %v", e, err)
					}
				}
				if e, err := img.Extent(img.Size(), 0); err != nil || e.Length != 0 {
					t.Fatalf("Extent(size, 0) = %+v, %v", e, err)
				}
				for _, r := range [][2]int64{{img.Size() - 1, 2}, {-1, 1}, {0, -1}, {img.Size() + 1, 0}} {
					if _, err := img.Extent(r[0], r[1]); err == nil {
						t.Fatalf("Extent(%d, %d) succeeded past the disk", r[0], r[1])
					}
				}
			})
		})
	}
}

// vdiFile is a qemu-made image held in memory for patching.
type vdiFile []byte

func (b vdiFile) u32(off int) uint32       { return binary.LittleEndian.Uint32(b[off:]) }
func (b vdiFile) put32(off int, v uint32)  { binary.LittleEndian.PutUint32(b[off:], v) }
func (b vdiFile) put64(off int, v uint64)  { binary.LittleEndian.PutUint64(b[off:], v) }
func (b vdiFile) entry(i int) uint32       { return b.u32(int(b.u32(offOffsetBmap)) + 4*i) }
func (b vdiFile) setEntry(i int, v uint32) { b.put32(int(b.u32(offOffsetBmap))+4*i, v) }

func (b vdiFile) write(t testing.TB) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "patched.vdi")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// baseImage is a dynamic 4 MiB + 512 B image whose five blocks are all stored.
func baseImage(t testing.TB) vdiFile {
	t.Helper()
	b, err := os.ReadFile(patternVDI(t, 4<<20+512, 7, false))
	if err != nil {
		t.Fatal(err)
	}
	f := vdiFile(b)
	if f.u32(offBlocksAlloc) != 5 || f.u32(offBlocksInImage) != 5 {
		t.Fatalf("base image: %d of %d blocks allocated, want 5 of 5", f.u32(offBlocksAlloc), f.u32(offBlocksInImage))
	}
	return f
}

// TestPatchedValid checks images qemu reads that qemu-img never writes.
func TestPatchedValid(t *testing.T) {
	testimg.Require(t, "qemu-img")
	base := baseImage(t)
	cases := []struct {
		name  string
		patch func(b vdiFile) vdiFile
		check func(t *testing.T, img *Image)
	}{
		{"discarded-block", func(b vdiFile) vdiFile { b.setEntry(2, entryDiscarded); return b }, func(t *testing.T, img *Image) {
			e, err := img.Extent(2<<20, 1<<20)
			if err != nil || !e.Allocated || !e.Zero || e.Length != 1<<20 {
				t.Fatalf("Extent of a discarded block = %+v, %v; want allocated and zero", e, err)
			}
		}},
		{"unallocated-block", func(b vdiFile) vdiFile { b.setEntry(0, entryUnallocated); return b }, func(t *testing.T, img *Image) {
			e, err := img.Extent(0, 3<<20)
			if err != nil || e.Allocated || !e.Zero || e.Length != 1<<20 {
				t.Fatalf("Extent of an unallocated block = %+v, %v; want one block, unallocated, zero", e, err)
			}
		}},
		// Two disk blocks sharing a data block: qemu does not check, reads
		// both from it; vimg tolerates it the same way.
		{"shared-data-block", func(b vdiFile) vdiFile { b.setEntry(3, b.entry(1)); return b }, nil},
		{"shared-data-block-adjacent", func(b vdiFile) vdiFile { b.setEntry(2, b.entry(1)); return b }, nil},
		{"blocks-out-of-order", func(b vdiFile) vdiFile {
			e0, e4 := b.entry(0), b.entry(4)
			b.setEntry(0, e4)
			b.setEntry(4, e0)
			return b
		}, nil},
		{"odd-disk-size", func(b vdiFile) vdiFile { b.put64(offDiskSize, 4<<20+100); return b }, func(t *testing.T, img *Image) {
			if img.Size() != 4<<20+512 {
				t.Fatalf("size %d, want rounded up to 4MiB+512", img.Size())
			}
		}},
		// More blocks than the disk needs; the extra map entries (zeros
		// here, read from the padding) are never used.
		{"spare-blocks", func(b vdiFile) vdiFile { b.put32(offBlocksInImage, 100); return b }, nil},
		// The tail of the last data block is missing: nothing needs it.
		{"last-block-padding-cut", func(b vdiFile) vdiFile {
			last := int(b.u32(offOffsetData)) + 5<<20
			return b[:last-(1<<20)+512]
		}, nil},
		{"trailing-garbage", func(b vdiFile) vdiFile { return append(b, bytes.Repeat([]byte{0xab}, 3000)...) }, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			path := tc.patch(slices.Clone(base)).write(t)
			ref := testimg.RawOf(t, path)
			img := openVDI(t, path)
			if want := qemuVirtualSize(t, path); img.Size() != want {
				t.Fatalf("Size %d, qemu-img info says %d", img.Size(), want)
			}
			compareAt(t, ref, img, img.Size(), 1<<20+13)
			set, _ := decodeFile(t, path)
			compareAt(t, ref, set, set.size, 1<<20)
			if tc.check != nil {
				tc.check(t, img)
			}
		})
	}
}

// TestHostile checks that broken or refused images give a specific error,
// from Open and from the decoder, and never a panic.
func TestHostile(t *testing.T) {
	testimg.Require(t, "qemu-img")
	base := baseImage(t)
	dataOff := base.u32(offOffsetData)
	cases := []struct {
		name      string
		patch     func(b vdiFile) vdiFile
		is        error  // what Open's error wraps
		open      string // substring of Open's error; "" when Open succeeds
		read      string // substring of the error reading the disk when Open succeeds
		streamErr string // substring of the decoder's error (NewDecoder or Run); "" = same as open
	}{
		{name: "too-short", patch: func(b vdiFile) vdiFile { return b[:100] }, is: stream.ErrCorrupt,
			open: "too short for the 512 byte header", streamErr: "the stream ended at byte 100, inside the header"},
		{name: "bad-signature", patch: func(b vdiFile) vdiFile { b.put32(offSignature, 0xbeda1070); return b }, is: stream.ErrCorrupt,
			open: "not a VDI image (signature 0xbeda1070"},
		{name: "bad-version", patch: func(b vdiFile) vdiFile { b.put32(offVersion, 0x00010000); return b }, is: stream.ErrUnsupported,
			open: "version 1.0"},
		{name: "version-2", patch: func(b vdiFile) vdiFile { b.put32(offVersion, 0x00020001); return b }, is: stream.ErrUnsupported,
			open: "version 2.1"},
		{name: "differencing", patch: func(b vdiFile) vdiFile {
			b.put32(offImageType, typeDiff)
			copy(b[offUUIDParent:], "parent-uuid-1234")
			return b
		}, is: stream.ErrUnsupported, open: "differencing image"},
		{name: "undo", patch: func(b vdiFile) vdiFile { b.put32(offImageType, typeUndo); return b }, is: stream.ErrUnsupported,
			open: "undo image"},
		{name: "unknown-type", patch: func(b vdiFile) vdiFile { b.put32(offImageType, 7); return b }, is: stream.ErrCorrupt,
			open: "unknown image type 7"},
		{name: "parent-uuid", patch: func(b vdiFile) vdiFile { copy(b[offUUIDParent:], "parent-uuid-1234"); return b }, is: stream.ErrUnsupported,
			open: "non-null parent UUID"},
		{name: "link-uuid", patch: func(b vdiFile) vdiFile { copy(b[offUUIDLink:], "link-uuid-123456"); return b }, is: stream.ErrUnsupported,
			open: "non-null link UUID"},
		{name: "sector-size", patch: func(b vdiFile) vdiFile { b.put32(offSectorSize, 4096); return b }, is: stream.ErrUnsupported,
			open: "sector size 4096"},
		{name: "block-size-512K", patch: func(b vdiFile) vdiFile { b.put32(offBlockSize, 512<<10); return b }, is: stream.ErrUnsupported,
			open: "block size 524288 (only 1048576"},
		{name: "block-size-huge", patch: func(b vdiFile) vdiFile { b.put32(offBlockSize, 1<<31); return b }, is: stream.ErrUnsupported,
			open: "block size 2147483648 (only 1048576"},
		{name: "block-size-zero", patch: func(b vdiFile) vdiFile { b.put32(offBlockSize, 0); return b }, is: stream.ErrCorrupt,
			open: "block size 0 is not a power of two"},
		{name: "block-size-odd", patch: func(b vdiFile) vdiFile { b.put32(offBlockSize, 3<<20); return b }, is: stream.ErrCorrupt,
			open: "block size 3145728 is not a power of two"},
		{name: "block-extra", patch: func(b vdiFile) vdiFile { b.put32(offBlockExtra, 512); return b }, is: stream.ErrUnsupported,
			open: "512 bytes of extra data per block"},
		{name: "blocks-in-image-huge", patch: func(b vdiFile) vdiFile { b.put32(offBlocksInImage, 4e9); return b }, is: stream.ErrCorrupt,
			open: "blocks in image 4000000000 exceeds the VDI maximum"},
		{name: "disk-size-past-blocks", patch: func(b vdiFile) vdiFile { b.put64(offDiskSize, 5<<20+512); return b }, is: stream.ErrCorrupt,
			open: "disk size 5243392 needs 6 blocks but the block map has room for 5"},
		{name: "disk-size-huge", patch: func(b vdiFile) vdiFile { b.put64(offDiskSize, 1<<62); return b }, is: stream.ErrUnsupported,
			open: "disk size 4611686018427387904 exceeds the 70368744177664 byte limit"},
		{name: "allocated-past-blocks", patch: func(b vdiFile) vdiFile { b.put32(offBlocksAlloc, 6); return b }, is: stream.ErrCorrupt,
			open: "6 blocks allocated but the image has only 5 blocks"},
		{name: "bmap-unaligned", patch: func(b vdiFile) vdiFile { b.put32(offOffsetBmap, 0x204); return b }, is: stream.ErrUnsupported,
			open: "block map offset 516 is not sector aligned"},
		{name: "data-unaligned", patch: func(b vdiFile) vdiFile { b.put32(offOffsetData, dataOff+4); return b }, is: stream.ErrUnsupported,
			open: "data offset 1028 is not sector aligned"},
		{name: "bmap-in-header", patch: func(b vdiFile) vdiFile { b.put32(offOffsetBmap, 0); return b }, is: stream.ErrCorrupt,
			open: "block map offset 0 lies inside the 512 byte header"},
		{name: "data-in-bmap", patch: func(b vdiFile) vdiFile { b.put32(offOffsetBmap, dataOff); return b }, is: stream.ErrCorrupt,
			open: "data offset 1024 lies inside the block map (bytes 1024 to 1044)"},
		{name: "bmap-past-eof", patch: func(b vdiFile) vdiFile {
			b.put32(offOffsetBmap, 0x10000000)
			b.put32(offOffsetData, 0x10000200)
			return b
		}, is: stream.ErrCorrupt,
			open:      "block map at offset 268435456 (20 bytes) lies beyond the end of the file (size 5243904)",
			streamErr: "the stream ended at byte 5243904, before the block map at offset 268435456"},
		{name: "bmap-entry-out-of-range", patch: func(b vdiFile) vdiFile { b.setEntry(3, 5); return b }, is: stream.ErrCorrupt,
			open: "VDI block map out of range: block 3 (disk offset 3145728) points to data block 5, but only 5 blocks are allocated"},
		{name: "bmap-entry-huge", patch: func(b vdiFile) vdiFile { b.setEntry(4, 0xfffffffd); return b }, is: stream.ErrCorrupt,
			open: "VDI block map out of range: block 4"},
		{name: "data-past-eof", patch: func(b vdiFile) vdiFile { b.put32(offOffsetData, 0x40000000); return b }, is: stream.ErrCorrupt,
			open:      "data area offset 1073741824 lies beyond the end of the file (size 5243904)",
			streamErr: "the stream ended at byte 5243904, before the data area at offset 1073741824"},
		{name: "truncated-data", patch: func(b vdiFile) vdiFile { return b[:len(b)-(3<<20)+100] },
			read:      "lies beyond the end of the file (needs bytes up to",
			streamErr: "the stream ended at byte 2098276, inside data block 2 (disk offset 2097152) (bytes 2098176 to 3146752)"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			b := tc.patch(slices.Clone(base))

			img, err := Open(bytes.NewReader(b), int64(len(b)))
			switch {
			case tc.open == "" && err != nil:
				t.Fatalf("Open: %v", err)
			case tc.open != "" && (err == nil || !strings.Contains(err.Error(), tc.open)):
				t.Fatalf("Open error %v; want one containing %q", err, tc.open)
			case tc.open != "" && !errors.Is(err, tc.is):
				t.Fatalf("Open error %v does not wrap %v", err, tc.is)
			}
			if img != nil {
				_, err := io.ReadAll(io.NewSectionReader(img, 0, img.Size()))
				if err == nil || !strings.Contains(err.Error(), tc.read) || !errors.Is(err, stream.ErrCorrupt) {
					t.Fatalf("reading the disk: %v; want an ErrCorrupt containing %q", err, tc.read)
				}
			}

			want := tc.streamErr
			if want == "" {
				want = tc.open
			}
			dec, _, err := NewDecoder(plainReader{bytes.NewReader(b)})
			if err == nil {
				err = dec.Run(&chunkSet{size: dec.Size()})
			}
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Fatalf("decoder error %v; want one containing %q", err, want)
			}
			if tc.is != nil && !errors.Is(err, tc.is) || tc.is == nil && !errors.Is(err, stream.ErrCorrupt) {
				t.Fatalf("decoder error %v does not wrap the right sentinel", err)
			}
		})
	}
}

func TestProbe(t *testing.T) {
	hdr := make([]byte, 512)
	binary.LittleEndian.PutUint32(hdr[64:], signature)
	for _, tc := range []struct {
		b    []byte
		want bool
	}{
		{hdr, true},
		{hdr[:68], true},
		{hdr[:67], false},
		{nil, false},
		{[]byte("QFI\xfb\x00\x00\x00\x03"), false},
		{make([]byte, 512), false},
	} {
		if got := Probe(tc.b); got != tc.want {
			t.Errorf("Probe(%d bytes) = %v, want %v", len(tc.b), got, tc.want)
		}
	}
}

func TestClose(t *testing.T) {
	testimg.Require(t, "qemu-img")
	img := openVDI(t, patternVDI(t, 1<<20, 9, false))
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := img.ReadAt(make([]byte, 10), 0); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("ReadAt after Close: %v", err)
	}
}

// fuzzSeeds returns small qemu-made images: a dynamic one with a stored
// block, a static one, an empty one, and the header and map of a bigger one.
func fuzzSeeds(f *testing.F) [][]byte {
	testimg.Require(f, "qemu-img")
	dir := f.TempDir()
	raw := filepath.Join(dir, "seed.raw")
	if err := os.WriteFile(raw, nil, 0o644); err != nil {
		f.Fatal(err)
	}
	if err := os.Truncate(raw, 3<<20+512); err != nil {
		f.Fatal(err)
	}
	rf, err := os.OpenFile(raw, os.O_WRONLY, 0)
	if err != nil {
		f.Fatal(err)
	}
	if _, err := rf.WriteAt([]byte("block one data; block one data"), 1<<20+100); err != nil {
		f.Fatal(err)
	}
	rf.Close()
	small := filepath.Join(dir, "small.raw")
	testimg.Pattern(f, small, 4096, 11)
	empty := filepath.Join(dir, "empty.raw")
	if err := os.WriteFile(empty, make([]byte, 2<<20), 0o644); err != nil {
		f.Fatal(err)
	}
	var seeds [][]byte
	for _, p := range []string{makeVDI(f, raw, false), makeVDI(f, small, true), makeVDI(f, empty, false)} {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		seeds = append(seeds, b)
	}
	big, err := os.ReadFile(patternVDI(f, 6<<20, 12, false))
	if err != nil {
		f.Fatal(err)
	}
	seeds = append(seeds, big[:binary.LittleEndian.Uint32(big[offOffsetData:])])
	return seeds
}

const fuzzMaxSize = 64 << 20

func FuzzOpen(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		img, err := Open(bytes.NewReader(b), int64(len(b)))
		if err != nil {
			if !errors.Is(err, stream.ErrCorrupt) && !errors.Is(err, stream.ErrUnsupported) {
				t.Fatalf("Open error wraps neither sentinel: %v", err)
			}
			return
		}
		if img.Size() > fuzzMaxSize {
			return
		}
		buf := make([]byte, 1<<20+3)
		for off := int64(0); off < img.Size(); off += int64(len(buf)) {
			n, err := img.ReadAt(buf, off)
			if err != nil && err != io.EOF {
				if !errors.Is(err, stream.ErrCorrupt) {
					t.Fatalf("ReadAt error is not ErrCorrupt: %v", err)
				}
				break
			}
			if want := min(int64(len(buf)), img.Size()-off); int64(n) != want {
				t.Fatalf("ReadAt at %d read %d bytes, want %d", off, n, want)
			}
		}
		walkExtents(t, img)
	})
}

func FuzzDecoder(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		dec, info, err := NewDecoder(plainReader{bytes.NewReader(b)})
		if err != nil {
			if !errors.Is(err, stream.ErrCorrupt) && !errors.Is(err, stream.ErrUnsupported) {
				t.Fatalf("NewDecoder error wraps neither sentinel: %v", err)
			}
			return
		}
		if dec.Size() != info.VirtualSize {
			t.Fatalf("Size %d, Info %+v", dec.Size(), info)
		}
		set := &chunkSet{size: dec.Size(), limit: 256 << 20}
		err = dec.Run(set)
		if errors.Is(err, errEnough) {
			return
		}
		if err != nil {
			if !errors.Is(err, stream.ErrCorrupt) {
				t.Fatalf("Run error is not ErrCorrupt: %v", err)
			}
			return
		}
		// Whenever both paths read the whole disk, they must agree.
		img, err := Open(bytes.NewReader(b), int64(len(b)))
		if err != nil || img.Size() > fuzzMaxSize {
			return
		}
		want, err := io.ReadAll(io.NewSectionReader(img, 0, img.Size()))
		if err != nil {
			return
		}
		set.sort()
		got, err := io.ReadAll(io.NewSectionReader(set, 0, set.size))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("decoder and ReadAt disagree")
		}
	})
}
