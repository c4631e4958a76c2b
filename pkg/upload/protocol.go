package upload

import (
	"crypto/sha256"
	"encoding"
	"fmt"
	"net/http"
	"strconv"
	"strings"

	"github.com/opencontainers/go-digest"

	"vimg.dev/vimg/pkg/worker/api"
)

// Headers of the protocol (docs/upload.md).
const (
	// HeaderOffset is how many bytes the upload holds: where to resume.
	HeaderOffset = "Upload-Offset"
	// HeaderLength is the size the client announced, when it did.
	HeaderLength = "Upload-Length"
	// HeaderDone is "true" once the upload is complete.
	HeaderDone = "Upload-Done"
	// HeaderDigest is the digest of a complete upload.
	HeaderDigest = "Upload-Digest"
	// HeaderReceivedDigest is the sha256 digest of the Upload-Offset bytes
	// received so far: a client resuming from a file can check that the
	// partial upload is of the same file.
	HeaderReceivedDigest = "Upload-Received-Digest"
	// HeaderExpires is the deadline for an upload to start (RFC 3339).
	HeaderExpires = "Upload-Expires"
	// HeaderMessage explains an Upload-Offset that went back to 0.
	HeaderMessage = "Upload-Message"
)

// DefaultMaxSize bounds an upload: the largest image vimg accepts.
const DefaultMaxSize int64 = 64 << 40

// parsePath splits /upload/<uid>/<token>[/<file name>]. A trailing file
// name is what `curl -T disk.qcow2 URL/` sends, and is ignored.
func parsePath(p string) (uid, token string, ok bool) {
	rest, found := strings.CutPrefix(p, api.UploadPathPrefix)
	if !found {
		return "", "", false
	}
	parts := strings.SplitN(rest, "/", 3)
	if len(parts) < 2 || !validUID(parts[0]) || !validToken(parts[1]) {
		return "", "", false
	}
	return parts[0], parts[1], true
}

// validUID accepts what a Kubernetes UID looks like (and what may follow
// the Secret name prefix).
func validUID(s string) bool {
	if s == "" || len(s) > 64 {
		return false
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

func validToken(s string) bool {
	if s == "" || len(s) > 256 {
		return false
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}

// contentRange is a request's "Content-Range: bytes <start>-<end>/<total>"
// (total "*": unknown, -1), or "bytes */<total>" (finish: the upload holds
// every byte, commit it).
type contentRange struct {
	start, end, total int64
	finish            bool
}

func parseContentRange(h string) (contentRange, error) {
	spec, ok := strings.CutPrefix(strings.TrimSpace(h), "bytes ")
	if !ok {
		return contentRange{}, fmt.Errorf("Content-Range %q: want bytes <start>-<end>/<total or *>", h)
	}
	rng, tot, ok := strings.Cut(strings.TrimSpace(spec), "/")
	if !ok {
		return contentRange{}, fmt.Errorf("Content-Range %q: want bytes <start>-<end>/<total or *>", h)
	}
	cr := contentRange{total: -1}
	if tot != "*" {
		n, err := strconv.ParseInt(tot, 10, 64)
		if err != nil || n < 0 {
			return contentRange{}, fmt.Errorf("Content-Range %q: bad total", h)
		}
		cr.total = n
	}
	if rng == "*" {
		if cr.total < 0 {
			return contentRange{}, fmt.Errorf("Content-Range %q: bytes */<total> needs the total", h)
		}
		cr.finish = true
		cr.start, cr.end = cr.total, cr.total-1
		return cr, nil
	}
	a, b, ok := strings.Cut(rng, "-")
	start, err1 := strconv.ParseInt(a, 10, 64)
	end, err2 := strconv.ParseInt(b, 10, 64)
	if !ok || err1 != nil || err2 != nil || start < 0 || end < start {
		return contentRange{}, fmt.Errorf("Content-Range %q: bad byte range", h)
	}
	if cr.total >= 0 && end >= cr.total {
		return contentRange{}, fmt.Errorf("Content-Range %q: the range ends beyond the total", h)
	}
	cr.start, cr.end = start, end
	return cr, nil
}

// request is what a PUT announces.
type request struct {
	rng *contentRange // nil: a new upload from byte 0
	// total is the upload's size as announced (Content-Range's total, or
	// Content-Length without Content-Range), -1 unknown.
	total int64
	// length is the number of body bytes to take, -1: up to the body's end.
	length int64
}

// statusError is an answer to a request, with its HTTP status.
type statusError struct {
	status int
	msg    string
	offset int64 // Upload-Offset to announce, -1 none
	done   bool  // Upload-Done: true
}

func (e *statusError) Error() string { return e.msg }

func refuse(status int, offset int64, format string, args ...any) *statusError {
	return &statusError{status: status, msg: fmt.Sprintf(format, args...), offset: offset}
}

func parseRequest(r *http.Request, maxSize int64) (request, error) {
	req := request{total: -1, length: -1}
	if h := r.Header.Get("Content-Range"); h != "" {
		cr, err := parseContentRange(h)
		if err != nil {
			return req, refuse(http.StatusBadRequest, -1, "%v", err)
		}
		req.rng, req.total = &cr, cr.total
		switch {
		case cr.finish && r.ContentLength > 0:
			return req, refuse(http.StatusBadRequest, -1, "Content-Range: bytes */%d completes an upload that holds every byte; it takes no body", cr.total)
		case cr.finish:
			req.length = 0
		default:
			req.length = cr.end - cr.start + 1
			if r.ContentLength >= 0 && r.ContentLength != req.length {
				return req, refuse(http.StatusBadRequest, -1, "Content-Length %d does not match Content-Range %q (%d bytes)", r.ContentLength, h, req.length)
			}
		}
		if cr.total > maxSize || cr.end >= maxSize {
			return req, refuse(http.StatusRequestEntityTooLarge, -1, "the upload is larger than the %d bytes an image may have", maxSize)
		}
		return req, nil
	}
	if r.ContentLength > maxSize {
		return req, refuse(http.StatusRequestEntityTooLarge, -1, "the upload is larger than the %d bytes an image may have", maxSize)
	}
	req.total, req.length = r.ContentLength, r.ContentLength
	return req, nil
}

// receivedDigest is the sha256 digest of the bytes a marshalled hash
// state covers, "" if it cannot be read.
func receivedDigest(hashState []byte) string {
	h := sha256.New()
	if len(hashState) > 0 {
		if err := h.(encoding.BinaryUnmarshaler).UnmarshalBinary(hashState); err != nil {
			return ""
		}
	}
	return digest.NewDigest(digest.SHA256, h).String()
}
