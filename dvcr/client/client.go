// Package client is the Go client of DVCR (and of any OCI distribution
// registry) for disk images in the layout of package layout.
//
// It speaks the distribution HTTP API directly rather than through a
// generic image library, because a disk image is one large uncompressed
// layer and the two things that matter are streaming it up in one pass (tar
// header, the caller's reader, tar trailer, hashed on the fly) and reading
// ranges of it back without downloading it.
//
// Authentication follows what docker clients do: nothing until the
// registry answers 401, then Basic credentials or a Bearer token fetched
// from the realm of the challenge (with the credentials as Basic auth), or a
// static bearer token given in Options.
package client

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
)

// Options configure a Client. The zero value means anonymous HTTPS with
// the system's CAs.
type Options struct {
	// Username and Password are sent as Basic auth when the registry asks
	// for it, and to the token realm when it asks for a Bearer token.
	Username, Password string
	// Token is a static bearer token sent with every request; it replaces
	// the challenge flow.
	Token string
	// CABundle is PEM data of extra CAs to trust for the registry (and its
	// token realm), added to the system's.
	CABundle []byte
	// InsecureSkipVerify turns off TLS certificate checks.
	InsecureSkipVerify bool
	// PlainHTTP talks http:// instead of https://.
	PlainHTTP bool
	// Transport replaces the client's own transport; CABundle and
	// InsecureSkipVerify are then ignored (configure them in Transport).
	Transport http.RoundTripper
	// UserAgent is sent with every request; empty means "vimg-dvcr-client".
	UserAgent string
}

// Client talks to one registry. It is safe for concurrent use.
type Client struct {
	registry string
	base     string // scheme://host[:port]
	opts     Options
	http     *http.Client

	mu     sync.Mutex
	basic  bool              // the registry asked for Basic auth
	tokens map[string]bearer // by scope key
}

type bearer struct {
	token   string
	expires time.Time
}

// New returns a client of the registry at host[:port].
func New(registry string, opts Options) (*Client, error) {
	if registry == "" || strings.Contains(registry, "/") {
		return nil, fmt.Errorf("registry %q: want host[:port] without scheme or path", registry)
	}
	rt := opts.Transport
	if rt == nil {
		var err error
		if rt, err = NewTransport(opts.CABundle, opts.InsecureSkipVerify); err != nil {
			return nil, err
		}
	}
	if opts.UserAgent == "" {
		opts.UserAgent = "vimg-dvcr-client"
	}
	scheme := "https"
	if opts.PlainHTTP {
		scheme = "http"
	}
	return &Client{
		registry: registry,
		base:     scheme + "://" + registry,
		opts:     opts,
		// No overall timeout: a layer upload takes as long as it takes; the
		// caller's context bounds every request.
		http:   &http.Client{Transport: rt},
		tokens: map[string]bearer{},
	}, nil
}

// NewTransport returns the transport a Client makes for itself: TLS 1.2 or
// later trusting caBundle (PEM) besides the system's CAs, tuned for bulk
// transfers. Share one between clients of several tokens to reuse
// connections.
func NewTransport(caBundle []byte, insecureSkipVerify bool) (http.RoundTripper, error) {
	tlsConf := &tls.Config{InsecureSkipVerify: insecureSkipVerify, MinVersion: tls.VersionTLS12}
	if len(caBundle) > 0 {
		pool, err := x509.SystemCertPool()
		if err != nil || pool == nil {
			pool = x509.NewCertPool()
		}
		if !pool.AppendCertsFromPEM(caBundle) {
			return nil, errors.New("CA bundle holds no PEM certificate")
		}
		tlsConf.RootCAs = pool
	}
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.TLSClientConfig = tlsConf
	// One large transfer per connection: HTTP/1.1 has no flow-control
	// window to stall a bulk stream the way HTTP/2 does, and big buffers
	// cut the system calls per gigabyte.
	t.ForceAttemptHTTP2 = false
	t.WriteBufferSize = 256 << 10
	t.ReadBufferSize = 256 << 10
	t.MaxIdleConnsPerHost = 16
	t.DialContext = (&net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}).DialContext
	return t, nil
}

