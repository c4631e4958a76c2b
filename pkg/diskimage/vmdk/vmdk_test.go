package vmdk

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"

	"github.com/klauspost/compress/zlib"

	"vimg.dev/vimg/pkg/diskimage/codec"
	"vimg.dev/vimg/pkg/diskimage/stream"
	"vimg.dev/vimg/pkg/diskimage/testimg"
)

const (
	kib = int64(1) << 10
	mib = int64(1) << 20
	gib = int64(1) << 30
)

// patternRaw writes a testimg pattern of size bytes.
func patternRaw(t testing.TB, size int64, seed uint64) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), fmt.Sprintf("src-%d-%d.raw", size, seed))
	testimg.Pattern(t, p, size, seed)
	return p
}

// holeRaw makes a 1 GiB disk that is almost all hole: a few patterned
// pieces at the start, in the middle and at the end.
func holeRaw(t testing.TB) string {
	t.Helper()
	piece := patternRaw(t, 3*mib+512, 7)
	data, err := os.ReadFile(piece)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "hole.raw")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(gib); err != nil {
		t.Fatal(err)
	}
	for _, off := range []int64{0, 500*mib + 4096, gib - int64(len(data))} {
		if _, err := f.WriteAt(data, off); err != nil {
			t.Fatal(err)
		}
	}
	return p
}

// toVMDK converts raw to VMDK with qemu-img and the given -o options.
func toVMDK(t testing.TB, raw, opts string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.vmdk")
	testimg.QemuImg(t, "convert", "-f", "raw", "-O", "vmdk", "-o", opts, raw, p)
	return p
}

func qemuVirtualSize(t testing.TB, path string) int64 {
	t.Helper()
	out := testimg.QemuImg(t, "info", "-f", "vmdk", "--output=json", path)
	var info struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	if err := json.Unmarshal(out, &info); err != nil {
		t.Fatalf("qemu-img info: %v\n%s", err, out)
	}
	return info.VirtualSize
}

func mustRead(t testing.TB, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func writeFile(t testing.TB, data []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "patched.vmdk")
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func openFile(t testing.TB, p string) (*Image, *os.File) {
	t.Helper()
	f, size := testimg.Open(t, p)
	img, err := Open(f, size)
	if err != nil {
		t.Fatalf("Open(%s): %v", p, err)
	}
	return img, f
}

// compareReads reads the whole disk through ReadAt in chunks of an odd size
// and compares with the reference raw file.
func compareReads(t *testing.T, img *Image, ref *os.File, start, stride, chunk int64) {
	t.Helper()
	compareRange(t, img, ref, start, img.Size(), stride, chunk)
}

// compareRange is compareReads over [start, end).
func compareRange(t *testing.T, img *Image, ref *os.File, start, end, stride, chunk int64) {
	t.Helper()
	size := min(end, img.Size())
	got := make([]byte, chunk)
	want := make([]byte, chunk)
	for off := start; off < size; off += stride {
		n := min(chunk, size-off)
		m, err := img.ReadAt(got[:n], off)
		if err != nil && !(err == io.EOF && off+n == size) {
			t.Errorf("ReadAt(%d, %d): %v", off, n, err)
			return
		}
		if int64(m) != n {
			t.Errorf("ReadAt(%d, %d) = %d bytes", off, n, m)
			return
		}
		if _, err := ref.ReadAt(want[:n], off); err != nil && err != io.EOF {
			t.Fatal(err)
		}
		if !bytes.Equal(got[:n], want[:n]) {
			i := 0
			for got[i] == want[i] {
				i++
			}
			t.Errorf("content differs at disk offset %d", off+int64(i))
			return
		}
	}
}

// checkRandomAccess opens path and compares everything it reads with ref.
func checkRandomAccess(t *testing.T, path, ref string, wantSub string) {
	img, _ := openFile(t, path)
	defer img.Close()
	info := img.Info()
	if q := qemuVirtualSize(t, path); info.VirtualSize != q || img.Size() != q {
		t.Fatalf("virtual size %d, qemu-img says %d", info.VirtualSize, q)
	}
	if info.Subformat != wantSub || info.Compressed != (wantSub == SubformatStreamOptimized) || info.GrainSize != 64*kib {
		t.Fatalf("Info = %+v, want subformat %s", info, wantSub)
	}
	if img.Type() != Type || img.Readable() != nil {
		t.Fatal("Type/Readable")
	}
	rf, err := os.Open(ref)
	if err != nil {
		t.Fatal(err)
	}
	defer rf.Close()
	if st, _ := rf.Stat(); st.Size() != img.Size() {
		t.Fatalf("reference is %d bytes, image says %d", st.Size(), img.Size())
	}

	// Sequentially, in chunks that straddle grains.
	compareReads(t, img, rf, 0, 1*mib+333, 1*mib+333)
	// Small reads inside grains, at the start and at the end of the disk.
	compareRange(t, img, rf, 0, 8*mib, 4093, 4093)
	compareRange(t, img, rf, max(0, img.Size()-8*mib-77), img.Size(), 4093, 4093)

	// Concurrently: each goroutine reads its own stripes with its own size.
	var wg sync.WaitGroup
	const workers = 6
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			chunk := 256*kib + int64(w)*1237
			f, err := os.Open(ref)
			if err != nil {
				t.Error(err)
				return
			}
			defer f.Close()
			compareReads(t, img, f, int64(w)*chunk, workers*chunk, chunk)
		}()
	}
	wg.Wait()

	checkExtents(t, img, rf)
}

