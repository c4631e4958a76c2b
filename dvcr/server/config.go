package server

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"time"

	storagedriver "github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/distribution/distribution/v3/registry/storage/driver/factory"

	// The storage drivers DVCR offers register themselves with the factory.
	_ "github.com/distribution/distribution/v3/registry/storage/driver/filesystem"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/inmemory"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/s3-aws"

	"vimg.dev/vimg/dvcr/auth"
)

// Storage drivers.
const (
	StorageFilesystem = "filesystem"
	StorageS3         = "s3"
	StorageInMemory   = "inmemory"
)

// Storage says where blobs and manifests live.
type Storage struct {
	// Type is StorageFilesystem (the default), StorageS3 or StorageInMemory
	// (tests only: every driver built for it is a separate, empty store).
	Type string
	// RootDirectory is the filesystem driver's directory (absolute); it is
	// created if missing.
	RootDirectory string
	// Parameters are passed to the s3 driver unchanged: bucket, region,
	// regionendpoint, forcepathstyle, accesskey, secretkey, rootdirectory,
	// secure, skipverify, chunksize, ... (see distribution's s3-aws
	// driver). Without accesskey/secretkey the AWS SDK's default chain is
	// used (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, web identity, ...).
	Parameters map[string]any
	// Redirect lets an s3-backed registry answer blob GETs with a redirect
	// to a presigned S3 URL. Off by default: nodes often cannot reach the
	// object store directly. Not available for other drivers.
	Redirect bool
}

func (s Storage) driverType() string {
	if s.Type == "" {
		return StorageFilesystem
	}
	return s.Type
}

// driverParameters is what distribution's factory gets for this storage.
func (s Storage) driverParameters() map[string]any {
	switch s.driverType() {
	case StorageFilesystem:
		return map[string]any{"rootdirectory": s.RootDirectory}
	case StorageS3:
		return maps.Clone(s.Parameters)
	}
	return map[string]any{}
}

func (s Storage) validate() error {
	switch s.driverType() {
	case StorageFilesystem:
		if s.RootDirectory == "" || !filepath.IsAbs(s.RootDirectory) {
			return fmt.Errorf("filesystem storage needs an absolute root directory, got %q", s.RootDirectory)
		}
		if len(s.Parameters) > 0 {
			return errors.New("storage parameters are only for s3; filesystem takes a root directory")
		}
	case StorageS3:
		for _, p := range []string{"bucket", "region"} {
			if v, _ := s.Parameters[p].(string); v == "" {
				return fmt.Errorf("s3 storage needs parameter %q", p)
			}
		}
		if s.RootDirectory != "" {
			return errors.New("s3 storage takes its root directory as parameter \"rootdirectory\"")
		}
	case StorageInMemory:
	default:
		return fmt.Errorf("unknown storage type %q (want %s, %s or %s)", s.Type, StorageFilesystem, StorageS3, StorageInMemory)
	}
	if s.Redirect && s.driverType() != StorageS3 {
		return fmt.Errorf("redirects are only available with s3 storage")
	}
	return nil
}

// NewDriver builds a storage driver on the same storage the registry uses,
// for tools that walk the storage directly (the garbage collector). For
// StorageInMemory it is a new, empty store.
func (s Storage) NewDriver(ctx context.Context) (storagedriver.StorageDriver, error) {
	if err := s.validate(); err != nil {
		return nil, err
	}
	if s.driverType() == StorageFilesystem {
		if err := os.MkdirAll(s.RootDirectory, 0o750); err != nil {
			return nil, fmt.Errorf("creating storage root directory: %w", err)
		}
	}
	d, err := factory.Create(ctx, s.driverType(), s.driverParameters())
	if err != nil {
		return nil, fmt.Errorf("creating %s storage driver: %w", s.driverType(), err)
	}
	return d, nil
}

// Config is everything the registry server needs.
type Config struct {
	Storage Storage
	// Users may log in (token endpoint, Basic on the registry).
	Users *auth.Users
	// TokenKeys sign (the first) and verify (all) tokens.
	TokenKeys [][]byte
	// Service is the token service name and audience; "dvcr" by default.
	Service string
	// Realm is the external URL of the token endpoint, announced in
	// challenges. Empty: derived from each request's scheme and Host.
	Realm string
	// TokenTTL is the default token lifetime (5m); MaxTokenTTL caps what a
	// client may ask for with expires_in (1h).
	TokenTTL, MaxTokenTTL time.Duration
	// UploadSecret signs the state of blob uploads in progress; every
	// replica serving the same storage must use the same one. Empty: derived
	// from the first token key, which replicas already share (so a key
	// rotation interrupts uploads in flight once; clients restart them).
	UploadSecret string
	// Wrap, when set, is applied around the registry's /v2/ handler (the
	// garbage collector installs its lease there). It sees only requests
	// with valid credentials, and never /auth/token, /healthz, /readyz or
	// /metrics.
	Wrap func(http.Handler) http.Handler
}

func (c *Config) validateAndDefault() error {
	if err := c.Storage.validate(); err != nil {
		return fmt.Errorf("storage: %w", err)
	}
	if c.Users == nil || c.Users.Len() == 0 {
		return errors.New("no users configured: DVCR has no anonymous access")
	}
	if len(c.TokenKeys) == 0 {
		return errors.New("no token signing key configured")
	}
	for i, k := range c.TokenKeys {
		if len(k) < auth.MinKeyLen {
			return fmt.Errorf("token key %d is %d bytes, want at least %d", i, len(k), auth.MinKeyLen)
		}
	}
	if c.Service == "" {
		c.Service = auth.DefaultService
	}
	if c.TokenTTL == 0 {
		c.TokenTTL = auth.DefaultTTL
	}
	if c.MaxTokenTTL == 0 {
		c.MaxTokenTTL = max(auth.DefaultMaxTTL, c.TokenTTL)
	}
	if c.TokenTTL < time.Second || c.MaxTokenTTL < time.Second {
		return fmt.Errorf("token lifetimes must be at least a second (ttl %s, max %s)", c.TokenTTL, c.MaxTokenTTL)
	}
	if c.TokenTTL > c.MaxTokenTTL {
		return fmt.Errorf("token ttl %s is longer than the maximum %s", c.TokenTTL, c.MaxTokenTTL)
	}
	if c.Realm != "" {
		u, err := url.Parse(c.Realm)
		if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
			return fmt.Errorf("realm %q must be an absolute http(s) URL of the token endpoint", c.Realm)
		}
	}
	if c.UploadSecret == "" {
		m := hmac.New(sha256.New, c.TokenKeys[0])
		m.Write([]byte("dvcr upload state secret"))
		c.UploadSecret = hex.EncodeToString(m.Sum(nil))
	}
	return nil
}
