package diskimage

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"

	"github.com/lima-vm/go-qcow2reader/image"

	"vimg.dev/vimg/pkg/diskimage/codec"
	"vimg.dev/vimg/pkg/diskimage/stream"
)

// Target is where the engine writes the disk. sink.Target satisfies it.
type Target interface {
	io.WriterAt
	// Zero makes [off, off+n) read back as zeros.
	Zero(off, n int64) error
	// Size is the target's size in bytes.
	Size() int64
	// Sync makes the data durable.
	Sync() error
}

// truncater is a target that can be sized once the disk size is known; only
// raw streams of unknown length need it.
type truncater interface{ Truncate(size int64) error }

// zeroBlock is the granularity of zero detection, as qemu-img's default -S.
const zeroBlock = 4096

// zeros is what isZero compares a block with; it never sees more than one.
var zeros = make([]byte, zeroBlock)

// readPiece is how much one random-access job reads.
const readPiece = 1 << 20

// job is one unit of work for a writer goroutine: a chunk to decode, or a
// range of an image to read.
type job struct {
	chunk stream.Chunk
	img   image.Image // read [off, off+n) of img when set
	off   int64
	n     int64
}

// writer runs workers that decode and write chunks in parallel, keeping only
// non-zero data, and remembers what it wrote so the rest can be zeroed.
type writer struct {
	ctx     context.Context
	target  Target
	size    int64 // virtual size, or -1 while unknown
	maxSize int64 // bound on a disk of unknown size
	jobs    chan job
	wg      sync.WaitGroup
	written ranges
	maxEnd  atomic.Int64
	bytes   atomic.Int64 // data bytes written
	handled atomic.Int64 // random access: guest bytes read or known zero
	errMu   sync.Mutex
	err     error
	failed  chan struct{}
	once    sync.Once
}

func newWriter(ctx context.Context, target Target, size, maxSize int64, workers int) *writer {
	w := &writer{ctx: ctx, target: target, size: size, maxSize: maxSize, jobs: make(chan job, 4*workers), failed: make(chan struct{})}
	for i := 0; i < workers; i++ {
		w.wg.Add(1)
		go w.work()
	}
	return w
}

func (w *writer) fail(err error) {
	w.errMu.Lock()
	if w.err == nil {
		w.err = err
	}
	w.errMu.Unlock()
	w.once.Do(func() { close(w.failed) })
}

func (w *writer) firstErr() error {
	w.errMu.Lock()
	defer w.errMu.Unlock()
	return w.err
}

// Put implements stream.Sink; it blocks while the workers are busy, which
// bounds memory to a few chunks per worker.
func (w *writer) Put(c stream.Chunk) error { return w.submit(job{chunk: c}) }

func (w *writer) submit(j job) error {
	select {
	case w.jobs <- j:
		return nil
	case <-w.failed:
		return w.firstErr()
	case <-w.ctx.Done():
		return context.Cause(w.ctx)
	}
}

// finish waits for the workers, zeroes what was not written and syncs.
func (w *writer) finish() error {
	close(w.jobs)
	w.wg.Wait()
	if err := w.firstErr(); err != nil {
		return err
	}
	size := w.size
	if size < 0 {
		size = w.maxEnd.Load()
		if t, ok := w.target.(truncater); ok {
			if err := t.Truncate(size); err != nil {
				return fmt.Errorf("sizing target to %d bytes: %w", size, err)
			}
		}
	}
	// A larger target (a grown disk) reads as zeros past the image too.
	for _, g := range w.written.gaps(max(size, w.target.Size())) {
		if err := w.target.Zero(g.start, g.end-g.start); err != nil {
			return fmt.Errorf("zeroing %d bytes at %d: %w", g.end-g.start, g.start, err)
		}
	}
	if err := w.target.Sync(); err != nil {
		return fmt.Errorf("syncing target: %w", err)
	}
	return nil
}

