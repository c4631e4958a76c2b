package gc

import (
	"context"
	"errors"
	"fmt"
	"path"
	"strings"
	"sync"
	"time"

	"github.com/distribution/distribution/v3"
	"github.com/distribution/distribution/v3/registry/storage"
	"github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/klog/v2"
)

// maxStoredManifestSize bounds a manifest read straight from storage when
// distribution cannot parse it.
const maxStoredManifestSize = maxManifestSize

// Options configure a Collector.
type Options struct {
	// Grace protects blobs written or leased less than Grace before a pass
	// started. It must exceed the time a pusher takes from checking a blob
	// to putting the manifest that references it, and covers the window
	// between replicas (see the package comment). Required.
	Grace time.Duration
	// Interval between passes in Run. Required.
	Interval time.Duration
	// Now is the clock for leases and cutoffs; time.Now when nil. Blob
	// ages come from the storage driver's modification times.
	Now func() time.Time
	// Registerer receives the collector's metrics; nil registers none.
	Registerer prometheus.Registerer
}

// Stats describe one pass.
type Stats struct {
	Repositories        int   // repositories walked
	ManifestsMarked     int   // manifest revisions whose references were marked
	BlobsKept           int   // blobs left in place (referenced, young or leased)
	BlobsDeleted        int   // blobs deleted
	BytesFreed          int64 // bytes of deleted blob data
	LayerLinksRemoved   int   // repository links to deleted or missing blobs removed
	RepositoriesRemoved int   // empty repositories removed
	LeasesRemoved       int   // expired leases removed
}

// Collector deletes blobs no manifest references, online.
type Collector struct {
	driver   driver.StorageDriver
	registry distribution.Namespace
	opts     Options
	now      func() time.Time
	leases   *leases
	metrics  *metrics

	// mu orders guarded requests (read side) against each pass's start
	// barrier and each deletion (write side); see the package comment.
	mu sync.RWMutex
	// passMu keeps passes from overlapping.
	passMu sync.Mutex

	// beforeDelete, when set by tests, runs for each deletion candidate
	// after it was chosen and before the write lock is taken.
	beforeDelete func(digest.Digest)
}

// New returns a collector working on the registry stored in d.
func New(d driver.StorageDriver, opts Options) (*Collector, error) {
	if d == nil {
		return nil, errors.New("creating garbage collector: no storage driver")
	}
	if opts.Grace <= 0 {
		return nil, fmt.Errorf("creating garbage collector: grace %v must be positive", opts.Grace)
	}
	if opts.Interval <= 0 {
		return nil, fmt.Errorf("creating garbage collector: interval %v must be positive", opts.Interval)
	}
	now := opts.Now
	if now == nil {
		now = time.Now
	}
	reg, err := storage.NewRegistry(context.Background(), d, storage.EnableDelete)
	if err != nil {
		return nil, fmt.Errorf("creating garbage collector: opening registry storage: %w", err)
	}
	m, err := newMetrics(opts.Registerer)
	if err != nil {
		return nil, err
	}
	return &Collector{
		driver:   d,
		registry: reg,
		opts:     opts,
		now:      now,
		leases:   newLeases(d, opts.Grace, now),
		metrics:  m,
	}, nil
}

// Run collects every Interval until ctx is done. Failed passes are logged
// and retried at the next tick; they never stop the registry.
func (c *Collector) Run(ctx context.Context) {
	logger := klog.FromContext(ctx).WithName("dvcr-gc")
	ctx = klog.NewContext(ctx, logger)
	ticker := time.NewTicker(c.opts.Interval)
	defer ticker.Stop()
	for {
		if _, err := c.Collect(ctx); err != nil && ctx.Err() == nil {
			logger.Error(err, "Garbage collection pass failed, retrying at next interval", "interval", c.opts.Interval)
		}
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
	}
}

