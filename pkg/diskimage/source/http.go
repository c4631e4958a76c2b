package source

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// HTTPOptions configures OpenHTTP.
type HTTPOptions struct {
	// Header holds extra request headers. Like the credentials, they are
	// sent only to the original host (or its subdomains), not to a
	// different host a redirect leads to.
	Header http.Header
	// Username and Password are sent as basic auth. They never appear in
	// errors or Name(). Userinfo in the URL is used when these are empty.
	Username, Password string
	// CABundle is PEM. When set, only these roots are trusted (a private CA
	// should not silently fall back to the public ones).
	CABundle []byte
	// InsecureSkipVerify turns off certificate verification.
	InsecureSkipVerify bool
	// Timeout bounds each attempt's connect, TLS handshake and wait for
	// response headers, and also how long a body read may go without any
	// data before the connection is considered lost. Default 30 s.
	Timeout time.Duration
	// Retries is how many times a request is retried after a failure
	// (connection lost, 5xx, stall) before giving up; the count starts over
	// whenever a retry receives data. Default 5; negative means none.
	// Backoff is 1 s, 2 s, 4 s, ... capped at 30 s.
	Retries int
	// ReadAhead is the size of the windows the ReaderAt fetches and caches.
	// Default 8 MiB; the cache holds at most 8 windows.
	ReadAhead int
	// Client replaces the built-in client (tests). The TLS, timeout and
	// redirect options are then the client's business.
	Client *http.Client
}

const (
	defaultTimeout   = 30 * time.Second
	defaultRetries   = 5
	defaultReadAhead = 8 << 20
	minReadAhead     = 4 << 10
	maxReadAhead     = 256 << 20
	cacheWindows     = 8
	maxRedirects     = 10
	maxBackoff       = 30 * time.Second
)

// retryBaseDelay is the first backoff; tests shorten it.
var retryBaseDelay = time.Second

// ErrChanged is wrapped by errors that show the file on the server is no
// longer the one the download started with.
var ErrChanged = errors.New("the file changed on the server during the download")

// ErrClosed is returned by reads on a closed Source.
var ErrClosed = errors.New("source closed")

// errStalled marks an attempt the watchdog cancelled.
var errStalled = errors.New("no data received")

// StatusError is an HTTP answer with an unexpected status. Find it with
// errors.As; the error returned reads "GET <url>: 404 Not Found".
type StatusError struct {
	StatusCode int
	Status     string
	// RetryAfter is the server's Retry-After, if it gave one in seconds.
	RetryAfter time.Duration
}

func (e *StatusError) Error() string { return e.Status }

// urlError puts the method and the redacted URL in front of an error, once.
type urlError struct {
	name string
	err  error
}

func (e *urlError) Error() string { return "GET " + e.name + ": " + e.err.Error() }
func (e *urlError) Unwrap() error { return e.err }

// permanentError marks failures that retrying cannot fix.
type permanentError struct{ err error }

func (e permanentError) Error() string { return e.err.Error() }
func (e permanentError) Unwrap() error { return e.err }

func permanent(err error) error { return permanentError{err} }

func isPermanent(err error) bool {
	var p permanentError
	return errors.As(err, &p)
}

// httpSource reads a URL.
type httpSource struct {
	name      string // redacted URL for messages
	origURL   string // as given, without userinfo
	origHost  string
	client    *http.Client
	ownClient bool
	opts      HTTPOptions // normalized

	ctx    context.Context
	cancel context.CancelCauseFunc

	// Set by the probe, read-only afterwards.
	url          string // final URL after redirects
	sendCreds    bool   // whether url is on a host that gets credentials
	size         int64
	resumable    bool // Range requests work
	randomAccess bool // resumable and the size is known
	etag         string
	lastModified string

	mu         sync.Mutex
	probe      *http.Response // the probe's body, kept for Stream
	probeAtt   *attempt
	probeEnd   int64
	hasProbe   atomic.Bool
	streamed   bool
	closed     bool
	background sync.WaitGroup // prefetches

	ra *httpReaderAt
}

