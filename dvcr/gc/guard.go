package gc

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"

	"github.com/opencontainers/go-digest"
	"k8s.io/klog/v2"
)

// maxManifestSize matches distribution's own limit on a manifest PUT body, so
// Guard never rejects a manifest the registry would accept.
const maxManifestSize = 4 << 20

// request kinds Guard cares about.
type guardKind int

const (
	passThrough guardKind = iota
	// leaseOnly: lease, then serve without the lock (long downloads).
	leaseOnly
	// lockedShort: lease and serve the whole request under the read lock.
	lockedShort
	// lockedAtEOF: the request carries blob data; lease and take the read
	// lock once the body has been read, i.e. right before the commit.
	lockedAtEOF
	// manifestPut: read the body, lease what it references, serve locked.
	manifestPut
)

type guardPlan struct {
	kind    guardKind
	digests []digest.Digest
}

// classify maps a registry API request to what Guard must do. Anything it
// does not recognise passes through untouched.
func classify(r *http.Request) guardPlan {
	p := r.URL.Path
	if !strings.HasPrefix(p, "/v2/") {
		return guardPlan{}
	}
	switch {
	case strings.Contains(p, "/blobs/uploads/") || strings.HasSuffix(p, "/blobs/uploads"):
		q := r.URL.Query()
		switch r.Method {
		case http.MethodPost:
			// Starting an upload must not interleave with the removal of
			// an empty repository; a mount relies on the source blob.
			plan := guardPlan{kind: lockedShort}
			if d, err := digest.Parse(q.Get("mount")); err == nil {
				plan.digests = append(plan.digests, d)
			}
			if d, err := digest.Parse(q.Get("digest")); err == nil {
				plan.digests = append(plan.digests, d)
				if r.ContentLength != 0 {
					plan.kind = lockedAtEOF
				}
			}
			return plan
		case http.MethodPut:
			d, err := digest.Parse(q.Get("digest"))
			if err != nil {
				return guardPlan{}
			}
			if r.ContentLength == 0 {
				return guardPlan{kind: lockedShort, digests: []digest.Digest{d}}
			}
			return guardPlan{kind: lockedAtEOF, digests: []digest.Digest{d}}
		}
		return guardPlan{}
	case strings.Contains(p, "/blobs/"):
		d, err := digest.Parse(p[strings.LastIndex(p, "/blobs/")+len("/blobs/"):])
		if err != nil {
			return guardPlan{}
		}
		switch r.Method {
		case http.MethodHead:
			return guardPlan{kind: lockedShort, digests: []digest.Digest{d}}
		case http.MethodGet:
			return guardPlan{kind: leaseOnly, digests: []digest.Digest{d}}
		}
		return guardPlan{}
	case strings.Contains(p, "/manifests/") && r.Method == http.MethodPut:
		return guardPlan{kind: manifestPut}
	}
	return guardPlan{}
}

