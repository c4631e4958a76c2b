package source

import (
	"context"
	"errors"
	"io"
	"sync"
)

// rangeMedium is what a windowCache needs from the source that owns it. The
// cache knows nothing of HTTP or any other medium: bytes come from fetch, and
// the rest ties the cache's life to its owner's.
type rangeMedium struct {
	size int64
	// ctx ends when the owner closes; its cause is what reads then fail with.
	ctx context.Context
	// fetch fills buf completely with the bytes at off, or fails. It is
	// called from several goroutines at once.
	fetch func(off int64, buf []byte) error
	// wrap dresses every error ReadAt returns (with a URL, a name). It
	// must return nil and io.EOF unchanged.
	wrap func(error) error
	// beyondFirst, when set, is called as a read starts past the first
	// window: random access is in use, so state kept for a front-to-back
	// read of window 0 (HTTP's probe) can go.
	beyondFirst func()
	// track registers a background fetch that the owner's Close waits
	// for; it returns false once the owner is closing, so that none start
	// then. untrack ends one that track allowed.
	track   func() bool
	untrack func()
}

// clampWindow turns a requested window size into a usable one: the default
// for zero or less, and never so small that every cluster costs a fetch or
// so large that cacheWindows buffers exhaust memory.
func clampWindow(n int) int {
	switch {
	case n <= 0:
		return defaultReadAhead
	case n < minReadAhead:
		return minReadAhead
	case n > maxReadAhead:
		return maxReadAhead
	}
	return n
}

// windowCache serves ReadAt from aligned windows of ws bytes, fetched with
// one fetch call each and kept in a small LRU cache. A converter reading
// clusters mostly in ascending order from several goroutines thus costs one
// fetch per window; concurrent misses on a window wait for the same fetch,
// and a read that moves on to the next window in sequence starts fetching
// the one after it in the background.
//
// Memory is bounded: at most cacheWindows buffers exist, in flight or not.
type windowCache struct {
	m    rangeMedium
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

func newWindowCache(m rangeMedium, windowSize int) *windowCache {
	ws := int64(windowSize)
	return &windowCache{
		m:       m,
		ws:      ws,
		nwin:    (m.size + ws - 1) / ws,
		entries: make(map[int64]*window),
		wake:    make(chan struct{}),
	}
}

func (r *windowCache) ReadAt(p []byte, off int64) (int, error) {
	return r.read(p, off, true)
}

// read is ReadAt. direct lets a read covering a whole uncached window
// bypass the cache, which saves a copy but also skips the prefetch; a
// stream wants the prefetch more.
func (r *windowCache) read(p []byte, off int64, direct bool) (int, error) {
	m := &r.m
	if off < 0 {
		return 0, errors.New("source: negative offset")
	}
	if off >= m.size {
		return 0, io.EOF
	}
	if m.ctx.Err() != nil {
		return 0, m.wrap(context.Cause(m.ctx))
	}
	if off >= r.ws && m.beyondFirst != nil {
		m.beyondFirst()
	}
	want := p
	eof := false
	if int64(len(p)) > m.size-off {
		want = p[:m.size-off]
		eof = true
	}
	n := 0
	for n < len(want) {
		pos := off + int64(n)
		idx := pos / r.ws
		wstart := idx * r.ws
		wlen := min(r.ws, m.size-wstart)
		in := pos - wstart
		seg := want[n:min(int64(len(want)), int64(n)+wlen-in)]
		if direct && in == 0 && int64(len(seg)) == wlen && !r.cached(idx) {
			// The caller's buffer holds the whole window: fetch
			// straight into it.
			if err := m.fetch(wstart, seg); err != nil {
				return n, m.wrap(err)
			}
			n += len(seg)
			continue
		}
		w, err := r.acquire(idx, wlen)
		if err != nil {
			return n, m.wrap(err)
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

func (r *windowCache) cached(idx int64) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	_, ok := r.entries[idx]
	return ok
}

// acquire returns window idx filled and pinned; release unpins it.
func (r *windowCache) acquire(idx, wlen int64) (*window, error) {
	ctx := r.m.ctx
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
			case <-ctx.Done():
				r.release(w)
				return nil, context.Cause(ctx)
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
			case <-ctx.Done():
				return nil, context.Cause(ctx)
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

func (r *windowCache) newWindowLocked(idx int64, buf []byte) *window {
	r.tick++
	w := &window{idx: idx, buf: buf, done: make(chan struct{}), used: r.tick}
	r.entries[idx] = w
	return w
}

// prefetchLocked starts fetching the window after idx when the reads look
// sequential (the window before idx is cached too) and a buffer is free
// without waiting.
func (r *windowCache) prefetchLocked(idx int64) {
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
	// Registering before taking a buffer means a closing owner never
	// sees a fetch it is not waiting for.
	if !r.m.track() {
		return
	}
	buf, ok := r.takeBufferLocked(min(r.ws, r.m.size-next*r.ws))
	if !ok {
		r.m.untrack()
		return
	}
	w := r.newWindowLocked(next, buf)
	go func() {
		defer r.m.untrack()
		r.load(w)
	}()
}

// takeBufferLocked finds a buffer of n bytes: a free one, a new one while
// fewer than cacheWindows exist, or the least recently used idle window's.
func (r *windowCache) takeBufferLocked(n int64) ([]byte, bool) {
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
func (r *windowCache) load(w *window) {
	err := r.m.fetch(w.idx*r.ws, w.buf)
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

func (r *windowCache) release(w *window) {
	r.mu.Lock()
	w.refs--
	if w.refs == 0 {
		r.signalLocked()
	}
	r.mu.Unlock()
}

func (r *windowCache) signalLocked() {
	close(r.wake)
	r.wake = make(chan struct{})
}
