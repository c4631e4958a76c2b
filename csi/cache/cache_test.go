package cache

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"vimg.dev/vimg/dvcr/layout"
)

// keyFor returns the key of the layer that would hold data as name.
func keyFor(t *testing.T, name string, data []byte) Key {
	t.Helper()
	hdr, err := layout.Header(name, int64(len(data)))
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	h.Write(hdr)
	h.Write(data)
	h.Write(layout.Trailer(int64(len(data))))
	return Key{Digest: "sha256:" + hex.EncodeToString(h.Sum(nil)), Name: name}
}

func randomBytes(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 1))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// fake serves data as a Source and counts what it is asked.
type fake struct {
	data    []byte
	size    int64 // reported size, if not len(data)
	failAt  int64 // if > 0, the read covering this offset fails...
	failFor int32 // ...in the first failFor opened sources
	corrupt bool  // flip a byte of every read
	gate    chan struct{}
	opens   atomic.Int32
	reads   atomic.Int32
	waiting sync.WaitGroup // done at the first read waiting at gate
	once    sync.Once
}

func newFake(data []byte) *fake {
	f := &fake{data: data, size: int64(len(data))}
	f.waiting.Add(1)
	return f
}

func (f *fake) open(ctx context.Context, k Key) (Source, error) {
	n := f.opens.Add(1)
	return &fakeSource{f: f, fail: n <= f.failFor}, nil
}

type fakeSource struct {
	f    *fake
	fail bool
}

func (s *fakeSource) Size() int64 { return s.f.size }

