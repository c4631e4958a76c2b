package upload

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/klog/v2"

	"vimg.dev/vimg/dvcr/client"
	"vimg.dev/vimg/pkg/worker/api"
)

// Config wires a Gateway.
type Config struct {
	Store    Store
	Registry Registry
	// ID names this gateway in upload leases (the pod's name); default
	// the host name.
	ID string
	// ProgressInterval is how often the state of an upload being received
	// is written (default 2 s).
	ProgressInterval time.Duration
	// IdleTimeout drops an upload whose client sent nothing for this long
	// (default 2 min). There is no other time limit on a request.
	IdleTimeout time.Duration
	// LeaseDuration is how long an upload stays claimed by a request
	// without a state write (default 30 s): what a crashed replica blocks
	// its uploads for.
	LeaseDuration time.Duration
	// MaxSize bounds an upload (default DefaultMaxSize, 64 TiB).
	MaxSize int64
	// BusyWait is how long a PUT waits for another request of the same
	// upload on this replica to end before it is refused as concurrent
	// (default 5 s): a client resuming right after its connection broke
	// finds the broken request still recording where it stopped.
	BusyWait time.Duration
	// Now is the clock of deadlines and leases (tests).
	Now func() time.Time
}

// Gateway is the upload gateway's HTTP handler: the protocol of
// docs/upload.md on /upload/<uid>/<token>.
type Gateway struct {
	cfg Config
	id  string
	seq atomic.Uint64

	mu     sync.Mutex
	active map[string]*transfer // by upload UID: the requests receiving here

	stop     chan struct{}
	stopOnce sync.Once
}

// New returns a Gateway.
func New(cfg Config) (*Gateway, error) {
	if cfg.Store == nil || cfg.Registry == nil {
		return nil, errors.New("upload gateway: a store and a registry are required")
	}
	if cfg.ProgressInterval <= 0 {
		cfg.ProgressInterval = 2 * time.Second
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = 2 * time.Minute
	}
	if cfg.LeaseDuration <= 0 {
		cfg.LeaseDuration = 30 * time.Second
	}
	if cfg.LeaseDuration < 3*cfg.ProgressInterval {
		return nil, fmt.Errorf("upload gateway: the lease (%s) must outlast several progress writes (%s)", cfg.LeaseDuration, cfg.ProgressInterval)
	}
	if cfg.MaxSize <= 0 {
		cfg.MaxSize = DefaultMaxSize
	}
	if cfg.BusyWait <= 0 {
		cfg.BusyWait = 5 * time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	id := cfg.ID
	if id == "" {
		id, _ = os.Hostname()
	}
	// A restarted pod keeps its name: the start time tells its leases
	// apart from those of its previous life.
	id = fmt.Sprintf("%s/%x", id, time.Now().UnixNano())
	return &Gateway{cfg: cfg, id: id, active: map[string]*transfer{}, stop: make(chan struct{})}, nil
}

// Shutdown ends every upload being received here cleanly: the bytes
// received so far are kept and recorded, and each client is told to resume
// (503), which it can do against another replica. New uploads are refused.
// It returns at once; http.Server.Shutdown waits for the requests.
func (g *Gateway) Shutdown() { g.stopOnce.Do(func() { close(g.stop) }) }

// ShuttingDown says whether Shutdown was called (readiness).
func (g *Gateway) ShuttingDown() bool {
	select {
	case <-g.stop:
		return true
	default:
		return false
	}
}

// Reasons an upload being received ends before its body does.
var (
	errShuttingDown = errors.New("the upload gateway is shutting down")
	errIdle         = errors.New("no data arrived for too long")
	errDeleted      = errors.New("the image was deleted")
	errLeaseLost    = errors.New("another request took over this upload")
	errLeaseExpired = errors.New("the upload's state could not be recorded for too long")
	errTooLarge     = errors.New("the upload is larger than an image may be")
	// errChanged: the state changed under a check; nothing written.
	errChanged = errors.New("the upload changed meanwhile")
)

// clientError is a failure to read the request body: the client went away.
type clientError struct{ err error }

func (e *clientError) Error() string { return "the client went away: " + e.err.Error() }
func (e *clientError) Unwrap() error { return e.err }

var errNoUpload = refuse(http.StatusNotFound, -1,
	"no upload at this URL: use the URL in the image's status.imageUploadURLs (an image that is recreated gets a new one)")

func (g *Gateway) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	uid, token, ok := parsePath(r.URL.Path)
	if !ok {
		reply(w, errNoUpload)
		return
	}
	// The URL holds the token: only the UID is ever logged.
	log := klog.FromContext(r.Context()).WithValues("upload", uid, "method", r.Method)
	r = r.WithContext(klog.NewContext(r.Context(), log))
	switch r.Method {
	case http.MethodHead, http.MethodGet, http.MethodPut:
	default:
		w.Header().Set("Allow", "GET, HEAD, PUT")
		reply(w, refuse(http.StatusMethodNotAllowed, -1, "PUT uploads; HEAD or GET tells how far an upload is"))
		return
	}
	up, err := g.authenticate(r.Context(), uid, token)
	if err != nil {
		reply(w, err)
		return
	}
	if r.Method == http.MethodPut {
		g.put(w, r, up)
		return
	}
	g.status(w, r, up)
}

