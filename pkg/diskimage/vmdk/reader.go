package vmdk

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/lima-vm/go-qcow2reader/image"

	"vimg.dev/vimg/pkg/diskimage/codec"
	"vimg.dev/vimg/pkg/diskimage/stream"
)

// Cache sizes. Grain tables are 2 KiB each; 64 of them map 2 GiB of disk
// with 64 KiB grains, plenty for sequential and moderately parallel reads.
// Decompressed grains are kept so that reads smaller than a grain do not
// inflate the same grain again.
const (
	tableCacheSize = 64
	grainCacheSize = 16
)

// Image is an opened VMDK file. ReadAt and Extent are safe for concurrent
// use.
type Image struct {
	ra       io.ReaderAt
	fileSize int64
	g        geometry
	gd       []uint32 // grain directory: sector of each grain table, 0 = none

	tables *lru[[]uint32] // grain tables by directory index
	grains *lru[[]byte]   // decompressed grains by grain index
	bufs   sync.Pool      // *[]byte for compressed payloads
}

var _ image.Image = (*Image)(nil)

// Open opens a VMDK for random access; size is the file's size. The caller
// keeps ownership of ra: Close does not close it.
func Open(ra io.ReaderAt, size int64) (*Image, error) {
	if size < 4 {
		return nil, corruptf("file of %d bytes is too small to be a VMDK image", size)
	}
	first := make([]byte, min(size, sectorSize))
	if err := readFullAt(ra, first, 0); err != nil {
		return nil, fmt.Errorf("vmdk: reading header: %w", err)
	}
	switch string(first[:4]) {
	case magicSparse:
	case magicCOWD:
		return nil, unsupportedf("VMDK3 (COWD) sparse extents from ESX 2 / GSX are not supported")
	default:
		if !isTextDescriptor(first) {
			return nil, corruptf("not a VMDK image: no KDMV magic and no text descriptor")
		}
		text := make([]byte, min(size, maxDescriptorBytes))
		if err := readFullAt(ra, text, 0); err != nil {
			return nil, fmt.Errorf("vmdk: reading descriptor: %w", err)
		}
		return nil, refuseStandalone(parseDescriptor(text))
	}
	if size < sectorSize {
		return nil, corruptf("file of %d bytes is too small for the 512-byte sparse header", size)
	}
	h := parseHeader(first)

	// A sparse header with no capacity but a descriptor is only a wrapper
	// for a descriptor naming other files (qemu opens it as such).
	if h.capacity == 0 && h.descOffset != 0 {
		d, err := readDescriptorAt(ra, size, h)
		if err != nil {
			return nil, err
		}
		return nil, refuseStandalone(d)
	}
	if h.gdOffset == gdAtEnd {
		// The footer takes precedence over the header: one sector of footer
		// marker, the footer itself, and the end-of-stream marker end the
		// file (qemu reads it from the sector-aligned size).
		f, err := readFooter(ra, size)
		if err != nil {
			return nil, err
		}
		h = f
	}
	g, err := h.validate(size)
	if err != nil {
		return nil, err
	}
	var d descriptor
	if h.descOffset != 0 {
		if d, err = readDescriptorAt(ra, size, h); err != nil {
			return nil, err
		}
	}
	if err := checkEmbedded(d); err != nil {
		return nil, err
	}

	img := &Image{
		ra:       ra,
		fileSize: size,
		g:        g,
		tables:   newLRU[[]uint32](tableCacheSize),
		grains:   newLRU[[]byte](grainCacheSize),
	}
	// The directory is inside the file (checked by validate), so its size
	// is bounded by the file's, and by maxGDEntries.
	raw := make([]byte, g.gdEntries*4)
	if err := readFullAt(ra, raw, int64(h.gdOffset)*sectorSize); err != nil {
		return nil, fmt.Errorf("vmdk: reading grain directory: %w", err)
	}
	img.gd = make([]uint32, g.gdEntries)
	for i := range img.gd {
		s := binary.LittleEndian.Uint32(raw[4*i:])
		if s != 0 && (int64(s)*sectorSize+gtBytes > size) {
			return nil, corruptf("grain table %d at offset %d lies beyond the end of the file (size %d)", i, int64(s)*sectorSize, size)
		}
		img.gd[i] = s
	}
	return img, nil
}

