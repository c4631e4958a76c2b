package qcow2

import (
	"bufio"
	"container/heap"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"

	"vimg.dev/vimg/pkg/diskimage/stream"
)

// DefaultSpillLimit bounds the memory the one-pass decoder may use for bytes
// whose meaning is not known yet (data clusters stored before the L2 table
// that maps them). Images written by qemu-img put every table before the
// data it maps, so they need none of it.
const DefaultSpillLimit = 128 << 20

// StreamOptions tunes NewDecoder.
type StreamOptions struct {
	// SpillLimit is the most bytes held for clusters whose metadata has not
	// arrived yet; 0 means DefaultSpillLimit.
	SpillLimit int64
}

// NewDecoder reads the header from r and returns a decoder that maps clusters
// as the metadata arrives, in one pass, without seeking.
func NewDecoder(r io.Reader, opts StreamOptions) (stream.Decoder, *Header, error) {
	br, ok := r.(*bufio.Reader)
	if !ok || br.Size() < 1<<20 {
		br = bufio.NewReaderSize(r, 1<<20)
	}
	first, err := br.Peek(4096)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, nil, fmt.Errorf("qcow2: reading header: %w", err)
	}
	if len(first) < 72 || string(first[:4]) != Magic {
		return nil, nil, corrupt("not a qcow2 file (no magic)")
	}
	bits := binary.BigEndian.Uint32(first[20:])
	if bits < minClusterBits || bits > maxClusterBits {
		return nil, nil, corrupt("cluster_bits %d out of range %d..%d", bits, minClusterBits, maxClusterBits)
	}
	hdr := make([]byte, 1<<bits)
	n, err := io.ReadFull(br, hdr)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) {
		return nil, nil, fmt.Errorf("qcow2: reading header: %w", err)
	}
	h, err := ParseHeader(hdr[:n], -1)
	if err != nil {
		return nil, nil, err
	}
	if opts.SpillLimit <= 0 {
		opts.SpillLimit = DefaultSpillLimit
	}
	d := &decoder{
		h: h, r: br, pos: int64(n), meta: h.fixedMetadata(),
		spill: newSpill(opts.SpillLimit), l2Left: -1,
	}
	d.tail = hdr[:n]
	return d, h, nil
}

type targetKind uint8

const (
	tL1 targetKind = iota
	tRefcount
	tL2
	tData
)

// target is a range of the file the decoder knows it needs.
type target struct {
	kind  targetKind
	host  int64
	n     int64
	index int64   // L2 table number
	guest int64   // data: guest offset
	mp    mapping // data: how it is stored
}

type targetHeap []target

func (t targetHeap) Len() int           { return len(t) }
func (t targetHeap) Less(i, j int) bool { return t[i].host < t[j].host }
func (t targetHeap) Swap(i, j int)      { t[i], t[j] = t[j], t[i] }
func (t *targetHeap) Push(x any)        { *t = append(*t, x.(target)) }
func (t *targetHeap) Pop() any {
	old := *t
	x := old[len(old)-1]
	*t = old[:len(old)-1]
	return x
}

type decoder struct {
	h    *Header
	r    *bufio.Reader
	pos  int64 // bytes of the file consumed
	meta *metadata

	wanted targetHeap
	// l2Left counts L2 tables not read yet; -1 until the L1 table is read.
	// Once it is 0 every cluster's place is known and unclaimed bytes can be
	// dropped instead of spilled.
	l2Left int
	spill  *spill
	// tail keeps the last bytes consumed: compressed clusters share sectors,
	// so the next one may start before pos.
	tail []byte
	sink stream.Sink
}

func (d *decoder) Size() int64 { return d.h.Size }

func (d *decoder) Run(sink stream.Sink) error {
	d.sink = sink
	heap.Push(&d.wanted, target{kind: tL1, host: d.h.L1Offset, n: d.h.L1Size * 8})
	if d.h.RefcountBytes > 0 {
		heap.Push(&d.wanted, target{kind: tRefcount, host: d.h.RefcountOffset, n: d.h.RefcountBytes})
	}
	for d.wanted.Len() > 0 {
		t := heap.Pop(&d.wanted).(target)
		b, err := d.fetch(t)
		if err != nil {
			return err
		}
		if err := d.handle(t, b); err != nil {
			return err
		}
	}
	// Everything is mapped: the rest (refcount blocks, snapshots, padding)
	// is read and dropped so the source is consumed to its end.
	if _, err := io.Copy(io.Discard, d.r); err != nil {
		return fmt.Errorf("qcow2: reading to the end: %w", err)
	}
	return nil
}

