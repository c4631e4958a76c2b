// Package registry reads a disk image out of a container image, the way
// KubeVirt containerDisks are built:
//
//	FROM scratch
//	COPY ubuntu.img /disk/
//
// Open resolves a reference (a tag or a digest, a single manifest or a
// multi-arch index, docker v2 schema2 or OCI), finds the layer holding the
// disk file and returns a source.Source that streams exactly that file's
// bytes, decompressing the layer (gzip, zstd or none) on the fly. Nothing is
// written to disk and no layer is ever held in memory: the engine reads the
// disk in the one pass it makes over any stream.
//
// # Which file
//
// The disk is the single regular file directly under disk/ (tar names
// "disk/x", "./disk/x" and "/disk/x" are the same) in the topmost layer that
// has one, as the container's merged filesystem would show it: layers are
// read from the last to the first, and whiteouts in upper layers
// (disk/.wh.<name>, disk/.wh..wh..opq, .wh.disk) hide lower layers' files.
// A symlink, hard link or device where the disk should be, a tar name that
// climbs out of the root with "..", and a size over 64 TiB are refused.
//
// # One pass
//
// Open reads layers top-down until it meets the disk's tar header, and keeps
// that layer's HTTP response open, positioned at the disk's first byte; the
// first Stream call takes it over. Re-opening the layer in Stream would be
// simpler to reason about, but it downloads and decompresses the layer's
// prefix twice and costs a second blob request (and token round trip), and
// for a layer that holds nothing but the disk the saving is nil anyway; the
// price of keeping it open is a connection that idles between Open and
// Stream, which the importer calls right away to detect the format. Upper
// layers without a disk are read through (a tar has no index), which is
// unavoidable and, for images built FROM scratch, never happens.
//
// Because the stream is handed over at the disk's first byte, a second file
// under disk/ that follows the disk in the same layer is only seen once the
// disk's bytes have gone by: the stream then ends with an error instead of
// io.EOF, so the import fails all the same. The same holds for the layer's
// digest: after the disk the rest of the layer is read and the blob's
// sha256 checked against the manifest before the final io.EOF, so a
// corrupted or truncated layer never ends a stream cleanly.
//
// # Errors
//
// Failures the registry reports keep go-containerregistry's
// *transport.Error in the chain (find it with errors.As for the status code
// and the registry's error codes) and are also tagged with ErrNotFound
// (404, MANIFEST_UNKNOWN, NAME_UNKNOWN, BLOB_UNKNOWN) or ErrUnauthorized
// (401, 403, UNAUTHORIZED, DENIED), for errors.Is. Docker Hub answers 401,
// not 404, for a repository that does not exist or that the credentials
// cannot see, so there ErrUnauthorized can also mean "not found". Images
// that are reachable but unusable (no disk file, two of them, a symlink, no
// variant for the platform, ...) give errors wrapping ErrInvalidImage.
package registry

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"k8s.io/klog/v2"

	"vimg.dev/vimg/pkg/diskimage/source"
)

// Options configures Open.
type Options struct {
	// Username and Password authenticate to the registry (basic auth, or
	// exchanged for a bearer token when the registry asks for one). Both
	// empty means anonymous. AuthFromDockerConfig extracts them from a pull
	// secret. They never appear in errors, logs or Name().
	Username, Password string
	// CABundle is PEM: extra roots trusted on top of the system pool (a
	// registry with a private CA is still usually reached through public
	// redirects, e.g. blobs served from S3, which need the public roots).
	CABundle []byte
	// InsecureSkipVerify turns off certificate verification.
	InsecureSkipVerify bool
	// PlainHTTP allows http:// registries. Without it every request,
	// including token requests and redirects, must use HTTPS, even to
	// localhost and private addresses (which go-containerregistry would
	// otherwise try over HTTP too), so credentials never travel in clear.
	PlainHTTP bool
	// Platform picks the image from a multi-arch index, as "os/arch" or
	// "os/arch/variant". Default "linux/amd64". A single-platform image is
	// used whatever its platform: the disk inside does not run in the
	// container's architecture anyway.
	Platform string
	// UserAgent is prepended to go-containerregistry's User-Agent.
	UserAgent string
}

// DefaultPlatform is the platform picked from an index when
// Options.Platform is empty.
const DefaultPlatform = "linux/amd64"

// MaxDiskSize bounds the disk file's size in its tar header, like the
// engine's bound on virtual sizes.
const MaxDiskSize = 64 << 40

