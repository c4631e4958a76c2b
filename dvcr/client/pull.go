package client

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"vimg.dev/vimg/dvcr/internal/pipe"
	"vimg.dev/vimg/dvcr/layout"
)

// Bounds on what is read into memory from the registry.
const (
	maxManifestSize = 4 << 20 // distribution's own limit on a manifest PUT
	maxConfigSize   = 1 << 20
)

const (
	mediaTypeDockerManifest = "application/vnd.docker.distribution.manifest.v2+json"
	mediaTypeDockerList     = "application/vnd.docker.distribution.manifest.list.v2+json"
	mediaTypeDockerLayer    = "application/vnd.docker.image.rootfs.diff.tar"
)

var manifestAccept = strings.Join([]string{layout.MediaTypeManifest, mediaTypeDockerManifest, v1.MediaTypeImageIndex, mediaTypeDockerList}, ", ")

// Image is an opened disk image: its manifest, metadata and where the
// disk file lies in the layer blob. It is safe for concurrent use.
type Image struct {
	c    *Client
	repo string
	// Ref is the reference it was opened with.
	Ref string
	// Digest is the manifest's digest.
	Digest   digest.Digest
	Manifest v1.Manifest
	Meta     layout.Meta
	// Layer is the one layer; the disk file is bytes [Offset, Offset+Size())
	// of it.
	Layer  v1.Descriptor
	Offset int64
	size   int64
}

// Size returns the size of the disk file.
func (im *Image) Size() int64 { return im.size }

// Open reads the manifest of ref ("<repository>:<tag>" or
// "<repository>@<digest>"), the metadata (from the manifest's annotations,
// or the config's labels when the manifest has none), and the layer's tar
// headers, which give the disk file's place in the layer.
func (c *Client) Open(ctx context.Context, ref string) (*Image, error) {
	im, err := c.open(ctx, ref)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", ref, err)
	}
	return im, nil
}

func (c *Client) open(ctx context.Context, ref string) (*Image, error) {
	repo, tagOrDigest, _, err := parseRef(ref)
	if err != nil {
		return nil, err
	}
	raw, mediaType, d, err := c.getManifest(ctx, repo, tagOrDigest)
	if err != nil {
		return nil, fmt.Errorf("getting manifest: %w", err)
	}
	var man v1.Manifest
	if err := json.Unmarshal(raw, &man); err != nil {
		return nil, fmt.Errorf("decoding manifest: %w", err)
	}
	if man.MediaType != "" {
		mediaType = man.MediaType
	}
	switch mediaType {
	case layout.MediaTypeManifest, mediaTypeDockerManifest:
	default:
		return nil, fmt.Errorf("manifest has media type %q: want a single-image manifest", mediaType)
	}
	if len(man.Layers) != 1 {
		return nil, fmt.Errorf("image has %d layers: a disk image has exactly one", len(man.Layers))
	}
	layer := man.Layers[0]
	if layer.MediaType != layout.MediaTypeLayer && layer.MediaType != mediaTypeDockerLayer {
		return nil, fmt.Errorf("layer has media type %q: only an uncompressed tar layer can be read by range", layer.MediaType)
	}
	if err := layer.Digest.Validate(); err != nil {
		return nil, fmt.Errorf("layer digest: %w", err)
	}
	if layer.Size <= 0 {
		return nil, fmt.Errorf("layer size %d in manifest", layer.Size)
	}

	var meta layout.Meta
	if _, ok := man.Annotations[layout.KeyFormat]; ok {
		meta, err = layout.MetaFromAnnotations(man.Annotations)
		if err != nil {
			return nil, fmt.Errorf("manifest annotations: %w", err)
		}
	} else {
		cfg, err := c.getBlob(ctx, repo, man.Config, maxConfigSize)
		if err != nil {
			return nil, fmt.Errorf("getting config: %w", err)
		}
		var img v1.Image
		if err := json.Unmarshal(cfg, &img); err != nil {
			return nil, fmt.Errorf("decoding config: %w", err)
		}
		meta, err = layout.MetaFromAnnotations(img.Config.Labels)
		if err != nil {
			return nil, fmt.Errorf("config labels: %w", err)
		}
		meta.Architecture = img.Architecture
	}

	first, err := c.getRange(ctx, repo, layer.Digest, 0, min(layer.Size, layout.MaxHeaderSize))
	if err != nil {
		return nil, fmt.Errorf("reading layer headers: %w", err)
	}
	off, size, name, err := layout.ParseDiskOffset(first)
	if err != nil {
		return nil, err
	}
	if off+size > layer.Size {
		return nil, fmt.Errorf("disk file of %d bytes at %d overruns the %d-byte layer", size, off, layer.Size)
	}
	if size != meta.StoredSize {
		return nil, fmt.Errorf("layer holds %d bytes in %s but the metadata says %d", size, name, meta.StoredSize)
	}
	return &Image{c: c, repo: repo, Ref: ref, Digest: d, Manifest: man, Meta: meta, Layer: layer, Offset: off, size: size}, nil
}

