package client

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"
	"k8s.io/klog/v2"

	"vimg.dev/vimg/dvcr/internal/pipe"
)

// Resumable blob uploads. PushBlob sends a whole stream in one go; an upload
// gateway instead receives a blob in pieces over several requests, perhaps
// through several processes, and must be able to carry on from the last
// byte the registry holds. A BlobUpload is one distribution upload session
// (POST /v2/<repo>/blobs/uploads/) whose state (the session's location, the
// number of bytes it holds and the SHA-256 state of those bytes) can be
// saved with State and picked up again with ResumeBlobUpload, in any
// process that can reach the registry.
//
// Each Append is ONE streamed PATCH. When Append's reader fails (a client
// that went away), the PATCH is ended cleanly at the last byte read rather
// than aborted, so that the registry keeps exactly the bytes that were
// hashed and the session stays resumable. Only a failure of the registry
// side (a dropped connection to it, an error answer) leaves the session's
// offset unknown; the BlobUpload is then unusable, State still returns the
// last confirmed point, and ResumeBlobUpload from it fails with
// ErrUploadLost when the registry holds something else.

// ErrUploadLost matches (with errors.Is) the failure to resume a session
// that the registry no longer has (cancelled, purged), or that holds a
// different number of bytes than the state says. The only way on is a new
// upload from byte 0.
var ErrUploadLost = errors.New("the registry's upload session is gone or holds other bytes than expected")

// SourceError is what Append returns when its reader failed: the bytes read
// before the failure are in the session, which stays usable.
type SourceError struct{ Err error }

func (e *SourceError) Error() string { return "reading the upload's source: " + e.Err.Error() }
func (e *SourceError) Unwrap() error { return e.Err }

// BlobUpload is an open blob upload session. It is not safe for concurrent
// use.
type BlobUpload struct {
	c    *Client
	repo string
	sc   scope
	loc  *url.URL
	off  int64
	h    hash.Hash // SHA-256 of the first off bytes (while err is nil)
	// saved is h marshalled at off: State's answer, kept apart from h
	// because a failed Append leaves h ahead of what the registry confirmed.
	saved []byte
	err   error // sticky: the session's offset is unknown, or it is committed
}

// StartBlobUpload opens a new upload session in repo.
func (c *Client) StartBlobUpload(ctx context.Context, repo string) (*BlobUpload, error) {
	if err := checkRepo(repo); err != nil {
		return nil, fmt.Errorf("start blob upload: %w", err)
	}
	sc := scope{repo: repo, push: true}
	loc, err := c.startUpload(ctx, repo, sc)
	if err != nil {
		return nil, fmt.Errorf("start blob upload to %s: %w", repo, err)
	}
	h := sha256.New()
	saved, err := marshalHash(h)
	if err != nil {
		return nil, err
	}
	klog.FromContext(ctx).V(3).Info("Opened blob upload session", "repository", repo)
	return &BlobUpload{c: c, repo: repo, sc: sc, loc: loc, h: h, saved: saved}, nil
}

// ResumeBlobUpload picks up a session saved with State. It asks the
// registry how many bytes the session holds (GET on the location, answered
// with "Range: 0-<last>") and fails with an error matching ErrUploadLost
// when the session is gone or that is not offset. hashState is the SHA-256
// state State returned; empty means offset 0.
//
// The location must be one of this client's registry, in repo: the
// client's credentials go wherever it points.
func (c *Client) ResumeBlobUpload(ctx context.Context, repo, location string, offset int64, hashState []byte) (*BlobUpload, error) {
	b, err := c.resumeBlobUpload(ctx, repo, location, offset, hashState)
	if err != nil {
		return nil, fmt.Errorf("resume blob upload to %s at byte %d: %w", repo, offset, err)
	}
	return b, nil
}

