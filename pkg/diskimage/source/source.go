// Package source says where the bytes of a disk image come from: a local
// file or block device, stdin or any other stream, or an HTTP(S) URL.
//
// A Source offers random access when the medium allows it (a file, an HTTP
// server that honours Range requests), which lets the format readers skip
// unallocated parts of a sparse image, and always offers a sequential stream,
// which is what the stream decoders use for pipes and servers without Range.
package source

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
)

// Source is an opened image source.
type Source interface {
	// Size is the total size in bytes, or -1 when unknown (a pipe, chunked
	// HTTP with no Content-Length).
	Size() int64
	// ReaderAt returns random access, or nil when the source cannot seek (a
	// pipe, an HTTP server without Range support). The returned ReaderAt is
	// safe for concurrent use and follows the io.ReaderAt contract: a read
	// that reaches Size returns io.EOF.
	ReaderAt() io.ReaderAt
	// Stream returns the source's bytes from offset 0, once, sequentially.
	// It may be called only once, and not after ReaderAt has been used.
	// Closing the stream does not close the Source.
	Stream() (io.ReadCloser, error)
	// Name is a display name for messages: the path, or the URL without
	// credentials or query string.
	Name() string
	// Close releases the source. Streams and ReaderAts obtained from it
	// stop working.
	Close() error
}

// ErrStreamUsed is returned by a second call to Stream.
var ErrStreamUsed = errors.New("source: Stream may be called only once")

// Open opens spec: "-" is stdin, an http:// or https:// URL is fetched with
// OpenHTTP, a file:// URL or anything else is a local path. ctx bounds the
// whole life of an HTTP source, not just the opening.
func Open(ctx context.Context, spec string, opts HTTPOptions) (Source, error) {
	lower := strings.ToLower(spec)
	switch {
	case spec == "-":
		return FromReader(os.Stdin, "stdin"), nil
	case strings.HasPrefix(lower, "http://"), strings.HasPrefix(lower, "https://"):
		return OpenHTTP(ctx, spec, opts)
	case strings.HasPrefix(lower, "file://"):
		return OpenFile(spec[len("file://"):])
	}
	return OpenFile(spec)
}

// OpenFile opens a local file or block device. A regular file or a block
// device gives random access (pread is safe for concurrent use); anything
// else that can be opened (a FIFO, /dev/stdin on a pipe, a character
// device) is read as a stream of unknown size.
func OpenFile(path string) (Source, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open image: %w", err)
	}
	s, err := fromFile(f, path, true)
	if err != nil {
		f.Close()
		return nil, err
	}
	return s, nil
}

// FromReader wraps a stream, usually stdin. The Source does not own r: Close
// and the stream's Close leave it open. If r is an *os.File on a regular file
// or block device (stdin redirected from a file), the Source behaves like
// OpenFile and reads it from offset 0. If r has ReadAt and Size methods (a
// *bytes.Reader, *io.SectionReader) it is used for random access too.
// Otherwise ReaderAt is nil and Size is -1.
func FromReader(r io.Reader, name string) Source {
	if f, ok := r.(*os.File); ok {
		if s, err := fromFile(f, name, false); err == nil {
			return s
		}
	}
	if ra, ok := r.(sizedReaderAt); ok && ra.Size() >= 0 {
		return &fileSource{name: name, size: ra.Size(), ra: ra}
	}
	return &streamSource{name: name, r: r}
}

type sizedReaderAt interface {
	io.ReaderAt
	Size() int64
}

// fromFile decides how f can be read. It only fails on errors worth
// reporting; a file that cannot seek becomes a streamSource.
func fromFile(f *os.File, name string, owned bool) (Source, error) {
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("stat %s: %w", name, err)
	}
	mode := fi.Mode()
	switch {
	case mode.IsDir():
		return nil, fmt.Errorf("open image %s: is a directory", name)
	case mode.IsRegular():
		s := &fileSource{name: name, size: fi.Size(), ra: f}
		if owned {
			s.closer = f
		}
		return s, nil
	case mode&os.ModeDevice != 0 && mode&os.ModeCharDevice == 0:
		// A block device reports size 0 in Stat; its real size is where a
		// seek to the end lands. The offset is put back because stdin's
		// is shared with the shell.
		cur, err := f.Seek(0, io.SeekCurrent)
		if err != nil {
			return nil, fmt.Errorf("size of block device %s: %w", name, err)
		}
		size, err := f.Seek(0, io.SeekEnd)
		if err != nil {
			return nil, fmt.Errorf("size of block device %s: %w", name, err)
		}
		if _, err := f.Seek(cur, io.SeekStart); err != nil {
			return nil, fmt.Errorf("size of block device %s: %w", name, err)
		}
		s := &fileSource{name: name, size: size, ra: f}
		if owned {
			s.closer = f
		}
		return s, nil
	}
	s := &streamSource{name: name, r: f}
	if owned {
		s.closer = f
	}
	return s, nil
}

// fileSource is anything with ReadAt and a known size.
type fileSource struct {
	name   string
	size   int64
	ra     io.ReaderAt
	closer io.Closer // nil when the caller owns the file

	mu       sync.Mutex
	streamed bool
}

func (s *fileSource) Size() int64           { return s.size }
func (s *fileSource) ReaderAt() io.ReaderAt { return s.ra }
func (s *fileSource) Name() string          { return s.name }

func (s *fileSource) Stream() (io.ReadCloser, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.streamed {
		return nil, ErrStreamUsed
	}
	s.streamed = true
	// A SectionReader reads with pread, so the file offset (which stdin
	// shares with the parent shell) is left alone.
	return io.NopCloser(io.NewSectionReader(s.ra, 0, s.size)), nil
}

func (s *fileSource) Close() error {
	if s.closer == nil {
		return nil
	}
	return s.closer.Close()
}

// streamSource is a reader that can only be read once, front to back.
type streamSource struct {
	name   string
	r      io.Reader
	closer io.Closer

	mu       sync.Mutex
	streamed bool
}

func (s *streamSource) Size() int64           { return -1 }
func (s *streamSource) ReaderAt() io.ReaderAt { return nil }
func (s *streamSource) Name() string          { return s.name }

func (s *streamSource) Stream() (io.ReadCloser, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.streamed {
		return nil, ErrStreamUsed
	}
	s.streamed = true
	return io.NopCloser(s.r), nil
}

func (s *streamSource) Close() error {
	if s.closer == nil {
		return nil
	}
	return s.closer.Close()
}
