package source

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// memMedium serves fetches from memory and counts them.
type memMedium struct {
	data  []byte
	calls atomic.Int64
	// hook, when set, runs before each fetch; an error it returns fails
	// the fetch.
	hook func(ctx context.Context, off int64, n int) error
}

func (m *memMedium) fetch(ctx context.Context, off int64, p []byte) error {
	m.calls.Add(1)
	if m.hook != nil {
		if err := m.hook(ctx, off, len(p)); err != nil {
			return err
		}
	}
	if off < 0 || off+int64(len(p)) > int64(len(m.data)) {
		return fmt.Errorf("fetch of %d bytes at %d is outside the data", len(p), off)
	}
	copy(p, m.data[off:])
	return nil
}

func newMemSource(t *testing.T, m *memMedium, window int) Source {
	t.Helper()
	src := NewRangeSource(context.Background(), "mem.img", int64(len(m.data)), m.fetch, RangeOptions{Window: window})
	t.Cleanup(func() { src.Close() })
	return src
}

// waitFor fails the test if ch does not close soon; it is a safety net
// against hangs, not a synchronisation delay.
func waitFor(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(5 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
	}
}

func TestRangeSourceReadAt(t *testing.T) {
	const ws = 16 << 10
	m := &memMedium{data: testData(20*ws+77, 40)}
	src := newMemSource(t, m, ws)
	size := int64(len(m.data))
	if src.Size() != size || src.Name() != "mem.img" {
		t.Fatalf("Size, Name = %d, %q", src.Size(), src.Name())
	}
	ra := src.ReaderAt()
	checkReaderAt(t, ra, m.data)

	rng := mrand.New(mrand.NewPCG(40, 1))
	for i := range 500 {
		off := rng.Int64N(size + 1)
		n := rng.IntN(3 * ws)
		switch i % 5 {
		case 0:
			// Whole aligned windows, which skip the cache.
			off = rng.Int64N(size/ws+1) * ws
			n = ws * (1 + rng.IntN(2))
		case 1:
			// Near the end.
			off = size - rng.Int64N(ws)
		}
		buf := make([]byte, n)
		got, err := ra.ReadAt(buf, off)
		end := min(off+int64(n), size)
		wantErr := error(nil)
		if off+int64(n) > size {
			wantErr = io.EOF
		}
		if got != int(end-off) || err != wantErr || !bytes.Equal(buf[:got], m.data[off:end]) {
			t.Fatalf("ReadAt(%d bytes at %d) = %d, %v or wrong bytes; want %d, %v", n, off, got, err, end-off, wantErr)
		}
	}

	// A window below the minimum is raised to it.
	small := NewRangeSource(context.Background(), "x", 10, m.fetch, RangeOptions{Window: 1})
	defer small.Close()
	if ws := small.(*rangeSource).cache.ws; ws != minReadAhead {
		t.Fatalf("window %d, want %d", ws, minReadAhead)
	}
}

func TestRangeSourceEmpty(t *testing.T) {
	src := newMemSource(t, &memMedium{}, 0)
	if n, err := src.ReaderAt().ReadAt(make([]byte, 1), 0); n != 0 || err != io.EOF {
		t.Fatalf("ReadAt = %d, %v; want 0, io.EOF", n, err)
	}
	if got := readStream(t, src); len(got) != 0 {
		t.Fatalf("stream gave %d bytes", len(got))
	}
}

func TestRangeSourceConcurrent(t *testing.T) {
	const ws = 32 << 10
	m := &memMedium{data: testData(50*ws+123, 41)}
	src := newMemSource(t, m, ws)
	ra := src.ReaderAt()
	concurrentReads(t, ra, m.data, 8, 200)
	c := ra.(*windowCache)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.nbufs > cacheWindows || len(c.entries) > cacheWindows {
		t.Fatalf("cache holds %d buffers, %d windows; limit %d", c.nbufs, len(c.entries), cacheWindows)
	}
}