// OpenHTTP opens an http:// or https:// URL. It sends one GET with
// "Range: bytes=0-": a 206 answer whose Content-Range gives the total size
// means random access works; a 200 answer is a plain stream (unless it says
// Accept-Ranges: bytes and a one-byte Range request confirms it). The
// probe's body is kept and becomes the Stream, so streaming costs a single
// request. ctx bounds the whole life of the Source, not just the opening.
func OpenHTTP(ctx context.Context, rawURL string, opts HTTPOptions) (Source, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		// url.Error would repeat the URL, secrets included.
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return nil, fmt.Errorf("invalid URL: %w", err)
	}
	u.Scheme = strings.ToLower(u.Scheme)
	if u.Scheme != "http" && u.Scheme != "https" {
		return nil, fmt.Errorf("URL %s: scheme %q is not http or https", redactURL(u), u.Scheme)
	}
	if u.Host == "" {
		return nil, fmt.Errorf("URL %s: no host", redactURL(u))
	}
	if u.User != nil {
		if opts.Username == "" && opts.Password == "" {
			opts.Username = u.User.Username()
			opts.Password, _ = u.User.Password()
		}
		u.User = nil
	}
	if opts.Timeout <= 0 {
		opts.Timeout = defaultTimeout
	}
	switch {
	case opts.Retries == 0:
		opts.Retries = defaultRetries
	case opts.Retries < 0:
		opts.Retries = 0
	}
	opts.ReadAhead = clampWindow(opts.ReadAhead)

	s := &httpSource{
		name:     redactURL(u),
		origURL:  u.String(),
		origHost: u.Host,
		opts:     opts,
		size:     -1,
	}
	if opts.Client != nil {
		s.client = opts.Client
	} else {
		s.client, err = s.newClient()
		if err != nil {
			return nil, fmt.Errorf("GET %s: %w", s.name, err)
		}
		s.ownClient = true
	}
	s.ctx, s.cancel = context.WithCancelCause(ctx)
	if err := s.openProbe(); err != nil {
		s.cancel(ErrClosed)
		s.closeIdle()
		return nil, s.wrap(err)
	}
	if s.randomAccess {
		s.ra = newHTTPReaderAt(s)
	}
	return s, nil
}

func (s *httpSource) newClient() (*http.Client, error) {
	tlsConf := &tls.Config{MinVersion: tls.VersionTLS12, InsecureSkipVerify: s.opts.InsecureSkipVerify}
	if len(s.opts.CABundle) > 0 {
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(s.opts.CABundle) {
			return nil, errors.New("the CA bundle contains no PEM certificate")
		}
		tlsConf.RootCAs = pool
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = tlsConf
	// Compression would change the bytes and break Range arithmetic; a
	// .gz image must arrive as it is stored.
	tr.DisableCompression = true
	tr.DialContext = (&net.Dialer{Timeout: s.opts.Timeout, KeepAlive: 30 * time.Second}).DialContext
	tr.TLSHandshakeTimeout = s.opts.Timeout
	tr.ResponseHeaderTimeout = s.opts.Timeout
	tr.MaxIdleConnsPerHost = cacheWindows + 2
	return &http.Client{Transport: tr, CheckRedirect: s.checkRedirect}, nil
}

func (s *httpSource) checkRedirect(req *http.Request, via []*http.Request) error {
	if len(via) >= maxRedirects {
		return permanent(fmt.Errorf("stopped after %d redirects", maxRedirects))
	}
	// net/http already drops Authorization on a cross-host redirect; the
	// extra headers may be tokens too.
	if !sameSite(req.URL.Host, s.origHost) {
		for k := range s.opts.Header {
			req.Header.Del(k)
		}
	}
	return nil
}

// sameSite says whether credentials for orig may go to host: the same host
// or a subdomain, the rule net/http applies to redirects.
func sameSite(host, orig string) bool {
	host, orig = strings.ToLower(host), strings.ToLower(orig)
	if host == orig {
		return true
	}
	h, o := hostOnly(host), hostOnly(orig)
	return h == o || strings.HasSuffix(h, "."+o)
}

func hostOnly(hostport string) string {
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		return h
	}
	return hostport
}

// redactURL drops userinfo, query and fragment: presigned URLs carry their
// signature in the query.
func redactURL(u *url.URL) string {
	c := *u
	c.User = nil
	c.RawQuery = ""
	c.ForceQuery = false
	c.Fragment = ""
	c.RawFragment = ""
	s := c.String()
	if u.RawQuery != "" {
		s += "?..."
	}
	return s
}

func (s *httpSource) wrap(err error) error {
	if err == nil || err == io.EOF {
		return err
	}
	var ue *urlError
	if errors.As(err, &ue) {
		return err
	}
	return &urlError{name: s.name, err: err}
}

