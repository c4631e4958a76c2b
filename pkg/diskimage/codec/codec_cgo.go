//go:build cgo

package codec

// libdeflate is linked statically (the archive from Debian's libdeflate-dev)
// so that the vimg binary runs on images without libdeflate.so.

/*
#cgo LDFLAGS: -l:libdeflate.a
#include <stddef.h>
#include <libdeflate.h>

// vimg_result comes back by value so that no Go variable has its address
// taken for C, which would make it escape to the heap on every call.
typedef struct {
	int res;
	size_t out;
} vimg_result;

// Stands in for dst when it is empty: libdeflate gets a valid pointer and
// zero bytes of room, so it can only say INSUFFICIENT_SPACE or succeed.
static unsigned char vimg_empty[1];

static vimg_result vimg_inflate(struct libdeflate_decompressor *d, int zlib,
		const void *in, size_t in_n, void *out, size_t out_n) {
	vimg_result r = {0, 0};
	size_t in_used = 0;
	if (out_n == 0)
		out = vimg_empty;
	if (zlib)
		r.res = libdeflate_zlib_decompress_ex(d, in, in_n, out, out_n, &in_used, &r.out);
	else
		r.res = libdeflate_deflate_decompress_ex(d, in, in_n, out, out_n, &in_used, &r.out);
	return r;
}
*/
import "C"

import (
	"fmt"
	"runtime"
	"sync"
	"unsafe"

	"vimg.dev/vimg/pkg/diskimage/stream"
)

const implementation = "libdeflate"

// decompressor owns one libdeflate decompressor. libdeflate's objects are
// not safe for concurrent use, so each call takes one from a pool; the pool
// may drop them at any GC, and the cleanup then frees the C memory.
type decompressor struct {
	p *C.struct_libdeflate_decompressor
}

var decompressors = sync.Pool{New: func() any {
	p := C.libdeflate_alloc_decompressor()
	if p == nil {
		return nil
	}
	d := &decompressor{p: p}
	runtime.AddCleanup(d, func(p *C.struct_libdeflate_decompressor) {
		C.libdeflate_free_decompressor(p)
	}, p)
	return d
}}

func inflate(zlibWrapped bool, dst, src []byte) (int, error) {
	what := "deflate"
	if zlibWrapped {
		what = "zlib"
	}
	if len(src) == 0 {
		return 0, fmt.Errorf("%w: %s: empty stream", stream.ErrCorrupt, what)
	}
	d, _ := decompressors.Get().(*decompressor)
	if d == nil {
		return 0, fmt.Errorf("%s: libdeflate could not allocate a decompressor", what)
	}
	z := C.int(0)
	if zlibWrapped {
		z = 1
	}
	// Passing Go memory that holds no Go pointers for the duration of the
	// call is allowed by the cgo rules; libdeflate keeps no reference.
	r := C.vimg_inflate(d.p, z,
		unsafe.Pointer(unsafe.SliceData(src)), C.size_t(len(src)),
		unsafe.Pointer(unsafe.SliceData(dst)), C.size_t(len(dst)))
	runtime.KeepAlive(d)
	decompressors.Put(d)

	switch r.res {
	case C.LIBDEFLATE_SUCCESS:
		if uint64(r.out) > uint64(len(dst)) { // cannot happen; never trust it blindly
			return 0, ErrTooLarge
		}
		return int(r.out), nil
	case C.LIBDEFLATE_INSUFFICIENT_SPACE:
		return 0, ErrTooLarge
	case C.LIBDEFLATE_SHORT_OUTPUT:
		// Only returned when no output length is asked for; we always ask,
		// and a short payload comes back as SUCCESS with r.out < len(dst).
		return 0, fmt.Errorf("%w: %s: libdeflate reported a short output without its length", stream.ErrCorrupt, what)
	case C.LIBDEFLATE_BAD_DATA:
		return 0, fmt.Errorf("%w: %s: invalid or truncated stream", stream.ErrCorrupt, what)
	}
	return 0, fmt.Errorf("%w: %s: libdeflate result %d", stream.ErrCorrupt, what, int(r.res))
}