func readDescriptorAt(ra io.ReaderAt, size int64, h header) (descriptor, error) {
	if h.descSize > maxDescriptorBytes/sectorSize {
		return descriptor{}, corruptf("embedded descriptor of %d sectors is larger than the %d bytes accepted", h.descSize, maxDescriptorBytes)
	}
	off := h.descOffset * sectorSize
	n := h.descSize * sectorSize
	if h.descOffset > uint64(size)/sectorSize || off+n > uint64(size) {
		return descriptor{}, corruptf("embedded descriptor at offset %d (%d bytes) lies beyond the end of the file (size %d)", off, n, size)
	}
	buf := make([]byte, n)
	if err := readFullAt(ra, buf, int64(off)); err != nil {
		return descriptor{}, fmt.Errorf("vmdk: reading embedded descriptor: %w", err)
	}
	return parseDescriptor(buf), nil
}

func readFooter(ra io.ReaderAt, size int64) (header, error) {
	end := size / sectorSize * sectorSize
	if end < 4*sectorSize {
		return header{}, corruptf("the header puts the grain directory at the end, but the file of %d bytes is too small to hold a footer", size)
	}
	var buf [3 * sectorSize]byte
	if err := readFullAt(ra, buf[:], end-3*sectorSize); err != nil {
		return header{}, fmt.Errorf("vmdk: reading footer: %w", err)
	}
	le := binary.LittleEndian
	fm, foot, eos := buf[:sectorSize], buf[sectorSize:2*sectorSize], buf[2*sectorSize:]
	switch {
	case le.Uint32(fm[8:]) != 0 || le.Uint32(fm[12:]) != markerFooter:
		return header{}, corruptf("invalid footer: no footer marker at offset %d (the header puts the grain directory at the end)", end-3*sectorSize)
	case string(foot[:4]) != magicSparse:
		return header{}, corruptf("invalid footer: no KDMV magic at offset %d", end-2*sectorSize)
	case le.Uint64(eos[0:]) != 0 || le.Uint32(eos[8:]) != 0 || le.Uint32(eos[12:]) != markerEOS:
		return header{}, corruptf("invalid footer: no end-of-stream marker at offset %d", end-sectorSize)
	}
	return parseHeader(foot), nil
}

// readFullAt reads len(p) bytes at off, treating a short read as corruption
// (offsets were checked against the size the caller gave).
func readFullAt(ra io.ReaderAt, p []byte, off int64) error {
	n, err := ra.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		return corruptf("file ends at offset %d, reading %d bytes at offset %d", off+int64(n), len(p), off)
	}
	return err
}

// Info describes the image.
func (img *Image) Info() Info { return img.g.info() }

// Type implements image.Image.
func (img *Image) Type() image.Type { return image.Type(Type) }

// Size is the virtual disk size in bytes.
func (img *Image) Size() int64 { return img.g.size }

// Readable implements image.Image: everything Open accepted is readable.
func (img *Image) Readable() error { return nil }

// Close drops the caches. It does not close the ReaderAt given to Open.
func (img *Image) Close() error {
	img.tables.reset()
	img.grains.reset()
	return nil
}

type grainKind uint8

const (
	grainUnallocated grainKind = iota
	grainZero
	grainData
)

// table returns grain table gdi (whose directory entry is non-zero).
func (img *Image) table(gdi uint64) ([]uint32, error) {
	if t, ok := img.tables.get(gdi); ok {
		return t, nil
	}
	var raw [gtBytes]byte
	off := int64(img.gd[gdi]) * sectorSize
	if err := readFullAt(img.ra, raw[:], off); err != nil {
		return nil, fmt.Errorf("vmdk: reading grain table %d at offset %d: %w", gdi, off, err)
	}
	t := make([]uint32, gtesPerGT)
	for i := range t {
		t[i] = binary.LittleEndian.Uint32(raw[4*i:])
	}
	img.tables.put(gdi, t)
	return t, nil
}

// classify turns a grain table entry into what it means, checking that a
// data grain's offset is plausible.
func (img *Image) classify(gi uint64, gte uint32) (grainKind, error) {
	switch {
	case gte == 0:
		return grainUnallocated, nil
	case gte == zeroGrainGTE && img.g.zeroGrain:
		return grainZero, nil
	}
	s := uint64(gte)
	if err := img.g.checkGrainSector(gi, s); err != nil {
		return 0, err
	}
	need := img.g.clip(gi)
	if img.g.compressed {
		need = markerHeaderSize
	}
	if int64(s)*sectorSize+need > img.fileSize {
		return 0, corruptf("grain %d (disk offset %d) at file offset %d lies beyond the end of the file (size %d)",
			gi, int64(gi)*img.g.grainSize, int64(s)*sectorSize, img.fileSize)
	}
	return grainData, nil
}