func (c *Client) resumeBlobUpload(ctx context.Context, repo, rawLoc string, offset int64, hashState []byte) (*BlobUpload, error) {
	if err := checkRepo(repo); err != nil {
		return nil, err
	}
	if offset < 0 {
		return nil, fmt.Errorf("negative offset %d", offset)
	}
	loc, err := url.Parse(rawLoc)
	if err != nil {
		return nil, fmt.Errorf("%w: unparsable location", ErrUploadLost)
	}
	if loc.Scheme+"://"+loc.Host != c.base || !strings.HasPrefix(loc.Path, "/v2/"+repo+"/blobs/uploads/") || loc.User != nil {
		// Not an error of the registry: a state that names another host or
		// repository is refused before any credential is sent there.
		return nil, fmt.Errorf("%w: the location is not an upload of %s at %s", ErrUploadLost, repo, c.registry)
	}
	h := sha256.New()
	if offset > 0 || len(hashState) > 0 {
		if err := h.(encoding.BinaryUnmarshaler).UnmarshalBinary(hashState); err != nil {
			return nil, fmt.Errorf("%w: unusable hash state: %v", ErrUploadLost, err)
		}
		if n, ok := hashedLength(hashState); ok && n != offset {
			return nil, fmt.Errorf("%w: the hash state covers %d bytes, not %d", ErrUploadLost, n, offset)
		}
	}
	sc := scope{repo: repo, push: true}
	req, err := c.newRequest(ctx, http.MethodGet, loc.String(), nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.do(req, sc)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusNoContent && resp.StatusCode != http.StatusOK {
		err := readError(resp)
		switch ErrorCode(err) {
		case "BLOB_UPLOAD_UNKNOWN", "BLOB_UPLOAD_INVALID", "RANGE_INVALID", "NOT_FOUND":
			// distribution answers RANGE_INVALID when the session's size
			// differs from the offset its location was issued at.
			return nil, fmt.Errorf("%w: %v", ErrUploadLost, err)
		}
		return nil, err
	}
	resp.Body.Close()
	if err := checkRange(resp.Header.Get("Range"), offset); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrUploadLost, err)
	}
	if l := resp.Header.Get("Location"); l != "" {
		if loc, err = location(resp); err != nil {
			return nil, err
		}
	}
	saved, err := marshalHash(h)
	if err != nil {
		return nil, err
	}
	return &BlobUpload{c: c, repo: repo, sc: sc, loc: loc, off: offset, h: h, saved: saved}, nil
}

// Append sends everything r yields, up to its first error, as one streamed
// PATCH, hashing it on the way, and returns how many bytes it added.
//
// io.EOF and any other error of r end the PATCH cleanly: the registry keeps
// the bytes r gave before it failed, and the session goes on from there. A
// failure of r is returned as a *SourceError together with the bytes
// added. Any other error is the registry's (or ctx's): the session's offset
// is then unknown and the BlobUpload unusable; State still gives the
// offset before this Append, which ResumeBlobUpload verifies.
//
// The PATCH carries no Content-Range: its length is not known before r
// ends, and distribution checks Content-Range only together with a
// Content-Length. The session's offset is checked by the registry anyway,
// against the one its location was issued at.
func (b *BlobUpload) Append(ctx context.Context, r io.Reader) (int64, error) {
	if b.err != nil {
		return 0, b.err
	}
	n, err := b.append(ctx, r)
	var se *SourceError
	if err != nil && !errors.As(err, &se) {
		b.err = fmt.Errorf("blob upload to %s broke (the session held %d bytes before this request): %w", b.repo, b.off, err)
		return 0, b.err
	}
	return n, err
}

func (b *BlobUpload) append(ctx context.Context, r io.Reader) (int64, error) {
	src := &cleanEndReader{r: r}
	// Reading and hashing run ahead in a goroutine of their own while this
	// one sends, as in Push.
	body := pipe.New(src, b.h, pipeBuffer, pipeDepth)
	end := &endReader{r: body, done: make(chan struct{})}
	req, err := b.c.newRequest(ctx, http.MethodPatch, b.loc.String(), io.NopCloser(end))
	if err != nil {
		body.Close()
		return 0, err
	}
	req.ContentLength = -1 // chunked
	req.Header.Set("Content-Type", "application/octet-stream")
	resp, err := b.c.do(req, b.sc)
	// Close waits for a read of r in progress: r belongs to the caller
	// again once Append returns.
	body.Close()
	if err != nil {
		return 0, err
	}
	if resp.StatusCode != http.StatusAccepted && resp.StatusCode != http.StatusNoContent {
		return 0, readError(resp)
	}
	resp.Body.Close()
	select {
	case <-end.done:
	default:
		return 0, errors.New("the registry answered the PATCH before the end of its body")
	}
	n := src.n.Load()
	if err := checkRange(resp.Header.Get("Range"), b.off+n); err != nil {
		return 0, err
	}
	loc, err := location(resp)
	if err != nil {
		return 0, err
	}
	saved, err := marshalHash(b.h)
	if err != nil {
		return 0, err
	}
	b.loc, b.off, b.saved = loc, b.off+n, saved
	if f := src.failure(); f != nil {
		return n, &SourceError{Err: f}
	}
	return n, nil
}

// State returns what ResumeBlobUpload needs to carry on: the session's
// location, the number of bytes it holds and the marshalled SHA-256 state
// of those bytes. After a failed Append it is the state before it.
func (b *BlobUpload) State() (location string, offset int64, hashState []byte) {
	return b.loc.String(), b.off, bytes.Clone(b.saved)
}

// Offset is the number of bytes the session holds.
func (b *BlobUpload) Offset() int64 { return b.off }

// Digest is the digest of the bytes the session holds so far.
func (b *BlobUpload) Digest() digest.Digest {
	h := sha256.New()
	if err := h.(encoding.BinaryUnmarshaler).UnmarshalBinary(b.saved); err != nil {
		return ""
	}
	return digest.NewDigest(digest.SHA256, h)
}

