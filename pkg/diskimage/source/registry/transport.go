package registry

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
)

// responseHeaderTimeout bounds the wait for a registry's answer, so that a
// registry that accepts the connection and says nothing fails Open instead
// of hanging it. Body reads are bounded by the caller's context.
const responseHeaderTimeout = 2 * time.Minute

// newTransport builds the HTTP transport for opts: go-containerregistry's
// defaults (proxy from the environment, dial and handshake timeouts) with
// our TLS settings, behind a guard that refuses plain HTTP unless allowed.
func newTransport(opts Options) (http.RoundTripper, error) {
	base, ok := remote.DefaultTransport.(*http.Transport)
	if !ok {
		return nil, errors.New("go-containerregistry's default transport is not an *http.Transport")
	}
	t := base.Clone()
	t.ResponseHeaderTimeout = responseHeaderTimeout
	tc := &tls.Config{MinVersion: tls.VersionTLS12, InsecureSkipVerify: opts.InsecureSkipVerify}
	if len(opts.CABundle) > 0 {
		pool, err := x509.SystemCertPool()
		if err != nil || pool == nil {
			// No system pool (e.g. a scratch container): the bundle
			// alone is what there is to trust.
			pool = x509.NewCertPool()
		}
		if !pool.AppendCertsFromPEM(opts.CABundle) {
			return nil, errors.New("CA bundle holds no PEM certificate")
		}
		tc.RootCAs = pool
	}
	t.TLSClientConfig = tc
	if opts.PlainHTTP {
		return t, nil
	}
	return httpsOnly{t}, nil
}

// httpsOnly refuses requests that are not HTTPS. go-containerregistry
// tries HTTP as well as HTTPS for localhost and RFC 1918 addresses, and
// token realms and blob redirects may name any URL: without this guard
// credentials could leave in clear for an in-cluster registry on 10.x.
type httpsOnly struct{ next http.RoundTripper }

func (g httpsOnly) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL.Scheme != "https" {
		if req.Body != nil {
			req.Body.Close()
		}
		return nil, fmt.Errorf("refusing plain HTTP to %s: the registry must use HTTPS (set PlainHTTP to allow HTTP)", req.URL.Host)
	}
	return g.next.RoundTrip(req)
}

// tagged is an error that errors.Is also matches against a sentinel, with
// the message of the error it wraps alone.
type tagged struct {
	sentinel error
	err      error
}

func (e *tagged) Error() string   { return e.err.Error() }
func (e *tagged) Unwrap() []error { return []error{e.sentinel, e.err} }

// invalidf formats an error wrapping ErrInvalidImage (and whatever the
// format wraps with %w).
func invalidf(format string, args ...any) error {
	return &tagged{sentinel: ErrInvalidImage, err: fmt.Errorf(format, args...)}
}

// classify tags a registry error with ErrNotFound or ErrUnauthorized, from
// the *transport.Error in its chain, and leaves other errors alone.
func classify(err error) error {
	var terr *transport.Error
	if !errors.As(err, &terr) {
		return err
	}
	switch terr.StatusCode {
	case http.StatusNotFound:
		return &tagged{sentinel: ErrNotFound, err: err}
	case http.StatusUnauthorized, http.StatusForbidden:
		return &tagged{sentinel: ErrUnauthorized, err: err}
	}
	// Some registries put the meaning in the error code with another
	// status (Docker Hub's 400 for some names, proxies' 500s).
	for _, d := range terr.Errors {
		switch d.Code {
		case transport.ManifestUnknownErrorCode, transport.NameUnknownErrorCode, transport.BlobUnknownErrorCode:
			return &tagged{sentinel: ErrNotFound, err: err}
		case transport.UnauthorizedErrorCode, transport.DeniedErrorCode:
			return &tagged{sentinel: ErrUnauthorized, err: err}
		}
	}
	return err
}
