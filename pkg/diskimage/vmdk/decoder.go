package vmdk

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"sort"

	"vimg.dev/vimg/pkg/diskimage/stream"
)

const (
	// maxEarlyBytes bounds what the decoder keeps of grain data that shows
	// up before the grain table mapping it.
	maxEarlyBytes = 64 << 20
	// maxStreamDescriptorEnd bounds how far into a stream NewDecoder reads
	// to find the embedded descriptor.
	maxStreamDescriptorEnd = 16 << 20
	// gdReadPiece is how much of the grain directory is read at a time, so
	// that a header claiming a big directory costs nothing until the bytes
	// really arrive.
	gdReadPiece = 64 << 10
	// earlyPiece is the unit in which early grain data is kept.
	earlyPiece    = 64 << 10
	streamBufSize = 64 << 10
)

// NewDecoder reads the header (and embedded descriptor) from r, a
// sequential stream positioned at byte 0, and returns a decoder that on Run
// reads the rest once and Puts every allocated grain: compressed grains as
// stream.Zlib chunks whose Len is the grain size clipped at the disk end,
// plain grains as stream.Raw.
//
// monolithicSparse and qemu-made streamOptimized images carry the grain
// directory and tables before the grains, so grains are placed through the
// tables as qemu does. streamOptimized images written as a stream
// (gdOffset = GD_AT_END) are placed by the sector number in each grain
// marker; the tables and footer that follow are checked for consistency
// with the header.
func NewDecoder(r io.Reader) (stream.Decoder, Info, error) {
	pr := &posReader{r: bufio.NewReaderSize(r, streamBufSize)}
	first := make([]byte, sectorSize)
	n, err := io.ReadFull(pr.r, first)
	pr.pos = int64(n)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		return nil, Info{}, fmt.Errorf("vmdk: reading header: %w", err)
	}
	first = first[:n]
	switch {
	case n >= 4 && string(first[:4]) == magicSparse:
	case n >= 4 && string(first[:4]) == magicCOWD:
		return nil, Info{}, unsupportedf("VMDK3 (COWD) sparse extents from ESX 2 / GSX are not supported")
	case isTextDescriptor(first):
		rest, err := io.ReadAll(io.LimitReader(pr.r, maxDescriptorBytes-int64(n)))
		if err != nil {
			return nil, Info{}, fmt.Errorf("vmdk: reading descriptor: %w", err)
		}
		return nil, Info{}, refuseStandalone(parseDescriptor(append(first, rest...)))
	default:
		if n < 4 {
			return nil, Info{}, corruptf("stream of %d bytes is too small to be a VMDK image", n)
		}
		return nil, Info{}, corruptf("not a VMDK image: no KDMV magic and no text descriptor")
	}
	if n < sectorSize {
		return nil, Info{}, corruptf("stream ended at offset %d, inside the 512-byte sparse header", n)
	}
	h := parseHeader(first)
	if h.capacity == 0 && h.descOffset != 0 {
		d, err := pr.descriptor(h)
		if err != nil {
			return nil, Info{}, err
		}
		return nil, Info{}, refuseStandalone(d)
	}
	g, err := h.validate(-1)
	if err != nil {
		return nil, Info{}, err
	}
	var d descriptor
	if h.descOffset != 0 {
		if d, err = pr.descriptor(h); err != nil {
			return nil, Info{}, err
		}
	}
	if err := checkEmbedded(d); err != nil {
		return nil, Info{}, err
	}
	if h.gdOffset == gdAtEnd && !g.compressed {
		return nil, Info{}, unsupportedf("grain directory at the end of an image without grain markers: the image cannot be streamed and needs a seekable source")
	}
	return &decoder{pr: pr, g: g}, g.info(), nil
}

// descriptor reads the embedded descriptor, which comes right after the
// header in every layout seen in practice.
func (pr *posReader) descriptor(h header) (descriptor, error) {
	if h.descSize > maxDescriptorBytes/sectorSize {
		return descriptor{}, corruptf("embedded descriptor of %d sectors is larger than the %d bytes accepted", h.descSize, maxDescriptorBytes)
	}
	off := int64(h.descOffset) * sectorSize
	if h.descOffset > maxStreamDescriptorEnd/sectorSize || off < pr.pos {
		return descriptor{}, corruptf("embedded descriptor at sector %d cannot be read from a stream (it must follow the header within %d bytes)", h.descOffset, maxStreamDescriptorEnd)
	}
	if err := pr.skip(off-pr.pos, "embedded descriptor"); err != nil {
		return descriptor{}, err
	}
	buf, err := pr.payload(int64(h.descSize)*sectorSize, "embedded descriptor")
	if err != nil {
		return descriptor{}, err
	}
	return parseDescriptor(buf), nil
}