// Registry returns the host[:port] the client talks to.
func (c *Client) Registry() string { return c.registry }

// ErrNotFound matches (with errors.Is) a registry's 404 answer.
var ErrNotFound = errors.New("not found")

// RegistryError is an unexpected answer of the registry.
type RegistryError struct {
	Method     string
	URL        string // without query
	StatusCode int
	// Code is the first error code of the body (UNAUTHORIZED,
	// BLOB_UNKNOWN, MANIFEST_UNKNOWN, ...), or derived from the status
	// when the body has none.
	Code    string
	Message string
}

func (e *RegistryError) Error() string {
	s := fmt.Sprintf("%s %s: %d %s", e.Method, e.URL, e.StatusCode, e.Code)
	if e.Message != "" {
		s += ": " + e.Message
	}
	return s
}

// Is makes errors.Is(err, ErrNotFound) true for 404 answers.
func (e *RegistryError) Is(target error) bool {
	return target == ErrNotFound && e.StatusCode == http.StatusNotFound
}

// ErrorCode returns the registry error code in err's chain, or "".
func ErrorCode(err error) string {
	var re *RegistryError
	if errors.As(err, &re) {
		return re.Code
	}
	return ""
}

// maxErrorBody bounds how much of an error answer is read.
const maxErrorBody = 64 << 10

// readError turns an unexpected response into a RegistryError and closes
// its body.
func readError(resp *http.Response) error {
	defer resp.Body.Close()
	u := *resp.Request.URL
	u.RawQuery = ""
	e := &RegistryError{Method: resp.Request.Method, URL: u.String(), StatusCode: resp.StatusCode}
	body, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
	var env struct {
		Errors []struct {
			Code    string `json:"code"`
			Message string `json:"message"`
		} `json:"errors"`
	}
	if json.Unmarshal(body, &env) == nil && len(env.Errors) > 0 {
		e.Code, e.Message = env.Errors[0].Code, env.Errors[0].Message
	}
	if e.Code == "" {
		e.Code = statusCode(resp.StatusCode)
	}
	return e
}

func statusCode(status int) string {
	switch status {
	case http.StatusUnauthorized:
		return "UNAUTHORIZED"
	case http.StatusForbidden:
		return "DENIED"
	case http.StatusNotFound:
		return "NOT_FOUND"
	case http.StatusTooManyRequests:
		return "TOOMANYREQUESTS"
	}
	return strings.ToUpper(strings.ReplaceAll(http.StatusText(status), " ", "_"))
}

// parseRef splits "<repository>:<tag>" or "<repository>@<digest>" (no
// registry host: the client is bound to one).
func parseRef(ref string) (repo, reference_ string, dgst digest.Digest, err error) {
	r, err := reference.Parse(ref)
	if err != nil {
		return "", "", "", fmt.Errorf("invalid reference %q: %w", ref, err)
	}
	named, ok := r.(reference.Named)
	if !ok {
		return "", "", "", fmt.Errorf("invalid reference %q: no repository", ref)
	}
	repo = named.Name()
	if len(repo) > reference.RepositoryNameTotalLengthMax {
		return "", "", "", fmt.Errorf("invalid reference %q: %w", ref, reference.ErrNameTooLong)
	}
	if d, ok := r.(reference.Digested); ok {
		return repo, d.Digest().String(), d.Digest(), nil
	}
	if t, ok := r.(reference.Tagged); ok {
		return repo, t.Tag(), "", nil
	}
	return "", "", "", fmt.Errorf("invalid reference %q: no tag or digest", ref)
}