// authenticate finds the upload and checks the URL's token. An unknown
// upload and a wrong token get the same answer.
func (g *Gateway) authenticate(ctx context.Context, uid, token string) (*Upload, error) {
	up, err := g.cfg.Store.Get(ctx, uid)
	if errors.Is(err, ErrNotFound) {
		return nil, errNoUpload
	}
	if err != nil {
		klog.FromContext(ctx).Error(err, "Reading the upload failed")
		return nil, refuse(http.StatusServiceUnavailable, -1, "the upload gateway cannot read its uploads right now; try again in a moment")
	}
	if subtle.ConstantTimeCompare([]byte(token), []byte(up.Token)) != 1 {
		return nil, errNoUpload
	}
	return up, nil
}

// fresh reads the upload from the source of truth, not the cache.
func (g *Gateway) fresh(ctx context.Context, uid string) (*Upload, error) {
	up, err := g.cfg.Store.Update(ctx, uid, func(*Upload) error { return nil })
	return up, g.storeError(ctx, err)
}

func (g *Gateway) storeError(ctx context.Context, err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, ErrNotFound):
		return errNoUpload
	}
	var se *statusError
	if errors.As(err, &se) {
		return se
	}
	klog.FromContext(ctx).Error(err, "Reading or writing the upload state failed")
	return refuse(http.StatusServiceUnavailable, -1, "the upload gateway cannot record the upload's state right now; try again in a moment")
}

// statusBody is GET's answer.
type statusBody struct {
	Received int64      `json:"received"`
	Total    int64      `json:"total"`
	Done     bool       `json:"done"`
	Digest   string     `json:"digest,omitempty"`
	Size     int64      `json:"size,omitempty"`
	Active   bool       `json:"active"`
	Expires  *time.Time `json:"expires,omitempty"`
	Message  string     `json:"message,omitempty"`
}

// status answers HEAD and GET: how far the upload is, and where to resume.
func (g *Gateway) status(w http.ResponseWriter, r *http.Request, up *Upload) {
	ctx := r.Context()
	var body statusBody
	if t := g.transferOf(up.UID); t != nil {
		body = statusBody{Received: t.received.Load(), Total: t.total.Load(), Active: true}
	} else {
		var err error
		if up, err = g.fresh(ctx, up.UID); err != nil {
			reply(w, err)
			return
		}
		var msg string
		if up, msg, err = g.verify(ctx, up); err != nil {
			reply(w, err)
			return
		}
		st := up.State
		body = statusBody{Received: st.Received, Total: st.Total, Done: st.Done, Active: up.Holder.Active(g.cfg.Now()), Message: msg}
		if st.Done {
			body.Received, body.Digest, body.Size = st.Size, st.Digest, st.Size
		}
		if !up.Expires.IsZero() && !st.Done {
			body.Expires = &up.Expires
		}
		if st.Received > 0 && !st.Done && !body.Active {
			w.Header().Set(HeaderReceivedDigest, receivedDigest(st.HashState))
		}
	}
	h := w.Header()
	h.Set("Cache-Control", "no-store")
	h.Set(HeaderOffset, strconv.FormatInt(body.Received, 10))
	if body.Total >= 0 {
		h.Set(HeaderLength, strconv.FormatInt(body.Total, 10))
	}
	h.Set(HeaderDone, strconv.FormatBool(body.Done))
	if body.Digest != "" {
		h.Set(HeaderDigest, body.Digest)
	}
	if body.Expires != nil {
		h.Set(HeaderExpires, body.Expires.UTC().Format(time.RFC3339))
	}
	if body.Message != "" {
		h.Set(HeaderMessage, body.Message)
	}
	if r.Method == http.MethodHead {
		w.WriteHeader(http.StatusOK)
		return
	}
	h.Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(body)
}