// posReader tracks the stream offset.
type posReader struct {
	r   *bufio.Reader
	pos int64
}

func (pr *posReader) full(b []byte, what string) error {
	at := pr.pos
	n, err := io.ReadFull(pr.r, b)
	pr.pos += int64(n)
	if err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return &vmdkError{
				msg:  fmt.Sprintf("vmdk: stream ended at offset %d while reading %s (%d bytes at offset %d): file is truncated", pr.pos, what, len(b), at),
				kind: stream.ErrCorrupt,
			}
		}
		return fmt.Errorf("vmdk: reading %s at offset %d: %w", what, at, err)
	}
	return nil
}

// payload reads n bytes into a new slice that grows as the bytes arrive,
// so that a size claimed by a marker or table costs memory only once the
// stream really holds that much.
func (pr *posReader) payload(n int64, what string) ([]byte, error) {
	const step = 256 << 10
	if n <= step {
		b := make([]byte, n)
		return b, pr.full(b, what)
	}
	b := make([]byte, 0, step)
	for int64(len(b)) < n {
		m := int(min(n-int64(len(b)), step))
		b = slices.Grow(b, m)
		if err := pr.full(b[len(b):len(b)+m], what); err != nil {
			return nil, err
		}
		b = b[:len(b)+m]
	}
	return b, nil
}

func (pr *posReader) skip(n int64, what string) error {
	for n > 0 {
		step := int(min(n, 1<<30))
		m, err := pr.r.Discard(step)
		pr.pos += int64(m)
		n -= int64(m)
		if err != nil {
			if errors.Is(err, io.EOF) {
				return corruptf("stream ended at offset %d before %s at offset %d: file is truncated", pr.pos, what, pr.pos+n)
			}
			return fmt.Errorf("vmdk: skipping to %s: %w", what, err)
		}
	}
	return nil
}

// drain reads the rest of the stream: Run succeeds only on a fully
// consumed input.
func (pr *posReader) drain() error {
	n, err := io.Copy(io.Discard, pr.r)
	pr.pos += n
	if err != nil {
		return fmt.Errorf("vmdk: reading the end of the stream: %w", err)
	}
	return nil
}

type decoder struct {
	pr *posReader
	g  geometry
}

func (d *decoder) Size() int64 { return d.g.size }

func (d *decoder) Run(sink stream.Sink) error {
	if d.g.h.gdOffset == gdAtEnd {
		return d.runMarkers(sink)
	}
	t := &tableWalk{decoder: d, sink: sink}
	return t.run()
}

