// Package diskimage detects, reads and converts virtual disk images (qcow2,
// VMDK, VDI, ISO 9660 and raw, optionally wrapped in gzip, xz or zstd) in one
// pass, in process, without scratch space.
//
// Two paths serve every format:
//   - random access, when the source can seek (a local file, an HTTP server
//     with Range support): the format's reader implements image.Image
//     (ReaderAt + Extent) and the engine reads the allocated extents with
//     several workers;
//   - one pass, when it cannot (a pipe, a decompressor, an upload body): the
//     format's stream decoder parses metadata as it arrives and hands out
//     chunks that the engine decompresses and writes with several workers.
//
// Either way the engine writes only non-zero data, leaves holes (or issues
// BLKZEROOUT) for the rest, and checks the source checksum before reporting
// success.
package diskimage

import (
	"bytes"
	"encoding/binary"

	"vimg.dev/vimg/pkg/diskimage/codec"
	"vimg.dev/vimg/pkg/diskimage/qcow2"
	"vimg.dev/vimg/pkg/diskimage/vdi"
	"vimg.dev/vimg/pkg/diskimage/vmdk"
)

// Format is a disk image container format.
type Format string

const (
	QCOW2 Format = "qcow2"
	VMDK  Format = "vmdk"
	VDI   Format = "vdi"
	ISO   Format = "iso"
	Raw   Format = "raw"
)

// Compression is a whole-file wrapper around an image.
type Compression string

const (
	NoCompression Compression = ""
	Gzip          Compression = "gzip"
	XZ            Compression = "xz"
	Zstd          Compression = "zstd"
)

// ProbeSize is how many leading bytes detection looks at: enough to reach the
// ISO 9660 volume descriptor in sector 16 (of 2 KiB).
const ProbeSize = 64 << 10

// isoMagicOffset is where the first volume descriptor's "CD001" lies.
const isoMagicOffset = 16*2048 + 1

// DetectFormat tells the container format from the first bytes of an image
// (ProbeSize, or the whole file if shorter). Content decides, never a name.
// Anything that is not recognised is raw, as for qemu-img.
func DetectFormat(hdr []byte) Format {
	switch {
	case bytes.HasPrefix(hdr, []byte(qcow2.Magic)):
		return QCOW2
	case vdi.Probe(hdr):
		return VDI
	case vmdk.Probe(hdr):
		return VMDK
	case isISO(hdr):
		return ISO
	}
	return Raw
}

// DetectCompression tells the wrapper, if any, from the first bytes.
func DetectCompression(hdr []byte) Compression {
	return Compression(codec.DetectWrapper(hdr))
}

// isISO recognises an ISO 9660 file system: a volume descriptor set starting
// at sector 16 with the "CD001" identifier. Hybrid ISOs (an MBR and partition
// table in sector 0, for booting from USB sticks) are ISOs too; UDF bridge
// discs carry CD001 as well.
func isISO(hdr []byte) bool {
	if len(hdr) < isoMagicOffset+5 {
		return false
	}
	return string(hdr[isoMagicOffset:isoMagicOffset+5]) == "CD001"
}

// isoVolumeSize returns the size the primary volume descriptor declares, or
// 0 if it has none.
func isoVolumeSize(hdr []byte) int64 {
	pvd := isoMagicOffset - 1
	if len(hdr) < pvd+132 || hdr[pvd] != 1 {
		return 0
	}
	blocks := binary.LittleEndian.Uint32(hdr[pvd+80:])
	blockSize := binary.LittleEndian.Uint16(hdr[pvd+128:])
	return int64(blocks) * int64(blockSize)
}
