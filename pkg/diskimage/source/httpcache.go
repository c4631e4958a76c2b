package source

import (
	"errors"
	"io"
	"sync"
)

// httpReaderAt serves ReadAt from aligned windows of ReadAhead bytes,
// fetched with one Range request each and kept in a small LRU cache. A
// converter reading clusters mostly in ascending order from several
// goroutines thus costs one request per window; concurrent misses on a
// window wait for the same fetch, and a read that moves on to the next
// window in sequence starts fetching the one after it in the background.
//
// Memory is bounded: at most cacheWindows buffers exist, in flight or not.
type httpReaderAt struct {
	s    *httpSource
	ws   int64 // window size
	nwin int64

	mu      sync.Mutex
	entries map[int64]*window
	nbufs   int
	free    [][]byte
	tick    uint64
	wake    chan struct{} // closed when a buffer may have become free
}

type window struct {
	idx   int64
	buf   []byte
	done  chan struct{} // closed when the fetch ended
	ready bool          // done, under mu
	err   error
	refs  int // readers waiting on or copying from buf
	used  uint64
}

func newHTTPReaderAt(s *httpSource) *httpReaderAt {
	ws := int64(s.opts.ReadAhead)
	return &httpReaderAt{
		s:       s,
		ws:      ws,
		nwin:    (s.size + ws - 1) / ws,
		entries: make(map[int64]*window),
		wake:    make(chan struct{}),
	}
}

func (r *httpReaderAt) ReadAt(p []byte, off int64) (int, error) {
	s := r.s
	if off < 0 {
		return 0, errors.New("source: negative offset")
	}
	if off >= s.size {
		return 0, io.EOF
	}
	if s.ctx.Err() != nil {
		return 0, s.wrap(s.ctxErr())
	}
	if off >= r.ws {
		// Random access is in use and the probe's body is not wanted
		// for window 0: let its connection go.
		s.dropProbe()
	}
	want := p
	eof := false
	if int64(len(p)) > s.size-off {
		want = p[:s.size-off]
		eof = true
	}
	n := 0
	for n < len(want) {
		pos := off + int64(n)
		idx := pos / r.ws
		wstart := idx * r.ws
		wlen := min(r.ws, s.size-wstart)
		in := pos - wstart
		seg := want[n:min(int64(len(want)), int64(n)+wlen-in)]
		if in == 0 && int64(len(seg)) == wlen && !r.cached(idx) {
			// A read covering a whole window goes straight to the
			// caller's buffer.
			if err := s.fetch(wstart, seg); err != nil {
				return n, s.wrap(err)
			}
			n += len(seg)
			continue
		}
		w, err := r.acquire(idx, wlen)
		if err != nil {
			return n, s.wrap(err)
		}
		copy(seg, w.buf[in:])
		r.release(w)
		n += len(seg)
	}
	if eof {
		return n, io.EOF
	}
	return n, nil
}

func (r *httpReaderAt) cached(idx int64) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	_, ok := r.entries[idx]
	return ok
}

// acquire returns window idx filled and pinned; release unpins it.
func (r *httpReaderAt) acquire(idx, wlen int64) (*window, error) {
	s := r.s
	r.mu.Lock()
	for {
		if w, ok := r.entries[idx]; ok {
			w.refs++
			r.tick++
			w.used = r.tick
			r.prefetchLocked(idx)
			r.mu.Unlock()
			select {
			case <-w.done:
			case <-s.ctx.Done():
				r.release(w)
				return nil, s.ctxErr()
			}
			if w.err != nil {
				r.release(w)
				return nil, w.err
			}
			return w, nil
		}
		buf, ok := r.takeBufferLocked(wlen)
		if !ok {
			// Every buffer is in flight or being copied from.
			wake := r.wake
			r.mu.Unlock()
			select {
			case <-wake:
			case <-s.ctx.Done():
				return nil, s.ctxErr()
			}
			r.mu.Lock()
			continue
		}
		w := r.newWindowLocked(idx, buf)
		w.refs = 1
		r.prefetchLocked(idx)
		r.mu.Unlock()
		r.load(w)
		if w.err != nil {
			r.release(w)
			return nil, w.err
		}
		return w, nil
	}
}

func (r *httpReaderAt) newWindowLocked(idx int64, buf []byte) *window {
	r.tick++
	w := &window{idx: idx, buf: buf, done: make(chan struct{}), used: r.tick}
	r.entries[idx] = w
	return w
}

// prefetchLocked starts fetching the window after idx when the reads look
// sequential (the window before idx is cached too) and a buffer is free
// without waiting.
func (r *httpReaderAt) prefetchLocked(idx int64) {
	next := idx + 1
	if next >= r.nwin {
		return
	}
	if _, ok := r.entries[next]; ok {
		return
	}
	if _, ok := r.entries[idx-1]; !ok {
		return
	}
	s := r.s
	s.mu.Lock()
	closed := s.closed
	if !closed {
		s.background.Add(1)
	}
	s.mu.Unlock()
	if closed {
		return
	}
	buf, ok := r.takeBufferLocked(min(r.ws, s.size-next*r.ws))
	if !ok {
		s.background.Done()
		return
	}
	w := r.newWindowLocked(next, buf)
	go func() {
		defer s.background.Done()
		r.load(w)
	}()
}

// takeBufferLocked finds a buffer of n bytes: a free one, a new one while
// fewer than cacheWindows exist, or the least recently used idle window's.
func (r *httpReaderAt) takeBufferLocked(n int64) ([]byte, bool) {
	if len(r.free) > 0 {
		b := r.free[len(r.free)-1]
		r.free = r.free[:len(r.free)-1]
		if int64(cap(b)) < n {
			b = make([]byte, n)
		}
		return b[:n], true
	}
	if r.nbufs < cacheWindows {
		r.nbufs++
		return make([]byte, n), true
	}
	var victim *window
	for _, w := range r.entries {
		if w.ready && w.refs == 0 && (victim == nil || w.used < victim.used) {
			victim = w
		}
	}
	if victim == nil {
		return nil, false
	}
	delete(r.entries, victim.idx)
	b := victim.buf
	victim.buf = nil
	if int64(cap(b)) < n {
		b = make([]byte, n)
	}
	return b[:n], true
}

// load fetches w and publishes the result. A failed window leaves the
// cache so that the next read tries again.
func (r *httpReaderAt) load(w *window) {
	err := r.s.fetch(w.idx*r.ws, w.buf)
	r.mu.Lock()
	w.err = err
	w.ready = true
	if err != nil {
		if r.entries[w.idx] == w {
			delete(r.entries, w.idx)
		}
		r.free = append(r.free, w.buf)
		w.buf = nil
	}
	close(w.done)
	r.signalLocked()
	r.mu.Unlock()
}

func (r *httpReaderAt) release(w *window) {
	r.mu.Lock()
	w.refs--
	if w.refs == 0 {
		r.signalLocked()
	}
	r.mu.Unlock()
}

func (r *httpReaderAt) signalLocked() {
	close(r.wake)
	r.wake = make(chan struct{})
}