// runMarkers walks a streamOptimized image written as a stream: grains and
// metadata, each behind a sector-aligned marker, up to the end-of-stream
// marker. Grains are placed by their marker's sector number; they must come
// in increasing order, which is what makes such a file streamable at all.
func (d *decoder) runMarkers(sink stream.Sink) error {
	pr, g := d.pr, &d.g
	if start := int64(g.h.overHead) * sectorSize; start > pr.pos {
		if err := pr.skip(start-pr.pos, "the first grain"); err != nil {
			return err
		}
	}
	// Markers are sector aligned; a descriptor ending mid-sector is padded.
	if r := pr.pos % sectorSize; r != 0 {
		if err := pr.skip(sectorSize-r, "the first grain"); err != nil {
			return err
		}
	}
	le := binary.LittleEndian
	var (
		next       uint64 // lowest grain index the next grain may have
		footerSeen bool
		mh         [markerHeaderSize]byte
		rest       [sectorSize - markerHeaderSize]byte
	)
	for {
		at := pr.pos
		if err := pr.full(mh[:], "a marker (no end-of-stream marker was found)"); err != nil {
			return err
		}
		val := le.Uint64(mh[0:])
		size := int64(le.Uint32(mh[8:]))
		if size != 0 {
			if val%g.h.grainSectors != 0 || val >= g.h.capacity {
				return corruptf("grain marker at offset %d is for sector %d, which is not the start of a grain inside the disk (%d sectors, %d-sector grains)",
					at, val, g.h.capacity, g.h.grainSectors)
			}
			gi := val / g.h.grainSectors
			if gi < next {
				return unsupportedf("grain marker at offset %d is for sector %d, out of order after sector %d: the image cannot be streamed and needs a seekable source",
					at, val, (next-1)*g.h.grainSectors)
			}
			if size > g.maxCompressed {
				return corruptf("compressed grain %d at offset %d claims %d bytes, more than the %d allowed for %d-byte grains", gi, at, size, g.maxCompressed, g.grainSize)
			}
			payload, err := pr.payload(size, fmt.Sprintf("compressed grain %d", gi))
			if err != nil {
				return err
			}
			if pad := (sectorSize - (markerHeaderSize+size)%sectorSize) % sectorSize; pad != 0 {
				if err := pr.skip(pad, "the next marker"); err != nil {
					return err
				}
			}
			next = gi + 1
			c := stream.Chunk{Off: int64(gi) * g.grainSize, Len: int(g.grainSize), Codec: stream.Zlib, Payload: payload}
			if err := sink.Put(c); err != nil {
				return err
			}
			continue
		}
		if err := pr.full(rest[:], "a metadata marker"); err != nil {
			return err
		}
		typ := le.Uint32(rest[0:])
		switch typ {
		case markerEOS:
			if !footerSeen {
				return corruptf("end-of-stream marker at offset %d comes before any footer, but the header puts the grain directory in the footer", at)
			}
			// Whatever follows the end-of-stream marker is not part of the image.
			return pr.drain()
		case markerGT, markerGD:
			// The tables repeat what the markers said; qemu would read
			// through them, and they agree in files VMware writes.
			if val > uint64(maxCapacitySectors) {
				return corruptf("%s marker at offset %d claims %d sectors", markerName(typ), at, val)
			}
			if err := pr.skip(int64(val)*sectorSize, markerName(typ)+" data"); err != nil {
				return err
			}
		case markerFooter:
			if val < 1 || val > maxDescriptorBytes/sectorSize {
				return corruptf("footer marker at offset %d claims %d sectors, expected 1", at, val)
			}
			foot := make([]byte, val*sectorSize)
			if err := pr.full(foot, "footer"); err != nil {
				return err
			}
			if err := d.checkFooter(foot, at+sectorSize); err != nil {
				return err
			}
			footerSeen = true
		default:
			return corruptf("marker at offset %d has unknown type %d", at, typ)
		}
	}
}

// checkFooter makes sure the footer, which qemu reads in place of the
// header, describes the same disk as the header the stream was decoded by.
func (d *decoder) checkFooter(foot []byte, at int64) error {
	if string(foot[:4]) != magicSparse {
		return corruptf("footer at offset %d has no KDMV magic", at)
	}
	f := parseHeader(foot)
	h := d.g.h
	if f.capacity != h.capacity || f.grainSectors != h.grainSectors || f.numGTEs != h.numGTEs ||
		f.compressAlgo != h.compressAlgo || (f.flags^h.flags)&(flagCompressed|flagMarkers|flagZeroGrain) != 0 || f.version != h.version {
		return corruptf("footer at offset %d disagrees with the header (capacity %d vs %d sectors, grain %d vs %d sectors, flags %#x vs %#x)",
			at, f.capacity, h.capacity, f.grainSectors, h.grainSectors, f.flags, h.flags)
	}
	if f.gdOffset == gdAtEnd || f.gdOffset == 0 {
		return corruptf("footer at offset %d has no grain directory offset", at)
	}
	return nil
}

// tableWalk decodes images whose grain directory offset is known from the
// header: it reads the directory, then the tables and grains in file order,
// always skipping forward. Grain data met before the table that maps it is
// kept (up to maxEarlyBytes) until that table arrives.
type tableWalk struct {
	*decoder
	sink stream.Sink

	tables    []uint64 // sector<<32 | directory index, sorted
	nextTable int
	grains    grainHeap // sector<<32 | grain index

	early      []span // stream bytes kept while the mapping is incomplete
	earlyBytes int64

	lastTable     uint64 // sector of the last table read, to share it
	lastTableData []byte
}

type span struct {
	off  int64
	data []byte
}

func (t *tableWalk) complete() bool { return t.tables != nil && t.nextTable == len(t.tables) }

func (t *tableWalk) run() error {
	pr, g := t.pr, &t.g
	if g.gdEntries > 0 {
		gdOff := int64(g.h.gdOffset) * sectorSize
		if g.h.gdOffset == 0 || gdOff < pr.pos {
			return unsupportedf("grain directory at offset %d precedes the end of the header and descriptor (%d): the image cannot be streamed and needs a seekable source", gdOff, pr.pos)
		}
		if err := t.advance(gdOff, "grain directory"); err != nil {
			return err
		}
		if err := t.readDirectory(); err != nil {
			return err
		}
	}
	if len(t.tables) == 0 {
		t.tables = []uint64{} // complete: nothing is mapped
	}
	if t.complete() {
		t.early = nil
	}
	for {
		haveTable := t.nextTable < len(t.tables)
		switch {
		case haveTable && (t.grains.Len() == 0 || t.tables[t.nextTable]>>32 <= t.grains.peek()>>32):
			if err := t.readTable(); err != nil {
				return err
			}
		case t.grains.Len() > 0:
			if err := t.readGrain(); err != nil {
				return err
			}
		default:
			return pr.drain()
		}
	}
}

