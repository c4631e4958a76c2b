package qcow2

import (
	"encoding/binary"
	"fmt"
	"slices"
	"sort"
)

// Bits of L1 and L2 entries (qcow2 spec, "Cluster mapping").
const (
	l1OffsetMask   = 0x00fffffffffffe00
	l2OffsetMask   = 0x00fffffffffffe00
	l2Compressed   = 1 << 62
	l2ZeroFlag     = 1 << 0
	refOffsetMask  = 0xfffffffffffffe00
	sectorSize     = 512
	maxRefcountBlk = 1 << 20 // refcount blocks tracked as metadata; more is not a real image
)

// entryKind says how one guest cluster (or, with extended L2, its
// subclusters) is stored.
type entryKind uint8

const (
	kindUnallocated entryKind = iota // reads as zeros (no backing file)
	kindZero                         // explicitly zero
	kindData                         // a host cluster, uncompressed
	kindCompressed                   // compressed bytes at an unaligned host offset
	kindSubclusters                  // extended L2: per-subcluster status
)

// mapping is one decoded L2 entry.
type mapping struct {
	kind     entryKind
	host     int64  // host offset of the data (cluster aligned unless compressed)
	hostLen  int64  // bytes of host data (cluster size, or compressed size)
	alloc    uint32 // extended L2: subclusters stored in the host cluster
	zeroBits uint32 // extended L2: subclusters that read as zeros
}

// decodeL2 interprets an L2 entry. ext is the second word of an extended
// entry (0 otherwise).
func (h *Header) decodeL2(e, ext uint64) (mapping, error) {
	if e&l2Compressed != 0 {
		x := h.ClusterBits - 8
		desc := e &^ (3 << 62)
		host := int64(desc & (1<<(62-x) - 1))
		sectors := int64((desc>>(62-x))&(1<<x-1)) + 1
		n := sectors*sectorSize - host%sectorSize
		if host == 0 {
			return mapping{}, corrupt("compressed cluster at host offset 0")
		}
		return mapping{kind: kindCompressed, host: host, hostLen: n}, nil
	}
	host := int64(e & l2OffsetMask)
	if h.ExtendedL2 {
		if e&l2ZeroFlag != 0 {
			// qemu ignores the bit here and reads the subclusters; the
			// library would report the cluster as a zero extent, which
			// callers skip.
			return mapping{}, corrupt("L2 entry %#x has the zero flag, which extended L2 entries do not use", e)
		}
		alloc, zero := uint32(ext), uint32(ext>>32)
		if alloc&zero != 0 {
			return mapping{}, corrupt("extended L2 entry marks subclusters both allocated and zero (%#x)", ext)
		}
		if alloc != 0 && host == 0 {
			return mapping{}, corrupt("extended L2 entry has allocated subclusters but no host cluster")
		}
		if alloc == 0 {
			if zero == 0 {
				return mapping{kind: kindUnallocated}, nil
			}
			if zero == 0xffffffff {
				return mapping{kind: kindZero}, nil
			}
		}
		if host%h.ClusterSize != 0 {
			return mapping{}, corrupt("data cluster at host offset %d is not cluster aligned", host)
		}
		// Only the allocated subclusters need to exist in the file: the
		// last cluster of a disk is often cut short.
		top := int64(32)
		for top > 0 && alloc&(1<<(top-1)) == 0 {
			top--
		}
		return mapping{kind: kindSubclusters, host: host, hostLen: top * (h.ClusterSize / 32), alloc: alloc, zeroBits: zero}, nil
	}
	if e&l2ZeroFlag != 0 {
		if h.Version < 3 {
			// qemu refuses to read such a cluster (and marks the image
			// corrupt); the library would read zeros, a data reader the
			// host cluster.
			return mapping{}, corrupt("L2 entry %#x has the zero flag, which version 2 images do not have", e)
		}
		return mapping{kind: kindZero}, nil
	}
	if host == 0 {
		if e&(l2Compressed-1) != 0 {
			// qemu ignores the reserved bits and reads zeros; the library
			// takes the entry for a cluster at offset 0 and fails to read it.
			return mapping{}, corrupt("L2 entry %#x sets reserved bits but no host offset", e)
		}
		return mapping{kind: kindUnallocated}, nil
	}
	if host%h.ClusterSize != 0 {
		return mapping{}, corrupt("data cluster at host offset %d is not cluster aligned", host)
	}
	return mapping{kind: kindData, host: host, hostLen: h.ClusterSize}, nil
}