// lostMessage tells a user why an upload starts over.
func lostMessage(received int64) string {
	return fmt.Sprintf("the %d bytes received so far were lost (the upload gateway was interrupted while receiving them, "+
		"or DVCR dropped the upload); upload the whole file again from byte 0", received)
}

// restart is the state of an upload that starts over. StartedAt stays: the
// upload started before its deadline, so it may start over after it.
func restart(st api.UploadState, now time.Time) api.UploadState {
	return api.UploadState{Total: st.Total, StartedAt: st.StartedAt, UpdatedAt: now}
}

// verify checks the recorded state of an upload that nobody is receiving
// against DVCR's session. If DVCR does not hold exactly the bytes recorded
// (a gateway died in the middle of a request, DVCR purged the session), the
// upload is set back to byte 0 and the message says why.
func (g *Gateway) verify(ctx context.Context, up *Upload) (*Upload, string, error) {
	st := up.State
	if st.Done || st.Session == "" || up.Holder.Active(g.cfg.Now()) {
		return up, "", nil
	}
	_, err := g.cfg.Registry.Resume(ctx, up.DVCRToken, up.Repository, st.Session, st.Received, st.HashState)
	if err == nil {
		return up, "", nil
	}
	if !errors.Is(err, client.ErrUploadLost) {
		klog.FromContext(ctx).Error(err, "Checking the upload session in DVCR failed")
		return nil, "", refuse(http.StatusBadGateway, -1, "checking the upload in DVCR failed (%v); try again in a moment", err)
	}
	klog.FromContext(ctx).Info("The upload's DVCR session is lost; the upload starts over", "received", st.Received, "reason", err)
	now := g.cfg.Now()
	reset, err := g.cfg.Store.Update(ctx, up.UID, func(u *Upload) error {
		if u.State.Session != st.Session || u.State.Done || u.Holder.Active(now) {
			return errChanged
		}
		u.State = restart(u.State, now)
		return nil
	})
	if errors.Is(err, errChanged) {
		// Another request moved the upload on meanwhile: its state is
		// the answer.
		up, err = g.fresh(ctx, up.UID)
		return up, "", err
	}
	if err != nil {
		return nil, "", g.storeError(ctx, err)
	}
	return reset, lostMessage(st.Received), nil
}

// transfer is a PUT being received here.
type transfer struct {
	holder   Holder
	total    atomic.Int64 // announced, -1 unknown
	received atomic.Int64 // the upload's bytes so far, this request's included
	lastByte atomic.Int64 // unix nanoseconds
	first    atomic.Int64 // unix nanoseconds of this request's first byte, 0 none
	reason   atomic.Pointer[error]
	rc       *http.ResponseController
	ended    chan struct{} // closed when the request is over
}

func (t *transfer) got(n int) {
	now := time.Now().UnixNano()
	t.received.Add(int64(n))
	t.lastByte.Store(now)
	t.first.CompareAndSwap(0, now)
}

// abort makes the body end with reason: a read blocked on the connection
// returns at once (its deadline passes), and so the DVCR PATCH fed by it
// ends cleanly with the bytes received.
func (t *transfer) abort(reason error) {
	if t.reason.CompareAndSwap(nil, &reason) && t.rc != nil {
		_ = t.rc.SetReadDeadline(time.Now())
	}
}

func (t *transfer) aborted() error {
	if p := t.reason.Load(); p != nil {
		return *p
	}
	return nil
}

func (g *Gateway) transferOf(uid string) *transfer {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.active[uid]
}

