// Command dvcr is vimg's in-cluster registry for disk images. It only parses
// flags and wires package dvcr/server into an HTTP(S) server.
//
// Storage is a filesystem directory (--storage-root) unless --config names a
// YAML or JSON file such as
//
//	storage:
//	  type: s3
//	  parameters:               # passed to distribution's s3 driver
//	    bucket: dvcr
//	    region: us-east-1
//	    regionendpoint: http://minio.storage:9000
//	    forcepathstyle: true
//	  accessKeyFile: /etc/dvcr/s3/access-key   # optional; else AWS_* env
//	  secretKeyFile: /etc/dvcr/s3/secret-key
//
// SIGTERM or SIGINT stops accepting connections, lets requests in flight
// finish for up to --shutdown-timeout, and exits 0.
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/klog/v2"
	"sigs.k8s.io/yaml"

	"vimg.dev/vimg/dvcr/auth"
	"vimg.dev/vimg/dvcr/gc"
	"vimg.dev/vimg/dvcr/server"
	"vimg.dev/vimg/pkg/certfile"
)

type options struct {
	listen          string
	tlsCert, tlsKey string
	insecureHTTP    bool
	configFile      string
	storageType     string
	storageRoot     string
	usersFile       string
	tokenKeyFile    string
	uploadSecret    string
	tokenTTL        time.Duration
	maxTokenTTL     time.Duration
	realm           string
	service         string
	shutdownTimeout time.Duration
	gcInterval      time.Duration
	gcGrace         time.Duration
}

func main() {
	klog.InitFlags(nil)
	var o options
	flag.StringVar(&o.listen, "listen", ":5000", "address to serve on")
	flag.StringVar(&o.tlsCert, "tls-cert-file", "", "PEM certificate (chain) for TLS; re-read when the file changes")
	flag.StringVar(&o.tlsKey, "tls-key-file", "", "PEM private key for TLS")
	flag.BoolVar(&o.insecureHTTP, "insecure-http", false, "serve plain HTTP instead of TLS (credentials travel in clear text)")
	flag.StringVar(&o.configFile, "config", "", "YAML/JSON file with a storage section (s3 parameters); overrides --storage and --storage-root")
	flag.StringVar(&o.storageType, "storage", server.StorageFilesystem, "storage driver: filesystem, s3 (needs --config) or inmemory")
	flag.StringVar(&o.storageRoot, "storage-root", "/var/lib/dvcr", "root directory of filesystem storage")
	flag.StringVar(&o.usersFile, "users-file", "", "users file, one role:name:bcrypt-hash per line (required)")
	flag.StringVar(&o.tokenKeyFile, "token-key-file", "", "token signing keys, one base64 key of 32+ bytes per line; the first signs (required)")
	flag.StringVar(&o.uploadSecret, "upload-secret-file", "", "secret for upload state shared by replicas (default: derived from the first token key)")
	flag.DurationVar(&o.tokenTTL, "token-ttl", auth.DefaultTTL, "default lifetime of issued tokens")
	flag.DurationVar(&o.maxTokenTTL, "token-max-ttl", auth.DefaultMaxTTL, "longest lifetime a client may ask for with expires_in")
	flag.StringVar(&o.realm, "realm", "", "external URL of /auth/token announced to clients (default: from each request's scheme and host)")
	flag.StringVar(&o.service, "service", auth.DefaultService, "token service name")
	flag.DurationVar(&o.shutdownTimeout, "shutdown-timeout", 30*time.Second, "how long requests in flight may finish after SIGTERM")
	flag.DurationVar(&o.gcInterval, "gc-interval", 10*time.Minute, "time between online garbage collection passes; 0 turns collection off")
	flag.DurationVar(&o.gcGrace, "gc-grace", time.Hour, "blobs written or used less than this long ago are never collected; must exceed the time from a pusher's blob check to its manifest PUT")
	flag.Parse()

	if err := run(o); err != nil {
		klog.ErrorS(err, "dvcr failed")
		klog.Flush()
		os.Exit(1)
	}
	klog.Flush()
}

func run(o options) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	logger := klog.Background()
	ctx = klog.NewContext(ctx, logger)

	cfg, err := o.serverConfig()
	if err != nil {
		return err
	}
	collector, err := o.collector(ctx, cfg.Storage)
	if err != nil {
		return err
	}
	if collector != nil {
		cfg.Wrap = collector.Guard
	}
	srv, err := server.New(ctx, cfg)
	if err != nil {
		return err
	}
	defer srv.Close()
	if collector != nil {
		go collector.Run(ctx)
	}

	hs := &http.Server{
		Handler: srv.Handler(),
		// No ReadTimeout or WriteTimeout: a multi-GiB blob upload or
		// download takes as long as it takes. Slow-header clients are
		// cut off, idle keep-alive connections closed.
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		BaseContext:       func(net.Listener) context.Context { return ctx },
		ErrorLog:          klog.NewStandardLogger("INFO"),
	}
	if !o.insecureHTTP {
		if o.tlsCert == "" || o.tlsKey == "" {
			return errors.New("--tls-cert-file and --tls-key-file are required (or --insecure-http to serve plain HTTP)")
		}
		kp, err := certfile.Load(o.tlsCert, o.tlsKey)
		if err != nil {
			return err
		}
		hs.TLSConfig = &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: kp.GetCertificate}
	} else if o.tlsCert != "" || o.tlsKey != "" {
		return errors.New("--insecure-http and TLS files are mutually exclusive")
	}

	ln, err := net.Listen("tcp", o.listen)
	if err != nil {
		return fmt.Errorf("listening on %s: %w", o.listen, err)
	}
	logger.Info("Serving", "address", ln.Addr().String(), "tls", !o.insecureHTTP)

	errc := make(chan error, 1)
	go func() {
		if hs.TLSConfig != nil {
			errc <- hs.ServeTLS(ln, "", "")
		} else {
			errc <- hs.Serve(ln)
		}
	}()
	select {
	case err := <-errc:
		return fmt.Errorf("serving: %w", err)
	case <-ctx.Done():
	}
	logger.Info("Shutting down", "timeout", o.shutdownTimeout)
	sctx, cancel := context.WithTimeout(context.Background(), o.shutdownTimeout)
	defer cancel()
	if err := hs.Shutdown(sctx); err != nil {
		// Requests still running after the grace period are cut; clients
		// resume their uploads against another replica.
		logger.Info("Connections still open at the end of the grace period", "err", err)
	}
	return nil
}

