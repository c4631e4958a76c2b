package diskimage

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"hash"
	"io"
	"runtime"
	"sync/atomic"
	"time"

	"github.com/lima-vm/go-qcow2reader/image"

	"vimg.dev/vimg/pkg/diskimage/codec"
	"vimg.dev/vimg/pkg/diskimage/qcow2"
	"vimg.dev/vimg/pkg/diskimage/source"
	"vimg.dev/vimg/pkg/diskimage/stream"
	"vimg.dev/vimg/pkg/diskimage/vdi"
	"vimg.dev/vimg/pkg/diskimage/vmdk"
)

// Options tunes Convert.
type Options struct {
	// OpenTarget opens the destination once the disk size is known. size is
	// -1 for a raw stream whose length is only known at its end; the target
	// must then accept writes anywhere and implement Truncate.
	OpenTarget func(size int64) (Target, error)
	// Checksum, when set, is checked against the source bytes as received.
	// It makes the conversion read the source in one sequential pass.
	Checksum *Checksum
	// Progress is called every ProgressInterval (default 1 s) and once at
	// the end.
	Progress         func(Progress)
	ProgressInterval time.Duration
	// Workers decode and write in parallel; default GOMAXPROCS (at least 2).
	Workers int
	// Sequential forces the one-pass path even for a seekable source.
	Sequential bool
	// SpillLimit bounds the memory a one-pass qcow2 conversion may hold for
	// clusters that arrive before their tables (default 128 MiB).
	SpillLimit int64
	// MaxSize bounds the virtual size of every image, and above all of raw
	// data whose size is known only at its end, so that a small compressed
	// file cannot expand forever (default DefaultMaxSize).
	MaxSize int64
}

// DefaultMaxSize is the largest disk accepted by default: 64 TiB, the limit
// every format reader applies to its own header.
const DefaultMaxSize = 64 << 40

// Progress reports how far a conversion is.
type Progress struct {
	SourceRead  int64 // bytes of the source read so far
	SourceTotal int64 // source size, -1 if unknown
	Written     int64 // bytes of non-zero data written to the target
	VirtualSize int64 // disk size, -1 until known
	// Fraction is how much of the work is done, 0..1, or -1 when it cannot
	// be told (a stream of unknown length). Random access counts the guest
	// bytes handled; one pass counts the source bytes read.
	Fraction float64
}

// Result describes a finished conversion.
type Result struct {
	Info       Info
	Written    int64 // bytes of data written (zeros are not written)
	SourceRead int64
	Sequential bool   // the one-pass path was used
	Digest     string // "algo:hex" of the source when a checksum was checked
}

// Convert reads the image from src and writes the raw disk to the target.
// It returns an error, and the target must not be used, when anything about
// the source is wrong: bad format, hostile metadata, truncation, or a
// checksum mismatch.
func Convert(ctx context.Context, src source.Source, opts Options) (*Result, error) {
	if opts.Workers <= 0 {
		opts.Workers = max(2, runtime.GOMAXPROCS(0))
	}
	if opts.MaxSize <= 0 {
		opts.MaxSize = DefaultMaxSize
	}
	if opts.ProgressInterval <= 0 {
		opts.ProgressInterval = time.Second
	}
	c := &conversion{ctx: ctx, src: src, opts: opts}
	c.virtual.Store(-1)
	stop := c.startProgress()
	res, err := c.run()
	if err == nil {
		c.finished.Store(true)
	}
	stop()
	return res, err
}

type conversion struct {
	ctx      context.Context
	src      source.Source
	opts     Options
	read     atomic.Int64
	virtual  atomic.Int64
	random   atomic.Bool // the random-access path runs
	finished atomic.Bool // the conversion succeeded
	w        *writer
}

func (c *conversion) progress() Progress {
	p := Progress{SourceRead: c.read.Load(), SourceTotal: c.src.Size(), VirtualSize: c.virtual.Load(), Fraction: -1}
	if c.w != nil {
		p.Written = c.w.bytes.Load()
	}
	switch {
	case c.finished.Load():
		p.Fraction = 1
	case c.random.Load() && p.VirtualSize > 0:
		p.Fraction = float64(c.w.handled.Load()) / float64(p.VirtualSize)
	case !c.random.Load() && p.SourceTotal > 0:
		p.Fraction = float64(p.SourceRead) / float64(p.SourceTotal)
	}
	if p.Fraction > 1 {
		p.Fraction = 1
	}
	return p
}

