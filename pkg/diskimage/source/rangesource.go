package source

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
)

// RangeOptions tune NewRangeSource.
type RangeOptions struct {
	// Window is the size of the aligned windows fetched and cached
	// (default 8 MiB, clamped like HTTPOptions.ReadAhead). The cache holds
	// at most 8 windows.
	Window int
}

// NewRangeSource returns a Source of size bytes named name whose ReaderAt
// serves reads from cached windows filled by fetch, and whose Stream reads
// the same bytes front to back (through the window cache, so that
// sequential streaming also prefetches). fetch must fill p completely with
// the bytes at off or return an error; it is called from several goroutines
// at once and must honour ctx. Close cancels ctx and waits for background
// fetches.
//
// It suits any medium that reads byte ranges: an object store, a registry
// blob, a remote file. size must not be negative.
func NewRangeSource(ctx context.Context, name string, size int64, fetch func(ctx context.Context, off int64, p []byte) error, opts RangeOptions) Source {
	if size < 0 {
		panic(fmt.Sprintf("source: NewRangeSource %s with negative size %d", name, size))
	}
	s := &rangeSource{name: name, size: size, fetchFn: fetch}
	s.ctx, s.cancel = context.WithCancelCause(ctx)
	s.cache = newWindowCache(rangeMedium{
		size:    size,
		ctx:     s.ctx,
		fetch:   s.fetch,
		wrap:    s.wrap,
		track:   s.track,
		untrack: s.background.Done,
	}, clampWindow(opts.Window))
	return s
}

// rangeSource is a Source over a caller's fetch function.
type rangeSource struct {
	name    string
	size    int64
	fetchFn func(ctx context.Context, off int64, p []byte) error
	cache   *windowCache

	ctx    context.Context
	cancel context.CancelCauseFunc

	mu         sync.Mutex
	streamed   bool
	closed     bool
	background sync.WaitGroup // prefetches
}

func (s *rangeSource) Size() int64           { return s.size }
func (s *rangeSource) Name() string          { return s.name }
func (s *rangeSource) ReaderAt() io.ReaderAt { return s.cache }

func (s *rangeSource) Stream() (io.ReadCloser, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.streamed {
		return nil, ErrStreamUsed
	}
	if s.closed {
		return nil, s.wrap(ErrClosed)
	}
	s.streamed = true
	return &rangeStream{cache: s.cache}, nil
}

// Close stops reads and waits for the prefetches, which the cancelled ctx
// cuts short. Reads in progress on other goroutines return ErrClosed
// without waiting for their fetch.
func (s *rangeSource) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.mu.Unlock()
	s.cancel(ErrClosed)
	s.background.Wait()
	return nil
}

// track registers a prefetch that Close must wait for, unless Close has
// already begun.
func (s *rangeSource) track() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.background.Add(1)
	return true
}

// fetch calls the caller's fetch and says which bytes failed.
func (s *rangeSource) fetch(off int64, buf []byte) error {
	err := s.fetchFn(s.ctx, off, buf)
	if err == nil {
		return nil
	}
	if s.ctx.Err() != nil {
		// Whatever fetch made of the cancellation, the source's
		// context ending (usually Close) is the reason.
		err = context.Cause(s.ctx)
	} else if err == io.EOF {
		// fetch promised the whole buffer: an EOF inside the source
		// is a truncation, not its end.
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("reading bytes %d-%d: %w", off, off+int64(len(buf))-1, err)
}

func (s *rangeSource) wrap(err error) error {
	if err == nil || err == io.EOF {
		return err
	}
	return fmt.Errorf("%s: %w", s.name, err)
}

// rangeStream reads the source front to back through the window cache,
// never around it, so that each window it enters starts the prefetch of
// the next.
type rangeStream struct {
	cache  *windowCache
	off    int64
	closed bool
}

var errStreamClosed = errors.New("source: read from a closed stream")

func (st *rangeStream) Read(p []byte) (int, error) {
	if st.closed {
		return 0, errStreamClosed
	}
	if len(p) == 0 {
		return 0, nil
	}
	n, err := st.cache.read(p, st.off, false)
	st.off += int64(n)
	return n, err
}

// Close ends the stream; the Source stays open.
func (st *rangeStream) Close() error {
	st.closed = true
	return nil
}
