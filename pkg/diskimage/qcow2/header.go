// Package qcow2 opens qcow2 images safely. Random access goes through
// github.com/lima-vm/go-qcow2reader once this package has checked everything
// that library would trust (backing files, external data, encryption, table
// sizes, where every table and cluster points); sequential sources go through
// this package's own one-pass decoder.
package qcow2

import (
	"encoding/binary"
	"fmt"

	"vimg.dev/vimg/pkg/diskimage/stream"
)

// Type is the format name, as qemu-img spells it.
const Type = "qcow2"

// Magic is the first four bytes of every qcow2 file.
const Magic = "QFI\xfb"

// Limits applied to values read from a header before they are used. They
// match or undercut what qemu itself accepts, so no image qemu-img writes is
// refused.
const (
	minClusterBits = 9  // qemu: MIN_CLUSTER_BITS
	maxClusterBits = 21 // qemu: MAX_CLUSTER_BITS (2 MiB)
	// MaxVirtualSize bounds the disk size: 64 TiB is qemu's own limit for
	// qcow2 images with 64 KiB clusters and far above any VM image.
	MaxVirtualSize = 64 << 40
	// maxL1Bytes mirrors qemu's QCOW_MAX_L1_SIZE (32 MiB of entries).
	maxL1Bytes = 32 << 20
	// maxRefcountTableBytes mirrors QCOW_MAX_REFTABLE_SIZE (8 MiB).
	maxRefcountTableBytes = 8 << 20
	maxHeaderLength       = 4096
	// maxHostOffset bounds table offsets: L1 and L2 entries cannot address
	// more (bits 9-55), and it keeps offset+length far from overflowing.
	maxHostOffset = 1 << 56
)

// Incompatible feature bits (qcow2 spec, header bytes 72-79).
const (
	incompatDirty      = 1 << 0
	incompatCorrupt    = 1 << 1
	incompatDataFile   = 1 << 2
	incompatCompressed = 1 << 3
	incompatExtendedL2 = 1 << 4
	incompatKnown      = incompatDirty | incompatCorrupt | incompatDataFile | incompatCompressed | incompatExtendedL2
)

// Header extension types that change how the image must be read.
const (
	extEnd            = 0x00000000
	extBackingFormat  = 0xe2792aca
	extCryptoHeader   = 0x0537be77
	extDataFileName   = 0x44415441
	maxHeaderExtBytes = 4096
)

// Header is the part of a qcow2 header vimg needs, already checked.
type Header struct {
	Version         uint32
	ClusterBits     uint32
	ClusterSize     int64
	Size            int64 // virtual disk size
	L1Size          int64 // entries
	L1Offset        int64
	RefcountOffset  int64
	RefcountBytes   int64 // size of the refcount table
	HeaderLength    int64
	Incompatible    uint64
	CompressionZstd bool
	ExtendedL2      bool
	Dirty           bool
}

// L2Entries is the number of entries in one L2 table.
func (h *Header) L2Entries() int64 {
	if h.ExtendedL2 {
		return h.ClusterSize / 16
	}
	return h.ClusterSize / 8
}

// L2EntrySize is the size of one L2 entry in bytes.
func (h *Header) L2EntrySize() int64 {
	if h.ExtendedL2 {
		return 16
	}
	return 8
}

// Compression is the codec of compressed clusters.
func (h *Header) Compression() stream.Codec {
	if h.CompressionZstd {
		return stream.Zstd
	}
	return stream.Deflate
}

func corrupt(format string, args ...any) error {
	return fmt.Errorf("qcow2: %w: %s", stream.ErrCorrupt, fmt.Sprintf(format, args...))
}

func unsupported(format string, args ...any) error {
	return fmt.Errorf("qcow2: %w: %s", stream.ErrUnsupported, fmt.Sprintf(format, args...))
}