func (w *writer) work() {
	defer w.wg.Done()
	var buf []byte
	for j := range w.jobs {
		if w.firstErr() != nil {
			continue // drain
		}
		var (
			data []byte
			off  int64
		)
		if j.img != nil {
			if int64(cap(buf)) < j.n {
				buf = make([]byte, j.n)
			}
			data, off = buf[:j.n], j.off
			n, err := j.img.ReadAt(data, off)
			if err != nil && !(errors.Is(err, io.EOF) && int64(n) == j.n) {
				w.fail(fmt.Errorf("reading %d bytes at guest offset %d: %w", j.n, off, err))
				continue
			}
		} else {
			c := j.chunk
			off = c.Off
			if c.Codec == stream.Raw {
				data = c.Payload
			} else {
				if cap(buf) < c.Len {
					buf = make([]byte, c.Len)
				}
				n, err := codec.Decode(c.Codec, buf[:c.Len], c.Payload)
				if err != nil {
					w.fail(fmt.Errorf("decoding %s data for guest offset %d: %w", c.Codec, c.Off, err))
					continue
				}
				data = buf[:c.Len]
				clear(data[n:])
			}
		}
		if err := w.write(data, off); err != nil {
			w.fail(err)
		}
		if j.chunk.Recycle != nil {
			j.chunk.Recycle(j.chunk.Payload)
		}
		if j.img != nil {
			w.handled.Add(j.n)
		}
	}
}

// write writes the non-zero blocks of data at off, clipped to the disk size.
func (w *writer) write(data []byte, off int64) error {
	if off < 0 {
		return fmt.Errorf("%w: data at negative offset %d", stream.ErrCorrupt, off)
	}
	if w.size >= 0 {
		if off >= w.size {
			return nil // past the end: padding of the last cluster or grain
		}
		if end := off + int64(len(data)); end > w.size {
			data = data[:w.size-off]
		}
	} else {
		end := off + int64(len(data))
		if end > w.maxSize {
			return fmt.Errorf("%w: the image grows past the %d byte limit (a decompression bomb, or raise the limit)", stream.ErrCorrupt, w.maxSize)
		}
		for {
			cur := w.maxEnd.Load()
			if end <= cur || w.maxEnd.CompareAndSwap(cur, end) {
				break
			}
		}
	}
	if end := off + int64(len(data)); end > w.target.Size() && w.size >= 0 {
		return fmt.Errorf("the image needs %d bytes but the target holds %d", w.size, w.target.Size())
	}
	for i := 0; i < len(data); {
		// Skip zero blocks, then take the run of non-zero ones.
		for i < len(data) && isZero(data[i:min(i+zeroBlock, len(data))]) {
			i += zeroBlock
		}
		if i >= len(data) {
			break
		}
		j := i
		for j < len(data) && !isZero(data[j:min(j+zeroBlock, len(data))]) {
			j += zeroBlock
		}
		j = min(j, len(data))
		if _, err := w.target.WriteAt(data[i:j], off+int64(i)); err != nil {
			return fmt.Errorf("writing %d bytes at %d: %w", j-i, off+int64(i), err)
		}
		w.written.add(off+int64(i), off+int64(j))
		w.bytes.Add(int64(j - i))
		i = j
	}
	return nil
}

func isZero(b []byte) bool { return bytes.Equal(b, zeros[:len(b)]) }

// readImage queues every allocated, non-zero extent of img in pieces.
func (w *writer) readImage(img image.Image) error {
	size := img.Size()
	for off := int64(0); off < size; {
		e, err := img.Extent(off, min(size-off, 1<<30))
		if err != nil {
			return fmt.Errorf("mapping guest offset %d: %w", off, err)
		}
		if e.Length <= 0 {
			return fmt.Errorf("mapping guest offset %d: empty extent", off)
		}
		if e.Zero {
			w.handled.Add(e.Length)
		} else {
			for p := e.Start; p < e.Start+e.Length; {
				// Pieces end on readPiece boundaries so that clusters are
				// never split between two workers.
				n := min(readPiece-p%readPiece, e.Start+e.Length-p)
				if err := w.submit(job{img: img, off: p, n: n}); err != nil {
					return err
				}
				p += n
			}
		}
		off = e.Start + e.Length
	}
	return nil
}