// ctxErr is the reason the source's context ended.
func (s *httpSource) ctxErr() error { return context.Cause(s.ctx) }

func (s *httpSource) Size() int64  { return s.size }
func (s *httpSource) Name() string { return s.name }

func (s *httpSource) ReaderAt() io.ReaderAt {
	if s.ra == nil {
		return nil
	}
	return s.ra
}

func (s *httpSource) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.dropProbeLocked()
	s.mu.Unlock()
	s.cancel(ErrClosed)
	s.background.Wait()
	s.closeIdle()
	return nil
}

func (s *httpSource) closeIdle() {
	if s.ownClient {
		s.client.CloseIdleConnections()
	}
}

// takeProbe hands over the probe's response, if it is still there.
func (s *httpSource) takeProbe() (*http.Response, *attempt, int64) {
	if !s.hasProbe.Load() {
		return nil, nil, 0
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	resp, a, end := s.probe, s.probeAtt, s.probeEnd
	s.probe, s.probeAtt = nil, nil
	s.hasProbe.Store(false)
	return resp, a, end
}

// dropProbe closes the probe's response once random access shows the
// stream is not going to be used.
func (s *httpSource) dropProbe() {
	if !s.hasProbe.Load() {
		return
	}
	s.mu.Lock()
	s.dropProbeLocked()
	s.mu.Unlock()
}

func (s *httpSource) dropProbeLocked() {
	if s.probe != nil {
		s.probe.Body.Close()
		s.probeAtt.end()
		s.probe, s.probeAtt = nil, nil
	}
	s.hasProbe.Store(false)
}

// attempt is one request with its watchdog: the context is cancelled with
// errStalled when the connect, the response headers, or a body read take
// longer than Timeout. A connection that silently died (a NAT entry
// expired) shows up this way rather than hanging forever.
type attempt struct {
	ctx     context.Context
	cancel  context.CancelCauseFunc
	timer   *time.Timer
	timeout time.Duration
}

func (s *httpSource) newAttempt() *attempt {
	ctx, cancel := context.WithCancelCause(s.ctx)
	a := &attempt{ctx: ctx, cancel: cancel, timeout: s.opts.Timeout}
	a.timer = time.AfterFunc(a.timeout, func() { cancel(errStalled) })
	return a
}

func (a *attempt) arm()    { a.timer.Reset(a.timeout) }
func (a *attempt) disarm() { a.timer.Stop() }
func (a *attempt) end() {
	a.timer.Stop()
	a.cancel(context.Canceled)
}

// read is a body read under the watchdog.
func (a *attempt) read(r io.Reader, p []byte) (int, error) {
	a.arm()
	n, err := r.Read(p)
	a.disarm()
	return n, err
}

func (a *attempt) stalled() bool { return errors.Is(context.Cause(a.ctx), errStalled) }

// do sends one GET. rangeHdr is empty for a plain request; ifRange adds the
// validator so that a changed file comes back as 200 rather than as a
// splice of two versions.
func (s *httpSource) do(a *attempt, target, rangeHdr string, ifRange bool) (*http.Response, error) {
	req, err := http.NewRequestWithContext(a.ctx, http.MethodGet, target, nil)
	if err != nil {
		return nil, permanent(errors.New("cannot build the request"))
	}
	creds := target == s.origURL || s.sendCreds
	if creds {
		for k, vs := range s.opts.Header {
			for _, v := range vs {
				req.Header.Add(k, v)
			}
		}
		if h := s.opts.Header.Get("Host"); h != "" {
			req.Host = h
		}
		if s.opts.Username != "" || s.opts.Password != "" {
			req.SetBasicAuth(s.opts.Username, s.opts.Password)
		}
	}
	// Setting it ourselves also stops net/http from adding gzip and
	// transparently decompressing.
	req.Header.Set("Accept-Encoding", "identity")
	if rangeHdr != "" {
		req.Header.Set("Range", rangeHdr)
		if ifRange {
			if s.etag != "" && !strings.HasPrefix(s.etag, "W/") {
				req.Header.Set("If-Range", s.etag)
			} else if s.etag == "" && s.lastModified != "" {
				req.Header.Set("If-Range", s.lastModified)
			}
		}
	}
	resp, err := s.client.Do(req)
	if err != nil {
		return nil, s.transportErr(a, err)
	}
	a.disarm()
	return resp, nil
}

// transportErr turns a client error into one without the URL (url.Error
// would print the query) and says whether retrying makes sense.
func (s *httpSource) transportErr(a *attempt, err error) error {
	a.disarm()
	if s.ctx.Err() != nil {
		return s.ctxErr()
	}
	if a.stalled() {
		return fmt.Errorf("no response within %v", a.timeout)
	}
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err
	}
	if isPermanent(err) {
		return err
	}
	var (
		certErr  *tls.CertificateVerificationError
		unknown  x509.UnknownAuthorityError
		hostErr  x509.HostnameError
		invalid  x509.CertificateInvalidError
		recErr   tls.RecordHeaderError
		dnsErr   *net.DNSError
		alertErr tls.AlertError
	)
	switch {
	case errors.As(err, &certErr), errors.As(err, &unknown), errors.As(err, &hostErr),
		errors.As(err, &invalid), errors.As(err, &recErr), errors.As(err, &alertErr):
		return permanent(err)
	case errors.As(err, &dnsErr) && dnsErr.IsNotFound:
		return permanent(err)
	}
	return err
}

