// Package vmdk reads the two single-file sparse VMDK subformats that
// qemu-img writes and VMware tools export: monolithicSparse (hosted sparse
// extent with grain directory and grain tables) and streamOptimized
// (deflate-compressed grains behind grain markers, possibly with the grain
// directory at the end of the file and a footer copy of the header).
//
// Images whose data lives in other files (monolithicFlat, twoGbMaxExtent*,
// vmfs, delta disks with a parent) are refused: an import takes one file.
//
// The layouts follow VMware's "Virtual Disk Format 5.0" technote and, where
// the two differ, what qemu's block/vmdk.c does, because the result must be
// byte-identical to `qemu-img convert -O raw`.
package vmdk

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/bits"
	"strconv"
	"strings"

	"vimg.dev/vimg/pkg/diskimage/stream"
)

// Type is the image type name, as qemu and go-qcow2reader spell it.
const Type = "vmdk"

const (
	sectorSize = 512

	magicSparse = "KDMV" // hosted sparse extent (VMDK4)
	magicCOWD   = "COWD" // ESX 2 / GSX sparse extent (VMDK3), refused

	// Header flags.
	flagNewlineDetect = 1 << 0
	flagRedundantGD   = 1 << 1
	flagZeroGrain     = 1 << 2 // GTE value 1 means "reads as zeros"
	flagCompressed    = 1 << 16
	flagMarkers       = 1 << 17

	compressionNone    = 0
	compressionDeflate = 1

	// gdAtEnd in the header's gdOffset says that the real header is the
	// footer near the end of the file (streamOptimized written as a stream).
	gdAtEnd = ^uint64(0)

	gtesPerGT = 512 // qemu and VMware always use 512 entries per table
	gtBytes   = gtesPerGT * 4

	zeroGrainGTE = 1

	// Bounds on header values. 64 TiB is far above what a hosted sparse
	// extent can address in practice (grain offsets are 32-bit sectors, so
	// the file is < 2 TiB) but harmless: everything is allocated lazily.
	maxCapacitySectors = 1 << 37 // 64 TiB
	// qemu accepts grains up to 1 GiB; VMware uses 64 KiB. 1 MiB keeps a
	// decompression buffer per grain small.
	maxGrainSectors = 2048
	// 4 Mi directory entries (a 16 MiB directory) cover 128 TiB with 64 KiB
	// grains and 8 TiB with 4 KiB grains; qemu's limit is 32 Mi.
	maxGDEntries = 1 << 22
	// qemu reads at most 1 MiB of descriptor.
	maxDescriptorBytes = 1 << 20

	// Grain marker: lba uint64, size uint32, then size bytes of zlib data
	// (size != 0) or a uint32 type and padding to a sector (size == 0, a
	// metadata marker whose lba field counts the sectors that follow).
	markerHeaderSize = 12
	markerEOS        = 0
	markerGT         = 1
	markerGD         = 2
	markerFooter     = 3
)

// Subformat names as they appear in descriptors and in Info.
const (
	SubformatMonolithicSparse = "monolithicSparse"
	SubformatStreamOptimized  = "streamOptimized"
)

// Info describes the file without reading data.
type Info struct {
	// Subformat is "monolithicSparse" or "streamOptimized".
	Subformat string
	// VirtualSize is the disk size in bytes (capacity × 512).
	VirtualSize int64
	// GrainSize is the allocation unit in bytes.
	GrainSize int64
	// Compressed says grains are deflate-compressed (streamOptimized).
	Compressed bool
}

// Probe reports whether the first bytes of a file (at least 512 given when
// available) look like VMDK: the sparse magic "KDMV" (or the older "COWD",
// which Open then refuses with a clear error) or a text descriptor.
func Probe(hdr []byte) bool {
	if len(hdr) >= 4 && (string(hdr[:4]) == magicSparse || string(hdr[:4]) == magicCOWD) {
		return true
	}
	return isTextDescriptor(hdr)
}

// isTextDescriptor recognises a descriptor file the way qemu's probe does:
// comment and blank lines, then "version=N". "# Disk DescriptorFile" alone
// is enough too, since a truncated probe buffer may end right after it.
func isTextDescriptor(b []byte) bool {
	if bytes.HasPrefix(b, []byte("# Disk DescriptorFile")) {
		return true
	}
	for len(b) > 0 {
		line := b
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			line, b = b[:i], b[i+1:]
		} else {
			b = nil
		}
		line = bytes.TrimRight(line, "\r")
		switch {
		case len(line) > 0 && line[0] == '#':
			continue
		case len(bytes.TrimLeft(line, " ")) == 0:
			continue
		}
		return bytes.HasPrefix(line, []byte("version=")) && len(line) == len("version=X") &&
			line[8] >= '1' && line[8] <= '3'
	}
	return false
}