func (d *decoder) describe(t target) string {
	switch t.kind {
	case tL1:
		return fmt.Sprintf("the L1 table at offset %d", t.host)
	case tRefcount:
		return fmt.Sprintf("the refcount table at offset %d", t.host)
	case tL2:
		return fmt.Sprintf("L2 table %d at offset %d", t.index, t.host)
	}
	return fmt.Sprintf("the cluster for guest offset %d at host offset %d", t.guest, t.host)
}

// fetch returns the bytes of t, reading forward (and spilling or dropping
// what lies between) or taking them from what was already read.
func (d *decoder) fetch(t target) ([]byte, error) {
	if t.host < d.pos {
		if b, ok, err := d.fromTail(t); ok || err != nil {
			return b, err
		}
		if b, ok := d.spill.take(t.host, t.n); ok {
			return b, nil
		}
		return nil, corrupt("%s lies in a part of the file already read as something else (pos %d tail %d)", d.describe(t), d.pos, len(d.tail))
	}
	if gap := t.host - d.pos; gap > 0 {
		if err := d.skip(gap); err != nil {
			return nil, fmt.Errorf("%w (while looking for %s)", err, d.describe(t))
		}
	}
	b, n, err := readTarget(d.r, t.n)
	d.pos += int64(n)
	if err != nil {
		// A compressed cluster's last sector may run past the end of file.
		if errors.Is(err, io.ErrUnexpectedEOF) && shortOK(t, t.n-int64(n)) {
			b = append(b[:n], make([]byte, t.n-int64(n))...)
			d.keepTail(b[:n])
			return b, nil
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, corrupt("file is truncated: %s ends past the end of the file (%d bytes)", d.describe(t), d.pos)
		}
		return nil, fmt.Errorf("qcow2: reading %s: %w", d.describe(t), err)
	}
	d.keepTail(b)
	if t.kind == tData && t.mp.kind == kindCompressed && d.l2Left != 0 {
		// Compressed clusters are packed: the last sector of this one may
		// hold the start of one whose L2 table has not arrived yet.
		k := min(t.n, sectorSize)
		if err := d.spill.put(d.pos-k, b[t.n-k:]); err != nil {
			return nil, err
		}
	}
	return b, nil
}

// shortOK reports whether t may end missing bytes past the end of the file:
// only a compressed cluster's last sector, which qemu reads as zeros.
func shortOK(t target, missing int64) bool {
	return t.kind == tData && t.mp.kind == kindCompressed && missing < sectorSize
}

// readTarget reads n bytes into a buffer of n bytes, returning how many it
// read. A large target (an L1 table may be 32 MiB) is read in steps into a
// growing buffer, so that a stream ending early costs the bytes it held
// rather than what its header claimed.
func readTarget(r io.Reader, n int64) ([]byte, int, error) {
	const step = 1 << 20
	if n <= step {
		b := make([]byte, n)
		m, err := io.ReadFull(r, b)
		return b, m, err
	}
	b := make([]byte, 0, step)
	for int64(len(b)) < n {
		if len(b) == cap(b) {
			b = slices.Grow(b, int(min(int64(cap(b)), n-int64(len(b)))))
		}
		m, err := io.ReadFull(r, b[len(b):min(int64(cap(b)), n)])
		b = b[:len(b)+m]
		if err != nil {
			if errors.Is(err, io.EOF) && len(b) > 0 {
				err = io.ErrUnexpectedEOF
			}
			return b, len(b), err
		}
	}
	return b, len(b), nil
}

// skip consumes n bytes whose meaning is not known yet: they are kept while
// some L2 table is still to come (they may be data it maps), else dropped.
func (d *decoder) skip(n int64) error {
	if d.l2Left == 0 {
		m, err := d.r.Discard(int(n))
		d.pos += int64(m)
		if err != nil {
			return corrupt("file is truncated at %d bytes", d.pos)
		}
		return nil
	}
	buf := make([]byte, min(n, 1<<20))
	for n > 0 {
		step := min(n, int64(len(buf)))
		m, err := io.ReadFull(d.r, buf[:step])
		if err != nil {
			d.pos += int64(m)
			return corrupt("file is truncated at %d bytes", d.pos)
		}
		if err := d.spill.put(d.pos, buf[:step]); err != nil {
			return err
		}
		d.pos += step
		d.keepTail(buf[:step])
		n -= step
	}
	return nil
}