// lookup returns the kind and file sector of grain gi.
func (img *Image) lookup(gi uint64) (grainKind, uint64, error) {
	gdi := gi / gtesPerGT
	if img.gd[gdi] == 0 {
		return grainUnallocated, 0, nil
	}
	t, err := img.table(gdi)
	if err != nil {
		return 0, 0, err
	}
	gte := t[gi%gtesPerGT]
	k, err := img.classify(gi, gte)
	return k, uint64(gte), err
}

// ReadAt implements io.ReaderAt over the virtual disk.
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("vmdk: read at negative offset %d", off)
	}
	if off >= img.g.size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	want := p
	var eof error
	if int64(len(p)) > img.g.size-off {
		want, eof = p[:img.g.size-off], io.EOF
	}
	gs := img.g.grainSize
	n := 0
	for n < len(want) {
		pos := off + int64(n)
		gi := uint64(pos / gs)
		in := pos % gs
		chunk := int(min(gs-in, int64(len(want)-n)))
		kind, sector, err := img.lookup(gi)
		if err != nil {
			return n, err
		}
		switch {
		case kind != grainData:
			clear(want[n : n+chunk])
		case img.g.compressed:
			data, err := img.grain(gi, sector)
			if err != nil {
				return n, err
			}
			copy(want[n:n+chunk], data[in:])
		default:
			// Grains allocated one after another in the file are read with
			// one call: qemu-img writes them in disk order.
			run := chunk
			next := sector + img.g.h.grainSectors
			for n+run < len(want) {
				k2, s2, err := img.lookup(gi + uint64(run+int(in))/uint64(gs))
				if err != nil || k2 != grainData || s2 != next {
					break
				}
				run += int(min(gs, int64(len(want)-n-run)))
				next += img.g.h.grainSectors
			}
			if err := readFullAt(img.ra, want[n:n+run], int64(sector)*sectorSize+in); err != nil {
				return n, fmt.Errorf("vmdk: reading grain %d at offset %d: %w", gi, int64(sector)*sectorSize, err)
			}
			chunk = run
		}
		n += chunk
	}
	return n, eof
}

// grain returns the decompressed content of compressed grain gi, whose
// marker is at sector. The result is shared: callers must not modify it.
func (img *Image) grain(gi, sector uint64) ([]byte, error) {
	if b, ok := img.grains.get(gi); ok {
		return b, nil
	}
	off := int64(sector) * sectorSize
	var m [markerHeaderSize]byte
	if err := readFullAt(img.ra, m[:], off); err != nil {
		return nil, fmt.Errorf("vmdk: reading marker of grain %d at offset %d: %w", gi, off, err)
	}
	lba := binary.LittleEndian.Uint64(m[0:])
	size := int64(binary.LittleEndian.Uint32(m[8:]))
	if err := img.g.checkMarker(gi, off, lba, size); err != nil {
		return nil, err
	}
	if off+markerHeaderSize+size > img.fileSize {
		return nil, corruptf("compressed grain %d at offset %d (%d bytes) extends beyond the end of the file (size %d)", gi, off, size, img.fileSize)
	}
	bp, _ := img.bufs.Get().(*[]byte)
	if bp == nil || int64(cap(*bp)) < size {
		b := make([]byte, img.g.maxCompressed)
		bp = &b
	}
	defer img.bufs.Put(bp)
	src := (*bp)[:size]
	if err := readFullAt(img.ra, src, off+markerHeaderSize); err != nil {
		return nil, fmt.Errorf("vmdk: reading compressed grain %d at offset %d: %w", gi, off, err)
	}
	dst := make([]byte, img.g.grainSize)
	got, err := codec.Decode(stream.Zlib, dst, src)
	if err != nil {
		return nil, fmt.Errorf("vmdk: decompressing grain %d (disk offset %d) at file offset %d: %w", gi, int64(gi)*img.g.grainSize, off, err)
	}
	if want := img.g.clip(gi); int64(got) < want {
		// qemu fails such a read too rather than inventing zeros.
		return nil, corruptf("compressed grain %d at offset %d decompresses to %d bytes, expected %d", gi, off, got, want)
	}
	img.grains.put(gi, dst)
	return dst, nil
}

