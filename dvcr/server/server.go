// Package server is DVCR, vimg's in-cluster registry for disk images:
// distribution's registry used as a library, behind DVCR's own
// authentication (package dvcr/auth), with health, readiness and metrics
// endpoints.
//
// Routes of (*Server).Handler:
//
//	/v2/...      the OCI distribution API (every request authenticated)
//	/auth/token  the token endpoint (HTTP Basic)
//	/healthz     200 while the process serves
//	/readyz      200 when the storage answers, 503 otherwise
//	/metrics     Prometheus
package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/distribution/distribution/v3/configuration"
	"github.com/distribution/distribution/v3/registry/handlers"
	storagedriver "github.com/distribution/distribution/v3/registry/storage/driver"
	"k8s.io/klog/v2"

	"vimg.dev/vimg/dvcr/auth"
	"vimg.dev/vimg/dvcr/internal/pipe"
)

const (
	// uploadPurgeAge is how old an unfinished upload gets before it is
	// removed: an import that has not finished in a day has been abandoned.
	uploadPurgeAge      = "24h"
	uploadPurgeInterval = "1h"
	readyTimeout        = 5 * time.Second
	catalogMaxEntries   = 1000
)

// Server is a configured DVCR.
type Server struct {
	app     *handlers.App
	driver  storagedriver.StorageDriver // for readiness only
	metrics *metrics
	handler http.Handler
}

// New validates cfg and builds the registry.
func New(ctx context.Context, cfg Config) (*Server, error) {
	if err := cfg.validateAndDefault(); err != nil {
		return nil, fmt.Errorf("invalid DVCR configuration: %w", err)
	}
	routeRegistryLogs()
	// Building our own driver first turns a bad storage configuration into
	// an error here; distribution's NewApp would panic on it.
	driver, err := cfg.Storage.NewDriver(ctx)
	if err != nil {
		return nil, err
	}
	m := newMetrics()
	ac := &auth.AccessController{
		Users:    cfg.Users,
		Keys:     cfg.TokenKeys,
		Service:  cfg.Service,
		Realm:    cfg.Realm,
		Observer: m,
	}
	app, err := newApp(ctx, distributionConfig(cfg, ac))
	if err != nil {
		return nil, err
	}
	s := &Server{app: app, driver: driver, metrics: m}

	// Only requests with valid credentials get the read-ahead (a few MiB
	// of buffers per upload) and Wrap (the garbage collector's lease
	// guard): an anonymous client must not make the registry allocate
	// buffers or write lease records at its rate. Rejected requests go
	// straight to the registry, which refuses them. Scopes are still
	// checked by the registry itself; the gate only authenticates, without
	// counting failures a second time.
	authenticated := readAhead(app)
	if cfg.Wrap != nil {
		authenticated = cfg.Wrap(authenticated)
	}
	gate := *ac
	gate.Observer = nil
	registry := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, err := gate.Authorized(r); err == nil {
			authenticated.ServeHTTP(w, r)
			return
		}
		app.ServeHTTP(w, r)
	})
	tokens := &auth.TokenServer{
		Users:    cfg.Users,
		Keys:     cfg.TokenKeys,
		Service:  cfg.Service,
		TTL:      cfg.TokenTTL,
		MaxTTL:   cfg.MaxTokenTTL,
		Observer: m,
	}
	mux := http.NewServeMux()
	mux.Handle("/v2/", m.instrument("registry", registry))
	mux.Handle(auth.TokenPath, m.instrument("token", tokens))
	mux.Handle("/healthz", m.instrument("healthz", http.HandlerFunc(healthz)))
	mux.Handle("/readyz", m.instrument("readyz", http.HandlerFunc(s.readyz)))
	mux.Handle("/metrics", m.instrument("metrics", m.handler()))
	s.handler = mux

	klog.FromContext(ctx).Info("DVCR configured", "storage", cfg.Storage.driverType(), "service", cfg.Service,
		"realm", cfg.Realm, "tokenTTL", cfg.TokenTTL, "maxTokenTTL", cfg.MaxTokenTTL, "users", cfg.Users.Len(), "tokenKeys", len(cfg.TokenKeys))
	return s, nil
}