var (
	// ErrNotFound tags errors for an image, tag, repository or blob the
	// registry does not have.
	ErrNotFound = errors.New("not found in the registry")
	// ErrUnauthorized tags errors for a registry that wants credentials or
	// refuses the ones given.
	ErrUnauthorized = errors.New("not authorized by the registry")
	// ErrInvalidImage tags errors for an image that was fetched but cannot
	// be used as a disk image.
	ErrInvalidImage = errors.New("not a usable disk image container")
	// ErrNoCredentials is wrapped by AuthFromDockerConfig's error when the
	// config has no entry for the image's registry; a caller may then fall
	// back to anonymous access.
	ErrNoCredentials = errors.New("no credentials for the registry")
)

// Image is a disk file inside a container image. It implements
// source.Source: ReaderAt is nil and Stream may be called once.
type Image struct {
	name        string
	digest      string
	imageDigest string
	layerDigest string
	diskPath    string
	size        int64

	mu       sync.Mutex
	layer    *layerReader // open at the disk's first byte; owned by the stream once handed over
	streamed bool
	closed   bool
}

var _ source.Source = (*Image)(nil)

// Size is the disk file's size from its tar header.
func (s *Image) Size() int64 { return s.size }

// ReaderAt is nil: a layer can only be read front to back.
func (s *Image) ReaderAt() io.ReaderAt { return nil }

// Name is the reference as given, without a docker:// prefix. It holds no
// credentials: the reference grammar has no place for them, and Open
// refuses anything that does not parse.
func (s *Image) Name() string { return s.name }

// Digest is the digest the reference resolved to: the index's when the
// reference names a multi-arch index, else the image manifest's. Pulling
// Name's repository at this digest, for the same platform, gives the same
// disk.
func (s *Image) Digest() string { return s.digest }

// ImageDigest is the digest of the platform's image manifest (Digest when
// the reference names an image, not an index).
func (s *Image) ImageDigest() string { return s.imageDigest }

// LayerDigest is the digest of the layer the disk file is read from.
func (s *Image) LayerDigest() string { return s.layerDigest }

// DiskPath is the disk file's path in the image, e.g. "/disk/ubuntu.img".
func (s *Image) DiskPath() string { return "/" + s.diskPath }

// Stream returns the disk file's bytes. It may be called once; it ends
// with io.EOF only after the rest of its layer has been checked (no second
// disk file) and the layer's digest verified. Closing the stream releases
// the layer's connection.
func (s *Image) Stream() (io.ReadCloser, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.streamed {
		return nil, source.ErrStreamUsed
	}
	if s.closed {
		return nil, source.ErrClosed
	}
	s.streamed = true
	return &diskReader{layer: s.layer, remaining: s.size}, nil
}

// Close releases the layer's connection. A stream obtained from the Image
// stops working: its next Read fails.
func (s *Image) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	if s.streamed {
		// The stream owns the decompressor and may be inside a Read;
		// closing the response body (safe concurrently with a Read) makes
		// that Read fail, and the stream's own Close frees the rest.
		return s.layer.abort()
	}
	return s.layer.close()
}

// Open resolves ref (a docker reference such as "docker.io/user/disk:latest"
// or "registry:5000/x@sha256:…"; a "docker://" prefix is accepted) and finds
// the disk file in it. ctx bounds the whole life of the Image, streaming
// included.
func Open(ctx context.Context, ref string, opts Options) (*Image, error) {
	logger := klog.FromContext(ctx)
	r, display, err := parseRef(ref, opts.PlainHTTP)
	if err != nil {
		return nil, err
	}
	platform := opts.Platform
	if platform == "" {
		platform = DefaultPlatform
	}
	want, err := v1.ParsePlatform(platform)
	if err != nil {
		return nil, fmt.Errorf("image %s: platform %q: %w", display, platform, err)
	}
	rt, err := newTransport(opts)
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", display, err)
	}
	ropts := []remote.Option{
		remote.WithContext(ctx),
		remote.WithTransport(rt),
		remote.WithAuth(authenticator(opts)),
	}
	if opts.UserAgent != "" {
		ropts = append(ropts, remote.WithUserAgent(opts.UserAgent))
	}

	desc, err := remote.Get(r, ropts...)
	if err != nil {
		return nil, fmt.Errorf("resolving image %s: %w", display, classify(err))
	}
	s := &Image{name: display, digest: desc.Digest.String()}

	var img v1.Image
	if desc.MediaType.IsIndex() {
		idx, err := desc.ImageIndex()
		if err != nil {
			return nil, fmt.Errorf("reading index of image %s: %w", display, classify(err))
		}
		img, err = imageForPlatform(idx, *want, display, 0)
		if err != nil {
			return nil, err
		}
	} else {
		img, err = desc.Image()
		if err != nil {
			return nil, fmt.Errorf("reading image %s: %w", display, classify(err))
		}
	}
	d, err := img.Digest()
	if err != nil {
		return nil, fmt.Errorf("digest of image %s: %w", display, err)
	}
	s.imageDigest = d.String()
	logger.V(2).Info("Resolved container image", "image", display, "digest", s.digest, "imageDigest", s.imageDigest)

	found, err := findDisk(ctx, img, display)
	if err != nil {
		return nil, err
	}
	s.layer = found
	s.layerDigest = found.digest
	s.diskPath = found.diskPath
	s.size = found.size
	logger.V(1).Info("Found disk file in container image", "image", display, "digest", s.digest,
		"path", s.DiskPath(), "size", s.size, "layer", found.desc)
	return s, nil
}