// checkExtents walks the disk with Extent and checks that zero extents read
// as zeros and that extents tile the disk.
func checkExtents(t *testing.T, img *Image, ref *os.File) {
	t.Helper()
	size := img.Size()
	var n int
	buf := make([]byte, 4*mib)
	for off := int64(0); off < size; n++ {
		e, err := img.Extent(off, size-off)
		if err != nil {
			t.Fatalf("Extent(%d): %v", off, err)
		}
		if e.Start != off || e.Length <= 0 || e.Start+e.Length > size {
			t.Fatalf("Extent(%d, %d) = %+v", off, size-off, e)
		}
		if e.Compressed != (e.Allocated && !e.Zero && img.Info().Compressed) {
			t.Fatalf("extent %+v: wrong compressed flag", e)
		}
		if e.Zero {
			// Check the first few MiB of each zero extent against the reference.
			m := min(e.Length, int64(len(buf)))
			if _, err := ref.ReadAt(buf[:m], off); err != nil && err != io.EOF {
				t.Fatal(err)
			}
			if !bytes.Equal(buf[:m], make([]byte, m)) {
				t.Fatalf("extent %+v is zero, but the reference has data there", e)
			}
		}
		off += e.Length
	}
	// A clipped request and one past the end.
	if e, err := img.Extent(100, 200); err != nil || e.Start != 100 || e.Length != 200 {
		t.Fatalf("Extent(100, 200) = %+v, %v", e, err)
	}
	if _, err := img.Extent(size-10, 11); err == nil {
		t.Fatal("Extent past the end succeeded")
	}
	t.Logf("%d extents", n)
}

// hidden hides Seek and ReadAt so that the decoder sees a plain stream.
type hidden struct{ r io.Reader }

func (h hidden) Read(p []byte) (int, error) { return h.r.Read(p) }

// fileSink decodes chunks into a sparse file and checks they do not
// overlap.
type fileSink struct {
	f     *os.File
	size  int64
	seen  map[int64]bool
	bytes int64
}

func (s *fileSink) Put(c stream.Chunk) error {
	// A chunk may overhang the end of the disk (a last grain stored whole);
	// the receiver clips it, as the engine does. It may not start past it.
	if c.Off < 0 || c.Len <= 0 || c.Off >= s.size {
		return fmt.Errorf("chunk [%d, +%d) outside the disk (size %d)", c.Off, c.Len, s.size)
	}
	if s.seen[c.Off] {
		return fmt.Errorf("chunk at %d put twice", c.Off)
	}
	s.seen[c.Off] = true
	dst := make([]byte, c.Len)
	if _, err := codec.Decode(c.Codec, dst, c.Payload); err != nil {
		return fmt.Errorf("decoding chunk at %d: %w", c.Off, err)
	}
	dst = dst[:min(int64(len(dst)), s.size-c.Off)]
	s.bytes += int64(len(dst))
	_, err := s.f.WriteAt(dst, c.Off)
	return err
}

// decodeStream runs the decoder over path and returns the raw result file.
func decodeStream(t *testing.T, path string) (string, Info, error) {
	t.Helper()
	in, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	dec, info, err := NewDecoder(hidden{in})
	if err != nil {
		return "", info, err
	}
	if dec.Size() != info.VirtualSize {
		t.Fatalf("decoder size %d, info %d", dec.Size(), info.VirtualSize)
	}
	out := filepath.Join(t.TempDir(), "decoded.raw")
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(dec.Size()); err != nil {
		t.Fatal(err)
	}
	sink := &fileSink{f: f, size: dec.Size(), seen: map[int64]bool{}}
	if err := dec.Run(sink); err != nil {
		return "", info, err
	}
	// The whole input must have been consumed.
	if n, _ := in.Read(make([]byte, 1)); n != 0 {
		t.Fatal("decoder returned before the end of the input")
	}
	return out, info, nil
}

// sameFiles compares two files chunk by chunk.
func sameFiles(t *testing.T, want, got string) {
	t.Helper()
	a, b := mustOpen(t, want), mustOpen(t, got)
	sa, _ := a.Stat()
	sb, _ := b.Stat()
	if sa.Size() != sb.Size() {
		t.Fatalf("size %d, want %d", sb.Size(), sa.Size())
	}
	ba, bb := make([]byte, 4*mib), make([]byte, 4*mib)
	for off := int64(0); off < sa.Size(); off += int64(len(ba)) {
		n, _ := a.ReadAt(ba, off)
		m, _ := b.ReadAt(bb, off)
		if n != m || !bytes.Equal(ba[:n], bb[:m]) {
			t.Fatalf("decoded content differs from the reference in [%d, +%d)", off, len(ba))
		}
	}
}

func mustOpen(t *testing.T, p string) *os.File {
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func checkDecoder(t *testing.T, path, ref, wantSub string) {
	out, info, err := decodeStream(t, path)
	if err != nil {
		t.Fatalf("decoder: %v", err)
	}
	if info.Subformat != wantSub {
		t.Fatalf("decoder info %+v, want %s", info, wantSub)
	}
	sameFiles(t, ref, out)
}

func TestImages(t *testing.T) {
	testimg.Require(t, "qemu-img")
	small := patternRaw(t, 5*mib+512, 1)
	odd := patternRaw(t, 1*mib+100, 2) // not a multiple of a sector: qemu rounds up
	tiny := patternRaw(t, 512, 3)
	hole := holeRaw(t)
	cases := []struct {
		name, raw, opts, sub string
	}{
		{"sparse", small, "subformat=monolithicSparse", SubformatMonolithicSparse},
		{"stream", small, "subformat=streamOptimized", SubformatStreamOptimized},
		{"sparse-odd", odd, "subformat=monolithicSparse", SubformatMonolithicSparse},
		{"stream-odd", odd, "subformat=streamOptimized", SubformatStreamOptimized},
		{"stream-tiny", tiny, "subformat=streamOptimized", SubformatStreamOptimized},
		{"sparse-hole", hole, "subformat=monolithicSparse", SubformatMonolithicSparse},
		{"stream-hole", hole, "subformat=streamOptimized", SubformatStreamOptimized},
		{"compat6", small, "subformat=monolithicSparse,compat6", SubformatMonolithicSparse},
		{"lsilogic", small, "subformat=streamOptimized,adapter_type=lsilogic", SubformatStreamOptimized},
		{"zeroed-grain", small, "subformat=monolithicSparse,zeroed_grain=on", SubformatMonolithicSparse},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := toVMDK(t, c.raw, c.opts)
			ref := testimg.RawOf(t, p)
			checkRandomAccess(t, p, ref, c.sub)
			checkDecoder(t, p, ref, c.sub)
		})
		if c.sub == SubformatStreamOptimized && (c.name == "stream" || c.name == "stream-hole" || c.name == "stream-odd") {
			// The same disk laid out the way VMware writes a stream: grain
			// directory at the end, footer, end-of-stream marker. qemu reads
			// it through the footer; the result must agree.
			t.Run(c.name+"-gd-at-end", func(t *testing.T) {
				q := toVMDK(t, c.raw, c.opts)
				p := writeFile(t, streamLayout(t, mustRead(t, q), false))
				ref := testimg.RawOf(t, p)
				sameFiles(t, testimg.RawOf(t, q), ref)
				checkRandomAccess(t, p, ref, c.sub)
				checkDecoder(t, p, ref, c.sub)
			})
		}
	}
}