// begin registers a PUT. If another one of the same upload runs here, it
// waits up to BusyWait for it to end, and returns that one if it does not.
func (g *Gateway) begin(ctx context.Context, uid string, t *transfer) (other *transfer) {
	timer := time.NewTimer(g.cfg.BusyWait)
	defer timer.Stop()
	for {
		g.mu.Lock()
		other = g.active[uid]
		if other == nil {
			g.active[uid] = t
		}
		g.mu.Unlock()
		if other == nil {
			return nil
		}
		select {
		case <-other.ended:
		case <-timer.C:
			return other
		case <-ctx.Done():
			return other
		}
	}
}

func (g *Gateway) end(uid string, t *transfer) {
	g.mu.Lock()
	if g.active[uid] == t {
		delete(g.active, uid)
	}
	g.mu.Unlock()
	close(t.ended)
}

func busy(offset int64, idle time.Duration) *statusError {
	return refuse(http.StatusConflict, offset,
		"another upload to this image is in progress; wait for it to end (one whose client is gone ends after %s without data), then resume", idle)
}

// decide checks a PUT against the upload's latest state: it returns
// whether the PUT starts a new upload (at byte 0) or continues this one.
func decide(u *Upload, req request, now time.Time, holder string, idle time.Duration) (start bool, err error) {
	st := u.State
	switch {
	case st.Done:
		e := refuse(http.StatusConflict, st.Size, "the upload is complete (%s, %d bytes); to upload another file, delete the image and create it again", st.Digest, st.Size)
		e.done = true
		return false, e
	case u.Holder.Active(now) && u.Holder.ID != holder:
		return false, busy(st.Received, idle)
	}
	started := !st.StartedAt.IsZero()
	expired := !u.Expires.IsZero() && !now.Before(u.Expires)
	expiredErr := refuse(http.StatusForbidden, -1,
		"the image stopped waiting for its upload at %s: the wait timed out; delete the image and create it again to upload", u.Expires.UTC().Format(time.RFC3339))
	have := st.Received
	if st.Session == "" {
		have = 0
	}
	if req.rng == nil {
		if expired && !started {
			return false, expiredErr
		}
		return true, nil
	}
	cr := req.rng
	resumeHint := "resume with Content-Range: bytes %d-<last byte>/<size>"
	if cr.finish {
		if st.Session == "" || have != cr.total {
			return false, refuse(http.StatusRequestedRangeNotSatisfiable, have, "the upload holds %d bytes, not %d: "+resumeHint, have, cr.total, have)
		}
		return false, nil
	}
	if cr.start != have {
		return false, refuse(http.StatusRequestedRangeNotSatisfiable, have, "the upload holds %d bytes: "+resumeHint, have, have)
	}
	if have > 0 && cr.total >= 0 && st.Total >= 0 && cr.total != st.Total {
		return false, refuse(http.StatusBadRequest, have,
			"the upload was announced as %d bytes, this request says %d: resume with the same file, or PUT without Content-Range to start over", st.Total, cr.total)
	}
	if have == 0 {
		if expired && !started {
			return false, expiredErr
		}
		return true, nil
	}
	return false, nil
}

// put receives a PUT: claims the upload, opens or resumes the DVCR session,
// streams the body into it and commits the blob when the body completes
// the upload.
func (g *Gateway) put(w http.ResponseWriter, r *http.Request, up *Upload) {
	ctx := r.Context()
	log := klog.FromContext(ctx)
	if g.ShuttingDown() {
		w.Header().Set("Retry-After", "1")
		reply(w, refuse(http.StatusServiceUnavailable, -1, "the upload gateway is restarting; try again in a moment"))
		return
	}
	req, err := parseRequest(r, g.cfg.MaxSize)
	if err != nil {
		reply(w, err)
		return
	}
	now := g.cfg.Now()
	t := &transfer{
		holder: Holder{ID: fmt.Sprintf("%s/%d", g.id, g.seq.Add(1)), Until: now.Add(g.cfg.LeaseDuration)},
		rc:     http.NewResponseController(w),
		ended:  make(chan struct{}),
	}
	t.total.Store(req.total)
	if other := g.begin(ctx, up.UID, t); other != nil {
		w.Header().Set("Retry-After", "5")
		reply(w, busy(other.received.Load(), g.cfg.IdleTimeout))
		return
	}
	defer g.end(up.UID, t)
	start := time.Now()
	res, err := g.receive(ctx, r, up, t, req)
	if err != nil {
		var se *statusError
		if !errors.As(err, &se) {
			log.Error(err, "Upload failed")
			se = refuse(http.StatusInternalServerError, -1, "the upload failed: %v", err)
		}
		if se.status == http.StatusServiceUnavailable || se.status == http.StatusConflict {
			w.Header().Set("Retry-After", "5")
		}
		v := 2 // a refusal: the client is told
		if se.status >= 500 || se.status == http.StatusRequestTimeout || se.status == http.StatusAccepted || se.status == http.StatusGone {
			v = 0 // an upload that stopped on the way
		}
		log.V(v).Info("Upload request ended", "status", se.status, "offset", se.offset, "message", se.msg, "duration", time.Since(start))
		reply(w, se)
		return
	}
	log.Info("Upload complete", "digest", res.Digest, "bytes", res.Size, "duration", time.Since(start))
	h := w.Header()
	h.Set(HeaderOffset, strconv.FormatInt(res.Size, 10))
	h.Set(HeaderDone, "true")
	h.Set(HeaderDigest, res.Digest)
	h.Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusCreated)
	json.NewEncoder(w).Encode(res)
}

