// Package sink is where a converted disk goes: a sparse regular file, a
// block device (a Kubernetes block-mode volume), or any io.WriterAt.
//
// A Target is written at most once per range by the conversion engine, in
// any order and from several goroutines at once; ranges it never writes must
// read back as zeros, which Zero guarantees in the cheapest way the target
// allows.
package sink

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"sync/atomic"
)

// Target is where a converted disk goes.
type Target interface {
	io.WriterAt
	// Zero makes [off, off+n) read back as zeros. On a fresh sparse file it
	// is a no-op (the range is a hole already); elsewhere it punches a hole,
	// issues BLKZEROOUT, or writes zeros — whatever reads back as zeros on
	// that target.
	Zero(off, n int64) error
	// Size is the target's size in bytes.
	Size() int64
	// Sync flushes data to stable storage (fsync).
	Sync() error
	Close() error
}

// Open opens path as a target of at least size bytes. A regular file is
// created or truncated and sized with ftruncate (sparse; existing content
// discarded). A block device is opened O_WRONLY (no O_TRUNC) and must be at
// least size bytes (error otherwise, saying both sizes); its Size comes from
// BLKGETSIZE64. The device is also opened O_EXCL, so that Linux refuses it
// while it is mounted or held by another exclusive user: a conversion must
// never write under a live file system. Anything else (a directory, a FIFO,
// a character device) is refused.
//
// WriteAt and Zero may be called from several goroutines at once.
//
// size may be Unknown for a disk whose length is known only at its end (a
// raw image from a pipe or a decompressor): a regular file then grows as it
// is written and takes its final size from Truncate; a block device keeps its
// own size.
func Open(path string, size int64) (Target, error) {
	if size < 0 && size != Unknown {
		return nil, fmt.Errorf("sink: negative size %d for %s", size, path)
	}
	fi, err := os.Stat(path)
	switch {
	case err == nil && fi.Mode()&fs.ModeDevice != 0 && fi.Mode()&fs.ModeCharDevice == 0:
		return openBlock(path, size)
	case err == nil && !fi.Mode().IsRegular():
		return nil, fmt.Errorf("sink: %s is neither a regular file nor a block device (%v)", path, fi.Mode().Type())
	case err != nil && !errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("sink: %w", err)
	}
	return openFile(path, size)
}

// Unknown is the size to pass to Open when the disk's length is not known yet.
const Unknown = -1

// Truncater is implemented by targets opened with size Unknown.
type Truncater interface {
	// Truncate fixes the final size once the whole disk was written.
	Truncate(size int64) error
}

// openFile creates or empties a regular file and gives it size bytes of
// hole.
func openFile(path string, size int64) (Target, error) {
	grow := size == Unknown
	if grow {
		size = 0
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("sink: %w", err)
	}
	fi, err := f.Stat()
	if err == nil && !fi.Mode().IsRegular() {
		err = fmt.Errorf("%s is not a regular file (%v)", path, fi.Mode().Type())
	}
	// Truncating to zero first drops every old extent, so that afterwards
	// each range the engine does not write is a hole that reads as zeros.
	if err == nil {
		err = f.Truncate(0)
	}
	if err == nil {
		err = f.Truncate(size)
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("sink: preparing %s: %w", path, err)
	}
	return &fileTarget{f: f, path: path, size: size, grow: grow}, nil
}

// fileTarget is a regular file or a block device.
type fileTarget struct {
	f     *os.File
	path  string
	size  int64
	block bool
	lbs   int64 // block device: logical block size, BLKZEROOUT's alignment
	// grow is set for a file opened with size Unknown: writes may land
	// anywhere until Truncate fixes the size.
	grow bool

	// written is set by the first WriteAt: until then every range of the
	// freshly truncated file is a hole and Zero has nothing to do.
	written atomic.Bool
	// noFastZero is set once punching holes (files) or BLKZEROOUT
	// (devices) turned out to be unsupported; Zero then writes zeros.
	noFastZero atomic.Bool
}

func (t *fileTarget) Size() int64 { return t.size }

func (t *fileTarget) limit() int64 {
	if t.grow {
		return maxGrowSize
	}
	return t.size
}

// maxGrowSize bounds a growing file like every disk format bounds its size.
const maxGrowSize = 64 << 40

// Truncate fixes the size of a file opened with size Unknown.
func (t *fileTarget) Truncate(size int64) error {
	if !t.grow {
		// A block device (or a file sized at Open) keeps its size; the
		// disk must fit.
		if size > t.size {
			return fmt.Errorf("sink: %s holds %d bytes, the disk needs %d", t.path, t.size, size)
		}
		return nil
	}
	if size < 0 || size > maxGrowSize {
		return fmt.Errorf("sink: refusing to size %s to %d bytes", t.path, size)
	}
	if err := t.f.Truncate(size); err != nil {
		return fmt.Errorf("sink: sizing %s to %d bytes: %w", t.path, size, err)
	}
	t.size, t.grow = size, false
	return nil
}