// collector builds the online garbage collector on its own driver for the
// registry's storage, or returns nil when collection is off.
func (o options) collector(ctx context.Context, st server.Storage) (*gc.Collector, error) {
	if o.gcInterval <= 0 {
		klog.FromContext(ctx).Info("Online garbage collection is off (--gc-interval=0)")
		return nil, nil
	}
	if st.Type == server.StorageInMemory {
		// A second inmemory driver is a separate, empty store: collecting
		// it would find nothing, and guarding requests would only cost.
		klog.FromContext(ctx).Info("Online garbage collection is off for inmemory storage")
		return nil, nil
	}
	d, err := st.NewDriver(ctx)
	if err != nil {
		return nil, fmt.Errorf("opening storage for the garbage collector: %w", err)
	}
	return gc.New(d, gc.Options{Grace: o.gcGrace, Interval: o.gcInterval, Registerer: prometheus.DefaultRegisterer})
}

// fileConfig is the --config file.
type fileConfig struct {
	Storage struct {
		Type          string         `json:"type"`
		RootDirectory string         `json:"rootDirectory"`
		Redirect      bool           `json:"redirect"`
		Parameters    map[string]any `json:"parameters"`
		AccessKeyFile string         `json:"accessKeyFile"`
		SecretKeyFile string         `json:"secretKeyFile"`
	} `json:"storage"`
}

func (o options) serverConfig() (server.Config, error) {
	cfg := server.Config{
		Storage:     server.Storage{Type: o.storageType},
		Service:     o.service,
		Realm:       o.realm,
		TokenTTL:    o.tokenTTL,
		MaxTokenTTL: o.maxTokenTTL,
	}
	if cfg.Storage.Type == server.StorageFilesystem {
		cfg.Storage.RootDirectory = o.storageRoot
	}
	if o.configFile != "" {
		st, err := loadStorageConfig(o.configFile)
		if err != nil {
			return cfg, err
		}
		cfg.Storage = st
	}
	if o.usersFile == "" || o.tokenKeyFile == "" {
		return cfg, errors.New("--users-file and --token-key-file are required")
	}
	var err error
	if cfg.Users, err = auth.LoadUsers(o.usersFile); err != nil {
		return cfg, err
	}
	if cfg.TokenKeys, err = auth.LoadKeys(o.tokenKeyFile); err != nil {
		return cfg, err
	}
	if o.uploadSecret != "" {
		if cfg.UploadSecret, err = readSecret(o.uploadSecret); err != nil {
			return cfg, err
		}
	}
	return cfg, nil
}

func loadStorageConfig(path string) (server.Storage, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return server.Storage{}, fmt.Errorf("reading config: %w", err)
	}
	js, err := yaml.YAMLToJSON(data)
	if err != nil {
		return server.Storage{}, fmt.Errorf("config %s: %w", path, err)
	}
	var fc fileConfig
	dec := json.NewDecoder(bytes.NewReader(js))
	// Numbers stay json.Number so that the s3 driver reads "chunksize:
	// 10485760" as an integer, not as 1.048576e+07.
	dec.UseNumber()
	dec.DisallowUnknownFields()
	if err := dec.Decode(&fc); err != nil {
		return server.Storage{}, fmt.Errorf("config %s: %w", path, err)
	}
	st := server.Storage{
		Type:          fc.Storage.Type,
		RootDirectory: fc.Storage.RootDirectory,
		Redirect:      fc.Storage.Redirect,
		Parameters:    fc.Storage.Parameters,
	}
	for param, file := range map[string]string{"accesskey": fc.Storage.AccessKeyFile, "secretkey": fc.Storage.SecretKeyFile} {
		if file == "" {
			continue
		}
		v, err := readSecret(file)
		if err != nil {
			return server.Storage{}, err
		}
		if st.Parameters == nil {
			st.Parameters = map[string]any{}
		}
		st.Parameters[param] = v
	}
	return st, nil
}

func readSecret(path string) (string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("reading secret file: %w", err)
	}
	s := strings.TrimSpace(string(data))
	if s == "" {
		return "", fmt.Errorf("secret file %s is empty", path)
	}
	return s, nil
}
