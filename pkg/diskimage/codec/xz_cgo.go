//go:build cgo

package codec

// liblzma is linked statically (the archive from Debian's liblzma-dev,
// 5.4 or later for the multithreaded decoder) so that the vimg binary runs
// on images without liblzma.so.

/*
#cgo LDFLAGS: -l:liblzma.a
#include <stdlib.h>
#include <string.h>
#include <lzma.h>

// The flags are the xz command's (xz -d without --single-stream or
// --ignore-check): concatenated streams are read through to the end, and an
// integrity check liblzma cannot verify is reported rather than skipped.
// timeout 0 makes lzma_code block until it has made progress, which is what
// a blocking Read wants (the xz command uses 300 ms only to update its
// progress display).
static lzma_ret vimg_xz_init(lzma_stream *s, uint32_t threads,
		uint64_t memlimit_threading, uint64_t memlimit_stop) {
	lzma_mt mt;
	memset(&mt, 0, sizeof(mt));
	mt.flags = LZMA_CONCATENATED | LZMA_TELL_UNSUPPORTED_CHECK;
	mt.threads = threads;
	mt.timeout = 0;
	mt.memlimit_threading = memlimit_threading;
	mt.memlimit_stop = memlimit_stop;
	return lzma_stream_decoder_mt(s, &mt);
}

typedef struct {
	lzma_ret ret;
	size_t in, out;
} vimg_xz_result;

// vimg_xz_code runs lzma_code once on Go memory. The buffers are the
// caller's for this call only: the pointers are cleared from the stream
// (which lives in C memory) before returning, as the cgo rules require.
// liblzma's worker threads never see them; the calling thread copies input
// into the threads' own buffers and their output out of them. The result
// comes back by value so that no Go variable's address goes to C.
static vimg_xz_result vimg_xz_code(lzma_stream *s, const void *in, size_t in_n,
		void *out, size_t out_n, int finish) {
	vimg_xz_result r;
	s->next_in = in;
	s->avail_in = in_n;
	s->next_out = out;
	s->avail_out = out_n;
	r.ret = lzma_code(s, finish ? LZMA_FINISH : LZMA_RUN);
	r.in = in_n - s->avail_in;
	r.out = out_n - s->avail_out;
	s->next_in = NULL;
	s->avail_in = 0;
	s->next_out = NULL;
	s->avail_out = 0;
	return r;
}
*/
import "C"

import (
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"
	"unsafe"

	"vimg.dev/vimg/pkg/diskimage/stream"
)

const xzImplementation = "liblzma-mt"

// Memory limits for liblzma's multithreaded decoder. A thread decoding a
// block holds the block's compressed and uncompressed bytes whole, plus its
// dictionary: about 17 MiB a thread for xz -T0 -3 (12 MiB blocks), about
// 300 MiB for -9 (192 MiB blocks).
//
// xzThreadMemory bounds all threads together: liblzma starts no more
// blocks at once than fit in it, and decodes a block too large for it
// alone in the calling thread (single-threaded, just the dictionary). The
// xz command allows a quarter of RAM here; a fixed bound keeps an importer
// pod's memory predictable whatever the machine.
//
// With GOMAXPROCS=1 there are no worker threads at all, as with xz -T1.
//
// xzMemoryLimit is where liblzma stops with LZMA_MEMLIMIT_ERROR. The guard
// refuses dictionaries over MaxWindow first, so it is a backstop. Tests
// lower both.
var (
	xzThreadMemory uint64 = 512 << 20
	xzMemoryLimit  uint64 = 1 << 30
)

const (
	xzInBuf     = 1 << 20   // compressed bytes handed to liblzma per call
	xzSmallRead = 64 << 10  // reads smaller than this go through xzOutBuf
	xzOutBuf    = 256 << 10 // decoded bytes per call for small reads
)