// ParseHeader checks the first cluster of a qcow2 file (at least the header
// and its extensions; 64 KiB or the whole file if shorter is always enough
// for images qemu writes). fileSize is the size of the file, or -1 when it is
// not known (a stream); offsets are then checked once the data arrives.
func ParseHeader(b []byte, fileSize int64) (*Header, error) {
	if len(b) < 72 || string(b[:4]) != Magic {
		return nil, corrupt("not a qcow2 file (no magic)")
	}
	be := binary.BigEndian
	h := &Header{Version: be.Uint32(b[4:])}
	if h.Version != 2 && h.Version != 3 {
		return nil, unsupported("version %d (only 2 and 3 exist)", h.Version)
	}
	backingOffset, backingSize := be.Uint64(b[8:]), be.Uint32(b[16:])
	if backingOffset != 0 {
		name := "?"
		// Compared without adding: offset+size may wrap around.
		if backingSize <= 1023 && backingOffset <= uint64(len(b)) && uint64(backingSize) <= uint64(len(b))-backingOffset {
			name = string(b[backingOffset : backingOffset+uint64(backingSize)])
		}
		return nil, unsupported("image has a backing file %q: vimg imports self-contained images only; flatten it first with `qemu-img convert -O qcow2 in.qcow2 out.qcow2`", name)
	}
	h.ClusterBits = be.Uint32(b[20:])
	if h.ClusterBits < minClusterBits || h.ClusterBits > maxClusterBits {
		return nil, corrupt("cluster_bits %d out of range %d..%d", h.ClusterBits, minClusterBits, maxClusterBits)
	}
	h.ClusterSize = 1 << h.ClusterBits
	size := be.Uint64(b[24:])
	if size > MaxVirtualSize {
		return nil, corrupt("virtual size %d exceeds the %d byte limit", size, int64(MaxVirtualSize))
	}
	h.Size = int64(size)
	if crypt := be.Uint32(b[32:]); crypt != 0 {
		return nil, unsupported("image is encrypted (crypt_method %d): decrypt it first with qemu-img convert", crypt)
	}
	l1Size := be.Uint32(b[36:])
	l1Offset, refcountOffset := be.Uint64(b[40:]), be.Uint64(b[48:])
	h.RefcountBytes = int64(be.Uint32(b[56:])) * h.ClusterSize
	h.HeaderLength = 72

	if h.Version == 3 {
		if len(b) < 104 {
			return nil, corrupt("version 3 header is truncated")
		}
		h.Incompatible = be.Uint64(b[72:])
		h.HeaderLength = int64(be.Uint32(b[100:]))
		if h.HeaderLength < 104 || h.HeaderLength > maxHeaderLength || h.HeaderLength > int64(len(b)) || h.HeaderLength > h.ClusterSize {
			return nil, corrupt("header length %d out of range", h.HeaderLength)
		}
		if order := be.Uint32(b[96:]); order > 6 {
			return nil, corrupt("refcount_order %d out of range 0..6", order)
		}
		if unknown := h.Incompatible &^ incompatKnown; unknown != 0 {
			return nil, unsupported("unknown incompatible feature bits %#x", unknown)
		}
		if h.Incompatible&incompatDataFile != 0 {
			return nil, unsupported("image keeps its data in an external data file: vimg imports self-contained images only")
		}
		if h.Incompatible&incompatCorrupt != 0 {
			return nil, corrupt("the image is marked corrupt by qemu; repair it with `qemu-img check -r all`")
		}
		h.Dirty = h.Incompatible&incompatDirty != 0
		h.ExtendedL2 = h.Incompatible&incompatExtendedL2 != 0
		if h.ExtendedL2 && h.ClusterBits < 14 {
			return nil, corrupt("extended L2 entries need clusters of at least 16 KiB")
		}
		if h.HeaderLength > 104 {
			ct := b[104]
			switch {
			case ct == 0:
			case ct == 1 && h.Incompatible&incompatCompressed != 0:
				h.CompressionZstd = true
			case ct == 1:
				return nil, corrupt("compression type zstd without the compression-type feature bit")
			default:
				return nil, unsupported("compression type %d (only zlib and zstd exist)", ct)
			}
		}
	}

	// The L1 table must cover the disk, and no more than qemu allows.
	need := (h.Size + h.ClusterSize*h.L2Entries() - 1) / (h.ClusterSize * h.L2Entries())
	if int64(l1Size) < need {
		return nil, corrupt("L1 table has %d entries, the %d byte disk needs %d", l1Size, h.Size, need)
	}
	if int64(l1Size)*8 > maxL1Bytes {
		return nil, corrupt("L1 table of %d entries exceeds the %d byte limit", l1Size, maxL1Bytes)
	}
	h.L1Size = int64(l1Size)
	if h.RefcountBytes > maxRefcountTableBytes {
		return nil, corrupt("refcount table of %d bytes exceeds the %d byte limit", h.RefcountBytes, maxRefcountTableBytes)
	}
	// Offsets are checked as read (the library uses all 64 bits) and only
	// for tables that exist: an empty disk has neither offset set.
	if h.L1Size > 0 {
		if l1Offset >= maxHostOffset {
			return nil, corrupt("L1 table offset %#x is out of range", l1Offset)
		}
		h.L1Offset = int64(l1Offset)
		if h.L1Offset == 0 || h.L1Offset%h.ClusterSize != 0 {
			return nil, corrupt("L1 table offset %d is not cluster aligned", h.L1Offset)
		}
		if fileSize >= 0 && h.L1Offset+h.L1Size*8 > fileSize {
			return nil, corrupt("L1 table at %d (%d entries) lies beyond the end of the file (%d bytes)", h.L1Offset, h.L1Size, fileSize)
		}
	}
	if h.RefcountBytes > 0 {
		if refcountOffset >= maxHostOffset {
			return nil, corrupt("refcount table offset %#x is out of range", refcountOffset)
		}
		h.RefcountOffset = int64(refcountOffset)
		if h.RefcountOffset%h.ClusterSize != 0 {
			return nil, corrupt("refcount table offset %d is not cluster aligned", h.RefcountOffset)
		}
		if fileSize >= 0 && h.RefcountOffset+h.RefcountBytes > fileSize {
			return nil, corrupt("refcount table at %d (%d bytes) lies beyond the end of the file (%d bytes)", h.RefcountOffset, h.RefcountBytes, fileSize)
		}
	}
	if err := h.parseExtensions(b); err != nil {
		return nil, err
	}
	return h, nil
}

// parseExtensions walks the header extensions, which live in the first
// cluster, and refuses those that would make a reader open other files.
func (h *Header) parseExtensions(b []byte) error {
	off := int64(72)
	if h.Version == 3 {
		off = h.HeaderLength
	}
	limit := min(int64(len(b)), h.ClusterSize)
	for off+8 <= limit {
		typ := binary.BigEndian.Uint32(b[off:])
		n := int64(binary.BigEndian.Uint32(b[off+4:]))
		if typ == extEnd {
			return nil
		}
		if n > maxHeaderExtBytes || off+8+n > limit {
			return corrupt("header extension %#x of %d bytes runs past the header cluster", typ, n)
		}
		switch typ {
		case extDataFileName:
			return unsupported("image names an external data file %q: vimg imports self-contained images only", string(b[off+8:off+8+n]))
		case extCryptoHeader:
			return unsupported("image carries an encryption header: decrypt it first with qemu-img convert")
		}
		off += 8 + (n+7)/8*8
	}
	if h.Version == 2 && off == 72 {
		return nil // version 2 images may have no extension area at all
	}
	return nil
}