// distributionConfig is the registry configuration DVCR runs with. Only the
// storage and the secrets vary.
func distributionConfig(cfg Config, ac *auth.AccessController) *configuration.Configuration {
	c := &configuration.Configuration{}
	c.Version = configuration.CurrentVersion
	c.Storage = configuration.Storage{
		cfg.Storage.driverType(): cfg.Storage.driverParameters(),
		// Manifests are deleted by digest when a VirtualImage goes away;
		// the garbage collector then removes unreferenced blobs.
		"delete":   configuration.Parameters{"enabled": true},
		"redirect": configuration.Parameters{"disable": !cfg.Storage.Redirect},
		// No blob descriptor cache: the online garbage collector deletes
		// blobs behind the registry's back, and a cached descriptor would
		// answer "exists" for a deleted blob, so that a pusher skips the
		// upload and its manifest then points at nothing.
		"maintenance": configuration.Parameters{
			"uploadpurging": map[any]any{
				"enabled":  true,
				"age":      uploadPurgeAge,
				"interval": uploadPurgeInterval,
				"dryrun":   false,
			},
		},
	}
	c.Auth = configuration.Auth{auth.ControllerName: auth.Options(ac)}
	c.HTTP.Secret = cfg.UploadSecret
	// Relative Location headers keep uploads working whatever host name
	// or proxy a client came through.
	c.HTTP.RelativeURLs = true
	c.Catalog.MaxEntries = catalogMaxEntries
	return c
}

// newApp calls distribution's NewApp, which reports configuration
// problems by panicking, and returns them as errors instead.
func newApp(ctx context.Context, c *configuration.Configuration) (app *handlers.App, err error) {
	defer func() {
		if r := recover(); r != nil {
			app, err = nil, fmt.Errorf("building the registry: %v", r)
		}
	}()
	return handlers.NewApp(ctx, c), nil
}

// readAhead gives blob upload bodies (PATCH and PUT of an upload session)
// a goroutine that reads the connection ahead in large buffers. Distribution
// reads, hashes and writes an upload in one goroutine; with the socket read
// (and TLS decryption) moved aside, an upload uses both cores of a small
// node instead of one.
func readAhead(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if (r.Method == http.MethodPatch || r.Method == http.MethodPut) && strings.Contains(r.URL.Path, "/blobs/uploads/") && r.ContentLength != 0 {
			raw := r.Body
			body := pipe.New(raw, nil, readAheadBuffer, readAheadDepth)
			defer func() {
				raw.Close() // ends a read the pipe may be blocked in
				body.Close()
			}()
			r.Body = io.NopCloser(body)
		}
		next.ServeHTTP(w, r)
	})
}

// Read-ahead per upload in flight: readAheadDepth buffers of readAheadBuffer.
const (
	readAheadBuffer = 1 << 20
	readAheadDepth  = 4
)

// Handler serves the registry and DVCR's own endpoints.
func (s *Server) Handler() http.Handler { return s.handler }

// Close stops the registry's background work (upload purging).
func (s *Server) Close() error {
	if err := s.app.Shutdown(); err != nil {
		return fmt.Errorf("shutting down the registry: %w", err)
	}
	return nil
}

func healthz(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	_, _ = w.Write([]byte("ok\n"))
}

// readyz answers 200 when the storage answers a stat of its root: a missing
// root is still an answer (an empty registry), anything else is not.
func (s *Server) readyz(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), readyTimeout)
	defer cancel()
	_, err := s.driver.Stat(ctx, "/")
	var notFound storagedriver.PathNotFoundError
	if err != nil && !errors.As(err, &notFound) {
		klog.FromContext(r.Context()).Error(err, "Readiness check: storage does not answer")
		http.Error(w, "storage unavailable", http.StatusServiceUnavailable)
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	_, _ = w.Write([]byte("ok\n"))
}