// streamLayout rewrites a qemu-made streamOptimized image the way a
// streaming writer (VMware, VirtualBox) lays it out: header with gdOffset =
// GD_AT_END, descriptor, grains in disk order, each grain table behind a
// marker after its grains, then the directory, footer and end-of-stream
// markers. reverse writes the grains of the first table in reverse order.
func streamLayout(t testing.TB, q []byte, reverse bool) []byte {
	t.Helper()
	le := binary.LittleEndian
	h := parseHeader(q)
	grains := (h.capacity + h.grainSectors - 1) / h.grainSectors
	gdEntries := (grains + 511) / 512
	var out bytes.Buffer
	hdr := bytes.Clone(q[:sectorSize])
	le.PutUint32(hdr[8:], h.flags&^flagRedundantGD)
	le.PutUint64(hdr[48:], 0)
	le.PutUint64(hdr[56:], gdAtEnd)
	out.Write(hdr)
	out.Write(q[h.descOffset*sectorSize : (h.descOffset+h.descSize)*sectorSize])
	out.Write(make([]byte, int(h.overHead*sectorSize)-out.Len()))
	pad := func() {
		if r := out.Len() % sectorSize; r != 0 {
			out.Write(make([]byte, sectorSize-r))
		}
	}
	metaMarker := func(sectors uint64, typ uint32) {
		m := make([]byte, sectorSize)
		le.PutUint64(m[0:], sectors)
		le.PutUint32(m[12:], typ)
		out.Write(m)
	}
	gd := make([]byte, gdEntries*4)
	for gdi := range gdEntries {
		gtSector := le.Uint32(q[h.gdOffset*sectorSize+gdi*4:])
		newGT := make([]byte, gtBytes)
		any := false
		order := make([]uint64, 512)
		for k := range order {
			order[k] = uint64(k)
			if reverse && gdi == 0 {
				order[k] = uint64(511 - k)
			}
		}
		for _, k := range order {
			gte := uint64(le.Uint32(q[uint64(gtSector)*sectorSize+k*4:]))
			if gte == 0 {
				continue
			}
			off := gte * sectorSize
			size := uint64(le.Uint32(q[off+8:]))
			le.PutUint32(newGT[k*4:], uint32(out.Len()/sectorSize))
			out.Write(q[off : off+12+size])
			pad()
			any = true
		}
		if any {
			metaMarker(gtBytes/sectorSize, markerGT)
			le.PutUint32(gd[gdi*4:], uint32(out.Len()/sectorSize))
			out.Write(newGT)
		}
	}
	metaMarker(uint64((len(gd)+sectorSize-1)/sectorSize), markerGD)
	gdSector := out.Len() / sectorSize
	out.Write(gd)
	pad()
	metaMarker(1, markerFooter)
	foot := bytes.Clone(hdr)
	le.PutUint64(foot[56:], uint64(gdSector))
	out.Write(foot)
	metaMarker(0, markerEOS)
	return out.Bytes()
}

// firstGTE returns the file offset of the first allocated grain table
// entry of directory entry 0 and that entry's index.
func firstGTE(t testing.TB, b []byte) (int64, int) {
	t.Helper()
	le := binary.LittleEndian
	h := parseHeader(b)
	gt := int64(le.Uint32(b[h.gdOffset*sectorSize:])) * sectorSize
	for k := range 512 {
		if le.Uint32(b[gt+int64(k)*4:]) != 0 {
			return gt + int64(k)*4, k
		}
	}
	t.Fatal("no allocated grain in the first grain table")
	return 0, 0
}

// firstUnallocatedGTE returns the file offset of an unallocated entry.
func firstUnallocatedGTE(t testing.TB, b []byte) int64 {
	t.Helper()
	le := binary.LittleEndian
	h := parseHeader(b)
	gt := int64(le.Uint32(b[h.gdOffset*sectorSize:])) * sectorSize
	for k := range 512 {
		if le.Uint32(b[gt+int64(k)*4:]) == 0 {
			return gt + int64(k)*4
		}
	}
	t.Fatal("no unallocated grain in the first grain table")
	return 0
}

