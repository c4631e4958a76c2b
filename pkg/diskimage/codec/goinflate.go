package codec

import (
	"bytes"
	"errors"
	"io"
	"sync"

	"github.com/klauspost/compress/flate"
	"github.com/klauspost/compress/zlib"
)

// goInflate is the pure-Go deflate/zlib decoder. It is the implementation
// of builds without cgo, and is compiled into every build so that tests and
// benchmarks can hold it against libdeflate.

// goInflater keeps one flate and one zlib reader for reuse: a fresh reader
// allocates tens of KiB of tables, which would dominate a 64 KiB cluster.
type goInflater struct {
	src bytes.Reader
	fr  io.ReadCloser // flate reader, also a flate.Resetter
	zr  io.ReadCloser // zlib reader, also a zlib.Resetter
	one [1]byte       // probe for output past len(dst), kept here so it does not escape per call
}

var goInflaters = sync.Pool{New: func() any { return new(goInflater) }}

func goInflate(zlibWrapped bool, dst, src []byte) (int, error) {
	what := "deflate"
	if zlibWrapped {
		what = "zlib"
	}
	g := goInflaters.Get().(*goInflater)
	defer func() {
		g.src.Reset(nil) // do not pin the caller's payload while pooled
		goInflaters.Put(g)
	}()
	g.src.Reset(src)

	var r io.Reader
	if zlibWrapped {
		if g.zr == nil {
			zr, err := zlib.NewReader(&g.src)
			if err != nil {
				return 0, corrupt(what, err)
			}
			g.zr = zr
		} else if err := g.zr.(zlib.Resetter).Reset(&g.src, nil); err != nil {
			return 0, corrupt(what, err)
		}
		r = g.zr
	} else {
		if g.fr == nil {
			g.fr = flate.NewReader(&g.src)
		} else if err := g.fr.(flate.Resetter).Reset(&g.src, nil); err != nil {
			return 0, corrupt(what, err)
		}
		r = g.fr
	}
	return readInto(what, r, dst, g.one[:])
}

// readInto fills dst from r and then checks that the stream ends there.
// Only a clean io.EOF ends the stream: flate reports a stream that stops
// before its final block as io.ErrUnexpectedEOF, which is corruption (and is
// what libdeflate says too), not a short payload.
func readInto(what string, r io.Reader, dst, one []byte) (int, error) {
	n, stalls := 0, 0
	for n < len(dst) {
		m, err := r.Read(dst[n:])
		n += m
		switch {
		case errors.Is(err, io.EOF):
			return n, nil // short payload: the caller pads with zeros
		case err != nil:
			return n, corrupt(what, err)
		case m == 0:
			if stalls++; stalls > 100 {
				return n, corrupt(what, io.ErrNoProgress)
			}
		}
	}
	m, err := r.Read(one)
	switch {
	case m > 0:
		return n, ErrTooLarge
	case errors.Is(err, io.EOF):
		return n, nil
	case err != nil:
		// The output is complete but the stream is not: a missing final
		// block or a bad checksum.
		return n, corrupt(what, err)
	}
	// (0, nil): read once more to be sure the stream really ends here.
	if m, err = r.Read(one); m > 0 {
		return n, ErrTooLarge
	} else if err != nil && !errors.Is(err, io.EOF) {
		return n, corrupt(what, err)
	}
	return n, nil
}