// Result is the answer to the PUT that completes an upload.
type Result struct {
	Digest string `json:"digest"`
	Size   int64  `json:"size"`
}

func (g *Gateway) receive(ctx context.Context, r *http.Request, up *Upload, t *transfer, req request) (*Result, error) {
	log := klog.FromContext(ctx)
	uid := up.UID
	now := g.cfg.Now()
	// The DVCR side and the state must not stop when the client goes: the
	// bytes received are what a resume continues from, and a claim
	// written must be given back.
	sctx := context.WithoutCancel(ctx)
	var start bool
	var old api.UploadState
	up, err := g.cfg.Store.Update(sctx, uid, func(u *Upload) error {
		var err error
		if start, err = decide(u, req, now, t.holder.ID, g.cfg.IdleTimeout); err != nil {
			return err
		}
		old = u.State
		u.Holder = t.holder
		if start {
			u.State = restart(u.State, now)
			u.State.Total = req.total
		} else if req.total >= 0 {
			u.State.Total = req.total
		}
		u.State.UpdatedAt = now
		return nil
	})
	if err != nil {
		return nil, g.storeError(sctx, err)
	}
	t.total.Store(up.State.Total)
	// The upload is claimed: every way out below records the state and
	// gives the claim back.
	var sess BlobSession
	if start {
		if old.Session != "" {
			g.discard(sctx, up, old)
		}
		sess, err = g.cfg.Registry.Start(sctx, up.DVCRToken, up.Repository)
	} else {
		st := up.State
		sess, err = g.cfg.Registry.Resume(sctx, up.DVCRToken, up.Repository, st.Session, st.Received, st.HashState)
		if errors.Is(err, client.ErrUploadLost) {
			log.Info("The upload's DVCR session is lost; the upload starts over", "received", st.Received, "reason", err)
			g.release(sctx, uid, t, func(s *api.UploadState) { *s = restart(*s, g.cfg.Now()) })
			return nil, refuse(http.StatusRequestedRangeNotSatisfiable, 0, "%s (a PUT without Content-Range)", lostMessage(st.Received))
		}
	}
	if err != nil {
		g.release(sctx, uid, t, nil)
		log.Error(err, "Opening the DVCR upload failed")
		return nil, refuse(http.StatusBadGateway, -1, "opening the upload in DVCR failed (%v); try again in a moment", err)
	}
	loc, off, hs := sess.State()
	if _, err := g.save(sctx, uid, t, false, func(s *api.UploadState) { s.Session, s.Received, s.HashState = loc, off, hs }); err != nil {
		if start {
			_ = sess.Cancel(sctx)
		}
		g.release(sctx, uid, t, nil)
		return nil, g.endError(sctx, err, -1)
	}
	t.received.Store(off)

	if req.rng == nil || !req.rng.finish {
		limit, probe := req.length, false
		if limit < 0 {
			limit, probe = g.cfg.MaxSize-off, true
		}
		t.lastByte.Store(time.Now().UnixNano())
		body := &bodyReader{r: r.Body, t: t, left: limit, probe: probe}
		stop := g.watch(sctx, uid, t)
		_, err = sess.Append(sctx, body)
		stop()
		var srcErr *client.SourceError
		if err != nil && !errors.As(err, &srcErr) {
			return nil, g.registryFailed(sctx, up, t, sess, err)
		}
		before := off
		loc, off, hs = sess.State()
		if srcErr != nil {
			g.release(sctx, uid, t, func(s *api.UploadState) { s.Session, s.Received, s.HashState = loc, off, hs })
			return nil, interrupted(srcErr.Err, off, g.cfg.IdleTimeout)
		}
		if req.length >= 0 && off-before < req.length {
			// A chunked body shorter than its Content-Range: not the end.
			g.release(sctx, uid, t, func(s *api.UploadState) { s.Session, s.Received, s.HashState = loc, off, hs })
			return nil, refuse(http.StatusBadRequest, off, "the body ended after %d of the %d bytes its Content-Range announced; the upload holds %d bytes: resume from there",
				off-before, req.length, off)
		}
		if req.total >= 0 && off < req.total {
			// A piece of a larger upload: the rest comes in later requests.
			g.release(sctx, uid, t, func(s *api.UploadState) { s.Session, s.Received, s.HashState = loc, off, hs })
			return nil, refuse(http.StatusAccepted, off, "received %d of %d bytes; send the rest with Content-Range: bytes %d-%d/%d", off, req.total, off, req.total-1, req.total)
		}
	}
	return g.commit(sctx, up, t, sess)
}

