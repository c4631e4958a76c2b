// Package vdi reads VirtualBox VDI images (dynamic and static/fixed), both by
// random access (Open) and as a one-pass stream (NewDecoder), with the same
// results as qemu-img's vdi driver.
//
// Layout (all integers little endian): a 512-byte header (64 bytes of text,
// then the signature 0xbeda107f at offset 64, version 1.1, image type, the
// offsets of the block map and of the data area, the disk size, the block
// size and the block counts), then the block map (one uint32 per 1 MiB block
// of the virtual disk: the index of the block in the data area, 0xffffffff
// for a block never written, 0xfffffffe for a discarded one; both read as
// zeros), then the data area, blocks in allocation order.
package vdi

import (
	"encoding/binary"
	"fmt"

	"vimg.dev/vimg/pkg/diskimage/stream"
)

// Type is the format name, as qemu-img spells it.
const Type = "vdi"

const (
	signature  = 0xbeda107f
	version11  = 0x00010001
	headerSize = 512 // qemu's VdiHeader; the fields vimg uses end at 0x1c8
	sectorSize = 512

	typeDynamic = 1
	typeStatic  = 2
	typeUndo    = 3
	typeDiff    = 4

	// blockSize is the only block size qemu accepts (DEFAULT_CLUSTER_SIZE)
	// and the only one VirtualBox writes.
	blockSize = 1 << 20

	// Block map entries at or above entryDiscarded are not in the data area
	// and read as zeros.
	entryDiscarded   = 0xfffffffe
	entryUnallocated = 0xffffffff

	// maxBlocksInImage is qemu's VDI_BLOCKS_IN_IMAGE_MAX: the block map of
	// larger images does not fit in an int.
	maxBlocksInImage = (1<<31 - sectorSize) / 4

	// MaxVirtualSize bounds the disk size, as for the other formats: 64 TiB
	// keeps the block map under 256 MiB and is far above any VM image.
	MaxVirtualSize = 64 << 40
)

// Header field offsets (qemu's VdiHeader).
const (
	offSignature      = 0x40
	offVersion        = 0x44
	offImageType      = 0x4c
	offOffsetBmap     = 0x154
	offOffsetData     = 0x158
	offSectorSize     = 0x168
	offDiskSize       = 0x170
	offBlockSize      = 0x178
	offBlockExtra     = 0x17c
	offBlocksInImage  = 0x180
	offBlocksAlloc    = 0x184
	offUUIDLink       = 0x1a8
	offUUIDParent     = 0x1b8
	minProbeLen       = offSignature + 4
	uuidLen           = 16
	entriesPerReadMax = 64 << 10 // block map entries read per I/O (256 KiB)
)

// Info describes an image, from its header.
type Info struct {
	// Static is true for fixed (preallocated) images, false for dynamic ones.
	Static bool
	// VirtualSize is the disk size in bytes, rounded up to a sector as qemu
	// does for the odd sizes 'VBoxManage convertfromraw' writes.
	VirtualSize int64
	// BlockSize is the size of a block (always 1 MiB).
	BlockSize int64
	// BlocksAllocated is the number of blocks in the data area, as the
	// header says.
	BlocksAllocated int64
}

// header is the checked part of a VDI header that reading needs.
type header struct {
	info        Info
	offsetBmap  int64
	offsetData  int64
	entries     int64 // block map entries that cover the disk
	blocksInHDD int64
	blocksAlloc int64
	bmapEnd     int64 // offsetBmap + 4*entries
}

func corrupt(format string, args ...any) error {
	return fmt.Errorf("vdi: %w: %s", stream.ErrCorrupt, fmt.Sprintf(format, args...))
}

func unsupported(format string, args ...any) error {
	return fmt.Errorf("vdi: %w: %s", stream.ErrUnsupported, fmt.Sprintf(format, args...))
}

// Probe reports whether the first bytes of a file look like VDI (signature
// 0xbeda107f at offset 64).
func Probe(hdr []byte) bool {
	return len(hdr) >= minProbeLen && binary.LittleEndian.Uint32(hdr[offSignature:]) == signature
}

