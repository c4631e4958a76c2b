// Package cache keeps the disk files of DVCR images on a node, named by the
// digest of the layer that holds them, so that read-only volumes (ISOs,
// CD-ROMs) are served from local files and each image is downloaded once
// per node however many volumes use it.
//
// Layout under the cache's directory:
//
//	entries/<hex>/<name>           a committed disk file (0444); <hex> is the layer digest's
//	pins/<sha256(volumeID)>.json   one per volume that uses an entry
//	tmp/                           fills, pin writes and removals in progress; Open empties it
//
// An entry appears by renaming a complete, verified directory from tmp/
// and disappears by renaming it back into tmp/, so a crash leaves either
// the whole entry or nothing under entries/. The entry directory's mtime
// is its last use, which keeps the LRU order across restarts.
package cache

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"time"

	"k8s.io/klog/v2"

	"vimg.dev/vimg/dvcr/layout"
)

// Key names one cached disk: the digest of the layer that holds it and the
// disk file's name inside the layer. The name is part of the key because a
// fill is verified by rebuilding the layer's bytes, and its tar header
// holds the name.
type Key struct {
	Digest string // "sha256:<64 hex>"
	Name   string // e.g. "disk.iso"
}

func (k Key) String() string { return k.Digest + "/" + k.Name }

var digestRE = regexp.MustCompile(`^sha256:[0-9a-f]{64}$`)

// validate refuses keys that could escape the cache directory or could
// never be verified; it runs before any file is touched.
func (k Key) validate() error {
	if !digestRE.MatchString(k.Digest) {
		return fmt.Errorf("digest %q: want sha256:<64 lowercase hex digits>", k.Digest)
	}
	n := k.Name
	if n == "" || n == "." || n == ".." || len(n) > 100 || strings.ContainsAny(n, "/\x00") {
		return fmt.Errorf("disk file name %q: want a plain file name of 1 to 100 bytes", n)
	}
	// The layer format is stricter still (letters, digits, '.', '-', '_');
	// a name it refuses could not be in a layer, so no fill could verify.
	if _, err := layout.Header(n, 0); err != nil {
		return err
	}
	return nil
}

// Source reads the disk file of one image: offsets are within the disk
// file, not the layer. ReadAtContext follows io.ReaderAt (fewer than
// len(p) bytes only with an error); *client.Image satisfies it.
type Source interface {
	Size() int64
	ReadAtContext(ctx context.Context, p []byte, off int64) (int, error)
}

// Opener opens the Source of a key. It is called once per fill; a Source
// that is also an io.Closer is closed when the fill ends.
type Opener func(ctx context.Context, k Key) (Source, error)

// Options tune a Cache. The zero value means no size limit and defaults.
type Options struct {
	// MaxBytes: while the entries total more, the least recently used
	// entry that no volume pins is removed. 0 means no limit.
	MaxBytes int64
	// ChunkSize is the size of one ranged read; default 8 MiB.
	ChunkSize int64
	// Parallelism is the number of concurrent ranged reads of a fill; default 4.
	Parallelism int
	// Now is the clock for last-use times; default time.Now.
	Now func() time.Time
}

// Stats describe the cache's content.
type Stats struct {
	Entries int
	Bytes   int64
	// Fills counts the fills started since Open (each one Opener call),
	// failed ones included.
	Fills int64
}

// Cache is a node-local, content-addressed store of disk files. It is safe
// for concurrent use; one process at a time may use a directory.
type Cache struct {
	dir string
	o   Options
	// Fills run under ctx rather than a caller's; Close cancels it.
	ctx  context.Context
	stop context.CancelFunc
	wg   sync.WaitGroup

	// mu guards the maps and counters, and is held across the small
	// writes that must agree with them (pin files, last-use times), so a
	// returned path is always backed by a persisted pin.
	mu      sync.Mutex
	entries map[Key]*entry
	pins    map[string]Key // volume ID → key
	fills   map[Key]*fill
	bytes   int64
	nfills  int64
}