// TestRangeSourceFetchCount reads front to back, first in small pieces
// from one goroutine, then with eight goroutines reading each window
// together before moving on to the next: either way each window must be
// fetched once, concurrent misses sharing the fetch.
func TestRangeSourceFetchCount(t *testing.T) {
	const ws = 16 << 10
	m := &memMedium{data: testData(40*ws+500, 42)}
	size := int64(len(m.data))
	nwin := (size + ws - 1) / ws

	ra := newMemSource(t, m, ws).ReaderAt()
	buf := make([]byte, 1000)
	for off := int64(0); off < size; off += int64(len(buf)) {
		n, err := ra.ReadAt(buf, off)
		if (err != nil && err != io.EOF) || !bytes.Equal(buf[:n], m.data[off:off+int64(n)]) {
			t.Fatalf("ReadAt at %d: %d, %v or wrong bytes", off, n, err)
		}
	}
	if calls := m.calls.Load(); calls > nwin {
		t.Fatalf("sequential read: %d fetches for %d windows", calls, nwin)
	}

	m.calls.Store(0)
	ra = newMemSource(t, m, ws).ReaderAt()
	const workers, piece = 8, ws / 8
	var bad atomic.Bool
	for w := range nwin {
		// Rounds keep the count exact: a free-running reader that fell
		// many windows behind could find its window evicted.
		var wg sync.WaitGroup
		for g := range int64(workers) {
			wg.Add(1)
			go func() {
				defer wg.Done()
				off := w*ws + g*piece
				if off >= size {
					return
				}
				buf := make([]byte, piece)
				n, err := ra.ReadAt(buf, off)
				end := min(off+piece, size)
				if (err != nil && err != io.EOF) || !bytes.Equal(buf[:n], m.data[off:end]) {
					bad.Store(true)
				}
			}()
		}
		wg.Wait()
	}
	if bad.Load() {
		t.Fatal("wrong bytes")
	}
	if calls := m.calls.Load(); calls > nwin {
		t.Fatalf("concurrent read: %d fetches for %d windows", calls, nwin)
	}
}

func TestRangeSourceFetchError(t *testing.T) {
	const ws = 8 << 10
	errBoom := errors.New("boom")
	m := &memMedium{data: testData(10*ws, 43)}
	var mu sync.Mutex
	failures := map[int64]error{1 * ws: errBoom, 2 * ws: errBoom, 4 * ws: errBoom, 6 * ws: io.EOF}
	m.hook = func(_ context.Context, off int64, _ int) error {
		mu.Lock()
		defer mu.Unlock()
		err := failures[off]
		delete(failures, off) // fail once
		return err
	}
	ra := newMemSource(t, m, ws).ReaderAt()
	check := func(off int64, n int) error {
		buf := make([]byte, n)
		got, err := ra.ReadAt(buf, off)
		if err == nil && (got != n || !bytes.Equal(buf, m.data[off:off+int64(n)])) {
			t.Fatalf("ReadAt(%d bytes at %d) = %d or wrong bytes", n, off, got)
		}
		return err
	}

	// Through the cache, then straight into a whole-window buffer.
	for _, c := range []struct {
		off int64
		n   int
	}{{1*ws + 5, 10}, {2 * ws, ws}} {
		err := check(c.off, c.n)
		if !errors.Is(err, errBoom) || !strings.Contains(err.Error(), "mem.img: reading bytes") {
			t.Fatalf("ReadAt(%d bytes at %d): %v, want boom with the name and the range", c.n, c.off, err)
		}
		if err := check(c.off, c.n); err != nil {
			t.Fatalf("retry of ReadAt(%d bytes at %d): %v", c.n, c.off, err)
		}
	}

	// A failed prefetch leaves no trace: reading window 3 after 2 (both
	// through the cache) starts fetching window 4, which fails; the read
	// of window 4 may share that failure but the next one fetches again.
	for _, off := range []int64{2*ws + 5, 3 * ws} {
		if err := check(off, 10); err != nil {
			t.Fatal(err)
		}
	}
	if err := check(4*ws, 10); err != nil && !errors.Is(err, errBoom) {
		t.Fatalf("read of window 4: %v", err)
	}
	if err := check(4*ws+100, 10); err != nil {
		t.Fatalf("second read of window 4: %v", err)
	}

	// fetch must fill the buffer, so its io.EOF is a truncation.
	if err := check(6*ws, 10); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("fetch returning io.EOF: ReadAt error %v, want io.ErrUnexpectedEOF", err)
	}
}

func TestRangeSourceStream(t *testing.T) {
	const ws = 16 << 10
	m := &memMedium{data: testData(30*ws+999, 44)}
	nwin := int64(len(m.data)+ws-1) / ws
	src := newMemSource(t, m, ws)
	if got := readStream(t, src); !bytes.Equal(got, m.data) {
		t.Fatalf("stream differs (%d bytes, want %d)", len(got), len(m.data))
	}
	if calls := m.calls.Load(); calls > nwin {
		t.Fatalf("%d fetches for %d windows", calls, nwin)
	}
	if _, err := src.Stream(); err != ErrStreamUsed {
		t.Fatalf("second Stream: %v, want ErrStreamUsed", err)
	}
}