// getManifest returns a manifest's bytes, media type and digest, checking
// the digest when the reference is one.
func (c *Client) getManifest(ctx context.Context, repo, ref string) ([]byte, string, digest.Digest, error) {
	req, err := c.newRequest(ctx, http.MethodGet, c.url(repo, "manifests", ref), nil)
	if err != nil {
		return nil, "", "", err
	}
	req.Header.Set("Accept", manifestAccept)
	resp, err := c.do(req, scope{repo: repo})
	if err != nil {
		return nil, "", "", err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, "", "", readError(resp)
	}
	defer resp.Body.Close()
	if resp.ContentLength > maxManifestSize {
		return nil, "", "", fmt.Errorf("manifest is %d bytes, over the %d limit", resp.ContentLength, maxManifestSize)
	}
	raw, err := io.ReadAll(io.LimitReader(resp.Body, maxManifestSize+1))
	if err != nil {
		return nil, "", "", fmt.Errorf("reading manifest: %w", err)
	}
	if len(raw) > maxManifestSize {
		return nil, "", "", fmt.Errorf("manifest is over the %d-byte limit", maxManifestSize)
	}
	d := digest.FromBytes(raw)
	if want, err := digest.Parse(ref); err == nil && want != d {
		return nil, "", "", fmt.Errorf("manifest digest is %s, not the %s asked for", d, want)
	}
	mediaType, _, _ := strings.Cut(resp.Header.Get("Content-Type"), ";")
	return raw, strings.TrimSpace(mediaType), d, nil
}

// getBlob reads a small blob whole and checks its digest.
func (c *Client) getBlob(ctx context.Context, repo string, desc v1.Descriptor, limit int64) ([]byte, error) {
	if desc.Size > limit || desc.Size < 0 {
		return nil, fmt.Errorf("blob %s is %d bytes, over the %d limit", desc.Digest, desc.Size, limit)
	}
	if err := desc.Digest.Validate(); err != nil {
		return nil, err
	}
	req, err := c.newRequest(ctx, http.MethodGet, c.url(repo, "blobs", desc.Digest.String()), nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.do(req, scope{repo: repo})
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, readError(resp)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, desc.Size+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) != desc.Size || digest.FromBytes(b) != desc.Digest {
		return nil, fmt.Errorf("blob %s: content does not match its descriptor", desc.Digest)
	}
	return b, nil
}

// getRange reads n bytes of a blob from off.
func (c *Client) getRange(ctx context.Context, repo string, d digest.Digest, off, n int64) ([]byte, error) {
	buf := make([]byte, n)
	if err := c.readRange(ctx, repo, d, off, buf); err != nil {
		return nil, err
	}
	return buf, nil
}