// readDirectory reads the grain directory piece by piece, keeping only the
// allocated entries, sorted by file offset.
func (t *tableWalk) readDirectory() error {
	g := &t.g
	buf := make([]byte, min(gdReadPiece, g.gdEntries*4))
	var tables []uint64
	for i := uint64(0); i < g.gdEntries; {
		n := min(uint64(len(buf)), (g.gdEntries-i)*4)
		if err := t.pr.full(buf[:n], "grain directory"); err != nil {
			return err
		}
		for j := uint64(0); j < n; j += 4 {
			if s := binary.LittleEndian.Uint32(buf[j:]); s != 0 {
				tables = append(tables, uint64(s)<<32|i)
			}
			i++
		}
	}
	slices.Sort(tables)
	t.tables = tables
	return nil
}

// advance moves the stream to off, keeping the bytes in between if they may
// hold grains whose table has not been read yet.
func (t *tableWalk) advance(off int64, what string) error {
	pr := t.pr
	if t.complete() {
		return pr.skip(off-pr.pos, what)
	}
	// Grains never start before the metadata area ends.
	if grainStart := int64(t.g.minGrainSector) * sectorSize; pr.pos < grainStart {
		if err := pr.skip(min(off, grainStart)-pr.pos, what); err != nil {
			return err
		}
	}
	for pr.pos < off {
		n := min(off-pr.pos, earlyPiece)
		if t.earlyBytes+n > maxEarlyBytes {
			return unsupportedf("more than %d MiB of grain data at offset %d precede the grain tables that map them: the image cannot be streamed and needs a seekable source",
				maxEarlyBytes>>20, pr.pos)
		}
		buf := make([]byte, n)
		at := pr.pos
		if err := pr.full(buf, what); err != nil {
			return err
		}
		t.early = append(t.early, span{off: at, data: buf})
		t.earlyBytes += n
	}
	return nil
}

// kept returns n kept bytes at off, or nil if they were not kept.
func (t *tableWalk) kept(off, n int64) []byte {
	i := sort.Search(len(t.early), func(i int) bool { return t.early[i].off+int64(len(t.early[i].data)) > off })
	var out []byte
	for ; n > 0 && i < len(t.early); i++ {
		s := t.early[i]
		if s.off > off {
			return nil // a gap: those bytes were read as metadata
		}
		b := s.data[off-s.off:]
		b = b[:min(int64(len(b)), n)]
		out = append(out, b...)
		off += int64(len(b))
		n -= int64(len(b))
	}
	if n > 0 {
		return nil
	}
	return out
}

func (t *tableWalk) readTable() error {
	pr, g := t.pr, &t.g
	entry := t.tables[t.nextTable]
	t.nextTable++
	sector, gdi := entry>>32, entry&0xffffffff
	off := int64(sector) * sectorSize
	var data []byte
	switch {
	case t.lastTableData != nil && sector == t.lastTable:
		data = t.lastTableData // two directory entries share a table
	case off < pr.pos:
		// A table written before the directory: it was kept if it lies
		// where grains may be.
		if data = t.kept(off, gtBytes); data == nil {
			return unsupportedf("grain table %d at offset %d lies before data already read (offset %d): the image cannot be streamed and needs a seekable source", gdi, off, pr.pos)
		}
		t.lastTable, t.lastTableData = sector, data
	default:
		if err := t.advance(off, fmt.Sprintf("grain table %d", gdi)); err != nil {
			return err
		}
		data = make([]byte, gtBytes)
		if err := pr.full(data, fmt.Sprintf("grain table %d", gdi)); err != nil {
			return err
		}
		t.lastTable, t.lastTableData = sector, data
	}
	for k := uint64(0); k < gtesPerGT; k++ {
		gi := gdi*gtesPerGT + k
		if gi >= g.grains {
			break // entries past the disk end are never read by qemu
		}
		gte := binary.LittleEndian.Uint32(data[4*k:])
		if gte == 0 || (gte == zeroGrainGTE && g.zeroGrain) {
			continue // reads as zeros
		}
		s := uint64(gte)
		if err := g.checkGrainSector(gi, s); err != nil {
			return err
		}
		if int64(s)*sectorSize < pr.pos {
			if err := t.emitKept(gi, s); err != nil {
				return err
			}
			continue
		}
		t.grains.push(s<<32 | gi)
	}
	if t.complete() {
		t.early, t.earlyBytes = nil, 0
	}
	return nil
}