// TestZeroedGrain patches grain table entries to the zeroed-grain value 1
// and checks reads, extents and the decoder against what qemu makes of the
// patched file.
func TestZeroedGrain(t *testing.T) {
	testimg.Require(t, "qemu-img")
	q := mustRead(t, toVMDK(t, patternRaw(t, 5*mib+512, 4), "subformat=monolithicSparse,zeroed_grain=on"))
	b := bytes.Clone(q)
	dataGTE, k := firstGTE(t, b)
	binary.LittleEndian.PutUint32(b[dataGTE:], zeroGrainGTE)
	binary.LittleEndian.PutUint32(b[firstUnallocatedGTE(t, b):], zeroGrainGTE)
	p := writeFile(t, b)
	ref := testimg.RawOf(t, p)
	checkRandomAccess(t, p, ref, SubformatMonolithicSparse)
	checkDecoder(t, p, ref, SubformatMonolithicSparse)
	img, _ := openFile(t, p)
	e, err := img.Extent(int64(k)*64*kib, 64*kib)
	if err != nil || !e.Zero || !e.Allocated || e.Compressed || e.Length != 64*kib {
		t.Fatalf("Extent of zeroed grain = %+v, %v", e, err)
	}

	// Without the zeroed-grain flag, 1 is a grain offset inside the header.
	binary.LittleEndian.PutUint32(b[8:], binary.LittleEndian.Uint32(b[8:])&^flagZeroGrain)
	expectFailure(t, b, "inside the header/metadata area", "inside the header/metadata area")
}

// expectFailure checks that both the random-access path (Open, then reading
// and walking everything) and the decoder fail on data with errors holding
// the given substrings.
func expectFailure(t *testing.T, data []byte, openSub, decSub string) {
	t.Helper()
	// An empty substring skips that path (the damage only matters to the other).
	if openSub == "" {
	} else if err := openAndReadAll(data); err == nil || !strings.Contains(err.Error(), openSub) {
		t.Errorf("random access: got error %v, want one containing %q", err, openSub)
	} else if !errors.Is(err, stream.ErrCorrupt) && !errors.Is(err, stream.ErrUnsupported) {
		t.Errorf("random access: error %v wraps neither ErrCorrupt nor ErrUnsupported", err)
	}
	if decSub == "" {
	} else if err := decodeAll(data, 1<<30); err == nil || !strings.Contains(err.Error(), decSub) {
		t.Errorf("decoder: got error %v, want one containing %q", err, decSub)
	} else if !errors.Is(err, stream.ErrCorrupt) && !errors.Is(err, stream.ErrUnsupported) {
		t.Errorf("decoder: error %v wraps neither ErrCorrupt nor ErrUnsupported", err)
	}
}

// openAndReadAll opens data and reads every allocated extent.
func openAndReadAll(data []byte) error {
	img, err := Open(bytes.NewReader(data), int64(len(data)))
	if err != nil {
		return err
	}
	defer img.Close()
	return walkAll(img, 64<<20, 1<<16)
}

// walkAll walks the image with Extent and reads what is allocated, up to
// maxRead bytes and maxExtents extents.
func walkAll(img *Image, maxRead int64, maxExtents int) error {
	size := img.Size()
	buf := make([]byte, 1<<20)
	var read int64
	for off, n := int64(0), 0; off < size && n < maxExtents; n++ {
		e, err := img.Extent(off, size-off)
		if err != nil {
			return err
		}
		if e.Start != off || e.Length <= 0 || e.Length > size-off {
			return fmt.Errorf("bad extent %+v at %d", e, off)
		}
		for o := off; o < off+e.Length && read < maxRead; o += int64(len(buf)) {
			m := min(int64(len(buf)), off+e.Length-o)
			if _, err := img.ReadAt(buf[:m], o); err != nil && err != io.EOF {
				return err
			}
			if e.Zero && !bytes.Equal(buf[:m], make([]byte, m)) {
				return fmt.Errorf("extent %+v is zero, but reads data", e)
			}
			read += m
		}
		off += e.Length
	}
	return nil
}

// decodeAll runs the decoder over data, decoding every chunk, within a
// budget of decoded bytes.
func decodeAll(data []byte, budget int64) error {
	dec, _, err := NewDecoder(hidden{bytes.NewReader(data)})
	if err != nil {
		return err
	}
	return dec.Run(sinkFunc(func(c stream.Chunk) error {
		if c.Off < 0 || c.Len <= 0 || c.Off >= dec.Size() {
			return fmt.Errorf("chunk [%d, +%d) outside the disk", c.Off, c.Len)
		}
		if budget -= int64(c.Len); budget < 0 {
			return nil
		}
		_, err := codec.Decode(c.Codec, make([]byte, c.Len), c.Payload)
		return err
	}))
}

type sinkFunc func(stream.Chunk) error

func (f sinkFunc) Put(c stream.Chunk) error { return f(c) }