func (s *fakeSource) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	f := s.f
	f.reads.Add(1)
	if f.gate != nil {
		f.once.Do(f.waiting.Done)
		select {
		case <-f.gate:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
	if s.fail && f.failAt >= off && f.failAt < off+int64(len(p)) {
		return 0, errors.New("injected read error")
	}
	if off >= int64(len(f.data)) {
		return 0, io.EOF
	}
	n := copy(p, f.data[off:])
	if f.corrupt && n > 0 {
		p[0] ^= 1
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func openCache(t *testing.T, dir string, o Options) *Cache {
	t.Helper()
	c, err := Open(dir, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

func ls(t *testing.T, dir string) []string {
	t.Helper()
	des, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, de := range des {
		names = append(names, de.Name())
	}
	return names
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

func (c *Cache) waiters(k Key) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if f := c.fills[k]; f != nil {
		return f.waiters
	}
	return -1
}

func TestAcquire_FillsReadOnlySparseCopy(t *testing.T) {
	data := make([]byte, 64<<20)
	copy(data, randomBytes(5000, 1))
	copy(data[40<<20+123:], randomBytes(100, 2))
	k := keyFor(t, "disk.iso", data)
	src := newFake(data)
	c := openCache(t, t.TempDir(), Options{ChunkSize: 1 << 20, Parallelism: 3})

	path, err := c.Acquire(context.Background(), k, "vol-1", src.open)
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Error("committed file differs from the source")
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o444 {
		t.Errorf("mode %v, want 0444", fi.Mode().Perm())
	}
	if alloc := fi.Sys().(*syscall.Stat_t).Blocks * 512; alloc > 8<<20 {
		t.Errorf("%d bytes allocated for a file of two non-zero chunks: not sparse", alloc)
	}
	if want := filepath.Join(c.dir, "entries", strings.TrimPrefix(k.Digest, "sha256:"), "disk.iso"); path != want {
		t.Errorf("path %s, want %s", path, want)
	}
	if n := src.reads.Load(); n != 64 {
		t.Errorf("%d reads, want 64 chunks", n)
	}
	if s := c.Stats(); s != (Stats{Entries: 1, Bytes: 64 << 20, Fills: 1}) {
		t.Errorf("stats %+v", s)
	}
	if left := ls(t, filepath.Join(c.dir, "tmp")); len(left) != 0 {
		t.Errorf("tmp/ holds %v", left)
	}
}

func TestAcquire_FailedFillCommitsNothing(t *testing.T) {
	data := randomBytes(100_000, 3)
	good := keyFor(t, "disk.iso", data)
	for _, tc := range []struct {
		name    string
		key     Key
		setup   func(*fake)
		max     int64
		wantErr []string
		reads   bool
	}{
		{name: "wrong digest", key: keyFor(t, "disk.iso", data[1:]), wantErr: []string{keyFor(t, "disk.iso", data[1:]).Digest, good.Digest}, reads: true},
		{name: "corrupt reads", key: good, setup: func(f *fake) { f.corrupt = true }, wantErr: []string{good.Digest}, reads: true},
		{name: "read error", key: good, setup: func(f *fake) { f.failAt, f.failFor = 50_000, 1 }, wantErr: []string{"injected read error"}, reads: true},
		{name: "source shorter than its size", key: good, setup: func(f *fake) { f.size += 10 }, wantErr: []string{"unexpected EOF"}, reads: true},
		{name: "negative size", key: good, setup: func(f *fake) { f.size = -1 }, wantErr: []string{"-1 bytes"}},
		{name: "over the cache size", key: good, max: 99_999, wantErr: []string{"100000 bytes"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := newFake(data)
			if tc.setup != nil {
				tc.setup(src)
			}
			c := openCache(t, t.TempDir(), Options{ChunkSize: 4096, MaxBytes: tc.max})
			_, err := c.Acquire(context.Background(), tc.key, "vol", src.open)
			if err == nil {
				t.Fatal("Acquire succeeded")
			}
			for _, s := range tc.wantErr {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not mention %q", err, s)
				}
			}
			if got := src.reads.Load() > 0; got != tc.reads {
				t.Errorf("source read: %v, want %v", got, tc.reads)
			}
			for _, d := range []string{"entries", "pins", "tmp"} {
				if left := ls(t, filepath.Join(c.dir, d)); len(left) != 0 {
					t.Errorf("%s/ holds %v", d, left)
				}
			}
			if s := c.Stats(); s.Entries != 0 || s.Bytes != 0 {
				t.Errorf("stats %+v", s)
			}
		})
	}
}

func TestAcquire_RetriesAfterFailedFill(t *testing.T) {
	data := randomBytes(100_000, 4)
	k := keyFor(t, "disk.iso", data)
	src := newFake(data)
	src.failAt, src.failFor = 70_000, 1
	c := openCache(t, t.TempDir(), Options{ChunkSize: 8192, Parallelism: 2})

	if _, err := c.Acquire(context.Background(), k, "vol", src.open); err == nil || !strings.Contains(err.Error(), "injected") {
		t.Fatalf("first Acquire: %v, want the injected error", err)
	}
	if _, _, ok := c.Pinned("vol"); ok {
		t.Error("volume pinned after a failed fill")
	}
	path, err := c.Acquire(context.Background(), k, "vol", src.open)
	if err != nil {
		t.Fatalf("second Acquire: %v", err)
	}
	if got, _ := os.ReadFile(path); !bytes.Equal(got, data) {
		t.Error("committed file differs from the source")
	}
	if n := src.opens.Load(); n != 2 {
		t.Errorf("%d opens, want 2", n)
	}
	if s := c.Stats(); s != (Stats{Entries: 1, Bytes: 100_000, Fills: 2}) {
		t.Errorf("stats %+v", s)
	}
}

func TestAcquire_ConcurrentCallersShareOneFill(t *testing.T) {
	data := randomBytes(300_000, 5)
	k := keyFor(t, "disk.iso", data)
	src := newFake(data)
	src.gate = make(chan struct{})
	c := openCache(t, t.TempDir(), Options{ChunkSize: 16 << 10})

	const n = 20
	paths := make([]string, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			paths[i], errs[i] = c.Acquire(context.Background(), k, fmt.Sprintf("vol-%d", i), src.open)
		})
	}
	waitFor(t, "20 waiters", func() bool { return c.waiters(k) == n })
	close(src.gate)
	wg.Wait()
	for i := range n {
		if errs[i] != nil || paths[i] != paths[0] {
			t.Errorf("Acquire %d: %q, %v", i, paths[i], errs[i])
		}
	}
	if o := src.opens.Load(); o != 1 {
		t.Errorf("%d opens, want 1", o)
	}
	if s := c.Stats(); s.Entries != 1 || s.Fills != 1 {
		t.Errorf("stats %+v", s)
	}
	if pins := ls(t, filepath.Join(c.dir, "pins")); len(pins) != n {
		t.Errorf("%d pin files, want %d", len(pins), n)
	}
}

func TestAcquire_CancelledWaiterLeavesFillToOthers(t *testing.T) {
	data := randomBytes(100_000, 6)
	k := keyFor(t, "disk.iso", data)
	src := newFake(data)
	src.gate = make(chan struct{})
	c := openCache(t, t.TempDir(), Options{ChunkSize: 8192})

	ctx, cancel := context.WithCancel(context.Background())
	cancelled := make(chan error, 1)
	go func() {
		_, err := c.Acquire(ctx, k, "quitter", src.open)
		cancelled <- err
	}()
	src.waiting.Wait() // the fill is blocked in a read
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i := range errs {
		wg.Go(func() { _, errs[i] = c.Acquire(context.Background(), k, fmt.Sprintf("stayer-%d", i), src.open) })
	}
	waitFor(t, "3 waiters", func() bool { return c.waiters(k) == 3 })
	cancel()
	if err := <-cancelled; !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled Acquire: %v, want context.Canceled", err)
	}
	close(src.gate)
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("Acquire %d: %v", i, err)
		}
	}
	if _, _, ok := c.Pinned("quitter"); ok {
		t.Error("the cancelled caller's volume is pinned")
	}
	if s := c.Stats(); s.Entries != 1 || s.Fills != 1 {
		t.Errorf("stats %+v", s)
	}
}

