package gc

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/opencontainers/go-digest"
)

// maxLeaseSize bounds a lease file read back from shared storage.
const maxLeaseSize = 64

// leases records "digest was relied upon at time t" in the storage driver so
// that every replica's sweep sees it. A small cache avoids rewriting a lease
// on every request: the stored time may lag the real one by at most
// refreshAfter, which the sweep's cutoff (pass start − Grace) tolerates as long
// as refreshAfter < Grace.
type leases struct {
	driver       driver.StorageDriver
	refreshAfter time.Duration
	now          func() time.Time

	mu    sync.Mutex
	cache map[digest.Digest]time.Time
}

func newLeases(d driver.StorageDriver, grace time.Duration, now func() time.Time) *leases {
	return &leases{driver: d, refreshAfter: grace / 4, now: now, cache: map[digest.Digest]time.Time{}}
}

// take records a lease at now unless a recent enough one is already stored.
func (l *leases) take(ctx context.Context, d digest.Digest, now time.Time) error {
	l.mu.Lock()
	cached, ok := l.cache[d]
	l.mu.Unlock()
	if ok && now.Sub(cached) < l.refreshAfter {
		return nil
	}
	if err := l.driver.PutContent(ctx, leasePath(d), []byte(strconv.FormatInt(now.UnixNano(), 10))); err != nil {
		return fmt.Errorf("writing lease of %s: %w", d, err)
	}
	l.mu.Lock()
	if now.After(l.cache[d]) {
		l.cache[d] = now
	}
	l.mu.Unlock()
	return nil
}

// newest returns the newest lease time known for d, from this process or
// from storage (another replica); the zero time when there is none.
func (l *leases) newest(ctx context.Context, d digest.Digest) (time.Time, error) {
	l.mu.Lock()
	cached := l.cache[d]
	l.mu.Unlock()
	stored, err := l.read(ctx, d)
	if err != nil {
		return time.Time{}, err
	}
	if cached.After(stored) {
		return cached, nil
	}
	return stored, nil
}

func (l *leases) read(ctx context.Context, d digest.Digest) (time.Time, error) {
	p := leasePath(d)
	fi, err := l.driver.Stat(ctx, p)
	if isNotFound(err) {
		return time.Time{}, nil
	}
	if err != nil {
		return time.Time{}, fmt.Errorf("reading lease of %s: %w", d, err)
	}
	if fi.Size() > maxLeaseSize {
		return time.Time{}, fmt.Errorf("reading lease of %s: %d bytes, more than %d", d, fi.Size(), maxLeaseSize)
	}
	b, err := l.driver.GetContent(ctx, p)
	if isNotFound(err) {
		return time.Time{}, nil
	}
	if err != nil {
		return time.Time{}, fmt.Errorf("reading lease of %s: %w", d, err)
	}
	ns, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		// A torn or foreign file must not make a blob deletable forever nor
		// block the pass: treat it as a lease written now, so it protects
		// the blob for one grace period and is then rewritten or cleaned.
		return l.now(), nil
	}
	return time.Unix(0, ns), nil
}

// forget drops a stored lease that is not newer than cutoff. The caller
// holds the collector's write lock, so no local request renews it meanwhile.
func (l *leases) forget(ctx context.Context, d digest.Digest, cutoff time.Time) (bool, error) {
	t, err := l.newest(ctx, d)
	if err != nil {
		return false, err
	}
	if t.After(cutoff) {
		return false, nil
	}
	if err := l.driver.Delete(ctx, leasePath(d)); err != nil && !isNotFound(err) {
		return false, fmt.Errorf("deleting lease of %s: %w", d, err)
	}
	l.mu.Lock()
	delete(l.cache, d)
	l.mu.Unlock()
	return true, nil
}

// pruneCache drops cached entries not newer than cutoff so the cache stays
// bounded by the digests touched within one grace period.
func (l *leases) pruneCache(cutoff time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for d, t := range l.cache {
		if !t.After(cutoff) {
			delete(l.cache, d)
		}
	}
}