// imageForPlatform picks want's image from idx, descending into nested
// indexes a few levels deep. It matches like go-containerregistry's
// WithPlatform (fields left empty in want match anything) but names the
// platforms the index does have when none fits.
func imageForPlatform(idx v1.ImageIndex, want v1.Platform, display string, depth int) (v1.Image, error) {
	if depth > 3 {
		return nil, invalidf("image %s: indexes nested more than 4 deep", display)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		return nil, fmt.Errorf("reading index of image %s: %w", display, classify(err))
	}
	var have []string
	for _, m := range im.Manifests {
		if m.Platform == nil {
			continue
		}
		if !m.Platform.Satisfies(want) {
			// Attestation manifests say unknown/unknown; not worth listing.
			if m.Platform.OS != "unknown" {
				have = append(have, m.Platform.String())
			}
			continue
		}
		switch {
		case m.MediaType.IsImage():
			img, err := idx.Image(m.Digest)
			if err != nil {
				return nil, fmt.Errorf("reading %s image %s of %s: %w", want.String(), m.Digest, display, classify(err))
			}
			return img, nil
		case m.MediaType.IsIndex():
			child, err := idx.ImageIndex(m.Digest)
			if err != nil {
				return nil, fmt.Errorf("reading index %s of %s: %w", m.Digest, display, classify(err))
			}
			return imageForPlatform(child, want, display, depth+1)
		}
	}
	if len(have) == 0 {
		return nil, invalidf("image %s is an index with no image for platform %s", display, want.String())
	}
	return nil, invalidf("image %s has no image for platform %s (it has %s)", display, want.String(), strings.Join(have, ", "))
}

func authenticator(opts Options) authn.Authenticator {
	if opts.Username == "" && opts.Password == "" {
		return authn.Anonymous
	}
	return authn.FromConfig(authn.AuthConfig{Username: opts.Username, Password: opts.Password})
}

// parseRef parses ref and returns it with the name to show for it. A
// reference that does not parse may be a URL with userinfo, so it is shown
// with the userinfo cut out and go-containerregistry's message (which
// quotes it whole) is then dropped.
func parseRef(ref string, plainHTTP bool) (name.Reference, string, error) {
	s := strings.TrimSpace(ref)
	s = strings.TrimPrefix(s, "docker://")
	var nopts []name.Option
	if plainHTTP {
		nopts = append(nopts, name.Insecure)
	}
	r, err := name.ParseReference(s, nopts...)
	if err != nil {
		shown := redactRef(s)
		if shown != s {
			return nil, "", fmt.Errorf("invalid image reference %q: a reference is registry/repository[:tag|@digest], without credentials or scheme", shown)
		}
		// ParseReference only says "could not parse"; the parser for
		// the form the string has says why.
		if strings.Contains(s, "@") {
			_, err = name.NewDigest(s, nopts...)
		} else {
			_, err = name.NewTag(s, nopts...)
		}
		return nil, "", fmt.Errorf("invalid image reference %q: %w", s, err)
	}
	return r, s, nil
}

// redactRef cuts anything that looks like userinfo ("user:pass@") out of
// the host part of a string that failed to parse as a reference.
func redactRef(s string) string {
	prefix, rest := "", s
	if i := strings.Index(rest, "://"); i >= 0 {
		prefix, rest = rest[:i+3], rest[i+3:]
	}
	host := rest
	if i := strings.IndexByte(rest, '/'); i >= 0 {
		host = rest[:i]
	}
	if at := strings.LastIndexByte(host, '@'); at >= 0 {
		return prefix + "REDACTED@" + rest[at+1:]
	}
	return s
}