// Collect runs one pass: mark every manifest revision's references, then
// delete the unmarked blobs that are neither young nor leased, the links to
// them, empty repositories and expired leases.
func (c *Collector) Collect(ctx context.Context) (Stats, error) {
	c.passMu.Lock()
	defer c.passMu.Unlock()
	logger := klog.FromContext(ctx)
	started := time.Now()

	st, err := c.collect(ctx)
	if err != nil {
		c.metrics.passes.WithLabelValues("error").Inc()
		return st, err
	}
	c.metrics.passes.WithLabelValues("success").Inc()
	c.metrics.lastSuccess.Set(float64(time.Now().Unix()))
	// Quiet when a pass found nothing to do, as most passes do.
	v := 0
	if st.BlobsDeleted == 0 && st.RepositoriesRemoved == 0 {
		v = 2
	}
	logger.V(v).Info("Garbage collection pass done",
		"repositories", st.Repositories, "manifests", st.ManifestsMarked,
		"blobsKept", st.BlobsKept, "blobsDeleted", st.BlobsDeleted, "bytesFreed", st.BytesFreed,
		"layerLinksRemoved", st.LayerLinksRemoved, "repositoriesRemoved", st.RepositoriesRemoved,
		"leasesRemoved", st.LeasesRemoved, "duration", time.Since(started))
	return st, nil
}

func (c *Collector) collect(ctx context.Context) (Stats, error) {
	var st Stats

	// Barrier: guarded requests that started before the pass finish before
	// the mark looks at storage; later ones lease at or after passStart.
	c.mu.Lock()
	passStart := c.now()
	c.mu.Unlock()
	cutoff := passStart.Add(-c.opts.Grace)

	repos, err := c.walkRepositories(ctx)
	if err != nil {
		return st, err
	}
	st.Repositories = len(repos)

	marked := map[digest.Digest]struct{}{}
	for _, r := range repos {
		if err := c.markRepository(ctx, r, marked); err != nil {
			return st, err
		}
		st.ManifestsMarked += len(r.revisions)
	}

	if err := c.sweepBlobs(ctx, repos, marked, cutoff, &st); err != nil {
		return st, err
	}
	if err := c.removeEmptyRepositories(ctx, repos, cutoff, &st); err != nil {
		return st, err
	}
	if err := c.removeExpiredLeases(ctx, cutoff, &st); err != nil {
		return st, err
	}
	return st, nil
}

// repoState is what one walk of a repository's directories found.
type repoState struct {
	name      string
	layers    map[digest.Digest]struct{} // layer links, dangling or not
	revisions []digest.Digest            // manifest revision links
	uploads   bool                       // upload sessions in progress
	newest    time.Time                  // newest file modification
}

// walkRepositories lists every repository, including those that only hold
// layer links or uploads: distribution's own enumerator skips repositories
// without _manifests, whose links would then dangle forever.
func (c *Collector) walkRepositories(ctx context.Context) ([]*repoState, error) {
	seen := map[string]bool{}
	var names []string
	err := c.walk(ctx, reposRoot, func(fi driver.FileInfo) error {
		if !strings.HasPrefix(path.Base(fi.Path()), "_") {
			return nil
		}
		name := strings.TrimPrefix(path.Dir(fi.Path()), reposRoot+"/")
		if !seen[name] {
			seen[name] = true
			names = append(names, name)
		}
		return driver.ErrSkipDir
	})
	if err != nil {
		return nil, fmt.Errorf("listing repositories: %w", err)
	}
	repos := make([]*repoState, 0, len(names))
	for _, name := range names {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		r, err := c.inspectRepository(ctx, name)
		if err != nil {
			return nil, err
		}
		repos = append(repos, r)
	}
	return repos, nil
}