// clock is a settable Options.Now.
type clock struct{ ns atomic.Int64 }

func (c *clock) now() time.Time { return time.Unix(0, c.ns.Load()) }
func (c *clock) set(sec int64)  { c.ns.Store(sec * 1e9) }
func newClock(sec int64) *clock { c := &clock{}; c.set(sec); return c }
func (c *Cache) has(k Key) bool { c.mu.Lock(); defer c.mu.Unlock(); return c.entries[k] != nil }
func exists(path string) bool   { _, err := os.Stat(path); return err == nil }
func notExist(path string) bool { _, err := os.Stat(path); return errors.Is(err, fs.ErrNotExist) }
func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func TestEviction_RemovesLeastRecentlyUsedUnpinned(t *testing.T) {
	const size = 1000
	srcs := map[string]*fake{}
	keys := map[string]Key{}
	for i, n := range []string{"a", "b", "c", "d", "e"} {
		data := randomBytes(size, uint64(10+i))
		srcs[n], keys[n] = newFake(data), keyFor(t, n+".iso", data)
	}
	clk := newClock(1000)
	c := openCache(t, t.TempDir(), Options{MaxBytes: 2 * size, Now: clk.now})
	acquire := func(at int64, n, vol string) string {
		t.Helper()
		clk.set(at)
		p, err := c.Acquire(context.Background(), keys[n], vol, srcs[n].open)
		must(t, err)
		return p
	}
	pa := acquire(1, "a", "va")
	pb := acquire(2, "b", "vb")
	must(t, c.Release("va"))
	must(t, c.Release("vb"))
	acquire(3, "a", "va") // a is now more recent than b
	must(t, c.Release("va"))
	pc := acquire(4, "c", "vc")
	if !notExist(pb) || !exists(pa) || !exists(pc) {
		t.Fatalf("after c: a %v, b %v, c %v; want b evicted", exists(pa), exists(pb), exists(pc))
	}
	if n := srcs["a"].opens.Load(); n != 1 {
		t.Errorf("a opened %d times, want 1", n)
	}

	// a is pinned and older than c: c goes.
	acquire(5, "a", "va")
	must(t, c.Release("vc"))
	pd := acquire(6, "d", "vd")
	if !notExist(pc) || !exists(pa) || !exists(pd) {
		t.Fatalf("after d: a %v, c %v, d %v; want c evicted", exists(pa), exists(pc), exists(pd))
	}

	// Everything pinned: the cache stays above its limit until a release.
	pe := acquire(7, "e", "ve")
	if s := c.Stats(); s.Entries != 3 || s.Bytes != 3*size {
		t.Errorf("all pinned: stats %+v, want 3 entries", s)
	}
	must(t, c.Release("vd"))
	if !notExist(pd) || !exists(pa) || !exists(pe) || c.has(keys["d"]) {
		t.Errorf("after releasing d: a %v, d %v, e %v; want d evicted", exists(pa), exists(pd), exists(pe))
	}
	if s := c.Stats(); s.Entries != 2 || s.Bytes != 2*size || s.Fills != 5 {
		t.Errorf("stats %+v", s)
	}
	if left := ls(t, filepath.Join(c.dir, "tmp")); len(left) != 0 {
		t.Errorf("tmp/ holds %v", left)
	}
}