// emitKept emits a grain that was passed before its table was read.
func (t *tableWalk) emitKept(gi, sector uint64) error {
	g := &t.g
	off := int64(sector) * sectorSize
	notKept := func() error {
		return unsupportedf("grain %d at offset %d was passed in the stream before the grain table that maps it and overlaps metadata: the image cannot be streamed and needs a seekable source", gi, off)
	}
	if !g.compressed {
		n := g.clip(gi)
		b := t.kept(off, n)
		if b == nil {
			return notKept()
		}
		return t.sink.Put(stream.Chunk{Off: int64(gi) * g.grainSize, Len: int(n), Codec: stream.Raw, Payload: b})
	}
	m := t.kept(off, markerHeaderSize)
	if m == nil {
		return notKept()
	}
	lba := binary.LittleEndian.Uint64(m[0:])
	size := int64(binary.LittleEndian.Uint32(m[8:]))
	if err := g.checkMarker(gi, off, lba, size); err != nil {
		return err
	}
	b := t.kept(off+markerHeaderSize, size)
	if b == nil {
		return notKept()
	}
	return t.sink.Put(stream.Chunk{Off: int64(gi) * g.grainSize, Len: int(g.grainSize), Codec: stream.Zlib, Payload: b})
}

func (t *tableWalk) readGrain() error {
	pr, g := t.pr, &t.g
	entry := t.grains.pop()
	sector, gi := entry>>32, entry&0xffffffff
	off := int64(sector) * sectorSize
	what := fmt.Sprintf("grain %d", gi)
	if off < pr.pos {
		return corruptf("grain %d at offset %d overlaps a grain or grain table already read (stream at offset %d)", gi, off, pr.pos)
	}
	if err := t.advance(off, what); err != nil {
		return err
	}
	var c stream.Chunk
	if !g.compressed {
		n := g.clip(gi)
		b, err := pr.payload(n, what)
		if err != nil {
			return err
		}
		c = stream.Chunk{Off: int64(gi) * g.grainSize, Len: int(n), Codec: stream.Raw, Payload: b}
	} else {
		var m [markerHeaderSize]byte
		if err := pr.full(m[:], what+" marker"); err != nil {
			return err
		}
		lba := binary.LittleEndian.Uint64(m[0:])
		size := int64(binary.LittleEndian.Uint32(m[8:]))
		if err := g.checkMarker(gi, off, lba, size); err != nil {
			return err
		}
		b, err := pr.payload(size, "compressed "+what)
		if err != nil {
			return err
		}
		c = stream.Chunk{Off: int64(gi) * g.grainSize, Len: int(g.grainSize), Codec: stream.Zlib, Payload: b}
	}
	// Other table entries pointing at the same grain get their own copy
	// (the sink owns each payload).
	for t.grains.Len() > 0 && t.grains.peek()>>32 == sector {
		gi2 := t.grains.pop() & 0xffffffff
		if g.compressed || g.clip(gi2) != int64(len(c.Payload)) {
			return corruptf("grains %d and %d share file offset %d", gi, gi2, off)
		}
		c2 := c
		c2.Off = int64(gi2) * g.grainSize
		c2.Payload = slices.Clone(c.Payload)
		if err := t.sink.Put(c2); err != nil {
			return err
		}
	}
	return t.sink.Put(c)
}

// grainHeap is a min-heap of packed sector<<32|index values: 8 bytes per
// allocated grain, the least the walk can remember.
type grainHeap []uint64

func (h grainHeap) Len() int       { return len(h) }
func (h grainHeap) peek() uint64   { return h[0] }
func (h *grainHeap) push(v uint64) { *h = append(*h, v); h.up(len(*h) - 1) }

func (h *grainHeap) pop() uint64 {
	old := *h
	v := old[0]
	last := len(old) - 1
	old[0] = old[last]
	*h = old[:last]
	h.down(0)
	return v
}

func (h grainHeap) up(i int) {
	for i > 0 {
		p := (i - 1) / 2
		if h[p] <= h[i] {
			return
		}
		h[p], h[i] = h[i], h[p]
		i = p
	}
}

func (h grainHeap) down(i int) {
	n := len(h)
	for {
		l := 2*i + 1
		if l >= n {
			return
		}
		m := l
		if r := l + 1; r < n && h[r] < h[l] {
			m = r
		}
		if h[i] <= h[m] {
			return
		}
		h[i], h[m] = h[m], h[i]
		i = m
	}
}
