// Package worker is the data mover that runs in an import pod: it reads the
// request the controller wrote into the pod's Secret (package api), imports
// the source into DVCR, reports progress on its own pod and leaves its
// result in the pod's termination message.
package worker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/klog/v2"

	"vimg.dev/vimg/dvcr/client"
	"vimg.dev/vimg/pkg/diskimage"
	"vimg.dev/vimg/pkg/diskimage/source"
	"vimg.dev/vimg/pkg/diskimage/source/registry"
	"vimg.dev/vimg/pkg/importer"
	"vimg.dev/vimg/pkg/version"
	"vimg.dev/vimg/pkg/worker/api"
)

// Config wires a worker run.
type Config struct {
	// RequestPath is the request file (RequestDir/RequestFile in a pod).
	RequestPath string
	// Pod is the worker's own pod; progress goes there. An empty name
	// turns reporting off (running by hand).
	PodNamespace, PodName string
	Kube                  kubernetes.Interface
	// TerminationMessagePath receives the Outcome; empty means none.
	TerminationMessagePath string
	// ReportInterval is how often progress is written (default 2 s).
	ReportInterval time.Duration
}

// Run performs the import a request describes and records the outcome. The
// returned error is the import's failure (nil on success), already recorded
// in the termination message.
func Run(ctx context.Context, cfg Config) error {
	return conclude(ctx, cfg, run(ctx, cfg), "Import done", "Import failed")
}

// conclude records out in the termination message, logs it with the
// message done or failed, and returns a failure as an error.
func conclude(ctx context.Context, cfg Config, out api.Outcome, done, failed string) error {
	record(ctx, cfg, out)
	log := klog.FromContext(ctx)
	switch r, p := out.Result, out.Populated; {
	case r != nil:
		kv := []any{"format", r.Format, "virtualSize", r.VirtualSize, "sourceSize", r.SourceSize, "cdrom", r.CDROM}
		if r.Digest != "" { // not a probe
			kv = append(kv, "digest", r.Digest, "storedSize", r.StoredSize)
		}
		log.Info(done, kv...)
	case p != nil:
		log.Info(done, "format", p.Format, "virtualSize", p.VirtualSize, "diskSize", p.DiskSize, "written", p.Written, "read", p.Read)
	default:
		log.Info(failed, "reason", out.Reason, "message", out.Message, "permanent", out.Permanent)
		return fmt.Errorf("%s: %s", out.Reason, out.Message)
	}
	return nil
}

func run(ctx context.Context, cfg Config) api.Outcome {
	o, err := openRequest(ctx, cfg.RequestPath, "vimg-worker/", true)
	if err != nil {
		return failure(err)
	}
	defer o.src.Close()

	rep := newReporter(cfg)
	stop := rep.start(ctx)
	res, err := importer.Import(ctx, importer.Request{
		Source:   o.src,
		Checksum: o.checksum,
		Client:   o.dvcr,
		Ref:      o.req.DVCR.Ref,
		Progress: rep.set,
	})
	stop()
	if err != nil {
		return failure(err)
	}
	return api.Outcome{Result: &api.Result{
		Digest:         res.ManifestDigest,
		Format:         string(res.Format),
		VirtualSize:    res.VirtualSize,
		StoredSize:     res.StoredSize,
		SourceSize:     res.SourceSize,
		SourceChecksum: res.SourceChecksum,
		CDROM:          res.CDROM,
	}}
}

// opened is an import request with its source open: what an import, a probe
// and a populate from the source all start with.
type opened struct {
	req api.Request
	// dvcr is nil when the request needs no DVCR.
	dvcr     *client.Client
	checksum *diskimage.Checksum
	src      source.Source
}

// openRequest reads the import request at path and opens its source, with a
// DVCR client whose User-Agent starts with agent. push says the image goes
// to DVCR, which the request must then name; otherwise DVCR only serves an
// upload (a blob of the image's repository). The error is an
// *importer.Error, or the source's, for failure.
func openRequest(ctx context.Context, path, agent string, push bool) (*opened, error) {
	req, err := readRequest(path)
	if err != nil {
		return nil, internalError(err.Error())
	}
	o := &opened{req: req}
	if push || req.Source.Type == api.SourceDVCRBlob {
		if req.DVCR.Address == "" || req.DVCR.Ref == "" {
			return nil, internalError("the import request names no DVCR address or reference")
		}
		o.dvcr, err = client.New(req.DVCR.Address, client.Options{
			Token:     req.DVCR.Token,
			CABundle:  req.DVCR.CABundle,
			UserAgent: agent + version.Version,
		})
		if err != nil {
			return nil, internalError("DVCR client: " + err.Error())
		}
	}
	if o.checksum, err = strongestChecksum(req.Checksums); err != nil {
		return nil, internalError(err.Error())
	}
	if o.src, err = openSource(ctx, req.Source, o.dvcr, req.DVCR.Ref); err != nil {
		return nil, err
	}
	return o, nil
}