func TestOpen_RestoresPinsAndEntriesAfterRestart(t *testing.T) {
	dir := t.TempDir()
	data := randomBytes(50_000, 20)
	k := keyFor(t, "disk.iso", data)
	src := newFake(data)
	clk := newClock(1_700_000_000)
	c := openCache(t, dir, Options{Now: clk.now})
	const vol = "csi-vol/../x" // not a safe file name
	path, err := c.Acquire(context.Background(), k, vol, src.open)
	must(t, err)
	c.Close()

	must(t, os.WriteFile(filepath.Join(dir, "tmp", "junk"), []byte("x"), 0o644))
	must(t, os.MkdirAll(filepath.Join(dir, "tmp", "fill-123", "sub"), 0o755))
	// A pin of an entry that is gone is dropped.
	orphan := Key{Digest: "sha256:" + strings.Repeat("0", 64), Name: "gone.iso"}
	must(t, (&Cache{dir: dir}).writePin("orphan", orphan))

	c2 := openCache(t, dir, Options{Now: clk.now})
	gk, gpath, ok := c2.Pinned(vol)
	if !ok || gk != k || gpath != path {
		t.Errorf("Pinned after restart: %v %q %v, want %v %q", gk, gpath, ok, k, path)
	}
	if _, _, ok := c2.Pinned("orphan"); ok {
		t.Error("pin of a missing entry survived Open")
	}
	if s := c2.Stats(); s != (Stats{Entries: 1, Bytes: 50_000}) {
		t.Errorf("stats %+v", s)
	}
	if used := c2.entries[k].used; !used.Equal(clk.now()) {
		t.Errorf("last use %v after restart, want %v", used, clk.now())
	}
	if left := ls(t, filepath.Join(dir, "tmp")); len(left) != 0 {
		t.Errorf("tmp/ holds %v", left)
	}
	if pins := ls(t, filepath.Join(dir, "pins")); len(pins) != 1 {
		t.Errorf("pins/ holds %v, want one pin", pins)
	}
	must(t, c2.Release(vol))
	must(t, c2.Release(vol)) // idempotent
	if _, _, ok := c2.Pinned(vol); ok {
		t.Error("still pinned after Release")
	}
	c3 := openCache(t, dir, Options{})
	if _, _, ok := c3.Pinned(vol); ok {
		t.Error("pinned after Release and restart")
	}
	if p, err := c3.Acquire(context.Background(), k, vol, src.open); err != nil || p != path {
		t.Errorf("Acquire after restart: %q, %v", p, err)
	}
	if n := src.opens.Load(); n != 1 {
		t.Errorf("%d opens, want 1: the entry should have survived", n)
	}
}

