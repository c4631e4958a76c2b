package cache

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"sync"
	"time"

	"k8s.io/klog/v2"

	"vimg.dev/vimg/csi/internal/fsync"
	"vimg.dev/vimg/dvcr/layout"
)

// startFill registers a fill of k and runs it; c.mu is held.
//
// The fill runs under the cache's context, not the caller's, and is not
// cancelled when its waiters give up: kubelet retries a NodePublishVolume
// that timed out, and the retry joins the fill in progress. Cancelling with
// the callers would restart a large download on every retry and might
// never finish it. An abandoned fill costs one download and leaves a
// usable entry; Close cancels the fills.
func (c *Cache) startFill(ctx context.Context, k Key, open Opener) *fill {
	f := &fill{done: make(chan struct{})}
	c.fills[k] = f
	c.nfills++
	logger := klog.FromContext(ctx).WithValues("key", k.String())
	fctx := klog.NewContext(c.ctx, logger)
	c.wg.Go(func() {
		size, err := c.fill(fctx, k, open)
		if err != nil {
			// No key in the message: each waiter's error already names it.
			err = fmt.Errorf("filling: %w", err)
		}
		c.mu.Lock()
		delete(c.fills, k)
		f.finished, f.err = true, err
		if err == nil {
			// Every waiter still there holds the entry until it has pinned it.
			c.entries[k] = &entry{size: size, used: c.o.Now(), holds: f.waiters}
			c.bytes += size
		} else {
			logger.Error(err, "Filling a cache entry")
		}
		close(f.done)
		c.unlockAndRemove(c.evictLocked(logger))
	})
	return f
}

// fill downloads, verifies and commits the disk of k, and returns its size.
func (c *Cache) fill(ctx context.Context, k Key, open Opener) (int64, error) {
	start := time.Now()
	src, err := open(ctx, k)
	if err != nil {
		return 0, fmt.Errorf("opening the source: %w", err)
	}
	if cl, ok := src.(io.Closer); ok {
		defer cl.Close()
	}
	size := src.Size()
	if size < 0 || c.o.MaxBytes > 0 && size > c.o.MaxBytes {
		return 0, fmt.Errorf("source has %d bytes: want 0 to %d (MaxBytes, 0 for no limit)", size, c.o.MaxBytes)
	}
	header, err := layout.Header(k.Name, size)
	if err != nil {
		return 0, err
	}

	// The entry is built as a directory in tmp/ and renamed into entries/
	// whole, so entries/ never shows a directory without its disk.
	tmp, err := os.MkdirTemp(filepath.Join(c.dir, "tmp"), "fill-")
	if err != nil {
		return 0, err
	}
	committed := false
	defer func() {
		if !committed {
			os.RemoveAll(tmp)
		}
	}()
	path := filepath.Join(tmp, k.Name)
	file, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return 0, err
	}
	defer file.Close()
	// Truncating first makes the file sparse: chunks of zeros are not written.
	if err := file.Truncate(size); err != nil {
		return 0, err
	}
	h := sha256.New()
	h.Write(header)
	if err := c.copy(ctx, src, file, size, h); err != nil {
		return 0, err
	}
	h.Write(layout.Trailer(size))
	if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != k.Digest {
		return 0, fmt.Errorf("the layer rebuilt from the source has digest %s, not %s", got, k.Digest)
	}

	if err := file.Sync(); err != nil {
		return 0, fmt.Errorf("syncing the disk file: %w", err)
	}
	if err := file.Close(); err != nil {
		return 0, err
	}
	if err := commit(path, c.entryDir(k), c.o.Now()); err != nil {
		return 0, fmt.Errorf("committing: %w", err)
	}
	committed = true
	klog.FromContext(ctx).Info("Filled cache entry", "size", size, "duration", time.Since(start))
	return size, nil
}

// commit makes the verified file read-only and renames its directory to
// dst, dated now (its last use).
func commit(path, dst string, now time.Time) error {
	tmp := filepath.Dir(path)
	if err := os.Chmod(path, 0o444); err != nil {
		return err
	}
	if err := os.Chmod(tmp, 0o755); err != nil {
		return err
	}
	if err := fsync.Dir(tmp); err != nil {
		return err
	}
	if err := os.Rename(tmp, dst); err != nil {
		return err
	}
	if err := os.Chtimes(dst, now, now); err != nil {
		return err
	}
	if err := fsync.Dir(filepath.Dir(dst)); err != nil {
		return err
	}
	return fsync.Dir(filepath.Dir(tmp))
}

// copy reads the source in chunks with c.o.Parallelism workers, writes the
// chunks that are not all zeros into file, and hashes every chunk in order
// as it arrives, so the digest needs no second pass over the file. At most
// Parallelism+2 chunks are in memory.
func (c *Cache) copy(ctx context.Context, src Source, file *os.File, size int64, h hash.Hash) error {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()

	type result struct {
		buf []byte
		err error
	}
	type job struct {
		off int64
		out chan result
	}
	cs, p := c.o.ChunkSize, c.o.Parallelism
	jobs := make(chan job)
	order := make(chan chan result, p) // results in file order
	free := make(chan []byte, 2*p)

	wg.Go(func() {
		defer close(order)
		defer close(jobs)
		for off := int64(0); off < size; off += cs {
			j := job{off: off, out: make(chan result, 1)}
			select {
			case order <- j.out:
			case <-ctx.Done():
				return
			}
			select {
			case jobs <- j:
			case <-ctx.Done():
				return
			}
		}
	})
	for range p {
		wg.Go(func() {
			for j := range jobs {
				var buf []byte
				select {
				case buf = <-free:
				default:
					buf = make([]byte, cs)
				}
				buf = buf[:min(cs, size-j.off)]
				err := readChunk(ctx, src, buf, j.off)
				if err == nil && !allZero(buf) {
					if _, werr := file.WriteAt(buf, j.off); werr != nil {
						err = fmt.Errorf("writing %d bytes at %d: %w", len(buf), j.off, werr)
					}
				}
				j.out <- result{buf, err}
			}
		})
	}
	for out := range order {
		r := <-out
		if r.err != nil {
			return r.err
		}
		h.Write(r.buf)
		select {
		case free <- r.buf[:cap(r.buf)]:
		default:
		}
	}
	// order is closed early only when ctx ended.
	return ctx.Err()
}

func readChunk(ctx context.Context, src Source, buf []byte, off int64) error {
	n, err := src.ReadAtContext(ctx, buf, off)
	if n == len(buf) {
		return nil // io.ReaderAt allows io.EOF with a full read at the end
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("reading %d bytes at %d: got %d: %w", len(buf), off, n, err)
}

var zeros [64 << 10]byte

func allZero(b []byte) bool {
	for len(b) > 0 {
		n := min(len(b), len(zeros))
		if !bytes.Equal(b[:n], zeros[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}
