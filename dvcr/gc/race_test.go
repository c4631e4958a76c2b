package gc

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/opencontainers/go-digest"
)

// pushed is one image a worker pushed successfully.
type pushed struct {
	ref     name.Digest
	img     v1.Image
	blobs   []digest.Digest
	deleted bool
	mounted bool // img reads from the source repository: not reusable
}

// pool shares what workers pushed and deleted, so that others mount from
// live images and reuse layers of deleted ones.
type pool struct {
	mu            sync.Mutex
	live          []name.Digest
	deletedLayers []v1.Layer
	deletedImages []v1.Image
}

func (p *pool) addLive(ref name.Digest) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.live = append(p.live, ref)
}

func (p *pool) addDeleted(img v1.Image) {
	p.mu.Lock()
	defer p.mu.Unlock()
	layers, _ := img.Layers()
	p.deletedLayers = append(p.deletedLayers, layers...)
	p.deletedImages = append(p.deletedImages, img)
	// Keep "just deleted" ones: their blobs are the ones the sweep hunts.
	if n := len(p.deletedLayers); n > 32 {
		p.deletedLayers = p.deletedLayers[n-32:]
	}
	if n := len(p.deletedImages); n > 8 {
		p.deletedImages = p.deletedImages[n-8:]
	}
}

func (p *pool) pick(r *rand.Rand) (live *name.Digest, layer v1.Layer, img v1.Image) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.live) > 0 {
		l := p.live[r.IntN(len(p.live))]
		live = &l
	}
	if len(p.deletedLayers) > 0 {
		layer = p.deletedLayers[r.IntN(len(p.deletedLayers))]
	}
	if len(p.deletedImages) > 0 {
		img = p.deletedImages[r.IntN(len(p.deletedImages))]
	}
	return live, layer, img
}