// Guard wraps the registry handler so that the blobs a request relies on are
// leased before the registry looks at them. See the package comment for why
// that keeps online collection safe.
func (c *Collector) Guard(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		plan := classify(r)
		switch plan.kind {
		case passThrough:
			next.ServeHTTP(w, r)

		case leaseOnly:
			c.mu.RLock()
			err := c.leaseAll(r.Context(), plan.digests)
			c.mu.RUnlock()
			if err != nil {
				c.leaseFailed(w, r, err)
				return
			}
			next.ServeHTTP(w, r)

		case lockedShort:
			c.mu.RLock()
			defer c.mu.RUnlock()
			if err := c.leaseAll(r.Context(), plan.digests); err != nil {
				c.leaseFailed(w, r, err)
				return
			}
			next.ServeHTTP(w, r)

		case lockedAtEOF:
			body := &leaseAtEOF{ReadCloser: r.Body, c: c, ctx: r.Context(), digests: plan.digests}
			r.Body = body
			defer body.release()
			next.ServeHTTP(w, r)

		case manifestPut:
			// Read the body before locking: a slow client must not hold
			// up the sweep.
			b, err := io.ReadAll(io.LimitReader(r.Body, maxManifestSize+1))
			if err != nil {
				writeRegistryError(w, http.StatusBadRequest, "MANIFEST_INVALID", "reading manifest body failed")
				return
			}
			if len(b) > maxManifestSize {
				writeRegistryError(w, http.StatusRequestEntityTooLarge, "SIZE_INVALID", fmt.Sprintf("manifest larger than %d bytes", maxManifestSize))
				return
			}
			r.Body = io.NopCloser(bytes.NewReader(b))
			// The manifest's own blob may have outlived a deleted revision
			// and be re-linked rather than rewritten, so lease it too.
			digests := append([]digest.Digest{digest.FromBytes(b)}, manifestReferences(b)...)
			c.mu.RLock()
			defer c.mu.RUnlock()
			if err := c.leaseAll(r.Context(), digests); err != nil {
				c.leaseFailed(w, r, err)
				return
			}
			next.ServeHTTP(w, r)
		}
	})
}

func (c *Collector) leaseAll(ctx context.Context, ds []digest.Digest) error {
	now := c.now()
	for _, d := range ds {
		if err := c.leases.take(ctx, d, now); err != nil {
			return err
		}
	}
	return nil
}

// leaseFailed refuses the request: serving it without a lease could let the
// collector delete a blob the client is about to rely on.
func (c *Collector) leaseFailed(w http.ResponseWriter, r *http.Request, err error) {
	klog.FromContext(r.Context()).Error(err, "Refusing registry request: cannot record blob lease", "method", r.Method, "path", r.URL.Path)
	c.metrics.leaseErrors.Inc()
	writeRegistryError(w, http.StatusServiceUnavailable, "UNAVAILABLE", "cannot record blob lease, retry later")
}

func writeRegistryError(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]any{
		"errors": []map[string]string{{"code": code, "message": msg}},
	})
}

// leaseAtEOF takes the read lock and the lease when the handler has read the
// whole request body, i.e. just before distribution commits the blob, so a
// long upload never holds the lock.
type leaseAtEOF struct {
	io.ReadCloser
	c       *Collector
	ctx     context.Context
	digests []digest.Digest
	locked  bool
}

func (b *leaseAtEOF) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err == io.EOF && !b.locked {
		b.locked = true
		b.c.mu.RLock()
		if lerr := b.c.leaseAll(b.ctx, b.digests); lerr != nil {
			klog.FromContext(b.ctx).Error(lerr, "Aborting blob upload commit: cannot record blob lease")
			b.c.metrics.leaseErrors.Inc()
			// Not EOF: the registry aborts instead of committing.
			return n, lerr
		}
	}
	return n, err
}

func (b *leaseAtEOF) release() {
	if b.locked {
		b.c.mu.RUnlock()
	}
}

// manifestReferences extracts the digests an image manifest or index names,
// whatever its media type; invalid JSON yields none and is left for the
// registry to reject.
func manifestReferences(b []byte) []digest.Digest {
	type desc struct {
		Digest string `json:"digest"`
	}
	var m struct {
		Config    *desc  `json:"config"`
		Layers    []desc `json:"layers"`
		Manifests []desc `json:"manifests"`
		Blobs     []desc `json:"blobs"`
		Subject   *desc  `json:"subject"`
	}
	if json.Unmarshal(b, &m) != nil {
		return nil
	}
	all := append(append(append([]desc{}, m.Layers...), m.Manifests...), m.Blobs...)
	if m.Config != nil {
		all = append(all, *m.Config)
	}
	if m.Subject != nil {
		all = append(all, *m.Subject)
	}
	var out []digest.Digest
	for _, d := range all {
		if p, err := digest.Parse(d.Digest); err == nil {
			out = append(out, p)
		}
	}
	return out
}