func TestHostile(t *testing.T) {
	testimg.Require(t, "qemu-img")
	raw := patternRaw(t, 2*mib+512, 5)
	sparse := mustRead(t, toVMDK(t, raw, "subformat=monolithicSparse"))
	streamed := mustRead(t, toVMDK(t, raw, "subformat=streamOptimized"))
	le := binary.LittleEndian
	patch := func(base []byte, f func(b []byte)) []byte {
		b := bytes.Clone(base)
		f(b)
		return b
	}
	setDescriptor := func(b []byte, edit func(string) string) {
		h := parseHeader(b)
		area := b[h.descOffset*sectorSize : (h.descOffset+h.descSize)*sectorSize]
		text := string(area[:bytes.IndexByte(area, 0)])
		text = edit(text)
		if len(text) >= len(area) {
			t.Fatal("descriptor too long")
		}
		clear(area)
		copy(area, text)
	}
	lastGrain := func(b []byte) int64 {
		h := parseHeader(b)
		gt := int64(le.Uint32(b[h.gdOffset*sectorSize:])) * sectorSize
		var last int64
		for k := range int64(512) {
			last = max(last, int64(le.Uint32(b[gt+k*4:]))*sectorSize)
		}
		return last
	}
	firstGrain := func(b []byte) int64 {
		off, _ := firstGTE(t, b)
		return int64(le.Uint32(b[off:])) * sectorSize
	}

	cases := []struct {
		name    string
		data    []byte
		openSub string
		decSub  string
	}{
		{"absurd capacity", patch(sparse, func(b []byte) { le.PutUint64(b[12:], 1<<40) }), "capacity of", "capacity of"},
		{"grain not power of two", patch(sparse, func(b []byte) { le.PutUint64(b[20:], 96) }), "grain size of 96 sectors is invalid", "grain size of 96 sectors is invalid"},
		{"grain too big", patch(sparse, func(b []byte) { le.PutUint64(b[20:], 4096) }), "grain size of 4096 sectors is invalid", "grain size of 4096 sectors is invalid"},
		{"grain zero", patch(sparse, func(b []byte) { le.PutUint64(b[20:], 0) }), "grain size of 0 sectors", "grain size of 0 sectors"},
		{"gtes per gt", patch(sparse, func(b []byte) { le.PutUint32(b[44:], 256) }), "256 entries per grain table is invalid", "256 entries per grain table is invalid"},
		{"version 4", patch(sparse, func(b []byte) { le.PutUint32(b[4:], 4) }), "version 4 is not supported", "version 4 is not supported"},
		{"unknown compression", patch(streamed, func(b []byte) { le.PutUint16(b[77:], 2) }), "compression algorithm 2", "compression algorithm 2"},
		{"compressed without markers", patch(streamed, func(b []byte) { le.PutUint32(b[8:], le.Uint32(b[8:])&^flagMarkers) }), "without grain markers", "without grain markers"},
		{"huge directory", patch(sparse, func(b []byte) { le.PutUint64(b[12:], 1<<37); le.PutUint64(b[20:], 1) }), "grain directory of", "grain directory of"},
		{"gd offset past EOF", patch(sparse, func(b []byte) { le.PutUint64(b[56:], 1<<30) }), "grain directory at sector 1073741824", "stream ended"},
		{"overhead past EOF", patch(sparse, func(b []byte) { le.PutUint64(b[64:], 1<<20) }), "file is truncated", "inside the header/metadata area"},
		{"descriptor past EOF", patch(sparse, func(b []byte) { le.PutUint64(b[28:], 1<<20) }), "embedded descriptor at offset", "cannot be read from a stream"},
		{"descriptor too big", patch(sparse, func(b []byte) { le.PutUint64(b[36:], 1<<20) }), "larger than the 1048576 bytes", "larger than the 1048576 bytes"},
		{"gt offset past EOF", patch(sparse, func(b []byte) {
			h := parseHeader(b)
			le.PutUint32(b[h.gdOffset*sectorSize:], 0x7fffff00)
		}), "grain table 0 at offset 1099511496704 lies beyond the end of the file", "stream ended"},
		{"grain past EOF", patch(sparse, func(b []byte) {
			off, _ := firstGTE(t, b)
			le.PutUint32(b[off:], 0x7fff0000)
		}), "lies beyond the end of the file", "stream ended"},
		{"grain in metadata", patch(sparse, func(b []byte) {
			off, _ := firstGTE(t, b)
			le.PutUint32(b[off:], 30)
		}), "inside the header/metadata area", "inside the header/metadata area"},
		{"stream grain in metadata", patch(streamed, func(b []byte) {
			off, _ := firstGTE(t, b)
			le.PutUint32(b[off:], 2)
		}), "inside the header/metadata area", "inside the header/metadata area"},
		{"two entries share a grain", patch(sparse, func(b []byte) {
			off, _ := firstGTE(t, b)
			le.PutUint32(b[off+4:], le.Uint32(b[off:]))
			// Make the shared grain the last (partial) grain's too, so the
			// decoder cannot share the payload.
			h := parseHeader(b)
			grains := (h.capacity + h.grainSectors - 1) / h.grainSectors
			gdi, k := (grains-1)/512, (grains-1)%512
			gt := uint64(le.Uint32(b[h.gdOffset*sectorSize+gdi*4:])) * sectorSize
			le.PutUint32(b[gt+k*4:], le.Uint32(b[off:]))
		}), "", "share file offset"},
		{"huge compressed size", patch(streamed, func(b []byte) { le.PutUint32(b[firstGrain(b)+8:], 0x7fffffff) }), "claims 2147483647 bytes", "claims 2147483647 bytes"},
		{"marker for another sector", patch(streamed, func(b []byte) { le.PutUint64(b[firstGrain(b):], 12345*128) }), "is for sector 1580160", "is for sector 1580160"},
		{"metadata marker in place of a grain", patch(streamed, func(b []byte) { le.PutUint32(b[firstGrain(b)+8:], 0) }), "holds a metadata marker", "holds a metadata marker"},
		{"descriptor with parent", patch(sparse, func(b []byte) {
			setDescriptor(b, func(s string) string {
				s = strings.Replace(s, "parentCID=ffffffff", "parentCID=1a2b3c4d", 1)
				return strings.Replace(s, "createType=", "parentFileNameHint=\"base.vmdk\"\ncreateType=", 1)
			})
		}), `names parent "base.vmdk"`, `names parent "base.vmdk"`},
		{"descriptor with extra extent", patch(sparse, func(b []byte) {
			setDescriptor(b, func(s string) string {
				return strings.Replace(s, "# Extent description\n", "# Extent description\nRW 4096 FLAT \"other-flat.vmdk\" 0\n", 1)
			})
		}), "outside the image", "outside the image"},
		{"descriptor naming a flat extent", patch(sparse, func(b []byte) {
			setDescriptor(b, func(s string) string { return strings.Replace(s, " SPARSE ", " FLAT ", 1) + "" })
		}), "names a FLAT extent", "names a FLAT extent"},
		{"cowd", patch(sparse, func(b []byte) { copy(b, "COWD") }), "COWD", "COWD"},
		{"garbage", patch(sparse, func(b []byte) { copy(b, "XXXX") }), "not a VMDK image", "not a VMDK image"},
	}
	// A compressed grain that inflates past the grain size: 2 grains of
	// data behind one marker, appended and mapped by the first entry.
	{
		var z bytes.Buffer
		zw := zlib.NewWriter(&z)
		zw.Write(bytes.Repeat([]byte("inflate me "), int(2*64*kib)/11+1))
		zw.Close()
		b := bytes.Clone(streamed)
		at := int64(len(b))
		m := make([]byte, 12)
		off, k := firstGTE(t, b)
		le.PutUint64(m, uint64(k)*128)
		le.PutUint32(m[8:], uint32(z.Len()))
		b = append(b, m...)
		b = append(b, z.Bytes()...)
		b = append(b, make([]byte, (sectorSize-len(b)%sectorSize)%sectorSize)...)
		le.PutUint32(b[off:], uint32(at/sectorSize))
		if err := openAndReadAll(b); !errors.Is(err, codec.ErrTooLarge) {
			t.Errorf("inflating grain: random access got %v, want codec.ErrTooLarge", err)
		}
		if err := decodeAll(b, 1<<30); !errors.Is(err, codec.ErrTooLarge) {
			t.Errorf("inflating grain: decoder got %v, want codec.ErrTooLarge", err)
		}
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) { expectFailure(t, c.data, c.openSub, c.decSub) })
	}

	t.Run("parent and extent errors are unsupported", func(t *testing.T) {
		b := patch(sparse, func(b []byte) {
			setDescriptor(b, func(s string) string {
				return strings.Replace(s, "createType=", "parentFileNameHint=\"base.vmdk\"\ncreateType=", 1)
			})
		})
		if err := openAndReadAll(b); !errors.Is(err, stream.ErrUnsupported) {
			t.Fatalf("got %v, want ErrUnsupported", err)
		}
	})

	t.Run("truncated", func(t *testing.T) {
		h := parseHeader(sparse)
		for _, tc := range []struct {
			base []byte
			cut  int64
		}{
			{sparse, 0}, {sparse, 3}, {sparse, 100}, {sparse, 511},
			{sparse, 512 + 100},                          // inside the descriptor
			{sparse, int64(h.gdOffset)*sectorSize + 10},  // inside the directory
			{sparse, int64(h.gdOffset+2) * sectorSize},   // inside the tables
			{sparse, int64(h.overHead)*sectorSize + 100}, // inside the first grain
			{sparse, lastGrain(sparse) + 100},            // the last grain
			{streamed, firstGrain(streamed) + 5},         // inside a marker
			{streamed, firstGrain(streamed) + 1000},      // inside compressed data
			{streamed, lastGrain(streamed) + 20},         // the last grain
		} {
			data := tc.base[:tc.cut]
			err := openAndReadAll(data)
			if err == nil || !(strings.Contains(err.Error(), "too small") || strings.Contains(err.Error(), "truncated") ||
				strings.Contains(err.Error(), "beyond the end of the file") || strings.Contains(err.Error(), "not a VMDK")) {
				t.Errorf("cut at %d: random access got %v", tc.cut, err)
			}
			err = decodeAll(data, 1<<30)
			if err == nil || !(strings.Contains(err.Error(), "stream ended") || strings.Contains(err.Error(), "too small") ||
				strings.Contains(err.Error(), "not a VMDK")) {
				t.Errorf("cut at %d: decoder got %v", tc.cut, err)
			}
		}
	})

	t.Run("gd at end", func(t *testing.T) {
		gdEnd := streamLayout(t, streamed, false)
		n := len(gdEnd)
		expectFailure(t, patch(gdEnd, func(b []byte) { copy(b[n-1024:], "XXXX") }), "invalid footer: no KDMV magic", "has no KDMV magic")
		expectFailure(t, patch(gdEnd, func(b []byte) { le.PutUint64(b[n-1024+12:], 9999) }), "", "footer at offset")
		expectFailure(t, gdEnd[:n-512], "invalid footer", "stream ended")
		expectFailure(t, patch(gdEnd, func(b []byte) { le.PutUint32(b[n-512+12:], 7) }), "no end-of-stream marker", "unknown type 7")
		// Grains out of order: readable at random, but not as a stream.
		rev := streamLayout(t, streamed, true)
		if err := openAndReadAll(rev); err != nil {
			t.Fatalf("random access of out-of-order grains: %v", err)
		}
		if err := decodeAll(rev, 1<<30); err == nil || !strings.Contains(err.Error(), "needs a seekable source") {
			t.Fatalf("decoder of out-of-order grains: %v", err)
		}
		// Trailing garbage after the end-of-stream marker is ignored.
		if err := decodeAll(append(bytes.Clone(gdEnd), "garbage"...), 1<<30); err != nil {
			t.Fatalf("trailing garbage: %v", err)
		}
	})
}