// TestRangeSourceStreamPrefetch checks that a stream, even one read in
// whole aligned windows, fetches ahead: while it reads window 1, window 2
// is already on its way.
func TestRangeSourceStreamPrefetch(t *testing.T) {
	const ws = 16 << 10
	m := &memMedium{data: testData(4*ws, 45)}
	started, release := make(chan struct{}), make(chan struct{})
	m.hook = func(ctx context.Context, off int64, _ int) error {
		if off == 2*ws {
			close(started)
			select {
			case <-release:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		return nil
	}
	src := newMemSource(t, m, ws)
	st, err := src.Stream()
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	buf := make([]byte, len(m.data))
	if _, err := io.ReadFull(st, buf[:2*ws]); err != nil {
		t.Fatal(err)
	}
	waitFor(t, started, "the prefetch of window 2")
	close(release)
	if _, err := io.ReadFull(st, buf[2*ws:]); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf, m.data) {
		t.Fatal("stream differs")
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Read(buf); err == nil {
		t.Fatal("Read after the stream's Close succeeded")
	}
}

// TestRangeSourceClose blocks a prefetch until the source's context ends:
// Close must cancel it and wait for it, and everything after fails with
// ErrClosed.
func TestRangeSourceClose(t *testing.T) {
	const ws = 16 << 10
	m := &memMedium{data: testData(4*ws, 46)}
	started := make(chan struct{})
	var returned atomic.Bool
	m.hook = func(ctx context.Context, off int64, _ int) error {
		if off != 2*ws {
			return nil
		}
		close(started)
		<-ctx.Done()
		returned.Store(true)
		return ctx.Err()
	}
	src := NewRangeSource(context.Background(), "mem.img", int64(len(m.data)), m.fetch, RangeOptions{Window: ws})
	st, err := src.Stream()
	if err != nil {
		t.Fatal(err)
	}
	ra := src.ReaderAt()
	for _, off := range []int64{0, ws} {
		if _, err := ra.ReadAt(make([]byte, 10), off); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, started, "the prefetch of window 2")

	closed := make(chan struct{})
	go func() {
		src.Close()
		close(closed)
	}()
	waitFor(t, closed, "Close")
	if !returned.Load() {
		t.Fatal("Close returned before the prefetch ended")
	}

	if _, err := ra.ReadAt(make([]byte, 10), 0); !errors.Is(err, ErrClosed) {
		t.Fatalf("ReadAt after Close: %v, want ErrClosed", err)
	}
	if _, err := st.Read(make([]byte, 10)); !errors.Is(err, ErrClosed) {
		t.Fatalf("stream Read after Close: %v, want ErrClosed", err)
	}
	if _, err := src.Stream(); err != ErrStreamUsed {
		t.Fatalf("Stream after Close: %v, want ErrStreamUsed", err)
	}
	if err := src.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}

	fresh := NewRangeSource(context.Background(), "mem.img", 10, m.fetch, RangeOptions{})
	fresh.Close()
	if _, err := fresh.Stream(); !errors.Is(err, ErrClosed) {
		t.Fatalf("Stream after Close: %v, want ErrClosed", err)
	}
}

// TestRangeSourceCloseUnblocksReader closes the source under a read whose
// fetch waits for the context: the read ends with ErrClosed.
func TestRangeSourceCloseUnblocksReader(t *testing.T) {
	const ws = 16 << 10
	m := &memMedium{data: testData(4*ws, 47)}
	started := make(chan struct{})
	m.hook = func(ctx context.Context, _ int64, _ int) error {
		close(started)
		<-ctx.Done()
		return ctx.Err()
	}
	src := NewRangeSource(context.Background(), "mem.img", int64(len(m.data)), m.fetch, RangeOptions{Window: ws})
	errc := make(chan error, 1)
	go func() {
		_, err := src.ReaderAt().ReadAt(make([]byte, 10), 3*ws)
		errc <- err
	}()
	waitFor(t, started, "the fetch")
	src.Close()
	select {
	case err := <-errc:
		if !errors.Is(err, ErrClosed) {
			t.Fatalf("ReadAt interrupted by Close: %v, want ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("ReadAt still blocked after Close")
	}
}