type entry struct {
	size int64
	used time.Time
	pins int // volumes pinned to it
	// holds counts the waiters of the fill that made it which have not yet
	// pinned it: eviction leaves it alone until they have.
	holds int
}

// fill is one download in progress, shared by every Acquire of its key.
type fill struct {
	done     chan struct{}
	finished bool  // set under Cache.mu before done is closed
	err      error // valid once finished
	waiters  int   // Acquire calls waiting for it
}

// Open opens (creating if needed) the cache in dir: it empties tmp/, whose
// content is what a crash interrupted, and loads the entries and pins.
func Open(dir string, o Options) (*Cache, error) {
	if o.ChunkSize == 0 {
		o.ChunkSize = 8 << 20
	}
	if o.Parallelism == 0 {
		o.Parallelism = 4
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.MaxBytes < 0 || o.ChunkSize < 0 || o.ChunkSize > 1<<30 || o.Parallelism < 0 {
		return nil, fmt.Errorf("open cache %s: invalid options: MaxBytes %d, ChunkSize %d, Parallelism %d", dir, o.MaxBytes, o.ChunkSize, o.Parallelism)
	}
	c := &Cache{dir: dir, o: o, entries: map[Key]*entry{}, pins: map[string]Key{}, fills: map[Key]*fill{}}
	for _, d := range []string{"entries", "pins", "tmp"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return nil, fmt.Errorf("open cache %s: %w", dir, err)
		}
	}
	if err := c.load(klog.Background()); err != nil {
		return nil, fmt.Errorf("open cache %s: %w", dir, err)
	}
	c.ctx, c.stop = context.WithCancel(context.Background())
	c.mu.Lock()
	c.unlockAndRemove(c.evictLocked(klog.Background()))
	return c, nil
}

// Close cancels the fills in progress and waits for them to end.
func (c *Cache) Close() {
	c.stop()
	c.wg.Wait()
}

func (c *Cache) entryDir(k Key) string {
	return filepath.Join(c.dir, "entries", strings.TrimPrefix(k.Digest, "sha256:"))
}

func (c *Cache) entryPath(k Key) string { return filepath.Join(c.entryDir(k), k.Name) }

// Acquire makes sure the disk of k is in the cache, filling it from open(k)
// if not, pins it for volumeID (persisted before it returns), marks it used
// and returns the path of the committed, read-only disk file. Acquiring
// again for the same volume and key is a no-op; for another key, an error.
//
// Concurrent Acquires of one key share one fill. A caller whose ctx ends
// while waiting gets ctx.Err(), but the fill goes on for the others and
// for the cache: see startFill.
func (c *Cache) Acquire(ctx context.Context, k Key, volumeID string, open Opener) (string, error) {
	if err := k.validate(); err != nil {
		return "", fmt.Errorf("acquire %q for volume %q: %w", k.String(), volumeID, err)
	}
	if volumeID == "" {
		return "", fmt.Errorf("acquire %s: empty volume ID", k)
	}
	logger := klog.FromContext(ctx).WithValues("key", k.String(), "volumeID", volumeID)
	c.mu.Lock()
	path, err := c.acquireLocked(ctx, k, volumeID, open)
	c.unlockAndRemove(c.evictLocked(logger))
	if err != nil {
		return "", fmt.Errorf("acquire %s for volume %q: %w", k, volumeID, err)
	}
	logger.V(2).Info("Acquired cached disk", "path", path)
	return path, nil
}

// acquireLocked is called and returns with c.mu held; it lets go of it
// while waiting for a fill.
func (c *Cache) acquireLocked(ctx context.Context, k Key, volumeID string, open Opener) (string, error) {
	for {
		if pk, ok := c.pins[volumeID]; ok && pk != k {
			return "", fmt.Errorf("volume is already pinned to %s", pk)
		}
		if e, ok := c.entries[k]; ok {
			if err := c.pinLocked(k, e, volumeID); err != nil {
				return "", err
			}
			return c.entryPath(k), nil
		}
		f := c.fills[k]
		if f == nil {
			f = c.startFill(ctx, k, open)
		}
		f.waiters++
		c.mu.Unlock()
		select {
		case <-f.done:
		case <-ctx.Done():
		}
		c.mu.Lock()
		if !f.finished {
			f.waiters--
			return "", fmt.Errorf("waiting for the fill: %w", ctx.Err())
		}
		if f.err != nil {
			return "", f.err
		}
		// The fill counted this caller in the entry's holds; from here on
		// the lock protects the entry until it is pinned.
		c.entries[k].holds--
		if err := ctx.Err(); err != nil {
			return "", err
		}
	}
}