// Commit turns the session into a blob of repo (PUT ?digest=) and returns
// its descriptor (media type application/octet-stream). If an earlier
// Commit reached the registry but its answer was lost, the blob is found
// by its digest instead.
func (b *BlobUpload) Commit(ctx context.Context) (v1.Descriptor, error) {
	if b.err != nil {
		return v1.Descriptor{}, b.err
	}
	d := b.Digest()
	if d == "" {
		return v1.Descriptor{}, fmt.Errorf("commit blob upload to %s: unusable hash state", b.repo)
	}
	desc := v1.Descriptor{MediaType: "application/octet-stream", Digest: d, Size: b.off}
	if err := b.c.commit(ctx, b.loc, d, nil, 0, b.sc); err != nil {
		if n, herr := b.c.headBlob(ctx, b.repo, d); herr == nil && n == b.off {
			b.err = errors.New("the blob upload is committed")
			return desc, nil
		}
		return v1.Descriptor{}, fmt.Errorf("commit blob upload to %s (%d bytes, %s): %w", b.repo, b.off, d, err)
	}
	b.err = errors.New("the blob upload is committed")
	klog.FromContext(ctx).V(2).Info("Committed blob upload", "repository", b.repo, "digest", d, "bytes", b.off)
	return desc, nil
}

// Cancel asks the registry to drop the session (DELETE, which needs the
// delete action on the repository; without it the registry's purge of
// stale uploads removes it later). The BlobUpload is unusable afterwards.
func (b *BlobUpload) Cancel(ctx context.Context) error {
	b.err = errors.New("the blob upload is cancelled")
	req, err := b.c.newRequest(ctx, http.MethodDelete, b.loc.String(), nil)
	if err != nil {
		return err
	}
	resp, err := b.c.do(req, b.sc)
	if err != nil {
		return fmt.Errorf("cancel blob upload to %s: %w", b.repo, err)
	}
	if resp.StatusCode != http.StatusNoContent && resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusNotFound {
		return fmt.Errorf("cancel blob upload to %s: %w", b.repo, readError(resp))
	}
	resp.Body.Close()
	return nil
}

// cleanEndReader turns r's failure into io.EOF, so that the PATCH it feeds
// ends cleanly, and keeps the failure for Append to return. It counts the
// bytes r gave (it is read in a pipe's goroutine).
type cleanEndReader struct {
	r      io.Reader
	n      atomic.Int64
	failed atomic.Pointer[error]
}

func (c *cleanEndReader) Read(p []byte) (int, error) {
	if c.failed.Load() != nil {
		return 0, io.EOF
	}
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	if err != nil && err != io.EOF {
		f := err
		c.failed.Store(&f)
		err = io.EOF
	}
	return n, err
}

func (c *cleanEndReader) failure() error {
	if p := c.failed.Load(); p != nil {
		return *p
	}
	return nil
}

func marshalHash(h hash.Hash) ([]byte, error) {
	m, ok := h.(encoding.BinaryMarshaler)
	if !ok {
		return nil, errors.New("the hash cannot save its state")
	}
	b, err := m.MarshalBinary()
	if err != nil {
		return nil, fmt.Errorf("saving the hash state: %w", err)
	}
	return b, nil
}

// hashedLength reads the message length out of a marshalled SHA-256 state
// (Go's format: "sha\x03", 8 words of state, a 64-byte block, the length as
// 8 big-endian bytes). ok is false for any other format, which is then
// trusted as it is.
func hashedLength(state []byte) (int64, bool) {
	const size = 4 + 8*4 + 64 + 8
	if len(state) != size || string(state[:4]) != "sha\x03" {
		return 0, false
	}
	return int64(binary.BigEndian.Uint64(state[size-8:])), true
}

// checkRange checks a registry's "Range: 0-<last>" answer against the
// number of bytes a session should hold. distribution writes "0-0" for an
// empty session as well as for one byte, so that answer fits both.
func checkRange(h string, want int64) error {
	h = strings.TrimPrefix(strings.TrimSpace(h), "bytes=")
	if h == "" {
		if want == 0 {
			return nil
		}
		return fmt.Errorf("the registry did not say how many bytes the session holds (want %d)", want)
	}
	lo, hi, ok := strings.Cut(h, "-")
	first, err1 := strconv.ParseInt(lo, 10, 64)
	last, err2 := strconv.ParseInt(hi, 10, 64)
	if !ok || err1 != nil || err2 != nil || first != 0 || last < 0 {
		return fmt.Errorf("unexpected Range %q in the registry's answer", h)
	}
	if last+1 == want || (last == 0 && want == 0) {
		return nil
	}
	return fmt.Errorf("the registry's session holds %d bytes, not %d", last+1, want)
}