// vmdkError keeps messages free of the sentinel's text while letting callers
// test errors.Is(err, stream.ErrCorrupt) or stream.ErrUnsupported.
type vmdkError struct {
	msg  string
	kind error
}

func (e *vmdkError) Error() string { return e.msg }
func (e *vmdkError) Unwrap() error { return e.kind }

func corruptf(format string, args ...any) error {
	return &vmdkError{msg: "vmdk: " + fmt.Sprintf(format, args...), kind: stream.ErrCorrupt}
}

func unsupportedf(format string, args ...any) error {
	return &vmdkError{msg: "vmdk: " + fmt.Sprintf(format, args...), kind: stream.ErrUnsupported}
}

// onlySingleFile ends every refusal of a multi-file layout.
const onlySingleFile = "only single-file monolithicSparse and streamOptimized images are accepted"

// header is the 512-byte SparseExtentHeader (little-endian, packed):
//
//	0  magic "KDMV"        4
//	4  version             4
//	8  flags               4
//	12 capacity (sectors)  8
//	20 grainSize (sectors) 8
//	28 descriptorOffset    8
//	36 descriptorSize      8
//	44 numGTEsPerGT        4
//	48 rgdOffset           8
//	56 gdOffset            8
//	64 overHead (sectors)  8
//	72 uncleanShutdown     1
//	73 '\n' ' ' '\r' '\n'  4
//	77 compressAlgorithm   2
type header struct {
	version      uint32
	flags        uint32
	capacity     uint64
	grainSectors uint64
	descOffset   uint64
	descSize     uint64
	numGTEs      uint32
	rgdOffset    uint64
	gdOffset     uint64
	overHead     uint64
	compressAlgo uint16
}

// parseHeader decodes the fields; b holds at least the first 79 bytes.
func parseHeader(b []byte) header {
	le := binary.LittleEndian
	return header{
		version:      le.Uint32(b[4:]),
		flags:        le.Uint32(b[8:]),
		capacity:     le.Uint64(b[12:]),
		grainSectors: le.Uint64(b[20:]),
		descOffset:   le.Uint64(b[28:]),
		descSize:     le.Uint64(b[36:]),
		numGTEs:      le.Uint32(b[44:]),
		rgdOffset:    le.Uint64(b[48:]),
		gdOffset:     le.Uint64(b[56:]),
		overHead:     le.Uint64(b[64:]),
		compressAlgo: le.Uint16(b[77:]),
	}
}

// geometry is what a validated header implies.
type geometry struct {
	h              header
	size           int64  // virtual bytes
	grainSize      int64  // bytes
	grains         uint64 // grains covering the disk
	gdEntries      uint64 // grain tables covering the disk
	compressed     bool
	zeroGrain      bool   // GTE 1 reads as zeros
	minGrainSector uint64 // grains never start before this sector
	maxCompressed  int64  // largest compressed payload accepted
}