// readRange fills p from a blob at off with one ranged GET. Redirects
// (to object storage) are followed by net/http, which drops the
// Authorization header when the host changes.
func (c *Client) readRange(ctx context.Context, repo string, d digest.Digest, off int64, p []byte) error {
	req, err := c.newRequest(ctx, http.MethodGet, c.url(repo, "blobs", d.String()), nil)
	if err != nil {
		return err
	}
	req.Header.Set("Range", "bytes="+strconv.FormatInt(off, 10)+"-"+strconv.FormatInt(off+int64(len(p))-1, 10))
	resp, err := c.do(req, scope{repo: repo})
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusPartialContent:
		if start, ok := rangeStart(resp.Header.Get("Content-Range")); !ok || start != off {
			return fmt.Errorf("asked for bytes from %d, got Content-Range %q", off, resp.Header.Get("Content-Range"))
		}
	case http.StatusOK:
		// The server ignored Range: skip to the offset.
		if _, err := io.CopyN(io.Discard, resp.Body, off); err != nil {
			return fmt.Errorf("skipping to %d in a whole-blob answer: %w", off, err)
		}
	default:
		return readError(resp)
	}
	if _, err := io.ReadFull(resp.Body, p); err != nil {
		return fmt.Errorf("reading %d bytes at %d: %w", len(p), off, err)
	}
	return nil
}

func rangeStart(cr string) (int64, bool) {
	rest, ok := strings.CutPrefix(cr, "bytes ")
	if !ok {
		return 0, false
	}
	s, _, ok := strings.Cut(rest, "-")
	if !ok {
		return 0, false
	}
	n, err := strconv.ParseInt(s, 10, 64)
	return n, err == nil
}