func (c *conversion) startProgress() func() {
	if c.opts.Progress == nil {
		return func() {}
	}
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		t := time.NewTicker(c.opts.ProgressInterval)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				c.opts.Progress(c.progress())
			case <-done:
				return
			}
		}
	}()
	return func() {
		close(done)
		<-finished
		c.opts.Progress(c.progress())
	}
}

func (c *conversion) run() (*Result, error) {
	ra := c.src.ReaderAt()
	if ra != nil && c.opts.Checksum == nil && !c.opts.Sequential {
		ra = &countingReaderAt{ra: ra, n: &c.read}
		hdr := make([]byte, min(ProbeSize, max(c.src.Size(), 0)))
		if n, err := ra.ReadAt(hdr, 0); err != nil && !errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("reading %s: %w", c.src.Name(), err)
		} else {
			hdr = hdr[:n]
		}
		if DetectCompression(hdr) == NoCompression {
			return c.randomAccess(ra, hdr)
		}
		// A compressed file can only be read front to back.
	}
	return c.sequential()
}

func (c *conversion) randomAccess(ra io.ReaderAt, hdr []byte) (*Result, error) {
	img, info, err := openImage(ra, c.src.Size(), hdr)
	if err != nil {
		return nil, err
	}
	defer img.Close()
	if err := c.checkSize(info.VirtualSize); err != nil {
		return nil, err
	}
	c.virtual.Store(info.VirtualSize)
	t, err := c.opts.OpenTarget(info.VirtualSize)
	if err != nil {
		return nil, err
	}
	c.w = newWriter(c.ctx, t, info.VirtualSize, c.opts.MaxSize, c.opts.Workers)
	c.random.Store(true)
	if err := c.w.readImage(img); err != nil {
		c.w.fail(err)
	}
	if err := c.w.finish(); err != nil {
		return nil, err
	}
	return &Result{Info: *info, Written: c.w.bytes.Load(), SourceRead: c.read.Load()}, nil
}

func (c *conversion) checkSize(size int64) error {
	if size > c.opts.MaxSize {
		return fmt.Errorf("%w: virtual size %d exceeds the %d byte limit", stream.ErrUnsupported, size, c.opts.MaxSize)
	}
	return nil
}

// openImage opens a seekable, uncompressed image for random access.
func openImage(ra io.ReaderAt, size int64, hdr []byte) (image.Image, *Info, error) {
	info := &Info{Format: DetectFormat(hdr), FileSize: size}
	var img image.Image
	switch info.Format {
	case QCOW2:
		q, err := qcow2.Open(ra, size)
		if err != nil {
			return nil, nil, err
		}
		info.setQcow2(q.Header())
		img = q
	case VMDK:
		v, err := vmdk.Open(ra, size)
		if err != nil {
			return nil, nil, err
		}
		info.setVMDK(v.Info())
		img = v
	case VDI:
		v, err := vdi.Open(ra, size)
		if err != nil {
			return nil, nil, err
		}
		info.setVDI(v.Info())
		img = v
	default:
		if size < 0 {
			return nil, nil, fmt.Errorf("raw image of unknown size")
		}
		img = &rawImage{ra: ra, size: size, typ: image.Type(info.Format)}
	}
	info.VirtualSize = img.Size()
	info.CDROM = info.Format == ISO
	return img, info, nil
}

// sequential converts in one pass over the source's byte stream.
func (c *conversion) sequential() (*Result, error) {
	rc, err := c.src.Stream()
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	var in io.Reader = &countingReader{r: rc, n: &c.read}
	var h hash.Hash
	if c.opts.Checksum != nil {
		h = c.opts.Checksum.newHash()
		in = io.TeeReader(in, h)
	}
	raw := bufio.NewReaderSize(in, 1<<20)
	dec, info, closeDec, err := openStream(raw, c.src.Size(), c.opts.SpillLimit)
	if err != nil {
		return nil, err
	}
	defer closeDec()
	if err := c.checkSize(dec.Size()); err != nil {
		return nil, err
	}
	c.virtual.Store(dec.Size())
	t, err := c.opts.OpenTarget(dec.Size())
	if err != nil {
		return nil, err
	}
	c.w = newWriter(c.ctx, t, dec.Size(), c.opts.MaxSize, c.opts.Workers)
	if err := dec.Run(c.w); err != nil {
		c.w.fail(err)
	}
	if err := c.w.finish(); err != nil {
		return nil, err
	}
	if info.VirtualSize < 0 {
		info.VirtualSize = c.w.maxEnd.Load()
		c.virtual.Store(info.VirtualSize)
	}
	// The checksum covers the whole source: read what the decoder left.
	if _, err := io.Copy(io.Discard, raw); err != nil {
		return nil, fmt.Errorf("reading %s to its end: %w", c.src.Name(), err)
	}
	res := &Result{Info: *info, Written: c.w.bytes.Load(), SourceRead: c.read.Load(), Sequential: true}
	if h != nil {
		if err := c.opts.Checksum.verify(h); err != nil {
			return nil, err
		}
		res.Digest = c.opts.Checksum.String()
	}
	return res, nil
}