// validate checks every header field that sizes an allocation or a loop.
// fileSize is -1 when unknown (a stream); checks against the file size are
// then done when the bytes arrive.
func (h header) validate(fileSize int64) (geometry, error) {
	var g geometry
	g.h = h
	if h.version > 3 {
		return g, unsupportedf("sparse extent version %d is not supported (1 to 3 are)", h.version)
	}
	switch h.compressAlgo {
	case compressionNone:
	case compressionDeflate:
		g.compressed = true
	default:
		return g, unsupportedf("compression algorithm %d is not supported (only 1, deflate)", h.compressAlgo)
	}
	markers := h.flags&flagMarkers != 0
	if g.compressed && !markers {
		return g, unsupportedf("compressed grains without grain markers (flags %#x) are not supported", h.flags)
	}
	if markers && !g.compressed {
		return g, unsupportedf("grain markers on uncompressed grains (flags %#x) are not supported", h.flags)
	}
	g.zeroGrain = h.flags&flagZeroGrain != 0
	if h.capacity > maxCapacitySectors {
		return g, corruptf("capacity of %d sectors (%d bytes) is larger than the 64 TiB accepted", h.capacity, h.capacity*sectorSize)
	}
	if h.grainSectors == 0 || h.grainSectors > maxGrainSectors || bits.OnesCount64(h.grainSectors) != 1 {
		return g, corruptf("grain size of %d sectors is invalid: it must be a power of two from 1 to %d sectors", h.grainSectors, maxGrainSectors)
	}
	if h.numGTEs != gtesPerGT {
		return g, corruptf("%d entries per grain table is invalid: it must be %d", h.numGTEs, gtesPerGT)
	}
	g.size = int64(h.capacity) * sectorSize
	g.grainSize = int64(h.grainSectors) * sectorSize
	g.grains = (h.capacity + h.grainSectors - 1) / h.grainSectors
	g.gdEntries = (g.grains + gtesPerGT - 1) / gtesPerGT
	if g.gdEntries > maxGDEntries {
		return g, corruptf("capacity %d sectors with %d-sector grains needs a grain directory of %d entries, more than the %d accepted",
			h.capacity, h.grainSectors, g.gdEntries, maxGDEntries)
	}
	// qemu-img and VMware both write compressed grains into a buffer of two
	// grains (incompressible data grows a little under zlib).
	g.maxCompressed = 2 * g.grainSize

	if h.descOffset != 0 {
		if h.descSize > maxDescriptorBytes/sectorSize {
			return g, corruptf("embedded descriptor of %d sectors is larger than the %d bytes accepted", h.descSize, maxDescriptorBytes)
		}
		if h.descOffset > maxCapacitySectors {
			return g, corruptf("embedded descriptor offset of sector %d is absurd", h.descOffset)
		}
	}
	if h.overHead > 1<<32 {
		return g, corruptf("metadata size (overHead) of %d sectors is absurd", h.overHead)
	}
	g.minGrainSector = max(h.overHead, 1)
	if h.descOffset != 0 {
		g.minGrainSector = max(g.minGrainSector, h.descOffset+h.descSize)
	}
	if fileSize < 0 {
		return g, nil
	}
	fileSectors := uint64(fileSize) / sectorSize
	if h.overHead > fileSectors {
		return g, corruptf("file is truncated: the header says grains start at sector %d (byte %d), but the file is %d bytes", h.overHead, h.overHead*sectorSize, fileSize)
	}
	if h.descOffset != 0 && (h.descOffset+h.descSize)*sectorSize > uint64(fileSize) {
		return g, corruptf("embedded descriptor at offset %d (%d bytes) lies beyond the end of the file (size %d)", h.descOffset*sectorSize, h.descSize*sectorSize, fileSize)
	}
	if h.gdOffset == gdAtEnd {
		return g, corruptf("grain directory offset says 'at end' in the footer too")
	}
	if g.gdEntries == 0 {
		return g, nil // an empty disk has no directory
	}
	gdBytes := g.gdEntries * 4
	if h.gdOffset == 0 {
		return g, corruptf("grain directory offset is 0")
	}
	if h.gdOffset > fileSectors || h.gdOffset*sectorSize+gdBytes > uint64(fileSize) {
		return g, corruptf("grain directory at sector %d (offset %d, %d bytes) lies beyond the end of the file (size %d)",
			h.gdOffset, h.gdOffset*sectorSize, gdBytes, fileSize)
	}
	return g, nil
}

func (g *geometry) info() Info {
	sub := SubformatMonolithicSparse
	if g.compressed {
		sub = SubformatStreamOptimized
	}
	return Info{Subformat: sub, VirtualSize: g.size, GrainSize: g.grainSize, Compressed: g.compressed}
}

// clip is the number of disk bytes grain gi holds (the last grain may be
// cut by the end of the disk).
func (g *geometry) clip(gi uint64) int64 {
	start := int64(gi) * g.grainSize
	return min(g.grainSize, g.size-start)
}

// checkGrainSector rejects grain offsets that point into the header,
// descriptor or (for preallocated layouts) grain directory and tables.
func (g *geometry) checkGrainSector(gi, sector uint64) error {
	if sector < g.minGrainSector {
		return corruptf("grain %d (disk offset %d) at file offset %d lies inside the header/metadata area (grains start at sector %d)",
			gi, gi*uint64(g.grainSize), sector*sectorSize, g.minGrainSector)
	}
	return nil
}

// descriptor is the part of a text descriptor that decides acceptance.
type descriptor struct {
	cid        string
	createType string
	parentCID  string
	parentHint string
	extents    []extentLine
}