// xzReader decodes xz with liblzma. Reads and Close are serialised by mu,
// so that Close cannot free the decoder under a Read in another goroutine;
// a Close while a Read waits on the source waits for that Read.
type xzReader struct {
	mu      sync.Mutex
	h       *lzmaHandle
	cleanup runtime.Cleanup
	src     *tap      // under the guard: tells the source's errors apart
	g       io.Reader // the guarded stream
	in      []byte    // compressed bytes, in[inPos:inEnd] not yet taken by liblzma
	inPos   int
	inEnd   int
	eof     bool   // the guard reported the end of the input
	out     []byte // decoded bytes for small reads, out[outPos:outEnd] not yet read
	outPos  int
	outEnd  int
	err     error // sticky: io.EOF, a decoding error, or "closed"
}

// lzmaHandle owns the lzma_stream, which lives in C memory so that liblzma
// (and its threads) may keep pointers into it between calls.
type lzmaHandle struct {
	strm *C.lzma_stream
}

// free ends the decoder (lzma_end stops and joins its threads) and frees
// the stream. It is safe to call more than once.
func (h *lzmaHandle) free() {
	if h.strm == nil {
		return
	}
	C.lzma_end(h.strm)
	C.free(unsafe.Pointer(h.strm))
	h.strm = nil
}

func newXZReader(src *tap, g io.Reader) (io.ReadCloser, error) {
	// One thread per core Go may use (GOMAXPROCS follows the container's
	// CPU limit); 256 is far below liblzma's own maximum (16384).
	threads := max(1, min(runtime.GOMAXPROCS(0), 256))
	// Zeroed memory is LZMA_STREAM_INIT.
	strm := (*C.lzma_stream)(C.calloc(1, C.sizeof_lzma_stream))
	if strm == nil {
		return nil, errors.New("xz: cannot allocate a liblzma stream")
	}
	h := &lzmaHandle{strm: strm}
	memThreads := xzThreadMemory
	if threads == 1 {
		// As xz -T1 does: no worker thread, decode in the calling thread
		// without the block buffers.
		memThreads = 0
	}
	if ret := C.vimg_xz_init(strm, C.uint32_t(threads), C.uint64_t(memThreads), C.uint64_t(xzMemoryLimit)); ret != C.LZMA_OK {
		h.free()
		return nil, fmt.Errorf("xz: starting liblzma's decoder: %w", lzmaError(ret))
	}
	x := &xzReader{h: h, src: src, g: g, in: make([]byte, xzInBuf)}
	// A reader dropped without Close would otherwise keep its threads
	// and C memory for the life of the process.
	x.cleanup = runtime.AddCleanup(x, (*lzmaHandle).free, h)

	// Read the stream header now, as the other decoders do, and let
	// liblzma parse it: errors about the source or the header come from
	// NewReader, not from the first Read.
	n, err := io.ReadFull(g, x.in[:12])
	x.inEnd = n
	if err != nil {
		x.Close()
		return nil, src.wrap("xz", err)
	}
	if _, err := x.code(nil); err != nil {
		x.Close()
		return nil, err
	}
	return x, nil
}

func (x *xzReader) Read(p []byte) (int, error) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.outPos < x.outEnd {
		n := copy(p, x.out[x.outPos:x.outEnd])
		x.outPos += n
		return n, nil
	}
	if x.err != nil {
		return 0, x.err
	}
	if len(p) == 0 {
		return 0, nil
	}
	if len(p) >= xzSmallRead {
		// Decode straight into the caller's buffer.
		n, err := x.decode(p)
		x.err = err
		return n, err
	}
	// A cgo call and a pass through liblzma's locks per tiny read would
	// be slow (io.Copy to io.Discard reads 8 KiB at a time): decode a
	// bigger piece and hand it out.
	if x.out == nil {
		x.out = make([]byte, xzOutBuf)
	}
	n, err := x.decode(x.out)
	x.err = err
	x.outPos, x.outEnd = 0, n
	m := copy(p, x.out[:n])
	x.outPos = m
	if x.outPos < x.outEnd {
		return m, nil // the error, if any, once the rest is read
	}
	return m, err
}