// Pushes (fresh layers, layers of just deleted images, cross-repository
// mounts, re-pushes of deleted images) and deletions run while passes run
// back to back with a short grace on the real clock. Nothing a successful
// push stored may be lost, and what was deleted is freed afterwards.
func TestCollect_ConcurrentPushesAndDeletesNeverLoseBlobs(t *testing.T) {
	const (
		grace   = 1500 * time.Millisecond
		workers = 4
		pushFor = 5 * time.Second
	)
	e := newEnv(t, Options{Grace: grace, Interval: time.Hour})
	ctx := context.Background()

	gcCtx, stopGC := context.WithCancel(ctx)
	var gcWG sync.WaitGroup
	var passes, deletedDuringPushes int
	var gcErr error
	gcWG.Add(1)
	go func() {
		defer gcWG.Done()
		for gcCtx.Err() == nil {
			st, err := e.gc.Collect(gcCtx)
			if err != nil && gcCtx.Err() == nil {
				gcErr = err
				return
			}
			passes++
			deletedDuringPushes += st.BlobsDeleted
			// Back to back, but leave the two CI cores to the pushers
			// now and then: many passes per grace period still.
			select {
			case <-gcCtx.Done():
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()

	var (
		shared   pool
		mu       sync.Mutex
		records  []*pushed
		attempts = map[string]int{}
		failures = map[string]int{}
		wg       sync.WaitGroup
	)
	deadline := time.Now().Add(pushFor)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), uint64(time.Now().UnixNano())))
			var mine []*pushed
			for i := 0; time.Now().Before(deadline); i++ {
				// Own repositories only, so each key's history is one
				// worker's sequence; new repositories appear all the time.
				repo := fmt.Sprintf("vi/race/w%d-%d", w, r.IntN(3))
				if r.IntN(4) == 0 {
					repo = fmt.Sprintf("cvi/w%d-n%d", w, i)
				}
				live, oldLayer, oldImg := shared.pick(r)
				kind, img, err := "fresh", v1.Image(nil), error(nil)
				switch n := r.IntN(10); {
				case n < 3 && oldLayer != nil:
					kind = "reuse"
					img, err = random.Image(512, 1)
					if err == nil {
						img, err = mutate.AppendLayers(img, oldLayer)
					}
				case n < 5 && live != nil:
					kind = "mount"
				case n < 7 && oldImg != nil:
					kind = "repush"
					img = oldImg
				default:
					img, err = random.Image(1024, 2)
				}
				if err != nil {
					mu.Lock()
					failures[kind+"-prepare"]++
					mu.Unlock()
					continue
				}
				tag := fmt.Sprintf("uid-%d-%d", w, i)
				var ref name.Digest
				if kind == "mount" {
					ref, img, err = e.mountPush(ctx, *live, repo, tag)
				} else {
					ref, err = e.push(ctx, repo, tag, img)
				}
				mu.Lock()
				attempts[kind]++
				if err != nil {
					failures[kind]++
					mu.Unlock()
					t.Logf("%s push failed: %v", kind, err)
					continue
				}
				mu.Unlock()
				blobs, err := imageBlobDigests(img)
				if err != nil {
					t.Errorf("listing blobs of %s: %v", ref, err)
					return
				}
				p := &pushed{ref: ref, img: img, blobs: blobs, mounted: kind == "mount"}
				mine = append(mine, p)
				// Re-pushing an identical image makes an older record
				// of the same repo@digest live again.
				for _, o := range mine[:len(mine)-1] {
					if o.ref == ref {
						o.deleted = false
					}
				}
				shared.addLive(ref)
				if r.IntN(5) < 2 {
					victim := mine[r.IntN(len(mine))]
					if !victim.deleted {
						if err := remote.Delete(victim.ref, remote.WithContext(ctx)); err != nil {
							t.Errorf("deleting %s: %v", victim.ref, err)
							return
						}
						for _, o := range mine {
							if o.ref == victim.ref {
								o.deleted = true
							}
						}
						if !victim.mounted {
							shared.addDeleted(victim.img)
						}
					}
				}
			}
			mu.Lock()
			records = append(records, mine...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	stopGC()
	gcWG.Wait()
	if gcErr != nil {
		t.Fatalf("collection pass failed during pushes: %v", gcErr)
	}
	t.Logf("%d passes deleted %d blobs during pushes; attempts %v; failures %v", passes, deletedDuringPushes, attempts, failures)
	// The mix varies with machine load; deletions racing pushes must happen.
	if deletedDuringPushes == 0 || len(records) < 10 {
		t.Fatalf("the race was not exercised: %d blobs deleted during pushes, attempts %v", deletedDuringPushes, attempts)
	}

	liveBlobs := map[digest.Digest]bool{}
	var liveCount, deletedCount int
	for _, p := range records {
		if p.deleted {
			deletedCount++
			continue
		}
		liveCount++
		for _, d := range p.blobs {
			liveBlobs[d] = true
		}
		if err := verifyPull(ctx, p.ref); err != nil {
			t.Errorf("image pushed successfully and never deleted does not pull: %v", err)
		}
	}
	stored, err := e.storedManifests()
	if err != nil {
		t.Fatal(err)
	}
	for _, ref := range stored {
		if err := verifyPull(ctx, ref); err != nil {
			t.Errorf("stored manifest references a missing blob: %v", err)
		}
	}
	if liveCount == 0 || deletedCount == 0 {
		t.Fatalf("%d live and %d deleted images: nothing to check", liveCount, deletedCount)
	}

	// One more pass once everything is past the grace frees the rest.
	time.Sleep(grace + 100*time.Millisecond)
	if _, err := e.gc.Collect(ctx); err != nil {
		t.Fatalf("final pass: %v", err)
	}
	freed := 0
	for _, p := range records {
		if !p.deleted {
			continue
		}
		for _, d := range p.blobs {
			if liveBlobs[d] {
				continue
			}
			freed++
			if e.blobOnDisk(d) {
				t.Errorf("blob %s of deleted image %s still on disk after the final pass", d, p.ref)
			}
		}
	}
	for d := range liveBlobs {
		if !e.blobOnDisk(d) {
			t.Errorf("blob %s of a live image deleted by the final pass", d)
		}
	}
	t.Logf("%d live images verified, %d stored manifests verified, %d blobs of %d deleted images freed", liveCount, len(stored), freed, deletedCount)
}

// mountPush copies src into repo by cross-repository mounts only, then puts
// its manifest. ggcr would mount too, but v0.20.6 races on its own HTTP
// client when it adds the source's scope during parallel uploads.
func (e *env) mountPush(ctx context.Context, src name.Digest, repo, tag string) (name.Digest, v1.Image, error) {
	desc, err := remote.Get(src, remote.WithContext(ctx))
	if err != nil {
		return name.Digest{}, nil, fmt.Errorf("reading mount source %s: %w", src, err)
	}
	m, err := v1.ParseManifest(bytes.NewReader(desc.Manifest))
	if err != nil {
		return name.Digest{}, nil, err
	}
	for _, b := range append([]v1.Descriptor{m.Config}, m.Layers...) {
		u := fmt.Sprintf("http://%s/v2/%s/blobs/uploads/?mount=%s&from=%s", e.host, repo, b.Digest, src.Context().RepositoryStr())
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, nil)
		if err != nil {
			return name.Digest{}, nil, err
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return name.Digest{}, nil, err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusCreated {
			// 202: the source is gone and an upload was started instead.
			return name.Digest{}, nil, fmt.Errorf("mounting %s from %s: %s", b.Digest, src, resp.Status)
		}
	}
	r, err := name.NewRepository(e.host + "/" + repo)
	if err != nil {
		return name.Digest{}, nil, err
	}
	if err := remote.Put(r.Tag(tag), desc, remote.WithContext(ctx)); err != nil {
		return name.Digest{}, nil, fmt.Errorf("putting mounted manifest in %s: %w", repo, err)
	}
	img, err := desc.Image()
	if err != nil {
		return name.Digest{}, nil, err
	}
	return r.Digest(desc.Digest.String()), img, nil
}