type extentLine struct {
	access  string
	sectors string
	kind    string
	file    string
	line    string
}

// parseDescriptor reads "key = value" lines and extent lines such as
//
//	RW 41943040 SPARSE "disk.vmdk"
//	RW 4192256 FLAT "disk-flat.vmdk" 0
//	RW 1024 ZERO
func parseDescriptor(b []byte) descriptor {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	var d descriptor
	for _, raw := range strings.Split(string(b), "\n") {
		line := strings.TrimSpace(raw)
		if line == "" || line[0] == '#' {
			continue
		}
		fields := strings.Fields(line)
		if len(fields) >= 3 && (fields[0] == "RW" || fields[0] == "RDONLY" || fields[0] == "NOACCESS") {
			if _, err := strconv.ParseInt(fields[1], 10, 64); err == nil {
				e := extentLine{access: fields[0], sectors: fields[1], kind: fields[2], line: line}
				if i := strings.IndexByte(line, '"'); i >= 0 {
					rest := line[i+1:]
					if j := strings.IndexByte(rest, '"'); j >= 0 {
						e.file = rest[:j]
					} else {
						e.file = rest
					}
				}
				d.extents = append(d.extents, e)
				continue
			}
		}
		key, val, ok := strings.Cut(line, "=")
		if !ok {
			continue
		}
		key = strings.TrimSpace(key)
		val = strings.Trim(strings.TrimSpace(val), `"`)
		switch key {
		case "createType":
			d.createType = val
		case "CID":
			d.cid = val
		case "parentCID":
			d.parentCID = val
		case "parentFileNameHint":
			d.parentHint = val
		}
	}
	return d
}

// refuseStandalone explains why a descriptor file (text, no sparse header)
// cannot be imported: its data is in other files.
func refuseStandalone(d descriptor) error {
	if d.parentHint != "" {
		return refuseParent(d)
	}
	for _, e := range d.extents {
		if e.file != "" {
			return unsupportedf("descriptor points at extent file %q outside the image (createType %q); %s", e.file, d.createType, onlySingleFile)
		}
	}
	if len(d.extents) > 0 {
		return unsupportedf("descriptor (createType %q) describes a %s extent without data; %s", d.createType, d.extents[0].kind, onlySingleFile)
	}
	return unsupportedf("descriptor file (createType %q) names no extents; %s", d.createType, onlySingleFile)
}

func refuseParent(d descriptor) error {
	return unsupportedf("image is a delta disk: its descriptor names parent %q (parentCID=%s); a VMDK delta disk needs its parent, which is not supported",
		d.parentHint, d.parentCID)
}

// checkEmbedded accepts the descriptor inside a sparse file only if it
// describes that file alone. qemu ignores the extent lines of an embedded
// descriptor, but a descriptor that lists more extents means the disk is
// larger than this file, and reading it as one file would be wrong.
//
// A sparse file without a descriptor is one piece of a split image
// (twoGbMaxExtentSparse extents carry none): qemu refuses to open it alone,
// and reading it would give the first 2 GiB of the disk as if it were all.
func checkEmbedded(d descriptor) error {
	if d.parentHint != "" {
		return refuseParent(d)
	}
	switch {
	case d.cid == "" && d.parentCID == "":
		return unsupportedf("sparse file has no embedded descriptor: it is one extent of a split (twoGbMaxExtentSparse) image or not a whole disk; %s", onlySingleFile)
	case len(d.extents) > 1:
		var names []string
		for _, e := range d.extents {
			names = append(names, fmt.Sprintf("%s %q", e.kind, e.file))
		}
		return unsupportedf("embedded descriptor lists %d extents (%s): descriptor points at extent files outside the image; %s",
			len(d.extents), strings.Join(names, ", "), onlySingleFile)
	case len(d.extents) == 1 && d.extents[0].kind != "SPARSE":
		e := d.extents[0]
		return unsupportedf("embedded descriptor names a %s extent %q instead of this sparse file; %s", e.kind, e.file, onlySingleFile)
	}
	return nil
}

// markerType names a metadata marker for messages.
func markerName(t uint32) string {
	switch t {
	case markerEOS:
		return "end-of-stream"
	case markerGT:
		return "grain table"
	case markerGD:
		return "grain directory"
	case markerFooter:
		return "footer"
	}
	return fmt.Sprintf("unknown (%d)", t)
}