// TestEarlyGrains moves the grain directory and tables of a monolithicSparse
// image behind its grains: the decoder must keep the grains it passes until
// the tables arrive, and give up past its bound.
func TestEarlyGrains(t *testing.T) {
	testimg.Require(t, "qemu-img")
	for _, tc := range []struct {
		size    int64
		wantErr string
	}{
		{6 * mib, ""},
		{100 * mib, "cannot be streamed and needs a seekable source"},
	} {
		raw := filepath.Join(t.TempDir(), "noise.raw")
		testimg.Pattern(t, raw, tc.size, 9)
		q := mustRead(t, toVMDK(t, raw, "subformat=monolithicSparse"))
		b := tablesAtEnd(t, q)
		p := writeFile(t, b)
		ref := testimg.RawOf(t, p)
		sameFiles(t, testimg.RawOf(t, toVMDK(t, raw, "subformat=monolithicSparse")), ref)
		checkRandomAccess(t, p, ref, SubformatMonolithicSparse)
		out, _, err := decodeStream(t, p)
		if tc.wantErr == "" {
			if err != nil {
				t.Fatal(err)
			}
			sameFiles(t, ref, out)
		} else if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !errors.Is(err, stream.ErrUnsupported) {
			t.Fatalf("got %v, want %q", err, tc.wantErr)
		}
	}
}