func (t *fileTarget) WriteAt(p []byte, off int64) (int, error) {
	if err := checkRange(t.path, off, int64(len(p)), t.limit(), "write"); err != nil {
		return 0, err
	}
	t.written.Store(true)
	n, err := t.f.WriteAt(p, off)
	if err != nil {
		err = fmt.Errorf("sink: writing %d bytes at offset %d of %s: %w", len(p), off, t.path, err)
	}
	return n, err
}

func (t *fileTarget) Zero(off, n int64) error {
	if err := checkRange(t.path, off, n, t.limit(), "zero"); err != nil || n == 0 {
		return err
	}
	var err error
	switch {
	case t.block:
		err = t.zeroBlock(off, n)
	case !t.written.Load():
		return nil // a hole since Open
	case !t.noFastZero.Load():
		err = punchHole(t.f, off, n)
		if errors.Is(err, errUnsupported) {
			t.noFastZero.Store(true)
			err = writeZeros(t.f, off, n)
		}
	default:
		err = writeZeros(t.f, off, n)
	}
	if err != nil {
		return fmt.Errorf("sink: zeroing %d bytes at offset %d of %s: %w", n, off, t.path, err)
	}
	return nil
}

// zeroBlock zeroes a device range: BLKZEROOUT for the part aligned to the
// logical block size (the kernel promises zeros, using WRITE ZEROES or
// writing them itself), plain writes of zeros for unaligned ends, and plain
// writes for all of it where the ioctl is refused. BLKDISCARD is never used:
// a discarded range need not read back as zeros.
func (t *fileTarget) zeroBlock(off, n int64) error {
	start := (off + t.lbs - 1) / t.lbs * t.lbs
	end := (off + n) / t.lbs * t.lbs
	if t.noFastZero.Load() || start >= end {
		return writeZeros(t.f, off, n)
	}
	if err := writeZeros(t.f, off, start-off); err != nil {
		return err
	}
	if err := writeZeros(t.f, end, off+n-end); err != nil {
		return err
	}
	err := zeroOut(t.f, start, end-start)
	if errors.Is(err, errUnsupported) {
		t.noFastZero.Store(true)
		err = writeZeros(t.f, start, end-start)
	}
	return err
}

func (t *fileTarget) Sync() error {
	if err := t.f.Sync(); err != nil {
		return fmt.Errorf("sink: flushing %s: %w", t.path, err)
	}
	return nil
}

func (t *fileTarget) Close() error {
	if err := t.f.Close(); err != nil {
		return fmt.Errorf("sink: closing %s: %w", t.path, err)
	}
	return nil
}

// errUnsupported marks a fast zeroing method the target does not have.
var errUnsupported = errors.New("not supported by this target")

// checkRange refuses any range that is not inside [0, size): a converter
// must never write outside its target, least of all on a block device.
func checkRange(name string, off, n, size int64, op string) error {
	if off < 0 || n < 0 || off > size || n > size-off {
		return fmt.Errorf("sink: refusing to %s %d bytes at offset %d: %s is %d bytes", op, n, off, name, size)
	}
	return nil
}

// zeroBuf is shared by every writer of zeros: WriterAt implementations must
// not modify the buffer they are given.
var zeroBuf [256 << 10]byte

// writeZeros writes n zero bytes at off in pieces of at most 256 KiB.
func writeZeros(w io.WriterAt, off, n int64) error {
	for n > 0 {
		k := min(n, int64(len(zeroBuf)))
		if _, err := w.WriteAt(zeroBuf[:k], off); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}

// FromWriterAt wraps any io.WriterAt of a known size. Zero writes zero
// bytes in bounded pieces unless w also implements Zero(off, n int64) error
// itself. Sync calls w's Sync() error if it has one; Close calls w's Close
// if it has one, so the Target owns w.
func FromWriterAt(w io.WriterAt, size int64) Target {
	return &writerAtTarget{w: w, size: size}
}

type writerAtTarget struct {
	w    io.WriterAt
	size int64
}

func (t *writerAtTarget) Size() int64 { return t.size }

func (t *writerAtTarget) WriteAt(p []byte, off int64) (int, error) {
	if err := checkRange("the target", off, int64(len(p)), t.size, "write"); err != nil {
		return 0, err
	}
	return t.w.WriteAt(p, off)
}

func (t *writerAtTarget) Zero(off, n int64) error {
	if err := checkRange("the target", off, n, t.size, "zero"); err != nil || n == 0 {
		return err
	}
	if z, ok := t.w.(interface{ Zero(off, n int64) error }); ok {
		return z.Zero(off, n)
	}
	return writeZeros(t.w, off, n)
}

func (t *writerAtTarget) Sync() error {
	if s, ok := t.w.(interface{ Sync() error }); ok {
		return s.Sync()
	}
	return nil
}

func (t *writerAtTarget) Close() error {
	if c, ok := t.w.(io.Closer); ok {
		return c.Close()
	}
	return nil
}
