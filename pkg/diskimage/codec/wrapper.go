package codec

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"

	"vimg.dev/vimg/pkg/diskimage/stream"
)

// MaxWindow bounds the history a wrapper decompressor may keep: the xz
// (LZMA2) dictionary and the zstd window. It is what bounds their memory.
//
// 256 MiB is four times the largest xz preset (-9 and -9e use 64 MiB) and
// twice what `zstd -d` accepts without --memory (128 MiB, enough for --long
// and --ultra -22), so anything made with the tools' ordinary settings opens,
// while a stream asking for gigabytes (xz --lzma2=dict=1536MiB, zstd
// --long=31) is refused instead of letting a hostile upload size our memory.
// (Memory is more than the window: the pure-Go xz reader allocates a fresh
// dictionary for every block, so the heap can briefly hold two; liblzma's
// multithreaded decoder holds a dictionary and a block's buffers per thread,
// bounded as a whole by its own limits, see xz_cgo.go.)
const MaxWindow = 256 << 20

// DetectWrapper names the compression a stream starts with, from its first
// bytes: "gzip", "xz", "zstd", or "" when it is none of them.
func DetectWrapper(hdr []byte) string {
	switch {
	case bytes.HasPrefix(hdr, []byte{0x1f, 0x8b}):
		return "gzip"
	case bytes.HasPrefix(hdr, []byte{0xfd, '7', 'z', 'X', 'Z', 0x00}):
		return "xz"
	case bytes.HasPrefix(hdr, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		return "zstd"
	}
	return ""
}

// NewReader decompresses r, a whole file compressed with kind ("gzip",
// "xz" or "zstd", as DetectWrapper names them). Concatenated streams (pigz,
// pxz, zstd -T) are read through to the end. The stream's header is read
// before NewReader returns. Errors about the compressed data wrap
// stream.ErrCorrupt, a stream needing more than MaxWindow of history wraps
// stream.ErrUnsupported, and errors from r come back unchanged. Close
// releases the decompressor, not r.
func NewReader(kind string, r io.Reader) (io.ReadCloser, error) {
	src := &tap{r: r}
	switch kind {
	case "gzip":
		zr, err := gzip.NewReader(src)
		if err != nil {
			return nil, src.wrap("gzip", err)
		}
		return &reader{kind: kind, r: zr, src: src, close: zr.Close}, nil
	case "xz":
		// The guard walks the container ahead of the decoder, so that a
		// dictionary over MaxWindow is refused before anything allocates
		// it, whichever decoder runs behind it (XZImplementation).
		return newXZReader(src, newXZGuard(src, MaxWindow))
	case "zstd":
		br := bufio.NewReaderSize(src, 64<<10)
		if err := checkZstdWindow(br); err != nil {
			return nil, src.wrap("zstd", err)
		}
		zr, err := zstd.NewReader(br,
			zstd.WithDecoderMaxWindow(MaxWindow),
			zstd.WithDecoderMaxMemory(MaxWindow),
			// Decode the stream as a stream: never slurp a buffer whole.
			zstd.WithDecodeBuffersBelow(0),
			// One goroutine: the engine has the other cores busy, and the
			// memory stays one window plus one block.
			zstd.WithDecoderConcurrency(1),
		)
		if err != nil {
			return nil, fmt.Errorf("zstd: creating decoder: %w", err)
		}
		return &reader{kind: kind, r: zr, src: src, close: func() error { zr.Close(); return nil }}, nil
	}
	return nil, fmt.Errorf("%w: unknown compression %q (want gzip, xz or zstd)", stream.ErrUnsupported, kind)
}

// XZImplementation names the xz decoder compiled in: "liblzma-mt" (cgo
// builds: liblzma's multithreaded decoder, linked statically, one thread per
// GOMAXPROCS; blocks run in parallel only in files written by xz -T or
// pxz, which record block sizes) or "go" (github.com/ulikunitz/xz, one
// goroutine). Both sit behind the same header guard, so oversized
// dictionaries are refused with the same message.
func XZImplementation() string { return xzImplementation }

// checkZstdWindow refuses, with the number in the message, a stream whose
// first frame needs a window over MaxWindow. Later frames are checked by
// the decoder itself.
func checkZstdWindow(br *bufio.Reader) error {
	hdr, err := br.Peek(zstd.HeaderMaxSize)
	if len(hdr) == 0 && err != nil {
		return err
	}
	var h zstd.Header
	if err := h.Decode(hdr); err != nil {
		return fmt.Errorf("frame header: %w", err)
	}
	w := h.WindowSize
	if h.SingleSegment {
		w = h.FrameContentSize
	}
	if w > MaxWindow {
		return fmt.Errorf("%w: zstd: the stream needs a %d MiB window, more than the %d MiB limit (made with --long or a high --ultra level?)",
			stream.ErrUnsupported, w>>20, MaxWindow>>20)
	}
	return nil
}

// reader turns a decompressor's errors into the package's: corruption
// wraps stream.ErrCorrupt, the source's own errors pass unchanged.
type reader struct {
	kind  string
	r     io.Reader
	src   *tap
	close func() error
	err   error
}

func (r *reader) Read(p []byte) (int, error) {
	if r.err != nil {
		return 0, r.err
	}
	n, err := r.r.Read(p)
	if err != nil && err != io.EOF {
		err = r.src.wrap(r.kind, err)
		r.err = err
	}
	return n, err
}

func (r *reader) Close() error {
	r.err = errors.New(r.kind + ": reader is closed")
	if r.close != nil {
		c := r.close
		r.close = nil
		return c()
	}
	return nil
}

// tap remembers the error its reader returned, so that an I/O error can be
// told apart from the decompressor's complaints about the data.
type tap struct {
	r   io.Reader
	err error
}

func (t *tap) Read(p []byte) (int, error) {
	n, err := t.r.Read(p)
	if err != nil && err != io.EOF {
		t.err = err
	}
	return n, err
}

// wrap classifies err from kind's decompressor.
func (t *tap) wrap(kind string, err error) error {
	switch {
	case t.err != nil && errors.Is(err, t.err):
		return err
	case t.err != nil:
		// The decompressor replaced the source's error with its own.
		return fmt.Errorf("%s: reading the compressed stream: %w", kind, t.err)
	case errors.Is(err, zstd.ErrWindowSizeExceeded), errors.Is(err, zstd.ErrDecoderSizeExceeded):
		// In a stream these mostly mean a later frame's window is over the
		// limit (the first frame's is checked up front), rarely corruption.
		return fmt.Errorf("%w: zstd: a frame needs a window over the %d MiB limit, or refers past its window: %v", stream.ErrUnsupported, MaxWindow>>20, err)
	case errors.Is(err, io.EOF):
		return fmt.Errorf("%w: %s: stream is empty or truncated", stream.ErrCorrupt, kind)
	}
	return corrupt(kind, err)
}