// mapL2 decodes and checks every entry of L2 table number index (held in
// b), in guest order, and hands each mapping to visit. fileSize is -1 while
// the end of the file is not known yet (one pass over a stream). Random
// access (Open) and the one-pass decoder walk the tables through here, so
// both refuse the same images with the same messages.
func (h *Header) mapL2(index int64, b []byte, fileSize int64, m *metadata, visit func(guest int64, mp mapping) error) error {
	per, es := h.L2Entries(), h.L2EntrySize()
	for j := int64(0); j < per; j++ {
		guest := (index*per + j) * h.ClusterSize
		if guest >= h.Size {
			break
		}
		var ext uint64
		if h.ExtendedL2 {
			ext = binary.BigEndian.Uint64(b[j*es+8:])
		}
		mp, err := h.decodeL2(binary.BigEndian.Uint64(b[j*es:]), ext)
		if err != nil {
			return fmt.Errorf("%w (guest offset %d)", err, guest)
		}
		if err := h.checkData(mp, guest, fileSize, m); err != nil {
			return err
		}
		if err := visit(guest, mp); err != nil {
			return err
		}
	}
	return nil
}

// span is a half-open byte range of the file.
type span struct{ start, end int64 }

// metadata is the set of file ranges that hold qcow2 structures; a data
// cluster that points into one would hand the guest our metadata (or let a
// crafted image alias its own tables), so such images are refused.
type metadata struct {
	spans  []span
	sorted bool
}

func (m *metadata) add(start, n int64) {
	m.spans = append(m.spans, span{start, start + n})
	m.sorted = false
}

func (m *metadata) sort() {
	if m.sorted {
		return
	}
	sort.Slice(m.spans, func(i, j int) bool { return m.spans[i].start < m.spans[j].start })
	// Coalesce, so that ends grow with starts and overlaps can binary search.
	out := m.spans[:0]
	for _, s := range m.spans {
		if n := len(out); n > 0 && s.start <= out[n-1].end {
			out[n-1].end = max(out[n-1].end, s.end)
			continue
		}
		out = append(out, s)
	}
	m.spans = out
	m.sorted = true
}

// overlaps reports whether [start, start+n) touches a metadata range.
func (m *metadata) overlaps(start, n int64) (span, bool) {
	m.sort()
	end := start + n
	// First span whose end is past start.
	i := sort.Search(len(m.spans), func(i int) bool { return m.spans[i].end > start })
	if i < len(m.spans) && m.spans[i].start < end {
		return m.spans[i], true
	}
	return span{}, false
}

// fixedMetadata is what the header alone tells: the header cluster, the L1
// table and the refcount table.
func (h *Header) fixedMetadata() *metadata {
	m := &metadata{}
	m.add(0, h.ClusterSize)
	if h.L1Size > 0 {
		m.add(h.L1Offset, roundUp(h.L1Size*8, h.ClusterSize))
	}
	if h.RefcountBytes > 0 {
		m.add(h.RefcountOffset, h.RefcountBytes)
	}
	return m
}