// openStream detects compression and format on a byte stream and returns the
// format's one-pass decoder.
func openStream(raw *bufio.Reader, size int64, spillLimit int64) (stream.Decoder, *Info, func(), error) {
	info := &Info{FileSize: size}
	closer := func() {}
	hdr, err := raw.Peek(ProbeSize)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, nil, closer, fmt.Errorf("reading header: %w", err)
	}
	r := raw
	info.Compression = DetectCompression(hdr)
	if info.Compression != NoCompression {
		dr, err := codec.NewReader(string(info.Compression), raw)
		if err != nil {
			return nil, nil, closer, fmt.Errorf("%s: %w", info.Compression, err)
		}
		closer = func() { dr.Close() }
		r = bufio.NewReaderSize(dr, 1<<20)
		if hdr, err = r.Peek(ProbeSize); err != nil && !errors.Is(err, io.EOF) {
			return nil, nil, closer, fmt.Errorf("decompressing %s: %w", info.Compression, err)
		}
		if inner := DetectCompression(hdr); inner != NoCompression {
			return nil, nil, closer, fmt.Errorf("%w: %s inside %s: only one level of compression is supported", stream.ErrUnsupported, inner, info.Compression)
		}
		size = -1 // the decompressed length is known only at the end
	}
	info.Format = DetectFormat(hdr)
	info.CDROM = info.Format == ISO
	var dec stream.Decoder
	switch info.Format {
	case QCOW2:
		d, h, err := qcow2.NewDecoder(r, qcow2.StreamOptions{SpillLimit: spillLimit})
		if err != nil {
			return nil, nil, closer, err
		}
		info.setQcow2(h)
		dec = d
	case VMDK:
		d, vi, err := vmdk.NewDecoder(r)
		if err != nil {
			return nil, nil, closer, err
		}
		info.setVMDK(vi)
		dec = d
	case VDI:
		d, vi, err := vdi.NewDecoder(r)
		if err != nil {
			return nil, nil, closer, err
		}
		info.setVDI(vi)
		dec = d
	default:
		dec = &rawDecoder{r: r, size: size}
	}
	info.VirtualSize = dec.Size()
	return dec, info, closer, nil
}

// rawDecoder streams a raw disk or ISO in 1 MiB chunks.
type rawDecoder struct {
	r    io.Reader
	size int64
}

// rawChunk is the size of the chunks a raw stream is cut into, and
// rawFree how many spent buffers are kept for reuse: enough for the chunks
// queued and in flight in the writer (4 per worker plus one per worker).
const (
	rawChunk = 1 << 20
	rawFree  = 64
)

func (d *rawDecoder) Size() int64 { return d.size }

func (d *rawDecoder) Run(sink stream.Sink) error {
	free := make(chan []byte, rawFree)
	recycle := func(b []byte) {
		select {
		case free <- b[:cap(b)]:
		default: // more buffers than the list keeps: let the GC have it
		}
	}
	var off int64
	for {
		var buf []byte
		select {
		case buf = <-free:
		default:
			buf = make([]byte, rawChunk)
		}
		n, err := io.ReadFull(d.r, buf)
		if n > 0 {
			if perr := sink.Put(stream.Chunk{Off: off, Len: n, Codec: stream.Raw, Payload: buf[:n], Recycle: recycle}); perr != nil {
				return perr
			}
			off += int64(n)
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			if d.size >= 0 && off != d.size {
				return fmt.Errorf("%w: the stream ended after %d of %d bytes", stream.ErrCorrupt, off, d.size)
			}
			return nil
		}
		if err != nil {
			return err
		}
	}
}

type countingReader struct {
	r io.Reader
	n *atomic.Int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}

type countingReaderAt struct {
	ra io.ReaderAt
	n  *atomic.Int64
}

func (c *countingReaderAt) ReadAt(p []byte, off int64) (int, error) {
	n, err := c.ra.ReadAt(p, off)
	c.n.Add(int64(n))
	return n, err
}
