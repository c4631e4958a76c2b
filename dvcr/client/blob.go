package client

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"
	"k8s.io/klog/v2"

	"vimg.dev/vimg/dvcr/internal/pipe"
)

// Plain blobs, outside the disk-image layout: an importer that gets a disk
// file of unknown length (a decompressed stream) cannot write the layer's tar
// header, which carries the length, before the end. It stores the stream as
// a blob first (PushBlob), then pushes the layer from it (BlobReader), and
// deletes it (DeleteBlob).

// PushBlob uploads everything r yields, up to its io.EOF, as a blob of repo
// and returns its descriptor (sha256 digest, size, media type
// application/octet-stream). The length need not be known: the bytes go as
// ONE chunked PATCH while SHA-256 is computed on the fly in a goroutine of
// its own, then PUT ?digest= commits the blob. Nothing is buffered on disk.
// On failure the upload session is cancelled; an error from r is what the
// error says, not the transport's complaint about the aborted request.
//
// The blob is referenced by no manifest: the registry's garbage collector
// removes it after its grace period unless DeleteBlob does first.
func (c *Client) PushBlob(ctx context.Context, repo string, r io.Reader) (v1.Descriptor, error) {
	d, err := c.pushBlob(ctx, repo, r)
	if err != nil {
		return v1.Descriptor{}, fmt.Errorf("push blob to %s: %w", repo, err)
	}
	return d, nil
}

func (c *Client) pushBlob(ctx context.Context, repo string, r io.Reader) (v1.Descriptor, error) {
	start := time.Now()
	if err := checkRepo(repo); err != nil {
		return v1.Descriptor{}, err
	}
	sc := scope{repo: repo, push: true}
	// A bodyless request first: it answers the auth challenge, which a
	// one-shot streamed body could not be sent again for.
	session, err := c.startUpload(ctx, repo, sc)
	if err != nil {
		return v1.Descriptor{}, fmt.Errorf("opening blob upload: %w", err)
	}
	src := &streamSource{r: r}
	h := sha256.New()
	body := pipe.New(src, h, pipeBuffer, pipeDepth)
	end := &endReader{r: body, done: make(chan struct{})}
	d, err := c.uploadStream(ctx, session, end, h, sc, src)
	body.Close()
	if err != nil {
		return v1.Descriptor{}, fmt.Errorf("uploading blob: %w", err)
	}
	n := src.n.Load()
	klog.FromContext(ctx).V(2).Info("Pushed blob", "repository", repo, "digest", d, "bytes", n, "duration", time.Since(start))
	return v1.Descriptor{MediaType: "application/octet-stream", Digest: d, Size: n}, nil
}

// uploadStream sends body, of unknown length, to the session with one
// chunked PATCH and commits it. h is complete once body has said io.EOF.
func (c *Client) uploadStream(ctx context.Context, session *url.URL, body *endReader, h hash.Hash, sc scope, src *streamSource) (digest.Digest, error) {
	ok := false
	defer func() {
		if !ok {
			c.cancelUpload(context.WithoutCancel(ctx), session, sc)
		}
	}()
	// Content-Length -1 makes net/http send the body chunked.
	req, err := c.newRequest(ctx, http.MethodPatch, session.String(), io.NopCloser(body))
	if err != nil {
		return "", err
	}
	req.ContentLength = -1
	req.Header.Set("Content-Type", "application/octet-stream")
	resp, err := c.do(req, sc)
	if f := src.Failure(); f != nil {
		if resp != nil {
			resp.Body.Close()
		}
		return "", f
	}
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusAccepted && resp.StatusCode != http.StatusNoContent {
		return "", readError(resp)
	}
	resp.Body.Close()
	loc, err := location(resp)
	if err != nil {
		return "", err
	}
	// The registry answers a chunked body only after its last chunk, which
	// net/http sends only after body said io.EOF: anything else means the
	// registry did not take the whole stream.
	select {
	case <-body.done:
	default:
		return "", errors.New("the registry answered the upload before the end of the stream")
	}
	d := digest.NewDigest(digest.SHA256, h)
	if err := c.commit(ctx, loc, d, nil, 0, sc); err != nil {
		return "", err
	}
	ok = true
	return d, nil
}

// streamSource counts what r yields and keeps its failure where the
// uploading goroutine can see it (r is read by a pipe's goroutine).
type streamSource struct {
	r      io.Reader
	n      atomic.Int64
	failed atomic.Pointer[error]
}

func (s *streamSource) Read(p []byte) (int, error) {
	n, err := s.r.Read(p)
	s.n.Add(int64(n))
	if err != nil && err != io.EOF {
		err = fmt.Errorf("reading source at byte %d: %w", s.n.Load(), err)
		s.failed.Store(&err)
	}
	return n, err
}

// Failure is the source's failure, if any.
func (s *streamSource) Failure() error {
	if p := s.failed.Load(); p != nil {
		return *p
	}
	return nil
}

// endReader closes done when r has said io.EOF: the pipe's consumer side,
// which sees the end only after every byte was hashed.
type endReader struct {
	r    io.Reader
	done chan struct{}
	once sync.Once
}