// checkMarker validates a grain marker met where grain gi is expected.
func (g *geometry) checkMarker(gi uint64, off int64, lba uint64, size int64) error {
	if size == 0 {
		return corruptf("grain %d points at offset %d, which holds a metadata marker, not a compressed grain", gi, off)
	}
	if size > g.maxCompressed {
		return corruptf("compressed grain %d at offset %d claims %d bytes, more than the %d allowed for %d-byte grains", gi, off, size, g.maxCompressed, g.grainSize)
	}
	if want := gi * g.h.grainSectors; lba != want {
		return corruptf("grain marker at offset %d is for sector %d, but the grain table maps it at sector %d", off, lba, want)
	}
	return nil
}

// Extent returns the run of same-status grains that starts at start,
// clipped to [start, start+length). Unallocated grains read as zeros;
// zeroed-grain entries are allocated zeros; data grains are allocated and,
// in streamOptimized images, compressed.
func (img *Image) Extent(start, length int64) (image.Extent, error) {
	if start < 0 || length < 0 || start > img.g.size || length > img.g.size-start {
		return image.Extent{}, fmt.Errorf("vmdk: extent [%d, +%d) is out of bounds (disk size %d)", start, length, img.g.size)
	}
	cur := image.Extent{Start: start}
	end := start + length
	gs := img.g.grainSize
	first := true
	for off := start; off < end; {
		gi := uint64(off / gs)
		st, runEnd, err := img.status(gi)
		if err != nil {
			return image.Extent{}, err
		}
		stop := min(int64(runEnd)*gs, end)
		if first {
			cur.Allocated, cur.Zero, cur.Compressed = st.Allocated, st.Zero, st.Compressed
			first = false
		} else if st.Allocated != cur.Allocated || st.Zero != cur.Zero || st.Compressed != cur.Compressed {
			break
		}
		cur.Length += stop - off
		off = stop
	}
	return cur, nil
}

// status returns the status of grain gi and the index of the first grain
// after it that may differ.
func (img *Image) status(gi uint64) (image.Extent, uint64, error) {
	gdi := gi / gtesPerGT
	tableEnd := min((gdi+1)*gtesPerGT, img.g.grains)
	if img.gd[gdi] == 0 {
		return image.Extent{Zero: true}, tableEnd, nil
	}
	t, err := img.table(gdi)
	if err != nil {
		return image.Extent{}, 0, err
	}
	kind := func(i uint64) (grainKind, error) { return img.classify(i, t[i%gtesPerGT]) }
	k, err := kind(gi)
	if err != nil {
		return image.Extent{}, 0, err
	}
	end := gi + 1
	for ; end < tableEnd; end++ {
		k2, err := kind(end)
		if err != nil || k2 != k {
			break // an error is reported when that grain is asked for
		}
	}
	switch k {
	case grainUnallocated:
		return image.Extent{Zero: true}, end, nil
	case grainZero:
		return image.Extent{Allocated: true, Zero: true}, end, nil
	}
	return image.Extent{Allocated: true, Compressed: img.g.compressed}, end, nil
}

// lru is a small fixed-size cache with least-recently-used eviction. Values
// are immutable once put, so they can be handed out without copying.
type lru[V any] struct {
	mu      sync.Mutex
	size    int
	tick    uint64
	entries map[uint64]*lruEntry[V]
}

type lruEntry[V any] struct {
	v    V
	used uint64
}

func newLRU[V any](size int) *lru[V] {
	return &lru[V]{size: size, entries: make(map[uint64]*lruEntry[V], size)}
}

func (c *lru[V]) get(k uint64) (V, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.entries[k]
	if !ok {
		var zero V
		return zero, false
	}
	c.tick++
	e.used = c.tick
	return e.v, true
}

func (c *lru[V]) put(k uint64, v V) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.tick++
	if e, ok := c.entries[k]; ok {
		e.v, e.used = v, c.tick
		return
	}
	if len(c.entries) >= c.size {
		var oldK uint64
		oldT := ^uint64(0)
		for k2, e := range c.entries {
			if e.used < oldT {
				oldK, oldT = k2, e.used
			}
		}
		delete(c.entries, oldK)
	}
	c.entries[k] = &lruEntry[V]{v: v, used: c.tick}
}

func (c *lru[V]) reset() {
	c.mu.Lock()
	defer c.mu.Unlock()
	clear(c.entries)
}
