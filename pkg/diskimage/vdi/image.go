package vdi

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync/atomic"

	"github.com/lima-vm/go-qcow2reader/image"
)

// Image is an open VDI image. It implements
// github.com/lima-vm/go-qcow2reader/image.Image. Everything is read at Open
// and never changes afterwards, so ReadAt and Extent are safe for concurrent
// use as long as the underlying io.ReaderAt is (an *os.File is).
type Image struct {
	ra       io.ReaderAt
	fileSize int64
	h        *header
	// bmap holds one entry per virtual block: the data block index, or
	// entryDiscarded / entryUnallocated. Every index is < h.blocksAlloc.
	bmap   []uint32
	closed atomic.Bool
}

var _ image.Image = (*Image)(nil)

// Open opens a VDI for random access; size is the file's size. The header and
// the whole block map are read and checked here; data blocks are read on
// demand, and a block lying past the end of the file fails the read that
// needs it.
func Open(ra io.ReaderAt, size int64) (*Image, error) {
	if size < headerSize {
		return nil, corrupt("file of %d bytes is too short for the %d byte header", size, headerSize)
	}
	hb := make([]byte, headerSize)
	// A ReaderAt may return io.EOF along with a full buffer at the end of
	// the file: only a short read is a problem.
	if n, err := ra.ReadAt(hb, 0); n < len(hb) {
		if err == nil || errors.Is(err, io.EOF) {
			return nil, corrupt("file is too short for the %d byte header", headerSize)
		}
		return nil, fmt.Errorf("vdi: reading the header: %w", err)
	}
	h, err := parseHeader(hb)
	if err != nil {
		return nil, err
	}
	if h.bmapEnd > size {
		return nil, corrupt("block map at offset %d (%d bytes) lies beyond the end of the file (size %d)",
			h.offsetBmap, h.bmapEnd-h.offsetBmap, size)
	}
	if h.offsetData > size {
		return nil, corrupt("data area offset %d lies beyond the end of the file (size %d)", h.offsetData, size)
	}
	// The map is in the file (checked above), so its size is bounded by
	// real bytes; the slice still grows as entries arrive in case ra is
	// shorter than size claims.
	bmap := make([]uint32, 0, min(h.entries, 1<<20))
	sr := io.NewSectionReader(ra, h.offsetBmap, h.bmapEnd-h.offsetBmap)
	if err := readBlockMap(sr, h, func(_ int64, e uint32) { bmap = append(bmap, e) }); err != nil {
		return nil, err
	}
	return &Image{ra: ra, fileSize: size, h: h, bmap: bmap}, nil
}

// Info describes the image.
func (img *Image) Info() Info { return img.h.info }

// Type returns "vdi".
func (img *Image) Type() image.Type { return Type }

// Size is the virtual disk size in bytes.
func (img *Image) Size() int64 { return img.h.info.VirtualSize }

// Readable returns nil: Open refuses every image it cannot read.
func (img *Image) Readable() error { return nil }

// Close marks the image closed. It does not close the io.ReaderAt given to
// Open: the caller opened it and owns it.
func (img *Image) Close() error {
	img.closed.Store(true)
	return nil
}

// ReadAt implements io.ReaderAt over the virtual disk. Unallocated and
// discarded blocks read as zeros. Runs of blocks that are also contiguous in
// the file (every static image, most dynamic ones) are read in one call.
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	if img.closed.Load() {
		return 0, os.ErrClosed
	}
	size := img.h.info.VirtualSize
	if off < 0 {
		return 0, fmt.Errorf("vdi: read at negative offset %d", off)
	}
	if off >= size {
		return 0, io.EOF
	}
	var eof error
	if int64(len(p)) > size-off {
		p = p[:size-off]
		eof = io.EOF
	}
	n := 0
	for n < len(p) {
		cur := off + int64(n)
		v := cur / blockSize
		in := cur % blockSize
		m := min(int64(len(p)-n), blockSize-in)
		e := img.bmap[v]
		if e >= entryDiscarded {
			clear(p[n : n+int(m)])
			n += int(m)
			continue
		}
		// Extend over following blocks stored right after this one.
		for next := v + 1; int64(n)+m < int64(len(p)) && img.bmap[next] == e+uint32(next-v); next++ {
			m = min(int64(len(p)-n), m+blockSize)
		}
		fileOff := img.h.offsetData + int64(e)*blockSize + in
		if fileOff+m > img.fileSize {
			return n, corrupt("data block %d for disk offset %d lies beyond the end of the file (needs bytes up to %d, file size %d)",
				e, cur, fileOff+m, img.fileSize)
		}
		k, err := img.ra.ReadAt(p[n:n+int(m)], fileOff)
		if int64(k) < m {
			if err == nil || errors.Is(err, io.EOF) {
				return n + k, corrupt("data block %d for disk offset %d is cut short: file ends at %d, need bytes up to %d: %v",
					e, cur, fileOff+int64(k), fileOff+m, io.ErrUnexpectedEOF)
			}
			return n + k, fmt.Errorf("vdi: reading data block %d for disk offset %d: %w", e, cur, err)
		}
		n += int(m)
	}
	return n, eof
}

// blockStatus is the Extent status of virtual block v.
func (img *Image) blockStatus(v int64) (allocated, zero bool) {
	switch img.bmap[v] {
	case entryUnallocated:
		return false, true
	case entryDiscarded:
		return true, true
	default:
		return true, false
	}
}

// Extent returns the extent starting at start, at most length bytes long,
// whose blocks all have the same status: never written (Zero), discarded
// (Allocated and Zero) or stored (Allocated). Static images store every block.
func (img *Image) Extent(start, length int64) (image.Extent, error) {
	if img.closed.Load() {
		return image.Extent{}, os.ErrClosed
	}
	size := img.h.info.VirtualSize
	if start < 0 || length < 0 || start > size || length > size-start {
		return image.Extent{}, fmt.Errorf("vdi: extent %d+%d is out of bounds (disk size %d)", start, length, size)
	}
	if length == 0 {
		return image.Extent{Start: start}, nil
	}
	end := start + length
	v := start / blockSize
	alloc, zero := img.blockStatus(v)
	stop := (v + 1) * blockSize
	for stop < end {
		a, z := img.blockStatus(stop / blockSize)
		if a != alloc || z != zero {
			break
		}
		stop += blockSize
	}
	return image.Extent{Start: start, Length: min(stop, end) - start, Allocated: alloc, Zero: zero}, nil
}