// Reader returns the disk file as a stream. It downloads the whole layer
// and checks the layer digest: when it does not match, the Read that
// delivers the last bytes returns an error instead of completing.
func (im *Image) Reader(ctx context.Context) (io.ReadCloser, error) {
	req, err := im.c.newRequest(ctx, http.MethodGet, im.c.url(im.repo, "blobs", im.Layer.Digest.String()), nil)
	if err != nil {
		return nil, err
	}
	resp, err := im.c.do(req, scope{repo: im.repo})
	if err != nil {
		return nil, fmt.Errorf("read %s: getting layer: %w", im.Ref, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("read %s: getting layer: %w", im.Ref, readError(resp))
	}
	h := im.Layer.Digest.Algorithm().Hash()
	if _, err := io.CopyN(h, resp.Body, im.Offset); err != nil {
		resp.Body.Close()
		return nil, fmt.Errorf("read %s: reading layer headers: %w", im.Ref, err)
	}
	// The download and the hash run ahead in a goroutine of their own
	// while the caller writes the bytes out.
	body := pipe.New(resp.Body, h, pipeBuffer, pipeDepth)
	return &verifyingReader{im: im, body: body, raw: resp.Body, h: h, left: im.size}, nil
}

type verifyingReader struct {
	im   *Image
	body *pipe.Reader // hashes into h everything it reads
	raw  io.Closer    // the response body under it
	h    hash.Hash
	left int64
	err  error // sticky end state: io.EOF or the failure
}

func (v *verifyingReader) Read(p []byte) (int, error) {
	if v.err != nil {
		return 0, v.err
	}
	if v.left == 0 {
		v.err = v.verify()
		return 0, v.err
	}
	if int64(len(p)) > v.left {
		p = p[:v.left]
	}
	n, err := v.body.Read(p)
	v.left -= int64(n)
	switch {
	case v.left == 0:
		// Check now, so that the caller cannot take a corrupt last
		// piece for a good end.
		v.err = v.verify()
		if v.err != io.EOF {
			return n, v.err
		}
		return n, nil
	case err == io.EOF:
		v.err = fmt.Errorf("read %s: layer ended %d bytes before the disk file's end: %w", v.im.Ref, v.left, io.ErrUnexpectedEOF)
		return n, v.err
	case err != nil:
		v.err = fmt.Errorf("read %s: %w", v.im.Ref, err)
		return n, v.err
	}
	return n, nil
}

// verify hashes the tar trailer and compares the digest. It returns io.EOF
// when all is well.
func (v *verifyingReader) verify() error {
	tail := v.im.Layer.Size - v.im.Offset - v.im.size
	if _, err := io.CopyN(io.Discard, v.body, tail); err != nil {
		return fmt.Errorf("read %s: reading the layer's end: %w", v.im.Ref, err)
	}
	// The pipe's end: everything it read is hashed once it says io.EOF.
	if n, err := v.body.Read(make([]byte, 1)); n > 0 {
		return fmt.Errorf("read %s: layer is longer than its %d bytes", v.im.Ref, v.im.Layer.Size)
	} else if err != io.EOF {
		return fmt.Errorf("read %s: reading the layer's end: %w", v.im.Ref, err)
	}
	if got := digest.NewDigest(v.im.Layer.Digest.Algorithm(), v.h); got != v.im.Layer.Digest {
		return fmt.Errorf("read %s: layer digest is %s, want %s", v.im.Ref, got, v.im.Layer.Digest)
	}
	return io.EOF
}

// Close closes the response first, so that a download stalled in the
// pipe's goroutine ends, then stops the pipe.
func (v *verifyingReader) Close() error {
	err := v.raw.Close()
	v.body.Close()
	return err
}

// ReaderAt returns random access to the disk file through ranged GETs, for
// callers that need an io.ReaderAt (no context: each attempt is bounded by
// a timeout instead; ReadAtContext takes one).
func (im *Image) ReaderAt() io.ReaderAt { return readerAt{im} }

type readerAt struct{ im *Image }

func (r readerAt) ReadAt(p []byte, off int64) (int, error) {
	return r.im.ReadAtContext(context.Background(), p, off)
}

// readAttempts and readBackoff shape the retries of a ranged read;
// rangeTimeout bounds one attempt, so that a connection that stalls
// (ReaderAt has no context to cancel it) is retried instead of hanging.
const (
	readAttempts = 4
	readBackoff  = 200 * time.Millisecond
	rangeTimeout = 2 * time.Minute
)

// ReadAtContext reads len(p) bytes of the disk file at off (fewer, with
// io.EOF, at the end). A transient failure (connection error, 5xx, 429,
// short body) is retried a few times with backoff.
func (im *Image) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("read %s: negative offset %d", im.Ref, off)
	}
	if off >= im.size {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), im.size-off))
	if n == 0 {
		return 0, nil
	}
	var err error
	for attempt := 0; attempt < readAttempts; attempt++ {
		if attempt > 0 {
			t := time.NewTimer(readBackoff << (attempt - 1))
			select {
			case <-ctx.Done():
				t.Stop()
				return 0, fmt.Errorf("read %s at %d: %w (after %v)", im.Ref, off, ctx.Err(), err)
			case <-t.C:
			}
		}
		actx, cancel := context.WithTimeout(ctx, rangeTimeout)
		err = im.c.readRange(actx, im.repo, im.Layer.Digest, im.Offset+off, p[:n])
		cancel()
		if err == nil || !transient(ctx, err) {
			break
		}
	}
	if err != nil {
		return 0, fmt.Errorf("read %s at %d: %w", im.Ref, off, err)
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// transient tells whether a failed read may succeed if tried again: not
// when the caller gave up, the registry refused (4xx), or TLS
// verification failed; yes for everything else (connection errors, 5xx,
// 429, a body cut short, an attempt that timed out).
func transient(ctx context.Context, err error) bool {
	if ctx.Err() != nil {
		return false
	}
	var re *RegistryError
	if errors.As(err, &re) {
		return re.StatusCode >= 500 || re.StatusCode == http.StatusTooManyRequests || re.StatusCode == http.StatusRequestTimeout
	}
	var certErr *tls.CertificateVerificationError
	var unknownAuthority x509.UnknownAuthorityError
	var hostname x509.HostnameError
	if errors.As(err, &certErr) || errors.As(err, &unknownAuthority) || errors.As(err, &hostname) {
		return false
	}
	return true
}