// scope is what a request needs access to, for the token cache.
type scope struct {
	repo string
	push bool
	from string // source repository of a cross-repository mount
}

func (s scope) key() string {
	k := "pull:" + s.repo
	if s.push {
		k = "push:" + s.repo
	}
	if s.from != "" {
		k += "<" + s.from
	}
	return k
}

func (s scope) scopes() []string {
	var out []string
	if s.repo != "" {
		act := "pull"
		if s.push {
			act = "pull,push"
		}
		out = append(out, "repository:"+s.repo+":"+act)
	}
	if s.from != "" {
		out = append(out, "repository:"+s.from+":pull")
	}
	return out
}

func (c *Client) url(repo, kind, rest string) string {
	return c.base + "/v2/" + repo + "/" + kind + "/" + rest
}

// newRequest builds a request with the user agent set.
func (c *Client) newRequest(ctx context.Context, method, u string, body io.Reader) (*http.Request, error) {
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		return nil, err
	}
	req.Header.Set("User-Agent", c.opts.UserAgent)
	return req, nil
}

// do sends req with authorization for sc. On a 401 it answers the
// challenge and, when the request can be sent again (no body, or
// GetBody), sends it once more. Requests with a one-shot body (a layer
// stream) are sent after a bodyless request to the same scope has
// obtained the credentials.
func (c *Client) do(req *http.Request, sc scope) (*http.Response, error) {
	c.authorize(req, sc)
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, transportError(err)
	}
	if resp.StatusCode != http.StatusUnauthorized || c.opts.Token != "" {
		return resp, nil
	}
	ch, ok := parseChallenge(resp.Header.Values("WWW-Authenticate"))
	if !ok {
		return resp, nil
	}
	switch ch.scheme {
	case "basic":
		if c.opts.Username == "" {
			return resp, nil
		}
		c.mu.Lock()
		already := c.basic
		c.basic = true
		c.mu.Unlock()
		if already && req.Header.Get("Authorization") != "" {
			return resp, nil // the credentials were sent and refused
		}
	case "bearer":
		resp.Body.Close()
		if err := c.fetchToken(req.Context(), ch, sc); err != nil {
			return nil, err
		}
		return c.resend(req, sc)
	default:
		return resp, nil
	}
	resp.Body.Close()
	return c.resend(req, sc)
}

func (c *Client) resend(req *http.Request, sc scope) (*http.Response, error) {
	if req.Body != nil && req.Body != http.NoBody && req.GetBody == nil {
		return nil, fmt.Errorf("%s %s: the registry asked for credentials in the middle of a streamed upload", req.Method, req.URL.Redacted())
	}
	again := req.Clone(req.Context())
	if req.GetBody != nil {
		b, err := req.GetBody()
		if err != nil {
			return nil, err
		}
		again.Body = b
	}
	c.authorize(again, sc)
	resp, err := c.http.Do(again)
	if err != nil {
		return nil, transportError(err)
	}
	return resp, nil
}

// transportError drops the query of the URL a transport error names: an
// upload's location carries the registry's long, opaque upload state
// there, which says nothing to a reader of the message. (http.Client.Do
// returns its errors as a *url.Error, never wrapped.)
func transportError(err error) error {
	ue, ok := err.(*url.Error)
	if !ok {
		return err
	}
	u, perr := url.Parse(ue.URL)
	if perr != nil || u.RawQuery == "" {
		return err
	}
	u.RawQuery = ""
	return &url.Error{Op: ue.Op, URL: u.String(), Err: ue.Err}
}

func (c *Client) authorize(req *http.Request, sc scope) {
	if c.opts.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.opts.Token)
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if b, ok := c.tokens[sc.key()]; ok && time.Now().Before(b.expires) {
		req.Header.Set("Authorization", "Bearer "+b.token)
		return
	}
	if c.basic && c.opts.Username != "" {
		req.SetBasicAuth(c.opts.Username, c.opts.Password)
	}
}