// inspectRepository reads link digests from their paths; link contents are
// never needed because the layout names the digest.
func (c *Collector) inspectRepository(ctx context.Context, name string) (*repoState, error) {
	r := &repoState{name: name, layers: map[digest.Digest]struct{}{}}
	root := repoPath(name)
	revisions := path.Join(root, "_manifests", "revisions") + "/"
	for _, sub := range []string{"_layers", "_manifests", "_uploads"} {
		err := c.walk(ctx, path.Join(root, sub), func(fi driver.FileInfo) error {
			if fi.IsDir() {
				return nil
			}
			if fi.ModTime().After(r.newest) {
				r.newest = fi.ModTime()
			}
			switch sub {
			case "_layers":
				if d, ok := digestFromLinkPath(fi.Path()); ok {
					r.layers[d] = struct{}{}
				}
			case "_manifests":
				if d, ok := digestFromLinkPath(fi.Path()); ok && strings.HasPrefix(fi.Path(), revisions) {
					r.revisions = append(r.revisions, d)
				}
			case "_uploads":
				r.uploads = true
			}
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("inspecting repository %s: %w", name, err)
		}
	}
	return r, nil
}

// walk visits the tree under dir like driver.Walk, but tolerates entries
// that vanish while it runs: pushes and deletions go on during a pass, and a
// directory removed between listing and reading must not fail the pass.
func (c *Collector) walk(ctx context.Context, dir string, fn driver.WalkFn) error {
	children, err := c.driver.List(ctx, dir)
	if isNotFound(err) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, child := range children {
		if err := ctx.Err(); err != nil {
			return err
		}
		fi, err := c.driver.Stat(ctx, child)
		if isNotFound(err) {
			continue
		}
		if err != nil {
			return err
		}
		err = fn(fi)
		if errors.Is(err, driver.ErrSkipDir) {
			continue
		}
		if err != nil {
			return err
		}
		if fi.IsDir() {
			if err := c.walk(ctx, child, fn); err != nil {
				return err
			}
		}
	}
	return nil
}

// markRepository marks every manifest revision of the repository, tagged or
// not, and everything it references. Untagged manifests are kept: pulling by
// digest is how DVCR images are used, and DELETE by digest is how they go.
func (c *Collector) markRepository(ctx context.Context, r *repoState, marked map[digest.Digest]struct{}) error {
	named, err := reference.WithName(r.name)
	if err != nil {
		// Never skip: an unmarked repository would lose its blobs.
		return fmt.Errorf("marking repository %q: %w", r.name, err)
	}
	repo, err := c.registry.Repository(ctx, named)
	if err != nil {
		return fmt.Errorf("marking repository %s: %w", r.name, err)
	}
	ms, err := repo.Manifests(ctx)
	if err != nil {
		return fmt.Errorf("marking repository %s: opening manifests: %w", r.name, err)
	}
	// The revisions come from our own tolerant walk rather than
	// distribution's ManifestEnumerator, whose walk fails when a concurrent
	// DELETE removes a revision directory under it.
	for _, d := range r.revisions {
		marked[d] = struct{}{}
		refs, err := c.references(ctx, ms, d)
		if err != nil {
			return fmt.Errorf("marking manifest %s@%s: %w", r.name, d, err)
		}
		for _, ref := range refs {
			marked[ref] = struct{}{}
		}
	}
	return nil
}

func (c *Collector) references(ctx context.Context, ms distribution.ManifestService, d digest.Digest) ([]digest.Digest, error) {
	m, err := ms.Get(ctx, d)
	if err == nil {
		var out []digest.Digest
		for _, desc := range m.References() {
			out = append(out, desc.Digest)
		}
		return out, nil
	}
	var unknown distribution.ErrManifestUnknownRevision
	if errors.As(err, &unknown) {
		return nil, nil // deleted since it was listed
	}
	// A media type distribution does not parse: fall back to the raw
	// descriptors rather than losing what the manifest references.
	p := blobDataPath(d)
	fi, serr := c.driver.Stat(ctx, p)
	if serr != nil || fi.Size() > maxStoredManifestSize {
		return nil, fmt.Errorf("reading manifest: %w", err)
	}
	b, rerr := c.driver.GetContent(ctx, p)
	if rerr != nil {
		return nil, fmt.Errorf("reading manifest: %w", rerr)
	}
	refs := manifestReferences(b)
	if refs == nil && !isJSONObject(b) {
		return nil, fmt.Errorf("reading manifest: %w", err)
	}
	return refs, nil
}

func isJSONObject(b []byte) bool {
	s := strings.TrimSpace(string(b))
	return strings.HasPrefix(s, "{") && strings.HasSuffix(s, "}")
}

type candidate struct {
	digest digest.Digest
	size   int64
}

func (c *Collector) sweepBlobs(ctx context.Context, repos []*repoState, marked map[digest.Digest]struct{}, cutoff time.Time, st *Stats) error {
	logger := klog.FromContext(ctx)
	var all []digest.Digest
	err := c.registry.Blobs().Enumerate(ctx, func(d digest.Digest) error {
		all = append(all, d)
		return nil
	})
	if err != nil && !isNotFound(err) {
		return fmt.Errorf("listing blobs: %w", err)
	}
	present := make(map[digest.Digest]struct{}, len(all))
	var candidates []candidate
	for _, d := range all {
		present[d] = struct{}{}
		if _, ok := marked[d]; ok {
			st.BlobsKept++
			continue
		}
		fi, err := c.driver.Stat(ctx, blobDataPath(d))
		if isNotFound(err) {
			continue
		}
		if err != nil {
			return fmt.Errorf("checking age of blob %s: %w", d, err)
		}
		if fi.ModTime().After(cutoff) {
			st.BlobsKept++
			continue
		}
		leased, err := c.leases.newest(ctx, d)
		if err != nil {
			return err
		}
		if leased.After(cutoff) {
			st.BlobsKept++
			continue
		}
		candidates = append(candidates, candidate{digest: d, size: fi.Size()})
	}

	linkedFrom := map[digest.Digest][]string{}
	for _, r := range repos {
		for d := range r.layers {
			linkedFrom[d] = append(linkedFrom[d], r.name)
		}
	}

	deleted := map[digest.Digest]struct{}{}
	vacuum := storage.NewVacuum(ctx, c.driver)
	for _, cand := range candidates {
		if err := ctx.Err(); err != nil {
			return err
		}
		if c.beforeDelete != nil {
			c.beforeDelete(cand.digest)
		}
		ok, links, err := c.deleteBlob(ctx, cand.digest, linkedFrom[cand.digest], cutoff)
		st.LayerLinksRemoved += links
		if err != nil {
			return err
		}
		if !ok {
			st.BlobsKept++
			continue
		}
		deleted[cand.digest] = struct{}{}
		st.BlobsDeleted++
		st.BytesFreed += cand.size
		c.metrics.blobsDeleted.Inc()
		c.metrics.bytesFreed.Add(float64(cand.size))
		logger.V(2).Info("Deleted unreferenced blob", "digest", cand.digest, "size", cand.size)
	}

	// Links whose blob vanished earlier (a crash between deletions, or a
	// manual cleanup) make the blob look present in that repository.
	for _, r := range repos {
		for d := range r.layers {
			if _, ok := present[d]; ok {
				continue
			}
			if _, ok := deleted[d]; ok {
				continue
			}
			removed, err := c.removeDanglingLink(ctx, vacuum, r.name, d)
			if err != nil {
				return err
			}
			if removed {
				st.LayerLinksRemoved++
			}
		}
	}
	return nil
}

// deleteBlob re-checks the lease and deletes the blob and its links, all
// under the write lock so that no guarded request interleaves.
func (c *Collector) deleteBlob(ctx context.Context, d digest.Digest, repos []string, cutoff time.Time) (bool, int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.deleteBlobLocked(ctx, d, repos, cutoff)
}

// deleteBlobLocked is deleteBlob for a caller holding the write lock.
func (c *Collector) deleteBlobLocked(ctx context.Context, d digest.Digest, repos []string, cutoff time.Time) (bool, int, error) {
	leased, err := c.leases.newest(ctx, d)
	if err != nil {
		return false, 0, err
	}
	if leased.After(cutoff) {
		return false, 0, nil
	}
	vacuum := storage.NewVacuum(ctx, c.driver)
	if err := vacuum.RemoveBlob(d.String()); err != nil && !isNotFound(err) {
		return false, 0, fmt.Errorf("deleting blob %s: %w", d, err)
	}
	links := 0
	for _, repo := range repos {
		err := vacuum.RemoveLayer(repo, d)
		if isNotFound(err) {
			continue
		}
		if err != nil {
			return true, links, fmt.Errorf("deleting link to blob %s in %s: %w", d, repo, err)
		}
		links++
	}
	return true, links, nil
}

func (c *Collector) removeDanglingLink(ctx context.Context, vacuum storage.Vacuum, repo string, d digest.Digest) (bool, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, err := c.driver.Stat(ctx, blobDataPath(d))
	if err == nil {
		return false, nil // uploaded again since the listing
	}
	if !isNotFound(err) {
		return false, fmt.Errorf("checking blob %s: %w", d, err)
	}
	err = vacuum.RemoveLayer(repo, d)
	if isNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("deleting dangling link to %s in %s: %w", d, repo, err)
	}
	return true, nil
}