// commit turns the session into the blob and records the upload as done.
func (g *Gateway) commit(ctx context.Context, up *Upload, t *transfer, sess BlobSession) (*Result, error) {
	log := klog.FromContext(ctx)
	loc, off, hs := sess.State()
	// A long upload may outlive the DVCR token it started with; the
	// controller renews it in the Secret.
	if cur, err := g.cfg.Store.Get(ctx, up.UID); err == nil && cur.DVCRToken != up.DVCRToken {
		if s, err := g.cfg.Registry.Resume(ctx, cur.DVCRToken, up.Repository, loc, off, hs); err == nil {
			sess = s
		}
	}
	desc, err := sess.Commit(ctx)
	if err != nil {
		log.Error(err, "Committing the upload failed")
		g.release(ctx, up.UID, t, func(s *api.UploadState) { s.Session, s.Received, s.HashState = loc, off, hs })
		return nil, refuse(http.StatusBadGateway, off, "all %d bytes arrived, but storing them in DVCR failed (%v); finish with an empty PUT and Content-Range: bytes */%d", off, err, off)
	}
	done := func(s *api.UploadState) {
		started := s.StartedAt
		if f := t.first.Load(); started.IsZero() && f != 0 {
			started = time.Unix(0, f)
		}
		if started.IsZero() {
			started = g.cfg.Now() // an empty upload has no first byte
		}
		*s = api.UploadState{Received: desc.Size, Total: desc.Size, Done: true, Digest: desc.Digest.String(), Size: desc.Size, StartedAt: started}
	}
	// The blob is in DVCR: recording that is worth a few tries, or the
	// image would wait for an upload that happened.
	backoff := 200 * time.Millisecond
	for attempt := 0; ; attempt++ {
		_, err = g.save(ctx, up.UID, t, true, done)
		if err == nil || errors.Is(err, ErrNotFound) || errors.Is(err, errLeaseLost) || attempt == 5 {
			break
		}
		time.Sleep(backoff)
		backoff *= 2
	}
	if err != nil {
		return nil, g.endError(ctx, err, off)
	}
	return &Result{Digest: desc.Digest.String(), Size: desc.Size}, nil
}