func (d *decoder) keepTail(b []byte) {
	keep := 2*d.h.ClusterSize + sectorSize
	if int64(len(b)) >= keep {
		d.tail = append(d.tail[:0], b[int64(len(b))-keep:]...)
		return
	}
	d.tail = append(d.tail, b...)
	if over := int64(len(d.tail)) - keep; over > 0 {
		d.tail = append(d.tail[:0], d.tail[over:]...)
	}
}

// fromTail returns t's bytes if they start in the tail (t.host < d.pos),
// reading on when they run past pos. ok is false when they are not there;
// err reports a file that ends too soon.
func (d *decoder) fromTail(t target) (b []byte, ok bool, err error) {
	host, n := t.host, t.n
	start := d.pos - int64(len(d.tail))
	if host < start {
		return nil, false, nil
	}
	if host+n <= d.pos {
		return append([]byte(nil), d.tail[host-start:host-start+n]...), true, nil
	}
	// A compressed cluster may start in the tail and end past pos.
	b = make([]byte, n)
	k := copy(b, d.tail[host-start:])
	m, err := io.ReadFull(d.r, b[k:])
	d.pos += int64(m)
	if err != nil {
		if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, false, fmt.Errorf("qcow2: reading %s: %w", d.describe(t), err)
		}
		if !shortOK(t, n-int64(k+m)) {
			return nil, false, corrupt("file is truncated: %s ends past the end of the file (%d bytes)", d.describe(t), d.pos)
		}
	}
	d.keepTail(b[k : k+m])
	if d.l2Left != 0 && m > 0 {
		// As in fetch: the last sector may start a cluster not mapped yet.
		keep := min(m, sectorSize)
		if err := d.spill.put(d.pos-int64(keep), b[k+m-keep:k+m]); err != nil {
			return nil, false, err
		}
	}
	return b, true, nil
}

func (d *decoder) handle(t target, b []byte) error {
	h := d.h
	switch t.kind {
	case tRefcount:
		return h.refcountBlocks(b, -1, d.meta)
	case tL1:
		l2s, err := h.l1Entries(b, -1, d.meta)
		if err != nil {
			return err
		}
		d.l2Left = 0
		for i, off := range l2s {
			if off != 0 {
				heap.Push(&d.wanted, target{kind: tL2, host: off, n: h.ClusterSize, index: int64(i)})
				d.l2Left++
			}
		}
		if d.l2Left == 0 {
			d.spill.drop()
		}
		return nil
	case tL2:
		if err := d.mapTable(t.index, b); err != nil {
			return err
		}
		if d.l2Left--; d.l2Left == 0 {
			// Later data targets may still be in the spill: take them
			// first; the heap orders them before anything ahead of pos.
			defer d.spill.dropUnneeded(d.wanted)
		}
		return nil
	}
	return d.emit(t, b)
}

func (d *decoder) mapTable(index int64, b []byte) error {
	return d.h.mapL2(index, b, -1, d.meta, func(guest int64, mp mapping) error {
		switch mp.kind {
		case kindData, kindCompressed, kindSubclusters:
			heap.Push(&d.wanted, target{kind: tData, host: mp.host, n: mp.hostLen, guest: guest, mp: mp})
		}
		return nil
	})
}

func (d *decoder) emit(t target, b []byte) error {
	h := d.h
	switch t.mp.kind {
	case kindData:
		return d.sink.Put(stream.Chunk{Off: t.guest, Len: len(b), Codec: stream.Raw, Payload: b})
	case kindCompressed:
		return d.sink.Put(stream.Chunk{Off: t.guest, Len: int(h.ClusterSize), Codec: h.Compression(), Payload: b})
	case kindSubclusters:
		sub := h.ClusterSize / 32
		for i := 0; i < 32; {
			if t.mp.alloc&(1<<i) == 0 {
				i++
				continue
			}
			j := i
			for j < 32 && t.mp.alloc&(1<<j) != 0 {
				j++
			}
			piece := b[int64(i)*sub : int64(j)*sub]
			if err := d.sink.Put(stream.Chunk{Off: t.guest + int64(i)*sub, Len: len(piece), Codec: stream.Raw, Payload: piece}); err != nil {
				return err
			}
			i = j
		}
	}
	return nil
}