// tablesAtEnd copies the grain directory and tables of a qemu-made sparse
// image to the end of the file and points the header there.
func tablesAtEnd(t testing.TB, q []byte) []byte {
	le := binary.LittleEndian
	h := parseHeader(q)
	grains := (h.capacity + h.grainSectors - 1) / h.grainSectors
	gdEntries := (grains + 511) / 512
	b := bytes.Clone(q)
	gd := make([]byte, gdEntries*4)
	for gdi := range gdEntries {
		old := uint64(le.Uint32(q[h.gdOffset*sectorSize+gdi*4:])) * sectorSize
		le.PutUint32(gd[gdi*4:], uint32(len(b)/sectorSize))
		b = append(b, q[old:old+gtBytes]...)
		// Wipe the old table so that nothing can read it by mistake.
		clear(b[old : old+gtBytes])
	}
	newGD := len(b) / sectorSize
	b = append(b, gd...)
	b = append(b, make([]byte, (sectorSize-len(b)%sectorSize)%sectorSize)...)
	le.PutUint64(b[56:], uint64(newGD))
	le.PutUint32(b[8:], h.flags&^flagRedundantGD)
	le.PutUint64(b[48:], 0)
	return b
}

func TestStandaloneDescriptor(t *testing.T) {
	testimg.Require(t, "qemu-img")
	dir := t.TempDir()
	for _, sub := range []string{"monolithicFlat", "twoGbMaxExtentSparse"} {
		p := filepath.Join(dir, sub+".vmdk")
		testimg.QemuImg(t, "create", "-f", "vmdk", "-o", "subformat="+sub, p, "10M")
		data := mustRead(t, p)
		if !Probe(data) {
			t.Fatalf("%s: Probe = false", sub)
		}
		want := map[string]string{
			"monolithicFlat":       `vmdk: descriptor points at extent file "monolithicFlat-flat.vmdk" outside the image`,
			"twoGbMaxExtentSparse": `vmdk: descriptor points at extent file "twoGbMaxExtentSparse-s001.vmdk" outside the image`,
		}[sub]
		_, err := Open(bytes.NewReader(data), int64(len(data)))
		if err == nil || !strings.HasPrefix(err.Error(), want) || !errors.Is(err, stream.ErrUnsupported) ||
			!strings.Contains(err.Error(), onlySingleFile) {
			t.Errorf("%s: Open: %v", sub, err)
		}
		_, _, err = NewDecoder(hidden{bytes.NewReader(data)})
		if err == nil || !strings.HasPrefix(err.Error(), want) || !errors.Is(err, stream.ErrUnsupported) {
			t.Errorf("%s: NewDecoder: %v", sub, err)
		}
	}
	// One extent of a split image has a sparse header but no descriptor:
	// alone it is not the disk.
	piece := mustRead(t, filepath.Join(dir, "twoGbMaxExtentSparse-s001.vmdk"))
	expectFailure(t, piece, "no embedded descriptor", "no embedded descriptor")
}

func TestProbe(t *testing.T) {
	for _, c := range []struct {
		in   string
		want bool
	}{
		{"KDMV\x01\x00\x00\x00", true},
		{"COWD", true},
		{"# Disk DescriptorFile\nversion=1\n", true},
		{"# comment\n\nversion=1\nCID=1\n", true},
		{"version=2\r\n", true},
		{"version=9\n", false},
		{"QFI\xfb", false},
		{"", false},
		{"KDM", false},
	} {
		if got := Probe([]byte(c.in)); got != c.want {
			t.Errorf("Probe(%q) = %v, want %v", c.in, got, c.want)
		}
	}
}

func TestReadAtBounds(t *testing.T) {
	testimg.Require(t, "qemu-img")
	img, _ := openFile(t, toVMDK(t, patternRaw(t, 1*mib, 6), "subformat=streamOptimized"))
	buf := make([]byte, 100)
	if _, err := img.ReadAt(buf, -1); err == nil {
		t.Error("negative offset accepted")
	}
	if n, err := img.ReadAt(buf, img.Size()); n != 0 || err != io.EOF {
		t.Errorf("ReadAt at end = %d, %v", n, err)
	}
	if n, err := img.ReadAt(buf, img.Size()-10); n != 10 || err != io.EOF {
		t.Errorf("ReadAt across end = %d, %v", n, err)
	}
	if _, err := img.Extent(-1, 10); err == nil {
		t.Error("negative extent accepted")
	}
	if e, err := img.Extent(img.Size(), 0); err != nil || e.Length != 0 {
		t.Errorf("empty extent at end = %+v, %v", e, err)
	}
}