// bodyErr explains a failed body read.
func (s *httpSource) bodyErr(a *attempt, err error) error {
	if s.ctx.Err() != nil {
		return s.ctxErr()
	}
	if a.stalled() {
		return fmt.Errorf("%w for %v", errStalled, a.timeout)
	}
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// statusErr consumes a response with an unwanted status.
func statusErr(resp *http.Response) error {
	drainClose(resp)
	status := resp.Status
	if status == "" {
		status = fmt.Sprintf("%d %s", resp.StatusCode, http.StatusText(resp.StatusCode))
	}
	e := &StatusError{StatusCode: resp.StatusCode, Status: status}
	if secs, err := strconv.Atoi(strings.TrimSpace(resp.Header.Get("Retry-After"))); err == nil && secs > 0 {
		e.RetryAfter = time.Duration(secs) * time.Second
	}
	switch resp.StatusCode {
	case http.StatusRequestTimeout, http.StatusTooEarly, http.StatusTooManyRequests,
		http.StatusInternalServerError, http.StatusBadGateway, http.StatusServiceUnavailable,
		http.StatusGatewayTimeout:
		return e
	}
	return permanent(e)
}

// drainClose reads a little of an unwanted body so the connection can be
// reused, then closes it.
func drainClose(resp *http.Response) {
	io.CopyN(io.Discard, resp.Body, 64<<10)
	resp.Body.Close()
}

// openProbe sends the first request, retrying like any other.
func (s *httpSource) openProbe() error {
	rs := retryState{s: s}
	for {
		err := s.probeOnce()
		if err == nil {
			break
		}
		if err = rs.next(err, false); err != nil {
			return err
		}
	}
	if s.probe != nil && !s.resumable && s.size > 0 && s.probe.StatusCode == http.StatusOK &&
		strings.EqualFold(strings.TrimSpace(s.probe.Header.Get("Accept-Ranges")), "bytes") {
		s.verifyRanges()
	}
	return nil
}

func (s *httpSource) probeOnce() error {
	a := s.newAttempt()
	resp, err := s.do(a, s.origURL, "bytes=0-", false)
	if err != nil {
		a.end()
		return err
	}
	final := *resp.Request.URL
	final.User = nil
	s.url = final.String()
	s.sendCreds = sameSite(final.Host, s.origHost)
	s.etag = resp.Header.Get("ETag")
	s.lastModified = resp.Header.Get("Last-Modified")
	cr := resp.Header.Get("Content-Range")
	end := int64(-1)
	switch resp.StatusCode {
	case http.StatusPartialContent:
		start, last, total, err := parseContentRange(cr)
		if err != nil || start != 0 {
			drainClose(resp)
			a.end()
			return permanent(fmt.Errorf("the answer to Range bytes=0- has Content-Range %q", cr))
		}
		s.size = total
		s.resumable = true
		s.randomAccess = total >= 0
		end = last + 1
	case http.StatusOK:
		s.size = resp.ContentLength
		end = s.size
	case http.StatusRequestedRangeNotSatisfiable:
		// What a Range-capable server says about an empty file.
		_, _, total, perr := parseContentRange(cr)
		if perr == nil && total == 0 {
			drainClose(resp)
			a.end()
			s.size = 0
			s.resumable = true
			s.randomAccess = true
			return nil
		}
		a.end()
		return statusErr(resp)
	default:
		a.end()
		return statusErr(resp)
	}
	s.probe, s.probeAtt, s.probeEnd = resp, a, end
	s.hasProbe.Store(true)
	return nil
}

// verifyRanges checks, with a one-byte request, a server that answered the
// probe with 200 but claims Accept-Ranges: bytes.
func (s *httpSource) verifyRanges() {
	a := s.newAttempt()
	defer a.end()
	resp, err := s.do(a, s.url, "bytes=0-0", true)
	if err != nil {
		return
	}
	defer drainClose(resp)
	if resp.StatusCode != http.StatusPartialContent || s.checkValidators(resp.Header) != nil {
		return
	}
	start, last, total, err := parseContentRange(resp.Header.Get("Content-Range"))
	if err == nil && start == 0 && last == 0 && total == s.size {
		s.resumable = true
		s.randomAccess = true
	}
}

// checkValidators fails when the ETag or Last-Modified differ from the
// probe's. A header the server leaves out of a 206 is not a change.
func (s *httpSource) checkValidators(h http.Header) error {
	if s.etag != "" {
		if e := h.Get("ETag"); e != "" && strings.TrimPrefix(e, "W/") != strings.TrimPrefix(s.etag, "W/") {
			return permanent(fmt.Errorf("%w (ETag was %s, now %s)", ErrChanged, s.etag, e))
		}
	}
	if s.lastModified != "" {
		if lm := h.Get("Last-Modified"); lm != "" && lm != s.lastModified {
			return permanent(fmt.Errorf("%w (Last-Modified was %s, now %s)", ErrChanged, s.lastModified, lm))
		}
	}
	return nil
}

// checkResponse validates the answer to a request for the bytes from start
// to last inclusive (last < 0: to the end). It returns the offset just past
// the bytes the body will carry, or -1 when unknown. The caller closes the
// body when this fails.
func (s *httpSource) checkResponse(resp *http.Response, start, last int64) (int64, error) {
	asked := fmt.Sprintf("bytes=%d-", start)
	if last >= 0 {
		asked += strconv.FormatInt(last, 10)
	}
	switch resp.StatusCode {
	case http.StatusPartialContent:
		if err := s.checkValidators(resp.Header); err != nil {
			return 0, err
		}
		cr := resp.Header.Get("Content-Range")
		cs, ce, total, err := parseContentRange(cr)
		if err != nil || cs < 0 {
			return 0, permanent(fmt.Errorf("the answer to Range %s has an invalid Content-Range %q", asked, cr))
		}
		if s.size >= 0 && total >= 0 && total != s.size {
			return 0, permanent(fmt.Errorf("%w (size was %d, now %d)", ErrChanged, s.size, total))
		}
		if cs != start || (last >= 0 && ce > last) || (s.size >= 0 && ce >= s.size) {
			return 0, permanent(fmt.Errorf("the answer to Range %s has Content-Range %q", asked, cr))
		}
		return ce + 1, nil
	case http.StatusOK:
		if err := s.checkValidators(resp.Header); err != nil {
			return 0, err
		}
		if s.size >= 0 && resp.ContentLength >= 0 && resp.ContentLength != s.size {
			return 0, permanent(fmt.Errorf("%w (size was %d, now %d)", ErrChanged, s.size, resp.ContentLength))
		}
		if start != 0 {
			return 0, permanent(fmt.Errorf("the server ignored Range %s (answered 200 instead of 206)", asked))
		}
		return resp.ContentLength, nil
	case http.StatusRequestedRangeNotSatisfiable:
		if _, _, total, err := parseContentRange(resp.Header.Get("Content-Range")); err == nil && total != s.size {
			drainClose(resp)
			return 0, permanent(fmt.Errorf("%w (size was %d, now %d)", ErrChanged, s.size, total))
		}
	}
	return 0, statusErr(resp)
}

// parseContentRange reads "bytes first-last/total", "bytes first-last/*"
// (total -1) and "bytes */total" (first and last -1).
func parseContentRange(v string) (first, last, total int64, err error) {
	bad := fmt.Errorf("invalid Content-Range %q", v)
	rest, ok := strings.CutPrefix(strings.TrimSpace(v), "bytes ")
	if !ok {
		return 0, 0, 0, bad
	}
	span, tot, ok := strings.Cut(strings.TrimSpace(rest), "/")
	if !ok {
		return 0, 0, 0, bad
	}
	total = -1
	if tot != "*" {
		if total, err = strconv.ParseInt(tot, 10, 64); err != nil || total < 0 {
			return 0, 0, 0, bad
		}
	}
	if span == "*" {
		if total < 0 {
			return 0, 0, 0, bad
		}
		return -1, -1, total, nil
	}
	a, b, ok := strings.Cut(span, "-")
	if !ok {
		return 0, 0, 0, bad
	}
	first, err1 := strconv.ParseInt(a, 10, 64)
	last, err2 := strconv.ParseInt(b, 10, 64)
	if err1 != nil || err2 != nil || first < 0 || last < first || (total >= 0 && last >= total) {
		return 0, 0, 0, bad
	}
	return first, last, total, nil
}

// retryState counts consecutive failures of one transfer.
type retryState struct {
	s        *httpSource
	failures int
}

// next records a failure and waits out the backoff. It returns the error
// to give up with, or nil to try again. progressed says whether the failed
// attempt received data, which starts the count over.
func (r *retryState) next(err error, progressed bool) error {
	s := r.s
	if s.ctx.Err() != nil {
		return s.ctxErr()
	}
	if isPermanent(err) {
		return err
	}
	if progressed {
		r.failures = 0
	}
	r.failures++
	if r.failures > s.opts.Retries {
		if s.opts.Retries == 0 {
			return err
		}
		return fmt.Errorf("gave up after %d retries: %w", s.opts.Retries, err)
	}
	d := retryBaseDelay
	for i := 1; i < r.failures && d < maxBackoff; i++ {
		d *= 2
	}
	var se *StatusError
	if errors.As(err, &se) && se.RetryAfter > d {
		d = se.RetryAfter
	}
	d = min(d, maxBackoff)
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-s.ctx.Done():
		return s.ctxErr()
	}
}