// pinLocked marks the entry used and records the pin, on disk first.
func (c *Cache) pinLocked(k Key, e *entry, volumeID string) error {
	now := c.o.Now()
	if err := os.Chtimes(c.entryDir(k), now, now); err != nil {
		return fmt.Errorf("marking the entry used: %w", err)
	}
	e.used = now
	if _, ok := c.pins[volumeID]; ok {
		return nil
	}
	if err := c.writePin(volumeID, k); err != nil {
		return err
	}
	c.pins[volumeID] = k
	e.pins++
	return nil
}

// Release unpins volumeID, which may be unknown or released already, and
// evicts entries while the cache is above MaxBytes.
func (c *Cache) Release(volumeID string) error {
	c.mu.Lock()
	k, ok := c.pins[volumeID]
	if !ok {
		c.mu.Unlock()
		return nil
	}
	err := c.removePin(volumeID)
	if err == nil {
		delete(c.pins, volumeID)
		c.entries[k].pins--
	}
	c.unlockAndRemove(c.evictLocked(klog.Background()))
	if err != nil {
		return fmt.Errorf("release volume %q of %s: %w", volumeID, k, err)
	}
	return nil
}

// Pinned returns the key and path volumeID is pinned to, if it is: a
// restarted plugin finds its published volumes with it.
func (c *Cache) Pinned(volumeID string) (Key, string, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	k, ok := c.pins[volumeID]
	if !ok {
		return Key{}, "", false
	}
	return k, c.entryPath(k), true
}

// Stats returns the number of entries, their total size and the fills
// started since Open.
func (c *Cache) Stats() Stats {
	c.mu.Lock()
	defer c.mu.Unlock()
	return Stats{Entries: len(c.entries), Bytes: c.bytes, Fills: c.nfills}
}

// evictLocked removes least recently used entries that are neither pinned
// nor awaited while the total is above MaxBytes. It only renames them into
// tmp/ and returns the renamed directories, which the caller deletes after
// unlocking: deleting a large file can take a while.
func (c *Cache) evictLocked(logger klog.Logger) []string {
	var trash []string
	for c.o.MaxBytes > 0 && c.bytes > c.o.MaxBytes {
		var victim Key
		var ve *entry
		for k, e := range c.entries {
			if e.pins == 0 && e.holds == 0 && (ve == nil || e.used.Before(ve.used)) {
				victim, ve = k, e
			}
		}
		if ve == nil {
			logger.Info("Cache is above its size limit but every entry is in use", "bytes", c.bytes, "maxBytes", c.o.MaxBytes)
			break
		}
		d, err := os.MkdirTemp(filepath.Join(c.dir, "tmp"), "evict-")
		if err == nil {
			err = os.Rename(c.entryDir(victim), filepath.Join(d, filepath.Base(c.entryDir(victim))))
			trash = append(trash, d)
		}
		if err != nil {
			// Stop rather than retry: the next Release or Acquire tries again.
			logger.Error(err, "Evicting a cache entry", "key", victim.String())
			break
		}
		delete(c.entries, victim)
		c.bytes -= ve.size
		logger.V(1).Info("Evicted cache entry", "key", victim.String(), "size", ve.size, "lastUsed", ve.used)
	}
	return trash
}

func (c *Cache) unlockAndRemove(trash []string) {
	c.mu.Unlock()
	for _, d := range trash {
		if err := os.RemoveAll(d); err != nil {
			// Open empties tmp/ again.
			klog.Background().Error(err, "Removing an evicted cache entry", "path", d)
		}
	}
}