func (e *endReader) Read(p []byte) (int, error) {
	n, err := e.r.Read(p)
	if err == io.EOF {
		e.once.Do(func() { close(e.done) })
	}
	return n, err
}

// BlobReader streams blob d of repo. It checks the content against d as it
// goes: when the bytes do not match (or stop short of the length the
// registry announced), the Read that reaches the end returns an error
// instead of io.EOF. A missing blob gives an error matching ErrNotFound.
func (c *Client) BlobReader(ctx context.Context, repo string, d digest.Digest) (io.ReadCloser, error) {
	rc, err := c.blobReader(ctx, repo, d)
	if err != nil {
		return nil, fmt.Errorf("read blob %s of %s: %w", d, repo, err)
	}
	return rc, nil
}

func (c *Client) blobReader(ctx context.Context, repo string, d digest.Digest) (io.ReadCloser, error) {
	if err := checkRepo(repo); err != nil {
		return nil, err
	}
	if err := d.Validate(); err != nil {
		return nil, err
	}
	req, err := c.newRequest(ctx, http.MethodGet, c.url(repo, "blobs", d.String()), nil)
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
	h := d.Algorithm().Hash()
	// The download and the hash run ahead in a goroutine of their own
	// while the caller sends the bytes on.
	body := pipe.New(resp.Body, h, pipeBuffer, pipeDepth)
	return &blobReader{d: d, body: body, raw: resp.Body, h: h, size: resp.ContentLength}, nil
}

type blobReader struct {
	d    digest.Digest
	body *pipe.Reader // hashes into h everything it reads
	raw  io.Closer
	h    hash.Hash
	size int64 // announced by the registry, -1 unknown
	n    int64
	err  error // sticky: io.EOF or the failure
}

func (b *blobReader) Read(p []byte) (int, error) {
	if b.err != nil {
		return 0, b.err
	}
	n, err := b.body.Read(p)
	b.n += int64(n)
	switch {
	case err == io.EOF:
		b.err = b.verify()
		return n, b.err
	case err != nil:
		b.err = fmt.Errorf("read blob %s after %d bytes: %w", b.d, b.n, err)
		return n, b.err
	}
	return n, nil
}

// verify is called at the end of the stream; it returns io.EOF when all is
// well.
func (b *blobReader) verify() error {
	if b.size >= 0 && b.n != b.size {
		return fmt.Errorf("read blob %s: got %d of the %d bytes announced: %w", b.d, b.n, b.size, io.ErrUnexpectedEOF)
	}
	if got := digest.NewDigest(b.d.Algorithm(), b.h); got != b.d {
		return fmt.Errorf("read blob %s: content has digest %s", b.d, got)
	}
	return io.EOF
}

// Close closes the response first, so that a download stalled in the
// pipe's goroutine ends, then stops the pipe.
func (b *blobReader) Close() error {
	err := b.raw.Close()
	b.body.Close()
	return err
}

// HeadBlob returns the size of blob d in repo. A missing blob gives an
// error matching ErrNotFound.
func (c *Client) HeadBlob(ctx context.Context, repo string, d digest.Digest) (int64, error) {
	if err := checkRepo(repo); err != nil {
		return 0, fmt.Errorf("head blob %s of %s: %w", d, repo, err)
	}
	n, err := c.headBlob(ctx, repo, d)
	if err != nil {
		return 0, fmt.Errorf("head blob %s of %s: %w", d, repo, err)
	}
	return n, nil
}

// DeleteBlob unlinks blob d from repo (DELETE /v2/<repo>/blobs/<digest>,
// which the registry must allow, as DVCR does). Only the repository's link
// goes: the data stays until garbage collection, and manifests of repo that
// name d would break, so it is meant for blobs no manifest uses (PushBlob's).
// A missing blob gives an error matching ErrNotFound.
func (c *Client) DeleteBlob(ctx context.Context, repo string, d digest.Digest) error {
	if err := c.deleteBlob(ctx, repo, d); err != nil {
		return fmt.Errorf("delete blob %s of %s: %w", d, repo, err)
	}
	return nil
}

func (c *Client) deleteBlob(ctx context.Context, repo string, d digest.Digest) error {
	if err := checkRepo(repo); err != nil {
		return err
	}
	if err := d.Validate(); err != nil {
		return err
	}
	req, err := c.newRequest(ctx, http.MethodDelete, c.url(repo, "blobs", d.String()), nil)
	if err != nil {
		return err
	}
	resp, err := c.do(req, scope{repo: repo, push: true})
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusAccepted && resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusNoContent {
		return readError(resp)
	}
	resp.Body.Close()
	klog.FromContext(ctx).V(2).Info("Deleted blob", "repository", repo, "digest", d)
	return nil
}

// checkRepo refuses what is not a repository name (no tag, no digest, no
// registry host: the client is bound to one).
func checkRepo(repo string) error {
	if repo == "" || strings.ContainsAny(repo, ":@") {
		return fmt.Errorf("invalid repository %q", repo)
	}
	got, _, _, err := parseRef(repo + ":t")
	if err != nil {
		return fmt.Errorf("invalid repository %q: %w", repo, err)
	}
	if got != repo {
		return fmt.Errorf("invalid repository %q (it reads as %q)", repo, got)
	}
	return nil
}