// decode fills p with decoded bytes, reading the source as needed; only
// the end of the stream (io.EOF, with the last bytes) or an error makes it
// return less. Whole reads matter: the engine reads through a bufio.Reader
// as big as its reads, which passes whole reads straight through but
// copies every byte once more after a short one.
func (x *xzReader) decode(p []byte) (int, error) {
	n := 0
	for {
		if x.inPos == x.inEnd && !x.eof {
			if err := x.fill(); err != nil {
				return n, err
			}
		}
		m, err := x.code(p[n:])
		n += m
		if err != nil || n == len(p) {
			return n, err
		}
		// Not done: liblzma took all the input it had (and wants more),
		// or is at the end and about to say whether the stream is whole.
		// A call without progress makes lzma_code say LZMA_BUF_ERROR on
		// the next, so this loop cannot spin.
	}
}

// fill reads the next compressed bytes, as many as x.in holds unless the
// input ends first. Errors come back classified: the source's as they are,
// the guard's wrapping stream.ErrCorrupt or stream.ErrUnsupported. Bytes
// read along with an error are dropped; the error ends the stream anyway.
func (x *xzReader) fill() error {
	x.inPos, x.inEnd = 0, 0
	for x.inEnd < len(x.in) {
		n, err := x.g.Read(x.in[x.inEnd:])
		x.inEnd += n
		if err == io.EOF {
			x.eof = true
			return nil
		}
		if err != nil {
			return x.src.wrap("xz", err)
		}
	}
	return nil
}

// code runs liblzma once on the pending input, producing at most len(out)
// bytes (none when out is empty, which only parses headers). The action is
// LZMA_FINISH once the input has ended, which is how liblzma learns that a
// stream cut short is truncated.
func (x *xzReader) code(out []byte) (int, error) {
	in := x.in[x.inPos:x.inEnd]
	finish := C.int(0)
	if x.eof {
		finish = 1
	}
	r := C.vimg_xz_code(x.h.strm,
		unsafe.Pointer(unsafe.SliceData(in)), C.size_t(len(in)),
		unsafe.Pointer(unsafe.SliceData(out)), C.size_t(len(out)), finish)
	if uint64(r.in) > uint64(len(in)) || uint64(r.out) > uint64(len(out)) {
		return 0, errors.New("xz: liblzma reported more bytes than it was given") // never trust it blindly
	}
	x.inPos += int(r.in)
	switch r.ret {
	case C.LZMA_OK:
		return int(r.out), nil
	case C.LZMA_STREAM_END:
		// With LZMA_CONCATENATED this comes only at the end of the input,
		// after the last stream and its padding.
		return int(r.out), io.EOF
	case C.LZMA_UNSUPPORTED_CHECK:
		return int(r.out), fmt.Errorf("%w: xz: the stream's integrity check (type %d) is not one liblzma can verify",
			stream.ErrUnsupported, int(C.lzma_get_check(x.h.strm)))
	}
	return int(r.out), lzmaError(r.ret)
}

// lzmaError turns a liblzma error code into the package's errors.
func lzmaError(ret C.lzma_ret) error {
	switch ret {
	case C.LZMA_DATA_ERROR:
		return fmt.Errorf("%w: xz: the compressed data is corrupt (an integrity check failed or the data does not decode)", stream.ErrCorrupt)
	case C.LZMA_FORMAT_ERROR:
		return fmt.Errorf("%w: xz: not an .xz stream", stream.ErrCorrupt)
	case C.LZMA_BUF_ERROR:
		// Under LZMA_FINISH: the input ended where more was needed.
		return fmt.Errorf("%w: xz: stream is truncated", stream.ErrCorrupt)
	case C.LZMA_OPTIONS_ERROR:
		return fmt.Errorf("%w: xz: the stream uses options liblzma does not support", stream.ErrUnsupported)
	case C.LZMA_MEMLIMIT_ERROR:
		return fmt.Errorf("%w: xz: decoding the stream needs more than the %d MiB memory limit", stream.ErrUnsupported, xzMemoryLimit>>20)
	case C.LZMA_MEM_ERROR:
		return errors.New("xz: liblzma could not allocate memory")
	}
	return fmt.Errorf("xz: liblzma failed with code %d", int(ret))
}

// Close stops liblzma's threads and frees the decoder (not the source). It
// may be called more than once; Read after Close fails.
func (x *xzReader) Close() error {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.err = errors.New("xz: reader is closed")
	x.outPos, x.outEnd = 0, 0
	x.cleanup.Stop()
	x.h.free()
	return nil
}