// registryFailed handles a PATCH that broke on the DVCR side: the session
// may hold some of the request's bytes, which no state describes. The last
// recorded point is checked at once, so that the answer can say where to
// resume.
func (g *Gateway) registryFailed(ctx context.Context, up *Upload, t *transfer, sess BlobSession, cause error) error {
	log := klog.FromContext(ctx)
	log.Error(cause, "The DVCR upload broke")
	loc, off, hs := sess.State()
	g.release(ctx, up.UID, t, func(s *api.UploadState) { s.Session, s.Received, s.HashState = loc, off, hs })
	msg := fmt.Sprintf("storing the upload in DVCR failed (%v)", cause)
	cur, err := g.fresh(ctx, up.UID)
	if err != nil {
		return refuse(http.StatusBadGateway, -1, "%s; HEAD the URL to learn where to resume", msg)
	}
	cur, lost, err := g.verify(ctx, cur)
	if err != nil {
		return refuse(http.StatusBadGateway, -1, "%s; HEAD the URL to learn where to resume", msg)
	}
	if lost != "" {
		return refuse(http.StatusBadGateway, 0, "%s, and %s", msg, lost)
	}
	return refuse(http.StatusBadGateway, cur.State.Received, "%s; resume at byte %d", msg, cur.State.Received)
}

// interrupted is the answer to a PUT whose body ended early.
func interrupted(reason error, off int64, idle time.Duration) error {
	resume := fmt.Sprintf("the upload holds %d bytes; resume with Content-Range: bytes %d-<last byte>/<size>", off, off)
	var ce *clientError
	switch {
	case errors.Is(reason, errShuttingDown):
		return refuse(http.StatusServiceUnavailable, off, "the upload gateway is restarting: %s", resume)
	case errors.Is(reason, errIdle):
		return refuse(http.StatusRequestTimeout, off, "no data arrived for %s: %s", idle, resume)
	case errors.Is(reason, errDeleted):
		return refuse(http.StatusGone, -1, "the image was deleted during the upload")
	case errors.Is(reason, errLeaseLost), errors.Is(reason, errLeaseExpired):
		return refuse(http.StatusConflict, -1, "this upload was taken over by another request (%v); HEAD the URL to learn where to resume", reason)
	case errors.Is(reason, errTooLarge):
		return refuse(http.StatusRequestEntityTooLarge, off, "the upload is larger than an image may be")
	case errors.As(reason, &ce):
		return refuse(http.StatusBadRequest, off, "the request body ended early (%v): %s", ce.err, resume)
	}
	return refuse(http.StatusInternalServerError, off, "the upload stopped (%v): %s", reason, resume)
}

// endError answers a failure to record the state at the end.
func (g *Gateway) endError(ctx context.Context, err error, offset int64) error {
	switch {
	case errors.Is(err, ErrNotFound):
		return refuse(http.StatusGone, -1, "the image was deleted during the upload")
	case errors.Is(err, errLeaseLost):
		return refuse(http.StatusConflict, -1, "this upload was taken over by another request; HEAD the URL to learn where to resume")
	}
	klog.FromContext(ctx).Error(err, "Recording the upload state failed")
	return refuse(http.StatusServiceUnavailable, offset, "the upload gateway could not record the upload's state; HEAD the URL in a moment to learn where to resume")
}

// save writes the state of an upload this request holds, renewing or
// giving back the claim.
func (g *Gateway) save(ctx context.Context, uid string, t *transfer, release bool, f func(*api.UploadState)) (*Upload, error) {
	return g.cfg.Store.Update(ctx, uid, func(u *Upload) error {
		if u.Holder.ID != t.holder.ID {
			return errLeaseLost
		}
		now := g.cfg.Now()
		if f != nil {
			f(&u.State)
		}
		if fb := t.first.Load(); fb != 0 && u.State.StartedAt.IsZero() && !u.State.Done {
			u.State.StartedAt = time.Unix(0, fb)
		}
		u.State.UpdatedAt = now
		if release {
			u.Holder = Holder{}
			u.State.Speed = 0
		} else {
			u.Holder.Until = now.Add(g.cfg.LeaseDuration)
		}
		return nil
	})
}

// release records the state (f, if any) and gives the claim back, logging
// a failure: the claim then runs out by itself.
func (g *Gateway) release(ctx context.Context, uid string, t *transfer, f func(*api.UploadState)) {
	if _, err := g.save(ctx, uid, t, true, f); err != nil && !errors.Is(err, ErrNotFound) {
		klog.FromContext(ctx).Error(err, "Recording the upload state failed; its claim runs out by itself")
	}
}