// parseHeader checks the 512-byte header. It refuses what qemu refuses, plus
// values qemu would trust blindly but that make no sense (a block map inside
// the header, a data area overlapping the map, more blocks allocated than
// exist), so that nothing later has to check them again.
func parseHeader(b []byte) (*header, error) {
	if len(b) < headerSize {
		return nil, corrupt("header is %d bytes, need %d", len(b), headerSize)
	}
	le := binary.LittleEndian
	if sig := le.Uint32(b[offSignature:]); sig != signature {
		return nil, corrupt("not a VDI image (signature %#08x at offset 64, want %#08x)", sig, signature)
	}
	if v := le.Uint32(b[offVersion:]); v != version11 {
		return nil, unsupported("version %d.%d (only 1.1 is supported, as in qemu)", v>>16, v&0xffff)
	}
	h := &header{}
	switch t := le.Uint32(b[offImageType:]); t {
	case typeDynamic:
	case typeStatic:
		h.info.Static = true
	case typeUndo:
		return nil, unsupported("image type 3 (undo image): it only records changes to another image")
	case typeDiff:
		return nil, unsupported("image type 4 (differencing image): it needs its parent; merge or clone the disk in VirtualBox first (VBoxManage clonemedium)")
	default:
		return nil, corrupt("unknown image type %d", t)
	}
	// qemu refuses images linked to another one whatever their type.
	if !allZero(b[offUUIDParent : offUUIDParent+uuidLen]) {
		return nil, unsupported("image has a parent (non-null parent UUID): merge or clone the disk in VirtualBox first")
	}
	if !allZero(b[offUUIDLink : offUUIDLink+uuidLen]) {
		return nil, unsupported("image is linked to another image (non-null link UUID)")
	}
	if ss := le.Uint32(b[offSectorSize:]); ss != sectorSize {
		return nil, unsupported("sector size %d (only %d is supported, as in qemu)", ss, sectorSize)
	}
	bs := le.Uint32(b[offBlockSize:])
	switch {
	case bs < sectorSize || bs&(bs-1) != 0:
		return nil, corrupt("block size %d is not a power of two of at least %d", bs, sectorSize)
	case bs != blockSize:
		return nil, unsupported("block size %d (only %d is supported, as in qemu)", bs, blockSize)
	}
	// VirtualBox would put this many bytes in front of every block; qemu
	// ignores the field and would read such an image wrong.
	if extra := le.Uint32(b[offBlockExtra:]); extra != 0 {
		return nil, unsupported("%d bytes of extra data per block (block_extra must be 0)", extra)
	}
	h.info.BlockSize = blockSize

	diskSize := le.Uint64(b[offDiskSize:])
	if diskSize > MaxVirtualSize {
		return nil, unsupported("disk size %d exceeds the %d byte limit", diskSize, int64(MaxVirtualSize))
	}
	// Round odd sizes up to a sector, as qemu does.
	h.info.VirtualSize = (int64(diskSize) + sectorSize - 1) &^ (sectorSize - 1)
	h.entries = (h.info.VirtualSize + blockSize - 1) / blockSize

	h.blocksInHDD = int64(le.Uint32(b[offBlocksInImage:]))
	if h.blocksInHDD > maxBlocksInImage {
		return nil, corrupt("blocks in image %d exceeds the VDI maximum %d", h.blocksInHDD, maxBlocksInImage)
	}
	if h.blocksInHDD < h.entries {
		return nil, corrupt("disk size %d needs %d blocks but the block map has room for %d (%d bytes)",
			h.info.VirtualSize, h.entries, h.blocksInHDD, h.blocksInHDD*blockSize)
	}
	h.blocksAlloc = int64(le.Uint32(b[offBlocksAlloc:]))
	if h.blocksAlloc > h.blocksInHDD {
		return nil, corrupt("%d blocks allocated but the image has only %d blocks", h.blocksAlloc, h.blocksInHDD)
	}
	h.info.BlocksAllocated = h.blocksAlloc

	h.offsetBmap = int64(le.Uint32(b[offOffsetBmap:]))
	h.offsetData = int64(le.Uint32(b[offOffsetData:]))
	if h.offsetBmap%sectorSize != 0 {
		return nil, unsupported("block map offset %d is not sector aligned", h.offsetBmap)
	}
	if h.offsetData%sectorSize != 0 {
		return nil, unsupported("data offset %d is not sector aligned", h.offsetData)
	}
	if h.offsetBmap < headerSize {
		return nil, corrupt("block map offset %d lies inside the %d byte header", h.offsetBmap, headerSize)
	}
	h.bmapEnd = h.offsetBmap + 4*h.entries
	if h.offsetData < h.bmapEnd {
		return nil, corrupt("data offset %d lies inside the block map (bytes %d to %d)", h.offsetData, h.offsetBmap, h.bmapEnd)
	}
	return h, nil
}

// checkEntry validates block map entry e of virtual block v.
func (h *header) checkEntry(v int64, e uint32) error {
	if e < entryDiscarded && int64(e) >= h.blocksAlloc {
		return corrupt("VDI block map out of range: block %d (disk offset %d) points to data block %d, but only %d blocks are allocated",
			v, v*blockSize, e, h.blocksAlloc)
	}
	return nil
}

// blockLen is how many bytes of virtual block v lie inside the disk.
func (h *header) blockLen(v int64) int64 {
	return min(blockSize, h.info.VirtualSize-v*blockSize)
}

var zeros [64 << 10]byte

// allZero reports whether b holds only zero bytes.
func allZero(b []byte) bool {
	for len(b) > 0 {
		n := min(len(b), len(zeros))
		if string(b[:n]) != string(zeros[:n]) { // compiles to memequal, no allocation
			return false
		}
		b = b[n:]
	}
	return true
}