// synthVMDK writes raw (a multiple of 512 bytes) as a compact sparse VMDK
// with grains of grainSectors sectors: header, a one-sector descriptor, the
// grain directory and tables, then the non-zero grains (deflated behind
// markers when compressed). qemu-img never writes such small grains, which
// is why TestSynthetic checks qemu reads these files the same way.
func synthVMDK(raw []byte, grainSectors uint64, compressed bool) []byte {
	le := binary.LittleEndian
	capacity := uint64(len(raw)) / sectorSize
	grainSize := grainSectors * sectorSize
	grains := (capacity + grainSectors - 1) / grainSectors
	gdEntries := (grains + 511) / 512
	gdSectors := (gdEntries*4 + sectorSize - 1) / sectorSize
	const descOffset, gdOffset = 1, 2
	overHead := gdOffset + gdSectors + gdEntries*gtBytes/sectorSize
	out := make([]byte, overHead*sectorSize)
	copy(out, magicSparse)
	flags, version, algo := uint32(flagNewlineDetect), uint32(1), uint16(0)
	createType := SubformatMonolithicSparse
	if compressed {
		flags |= flagCompressed | flagMarkers
		version, algo, createType = 3, compressionDeflate, SubformatStreamOptimized
	}
	le.PutUint32(out[4:], version)
	le.PutUint32(out[8:], flags)
	le.PutUint64(out[12:], capacity)
	le.PutUint64(out[20:], grainSectors)
	le.PutUint64(out[28:], descOffset)
	le.PutUint64(out[36:], 1)
	le.PutUint32(out[44:], gtesPerGT)
	le.PutUint64(out[56:], gdOffset)
	le.PutUint64(out[64:], overHead)
	copy(out[73:], "\n \r\n")
	le.PutUint16(out[77:], algo)
	desc := fmt.Sprintf("# Disk DescriptorFile\nversion=1\nCID=1234abcd\nparentCID=ffffffff\ncreateType=%q\n\n# Extent description\nRW %d SPARSE \"synth.vmdk\"\n",
		createType, capacity)
	copy(out[descOffset*sectorSize:], desc)
	for i := range gdEntries {
		le.PutUint32(out[gdOffset*sectorSize+i*4:], uint32(gdOffset+gdSectors+i*gtBytes/sectorSize))
	}
	for gi := range grains {
		data := raw[gi*grainSize : min((gi+1)*grainSize, uint64(len(raw)))]
		if bytes.Count(data, []byte{0}) == len(data) {
			continue
		}
		gte := (gdOffset+gdSectors)*sectorSize + gi*4 // tables are contiguous
		le.PutUint32(out[gte:], uint32(len(out)/sectorSize))
		if compressed {
			var z bytes.Buffer
			zw := zlib.NewWriter(&z)
			zw.Write(data)
			zw.Close()
			m := make([]byte, markerHeaderSize)
			le.PutUint64(m, gi*grainSectors)
			le.PutUint32(m[8:], uint32(z.Len()))
			out = append(append(out, m...), z.Bytes()...)
		} else {
			out = append(out, data...)
			out = append(out, make([]byte, grainSize-uint64(len(data)))...)
		}
		out = append(out, make([]byte, (sectorSize-len(out)%sectorSize)%sectorSize)...)
	}
	return out
}

func TestSynthetic(t *testing.T) {
	testimg.Require(t, "qemu-img")
	raw := mustRead(t, patternRaw(t, 300*kib+512, 21))
	for _, grainSectors := range []uint64{1, 8, 128, 2048} {
		for _, layout := range []string{"sparse", "stream", "stream-gd-at-end"} {
			t.Run(fmt.Sprintf("grain%d-%s", grainSectors, layout), func(t *testing.T) {
				b := synthVMDK(raw, grainSectors, layout != "sparse")
				if layout == "stream-gd-at-end" {
					b = streamLayout(t, b, false)
				}
				p := writeFile(t, b)
				ref := testimg.RawOf(t, p)
				if !bytes.Equal(mustRead(t, ref), raw) {
					t.Fatal("qemu-img reads the synthetic image differently from its source")
				}
				img, _ := openFile(t, p)
				if img.Info().GrainSize != int64(grainSectors)*sectorSize {
					t.Fatalf("Info = %+v", img.Info())
				}
				compareReads(t, img, mustOpen(t, ref), 0, 3001, 3001)
				checkExtents(t, img, mustOpen(t, ref))
				checkDecoder(t, p, ref, img.Info().Subformat)
			})
		}
	}
}

// TestLargeEmpty opens 1 TiB images made by qemu-img create, whose grain
// tables are all preallocated and empty: metadata memory must stay small
// and the whole disk must show as one unallocated extent.
func TestLargeEmpty(t *testing.T) {
	testimg.Require(t, "qemu-img")
	for _, sub := range []string{SubformatMonolithicSparse, SubformatStreamOptimized} {
		t.Run(sub, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "big.vmdk")
			testimg.QemuImg(t, "create", "-f", "vmdk", "-o", "subformat="+sub, p, "1T")
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			img, _ := openFile(t, p)
			e, err := img.Extent(0, img.Size())
			if err != nil || e.Length != img.Size() || e.Allocated || !e.Zero {
				t.Fatalf("Extent(0, 1 TiB) = %+v, %v", e, err)
			}
			runtime.GC()
			runtime.ReadMemStats(&after)
			if grown := int64(after.HeapAlloc) - int64(before.HeapAlloc); grown > 4<<20 {
				t.Errorf("an open 1 TiB image holds %d bytes of heap", grown)
			}
			runtime.KeepAlive(img)
			if img.Size() != 1<<40 || img.Size() != qemuVirtualSize(t, p) {
				t.Fatalf("size %d", img.Size())
			}
			buf := make([]byte, 1<<20)
			for _, off := range []int64{0, 1 << 39, 1<<40 - 1<<20} {
				if _, err := img.ReadAt(buf, off); err != nil && err != io.EOF {
					t.Fatal(err)
				}
				if !bytes.Equal(buf, make([]byte, len(buf))) {
					t.Fatalf("data at %d in an empty image", off)
				}
			}
			// The decoder reads through the preallocated tables and emits
			// nothing.
			f := mustOpen(t, p)
			dec, _, err := NewDecoder(hidden{f})
			if err != nil {
				t.Fatal(err)
			}
			var chunks int
			if err := dec.Run(sinkFunc(func(stream.Chunk) error { chunks++; return nil })); err != nil || chunks != 0 {
				t.Fatalf("Run: %d chunks, %v", chunks, err)
			}
		})
	}
}