// discard drops the DVCR session of an upload that starts over, so that
// its bytes do not wait for DVCR's purge of stale uploads. Best effort:
// the push token may not grant the delete it needs.
func (g *Gateway) discard(ctx context.Context, up *Upload, st api.UploadState) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	s, err := g.cfg.Registry.Resume(ctx, up.DVCRToken, up.Repository, st.Session, st.Received, st.HashState)
	if err == nil {
		err = s.Cancel(ctx)
	}
	if err != nil {
		klog.FromContext(ctx).V(2).Info("Could not drop the previous DVCR session; DVCR purges it later", "err", err)
	}
}

// watch writes the progress of a transfer every ProgressInterval (which
// renews its claim) and ends its body when the client is idle for too long,
// the image is deleted, or the gateway shuts down.
func (g *Gateway) watch(ctx context.Context, uid string, t *transfer) (stop func()) {
	done, finished := make(chan struct{}), make(chan struct{})
	tick := min(g.cfg.ProgressInterval, g.cfg.IdleTimeout/4, time.Second)
	go func() {
		defer close(finished)
		ticker := time.NewTicker(tick)
		defer ticker.Stop()
		stopping := g.stop
		lastWrite, lastOK, lastReceived := time.Now(), time.Now(), t.received.Load()
		for {
			select {
			case <-done:
				return
			case <-stopping:
				t.abort(errShuttingDown)
				stopping = nil
			case now := <-ticker.C:
				if now.Sub(time.Unix(0, t.lastByte.Load())) > g.cfg.IdleTimeout {
					t.abort(errIdle)
				}
				if now.Sub(lastWrite) < g.cfg.ProgressInterval {
					continue
				}
				rec := t.received.Load()
				speed := int64(float64(rec-lastReceived) / now.Sub(lastWrite).Seconds())
				_, err := g.save(ctx, uid, t, false, func(s *api.UploadState) { s.Received, s.Speed = rec, speed })
				switch {
				case err == nil:
					lastOK = now
				case errors.Is(err, ErrNotFound):
					t.abort(errDeleted)
				case errors.Is(err, errLeaseLost):
					t.abort(errLeaseLost)
				default:
					klog.FromContext(ctx).V(2).Info("Writing the upload progress failed; will try again", "err", err)
					if now.Sub(lastOK) > g.cfg.LeaseDuration*2/3 {
						// Before the claim runs out and another replica
						// could take the upload over.
						t.abort(errLeaseExpired)
					}
				}
				lastWrite, lastReceived = now, rec
			}
		}
	}()
	return func() { close(done); <-finished }
}

// bodyReader is the request body as the DVCR session reads it: bounded,
// counted, and ended early by transfer.abort.
type bodyReader struct {
	r     io.Reader
	t     *transfer
	left  int64 // bytes still to take
	probe bool  // left is the size limit, not the announced length: more is an error
}

func (b *bodyReader) Read(p []byte) (int, error) {
	if err := b.t.aborted(); err != nil {
		return 0, err
	}
	if b.left <= 0 {
		if !b.probe {
			return 0, io.EOF
		}
		var one [1]byte
		for {
			n, err := b.r.Read(one[:])
			if n > 0 {
				return 0, errTooLarge
			}
			if err != nil {
				return 0, b.readError(err)
			}
		}
	}
	if int64(len(p)) > b.left {
		p = p[:b.left]
	}
	n, err := b.r.Read(p)
	if n > 0 {
		b.left -= int64(n)
		b.t.got(n)
	}
	if err != nil {
		err = b.readError(err)
	}
	return n, err
}

func (b *bodyReader) readError(err error) error {
	if err == io.EOF {
		return io.EOF
	}
	if reason := b.t.aborted(); reason != nil {
		return reason // the deadline abort set, not the client's doing
	}
	return &clientError{err: err}
}

// reply writes an error answer as plain text.
func reply(w http.ResponseWriter, err error) {
	var se *statusError
	if !errors.As(err, &se) {
		se = refuse(http.StatusInternalServerError, -1, "%v", err)
	}
	h := w.Header()
	if se.offset >= 0 {
		h.Set(HeaderOffset, strconv.FormatInt(se.offset, 10))
	}
	if se.done {
		h.Set(HeaderDone, "true")
	}
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Cache-Control", "no-store")
	w.WriteHeader(se.status)
	io.WriteString(w, se.msg+"\n")
}