// l1Entries decodes the L1 table, keeping only the entries that map part of
// the disk, and checks where each L2 table lies.
func (h *Header) l1Entries(b []byte, fileSize int64, m *metadata) ([]int64, error) {
	need := (h.Size + h.ClusterSize*h.L2Entries() - 1) / (h.ClusterSize * h.L2Entries())
	l2 := make([]int64, need)
	for i := range l2 {
		off := int64(binary.BigEndian.Uint64(b[i*8:]) & l1OffsetMask)
		if off == 0 {
			continue
		}
		if off%h.ClusterSize != 0 {
			return nil, corrupt("L2 table %d at offset %d is not cluster aligned", i, off)
		}
		if fileSize >= 0 && off+h.ClusterSize > fileSize {
			return nil, corrupt("L2 table %d at offset %d lies beyond the end of the file (%d bytes)", i, off, fileSize)
		}
		if s, ok := m.overlaps(off, h.ClusterSize); ok {
			return nil, corrupt("L2 table %d at offset %d overlaps other metadata at %d..%d", i, off, s.start, s.end)
		}
		l2[i] = off
	}
	if err := sharedTable(l2); err != nil {
		return nil, err
	}
	for _, off := range l2 {
		if off != 0 {
			m.add(off, h.ClusterSize)
		}
	}
	return l2, nil
}

// sharedTable refuses an L1 table that names one L2 table twice. qemu never
// writes one (an L2 table belongs to one L1 entry; only snapshots share
// them, between L1 tables), and it would let a small file map every L1
// entry through the same table: the work of checking and decoding the disk
// would then grow with the virtual size instead of the file.
func sharedTable(l2 []int64) error {
	offs := make([]int64, 0, len(l2))
	for _, off := range l2 {
		if off != 0 {
			offs = append(offs, off)
		}
	}
	slices.Sort(offs)
	for i := 1; i < len(offs); i++ {
		if offs[i] != offs[i-1] {
			continue
		}
		first := slices.Index(l2, offs[i])
		second := first + 1 + slices.Index(l2[first+1:], offs[i])
		return corrupt("L2 table %d at offset %d is also L2 table %d", second, offs[i], first)
	}
	return nil
}

// refcountBlocks adds the refcount blocks named by the refcount table to m.
func (h *Header) refcountBlocks(b []byte, fileSize int64, m *metadata) error {
	for i := 0; i+8 <= len(b); i += 8 {
		off := int64(binary.BigEndian.Uint64(b[i:]) & refOffsetMask)
		if off == 0 {
			continue
		}
		if off%h.ClusterSize != 0 || (fileSize >= 0 && off+h.ClusterSize > fileSize) {
			// qemu would refuse to write such an image, but reading it is
			// harmless: refcounts are not needed to read the disk.
			continue
		}
		m.add(off, h.ClusterSize)
	}
	return nil
}

// checkData checks where a mapped cluster's host bytes lie.
func (h *Header) checkData(mp mapping, guest int64, fileSize int64, m *metadata) error {
	switch mp.kind {
	case kindData, kindSubclusters, kindCompressed:
	default:
		return nil
	}
	end := mp.host + mp.hostLen
	if mp.kind == kindCompressed {
		// The last compressed cluster may be rounded up to a sector past EOF.
		if fileSize >= 0 && (mp.host >= fileSize || end > roundUp(fileSize, sectorSize)) {
			return corrupt("compressed cluster for guest offset %d at host offset %d (+%d) lies beyond the end of the file (%d bytes)", guest, mp.host, mp.hostLen, fileSize)
		}
		if mp.hostLen > 2*h.ClusterSize+sectorSize {
			return corrupt("compressed cluster for guest offset %d claims %d bytes, more than twice the cluster size", guest, mp.hostLen)
		}
	} else if fileSize >= 0 && end > fileSize {
		return corrupt("data cluster for guest offset %d at host offset %d lies beyond the end of the file (%d bytes)", guest, mp.host, fileSize)
	}
	if s, ok := m.overlaps(mp.host, mp.hostLen); ok {
		return corrupt("data cluster for guest offset %d at host offset %d points into metadata at %d..%d", guest, mp.host, s.start, s.end)
	}
	return nil
}

func roundUp(n, to int64) int64 { return (n + to - 1) / to * to }