// fetch fills buf with the bytes at off, resuming after each failure from
// the last byte received.
func (s *httpSource) fetch(off int64, buf []byte) error {
	got := 0
	rs := retryState{s: s}
	if off == 0 {
		// The probe already carries the first bytes.
		if resp, a, end := s.takeProbe(); resp != nil {
			want := len(buf)
			if end >= 0 && int64(want) > end {
				want = int(end)
			}
			n, err := readFull(a, resp.Body, buf[:want])
			resp.Body.Close()
			a.end()
			got = n
			if err != nil {
				if err = rs.next(s.bodyErr(a, err), n > 0); err != nil {
					return fmt.Errorf("reading bytes 0-%d: %w", len(buf)-1, err)
				}
			}
		}
	}
	for got < len(buf) {
		n, err := s.fetchOnce(off+int64(got), buf[got:])
		got += n
		if err == nil {
			if n == 0 {
				return fmt.Errorf("reading bytes %d-%d: the server sent nothing", off, off+int64(len(buf))-1)
			}
			continue
		}
		if err = rs.next(err, n > 0); err != nil {
			return fmt.Errorf("reading bytes %d-%d: %w", off+int64(got), off+int64(len(buf))-1, err)
		}
	}
	return nil
}

// fetchOnce makes one ranged request for buf. It returns a nil error when
// it read everything the response promised, which may be less than asked.
func (s *httpSource) fetchOnce(off int64, buf []byte) (int, error) {
	a := s.newAttempt()
	defer a.end()
	last := off + int64(len(buf)) - 1
	resp, err := s.do(a, s.url, fmt.Sprintf("bytes=%d-%d", off, last), true)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	end, err := s.checkResponse(resp, off, last)
	if err != nil {
		drainClose(resp)
		return 0, err
	}
	want := len(buf)
	if end >= 0 && end-off < int64(want) {
		want = int(end - off)
	}
	n, err := readFull(a, resp.Body, buf[:want])
	if err != nil {
		return n, s.bodyErr(a, err)
	}
	return n, nil
}

// readFull is io.ReadFull under the watchdog.
func readFull(a *attempt, r io.Reader, buf []byte) (int, error) {
	n := 0
	for n < len(buf) {
		m, err := a.read(r, buf[n:])
		n += m
		if err != nil {
			if err == io.EOF && n == len(buf) {
				break
			}
			return n, err
		}
	}
	return n, nil
}