// internalError is a request the controller got wrong: permanent, as only
// a fixed controller writes a better one.
func internalError(msg string) error {
	return &importer.Error{Reason: importer.ReasonInternal, Message: msg, Permanent: true}
}

func failure(err error) api.Outcome {
	e := importer.Classify(err)
	return api.Outcome{Reason: e.Reason, Message: e.Message, Permanent: e.Permanent}
}

func readRequest(path string) (api.Request, error) {
	b, err := os.ReadFile(filepath.Clean(path))
	if err != nil {
		return api.Request{}, fmt.Errorf("reading the import request: %w", err)
	}
	var r api.Request
	if err := json.Unmarshal(b, &r); err != nil {
		return api.Request{}, fmt.Errorf("parsing the import request: %w", err)
	}
	return r, nil
}

// openSource opens the request's source; dvcr and ref (the image's DVCR
// reference) serve an upload, which is a blob of the image's repository.
func openSource(ctx context.Context, s api.SourceSpec, dvcr *client.Client, ref string) (source.Source, error) {
	switch s.Type {
	case api.SourceDVCRBlob:
		return openBlob(ctx, s, dvcr, ref)
	case api.SourceHTTP:
		h := http.Header{}
		for k, v := range s.Headers {
			h.Set(k, v)
		}
		return source.OpenHTTP(ctx, s.URL, source.HTTPOptions{
			Header:             h,
			Username:           s.Username,
			Password:           s.Password,
			CABundle:           s.CABundle,
			InsecureSkipVerify: s.InsecureSkipVerify,
		})
	case api.SourceRegistry:
		if len(s.DockerConfig) > 0 {
			u, p, err := registry.AuthFromDockerConfig(s.DockerConfig, s.URL)
			if err != nil && !errors.Is(err, registry.ErrNoCredentials) {
				return nil, &importer.Error{Reason: importer.ReasonSourceUnauthorized, Message: "imagePullSecret: " + err.Error(), Permanent: true}
			}
			s.Username, s.Password = u, p
		}
		return registry.Open(ctx, s.URL, registry.Options{
			Username:           s.Username,
			Password:           s.Password,
			CABundle:           s.CABundle,
			InsecureSkipVerify: s.InsecureSkipVerify,
			UserAgent:          "vimg-worker/" + version.Version,
		})
	}
	return nil, &importer.Error{Reason: importer.ReasonInternal, Message: fmt.Sprintf("unknown source type %q", s.Type), Permanent: true}
}

// strongestChecksum picks the strongest of the given checksums: the engine
// verifies one digest per pass, and a user who gives several means the
// same file.
func strongestChecksum(sums []string) (*diskimage.Checksum, error) {
	rank := map[string]int{"md5": 1, "sha1": 2, "sha256": 3, "sha512": 4}
	var best *diskimage.Checksum
	for _, s := range sums {
		c, err := diskimage.ParseChecksum(s)
		if err != nil {
			return nil, fmt.Errorf("checksum %q: %w", s, err)
		}
		if best == nil || rank[c.Algorithm] > rank[best.Algorithm] {
			best = &c
		}
	}
	return best, nil
}

// reporter writes the latest progress onto the worker's pod, at most every
// interval and only when it changed, so a slow API server only delays
// reports and never the import.
type reporter struct {
	cfg      Config
	mu       sync.Mutex
	latest   api.Progress
	written  api.Progress
	interval time.Duration
}

func newReporter(cfg Config) *reporter {
	iv := cfg.ReportInterval
	if iv <= 0 {
		iv = 2 * time.Second
	}
	return &reporter{cfg: cfg, interval: iv, latest: api.Progress{Fraction: -1, SourceTotal: -1}}
}

func (r *reporter) set(p importer.Progress) {
	r.report(api.Progress{
		Fraction:     p.Fraction,
		SourceRead:   p.SourceRead,
		SourceTotal:  p.SourceTotal,
		AvgSpeed:     p.AvgBytesPerSecond,
		CurrentSpeed: p.CurrentBytesPerSecond,
	})
}

// report records p as the latest progress, written at the next tick.
func (r *reporter) report(p api.Progress) {
	r.mu.Lock()
	r.latest = p
	r.mu.Unlock()
}

func (r *reporter) start(ctx context.Context) (stop func()) {
	if r.cfg.PodName == "" || r.cfg.Kube == nil {
		return func() {}
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(r.interval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				r.flush(ctx)
			}
		}
	}()
	return func() { cancel(); <-done }
}

func (r *reporter) flush(ctx context.Context) {
	r.mu.Lock()
	p := r.latest
	same := p == r.written
	r.mu.Unlock()
	if same {
		return
	}
	patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": map[string]string{api.AnnotationProgress: p.Encode()}}})
	_, err := r.cfg.Kube.CoreV1().Pods(r.cfg.PodNamespace).Patch(ctx, r.cfg.PodName, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: "vimg-worker"})
	if err != nil {
		klog.FromContext(ctx).V(2).Info("Reporting progress failed; will try again", "err", err)
		return
	}
	r.mu.Lock()
	r.written = p
	r.mu.Unlock()
}