// removeEmptyRepositories removes repositories without manifests or uploads
// whose files are all older than the grace and whose remaining links are not
// leased. Upload sessions are never touched: a repository with one is kept.
func (c *Collector) removeEmptyRepositories(ctx context.Context, repos []*repoState, cutoff time.Time, st *Stats) error {
	vacuum := storage.NewVacuum(ctx, c.driver)
	for _, r := range repos {
		if len(r.revisions) > 0 || r.uploads || r.newest.After(cutoff) {
			continue
		}
		removed, err := c.removeRepository(ctx, vacuum, r.name, cutoff)
		if err != nil {
			return err
		}
		if removed {
			st.RepositoriesRemoved++
			c.metrics.reposRemoved.Inc()
			klog.FromContext(ctx).V(2).Info("Removed empty repository", "repository", r.name)
		}
	}
	return nil
}

func (c *Collector) removeRepository(ctx context.Context, vacuum storage.Vacuum, name string, cutoff time.Time) (bool, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	// Look again under the lock: pushes may have landed since the walk.
	r, err := c.inspectRepository(ctx, name)
	if err != nil {
		return false, err
	}
	if len(r.revisions) > 0 || r.uploads || r.newest.After(cutoff) {
		return false, nil
	}
	for d := range r.layers {
		leased, err := c.leases.newest(ctx, d)
		if err != nil {
			return false, err
		}
		if leased.After(cutoff) {
			return false, nil
		}
	}
	if err := vacuum.RemoveRepository(name); err != nil {
		return false, fmt.Errorf("removing repository %s: %w", name, err)
	}
	// Prune the now empty directories up to the repositories root, but never
	// a directory that still holds another (nested) repository.
	for dir := repoPath(name); dir != reposRoot && strings.HasPrefix(dir, reposRoot+"/"); dir = path.Dir(dir) {
		children, err := c.driver.List(ctx, dir)
		if isNotFound(err) {
			continue
		}
		if err != nil || len(children) > 0 {
			break
		}
		if err := c.driver.Delete(ctx, dir); err != nil && !isNotFound(err) {
			break
		}
	}
	return true, nil
}

func (c *Collector) removeExpiredLeases(ctx context.Context, cutoff time.Time, st *Stats) error {
	var expired []digest.Digest
	err := c.walk(ctx, leasesRoot, func(fi driver.FileInfo) error {
		if fi.IsDir() {
			return nil
		}
		d, ok := digestFromLeasePath(fi.Path())
		if !ok {
			return nil
		}
		t, err := c.leases.read(ctx, d)
		if err != nil {
			return err
		}
		if !t.After(cutoff) {
			expired = append(expired, d)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("listing leases: %w", err)
	}
	for _, d := range expired {
		c.mu.Lock()
		removed, err := c.leases.forget(ctx, d, cutoff)
		c.mu.Unlock()
		if err != nil {
			return err
		}
		if removed {
			st.LeasesRemoved++
		}
	}
	c.leases.pruneCache(cutoff)
	return nil
}