func TestAcquire_ValidatesKeyBeforeTouchingFiles(t *testing.T) {
	hex64 := strings.Repeat("ab", 32)
	for _, tc := range []struct {
		name string
		key  Key
		vol  string
	}{
		{"empty digest", Key{"", "disk.iso"}, "v"},
		{"short digest", Key{"sha256:abc", "disk.iso"}, "v"},
		{"other algorithm", Key{"sha512:" + hex64, "disk.iso"}, "v"},
		{"upper-case hex", Key{"sha256:" + strings.ToUpper(hex64), "disk.iso"}, "v"},
		{"digest with path", Key{"sha256:" + hex64 + "/..", "disk.iso"}, "v"},
		{"empty name", Key{"sha256:" + hex64, ""}, "v"},
		{"name with slash", Key{"sha256:" + hex64, "a/disk.iso"}, "v"},
		{"dot-dot", Key{"sha256:" + hex64, ".."}, "v"},
		{"dot", Key{"sha256:" + hex64, "."}, "v"},
		{"NUL", Key{"sha256:" + hex64, "disk\x00.iso"}, "v"},
		{"long name", Key{"sha256:" + hex64, strings.Repeat("x", 101)}, "v"},
		{"empty volume ID", Key{"sha256:" + hex64, "disk.iso"}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := newFake(nil)
			c := openCache(t, t.TempDir(), Options{})
			if _, err := c.Acquire(context.Background(), tc.key, tc.vol, src.open); err == nil {
				t.Fatal("Acquire succeeded")
			}
			if src.opens.Load() != 0 {
				t.Error("source opened")
			}
			for _, d := range []string{"entries", "pins", "tmp"} {
				if left := ls(t, filepath.Join(c.dir, d)); len(left) != 0 {
					t.Errorf("%s/ holds %v", d, left)
				}
			}
		})
	}
}

func TestAcquire_VolumeIDsAreHashed(t *testing.T) {
	data := randomBytes(1000, 30)
	k := keyFor(t, "disk.iso", data)
	c := openCache(t, t.TempDir(), Options{})
	for _, vol := range []string{"../../etc/passwd", "a/b", "..", "x\x00y"} {
		p, err := c.Acquire(context.Background(), k, vol, newFake(data).open)
		if err != nil {
			t.Fatalf("Acquire for %q: %v", vol, err)
		}
		if gk, gp, ok := c.Pinned(vol); !ok || gk != k || gp != p {
			t.Errorf("Pinned(%q) = %v %q %v", vol, gk, gp, ok)
		}
	}
	for _, name := range ls(t, filepath.Join(c.dir, "pins")) {
		if len(name) != 64+len(".json") || !strings.HasSuffix(name, ".json") {
			t.Errorf("pin file %q is not named by a hash", name)
		}
	}
}

func TestAcquire_PinnedVolumeKeepsItsKey(t *testing.T) {
	one, two := randomBytes(1000, 40), randomBytes(1000, 41)
	k1, k2 := keyFor(t, "one.iso", one), keyFor(t, "two.iso", two)
	c := openCache(t, t.TempDir(), Options{})
	clk := newClock(1)
	c.o.Now = clk.now
	p1, err := c.Acquire(context.Background(), k1, "vol", newFake(one).open)
	must(t, err)

	clk.set(2)
	again, err := c.Acquire(context.Background(), k1, "vol", newFake(one).open)
	if err != nil || again != p1 {
		t.Errorf("second Acquire of the same key: %q, %v", again, err)
	}
	if fi, err := os.Stat(filepath.Dir(p1)); err != nil || !fi.ModTime().Equal(clk.now()) {
		t.Errorf("entry not marked used by the second Acquire: %v, %v", fi.ModTime(), err)
	}

	src2 := newFake(two)
	if _, err := c.Acquire(context.Background(), k2, "vol", src2.open); err == nil || !strings.Contains(err.Error(), k1.Digest) {
		t.Errorf("Acquire of another key: %v, want an error naming %s", err, k1.Digest)
	}
	if src2.opens.Load() != 0 {
		t.Error("the other key was filled")
	}
	if gk, _, _ := c.Pinned("vol"); gk != k1 {
		t.Errorf("volume pinned to %v, want %v", gk, k1)
	}
}
