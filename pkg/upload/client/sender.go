// Package client is the user's side of an upload (`vimg upload`): it finds
// or creates the image, waits for its upload URL, sends the file to the
// upload gateway, resuming after dropped connections, and waits for the
// import to finish.
package client

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"

	"vimg.dev/vimg/pkg/upload"
)

// Sender sends a file to an upload URL (the protocol of docs/upload.md).
type Sender struct {
	// HTTP talks to the gateway; it must have no overall timeout.
	HTTP *http.Client
	// Progress, when set, is called as the body is read with the bytes
	// the upload holds so far (as far as this side knows) and the total
	// (-1 unknown).
	Progress func(sent, total int64)
	// Notice, when set, receives messages for the user: resuming,
	// starting over, waiting for a busy upload.
	Notice func(msg string)
	// Attempts is how many requests in a row may fail without the upload
	// getting further before Send gives up (default 8).
	Attempts int
	// Backoff is the first wait after a failure, doubled after each
	// (default 1 s, at most 30 s).
	Backoff time.Duration
	// StallTimeout abandons a request that could send nothing for this
	// long (default 2 min, as the gateway's idle timeout).
	StallTimeout time.Duration
}

// Result is what the gateway stored.
type Result = upload.Result

// HTTPError is an answer of the gateway other than success.
type HTTPError struct {
	Status  int
	Message string // the gateway's text
	Offset  int64  // Upload-Offset, -1 absent
	Done    bool
}

func (e *HTTPError) Error() string {
	msg := e.Message
	if msg == "" {
		msg = http.StatusText(e.Status)
	}
	return fmt.Sprintf("the upload gateway answered %d: %s", e.Status, msg)
}

// permanent says whether sending again cannot help.
func (e *HTTPError) permanent() bool {
	switch e.Status {
	case http.StatusBadRequest, http.StatusForbidden, http.StatusNotFound, http.StatusMethodNotAllowed,
		http.StatusGone, http.StatusRequestEntityTooLarge, http.StatusUnauthorized:
		return true
	}
	return false
}

func (s *Sender) notice(format string, args ...any) {
	if s.Notice != nil {
		s.Notice(fmt.Sprintf(format, args...))
	}
}

func (s *Sender) defaults() (attempts int, backoff, stall time.Duration) {
	attempts, backoff, stall = s.Attempts, s.Backoff, s.StallTimeout
	if attempts <= 0 {
		attempts = 8
	}
	if backoff <= 0 {
		backoff = time.Second
	}
	if stall <= 0 {
		stall = 2 * time.Minute
	}
	return
}

// SendFile uploads size bytes of f to uploadURL. It picks up where an earlier
// upload of the same file stopped (the gateway's digest of the bytes it
// holds is checked against the file first), and after a failure asks the
// gateway how far it got and resumes from there.
func (s *Sender) SendFile(ctx context.Context, uploadURL string, f io.ReaderAt, size int64) (Result, error) {
	attempts, backoff, _ := s.defaults()
	fails, best := 0, int64(-1)
	checkPrefix := true
	var last error
	for {
		if fails > 0 {
			if fails >= attempts {
				return Result{}, fmt.Errorf("giving up after %d attempts without progress: %w", fails, last)
			}
			wait := min(backoff<<(fails-1), 30*time.Second)
			select {
			case <-ctx.Done():
				return Result{}, fmt.Errorf("%w (last failure: %v)", ctx.Err(), last)
			case <-time.After(wait):
			}
		}
		st, err := s.head(ctx, uploadURL)
		if err != nil {
			var he *HTTPError
			if errors.As(err, &he) && he.permanent() || ctx.Err() != nil {
				return Result{}, err
			}
			fails, last = fails+1, err
			continue
		}
		if st.done {
			if st.offset != size {
				return Result{}, fmt.Errorf("the image already holds a complete upload of %d bytes, not this file's %d: to upload another file, delete the image and create it again", st.offset, size)
			}
			return Result{Digest: st.digest, Size: st.offset}, nil
		}
		if st.message != "" {
			s.notice("%s", st.message)
		}
		off := st.offset
		if off > 0 && (off > size || st.length >= 0 && st.length != size) {
			s.notice("the upload holds %d bytes of a file of another size; starting over", off)
			off = 0
		}
		if off > 0 && checkPrefix && st.receivedDigest != "" {
			// A partial upload from an earlier run: of this file?
			d, err := prefixDigest(f, off)
			if err != nil {
				return Result{}, err
			}
			if d != st.receivedDigest {
				s.notice("the upload holds %d bytes of another file; starting over", off)
				off = 0
			}
		}
		checkPrefix = false
		if off > best {
			best, fails = off, 0
		}
		if off > 0 {
			s.notice("resuming at byte %d of %d", off, size)
		}
		res, err := s.put(ctx, uploadURL, f, off, size)
		if err == nil {
			return res, nil
		}
		var he *HTTPError
		if errors.As(err, &he) && he.permanent() || ctx.Err() != nil {
			return Result{}, err
		}
		if errors.As(err, &he) && he.Status == http.StatusConflict && !he.Done {
			s.notice("another upload to this image is in progress; waiting")
		} else if !errors.As(err, &he) || he.Status != http.StatusRequestedRangeNotSatisfiable {
			s.notice("the upload was interrupted (%v); resuming", err)
		}
		fails, last = fails+1, err
	}
}

// SendStream uploads everything r yields, in one request: a stream
// cannot be read again, so a failure cannot be resumed.
func (s *Sender) SendStream(ctx context.Context, uploadURL string, r io.Reader) (Result, error) {
	body := &countingReader{r: r, progress: s.Progress, total: -1}
	res, err := s.do(ctx, uploadURL, body, -1, "")
	if err != nil {
		return Result{}, fmt.Errorf("%w; an upload from a stream cannot be resumed: run the command again (it starts over), or upload from a file", err)
	}
	return res, nil
}

// remoteState is a HEAD's answer.
type remoteState struct {
	offset, length int64
	done           bool
	digest         string
	receivedDigest string
	message        string
}

func (s *Sender) head(ctx context.Context, uploadURL string) (remoteState, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodHead, uploadURL, nil)
	if err != nil {
		return remoteState{}, err
	}
	resp, err := s.HTTP.Do(req)
	if err != nil {
		return remoteState{}, fmt.Errorf("asking the upload gateway how far the upload is: %w", redact(err))
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		e := answerError(resp, "")
		if resp.StatusCode == http.StatusNotFound {
			e.Message = "no upload at this URL: the image was deleted, or recreated with a new URL"
		}
		return remoteState{}, e
	}
	h := resp.Header
	st := remoteState{length: -1, done: h.Get(upload.HeaderDone) == "true", digest: h.Get(upload.HeaderDigest),
		receivedDigest: h.Get(upload.HeaderReceivedDigest), message: h.Get(upload.HeaderMessage)}
	if st.offset, err = strconv.ParseInt(h.Get(upload.HeaderOffset), 10, 64); err != nil || st.offset < 0 {
		return remoteState{}, fmt.Errorf("the upload gateway's answer has no usable %s", upload.HeaderOffset)
	}
	if l := h.Get(upload.HeaderLength); l != "" {
		st.length, _ = strconv.ParseInt(l, 10, 64)
	}
	return st, nil
}

// put sends bytes off..size-1 of f.
func (s *Sender) put(ctx context.Context, uploadURL string, f io.ReaderAt, off, size int64) (Result, error) {
	var cr string
	switch {
	case off > 0 && off == size:
		cr = fmt.Sprintf("bytes */%d", size) // every byte is there: finish
	case off > 0:
		cr = fmt.Sprintf("bytes %d-%d/%d", off, size-1, size)
	}
	body := &countingReader{r: io.NewSectionReader(f, off, size-off), base: off, total: size, progress: s.Progress}
	return s.do(ctx, uploadURL, body, size-off, cr)
}

// do sends one PUT. A request that can send nothing for StallTimeout is
// abandoned (a connection that died without a word).
func (s *Sender) do(ctx context.Context, uploadURL string, body *countingReader, length int64, contentRange string) (Result, error) {
	_, _, stall := s.defaults()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, uploadURL, body)
	if err != nil {
		return Result{}, err
	}
	req.ContentLength = length
	if length == 0 {
		req.Body = http.NoBody
	}
	req.Header.Set("Content-Type", "application/octet-stream")
	// The gateway refuses a busy, complete or expired upload before the
	// body: no need to send it.
	req.Header.Set("Expect", "100-continue")
	if contentRange != "" {
		req.Header.Set("Content-Range", contentRange)
	}
	body.touch()
	stalled := make(chan struct{})
	done := make(chan struct{})
	defer close(done)
	go func() {
		t := time.NewTicker(min(stall/4, time.Second))
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				if !body.finished.Load() && time.Since(time.Unix(0, body.last.Load())) > stall {
					close(stalled)
					cancel()
					return
				}
			}
		}
	}()
	resp, err := s.HTTP.Do(req)
	if err != nil {
		select {
		case <-stalled:
			return Result{}, fmt.Errorf("nothing could be sent for %s", stall)
		default:
		}
		return Result{}, fmt.Errorf("sending to the upload gateway: %w", redact(err))
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		return Result{}, answerError(resp, "")
	}
	var res Result
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<10)).Decode(&res); err != nil || res.Digest == "" {
		return Result{}, fmt.Errorf("the upload gateway's answer is not a result: %v", err)
	}
	return res, nil
}

func answerError(resp *http.Response, fallback string) *HTTPError {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 16<<10))
	e := &HTTPError{Status: resp.StatusCode, Message: strings.TrimSpace(string(b)), Offset: -1, Done: resp.Header.Get(upload.HeaderDone) == "true"}
	if e.Message == "" {
		e.Message = fallback
	}
	if o, err := strconv.ParseInt(resp.Header.Get(upload.HeaderOffset), 10, 64); err == nil {
		e.Offset = o
	}
	return e
}

// redact keeps the upload URL, which holds its token, out of an error: Go's
// HTTP client names the URL in its errors.
func redact(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return fmt.Errorf("%s: %w", ue.Op, ue.Err)
	}
	return err
}

// prefixDigest is the sha256 digest of the first n bytes of f.
func prefixDigest(f io.ReaderAt, n int64) (string, error) {
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(f, 0, n)); err != nil {
		return "", fmt.Errorf("reading the file to compare it with the partial upload: %w", err)
	}
	return digest.NewDigest(digest.SHA256, h).String(), nil
}

// countingReader reports progress and when it was last read.
type countingReader struct {
	r        io.Reader
	base     int64 // bytes the upload held before this request
	total    int64
	n        int64
	progress func(sent, total int64)
	last     atomic.Int64 // unix nanoseconds of the last read
	finished atomic.Bool
}

func (c *countingReader) touch() { c.last.Store(time.Now().UnixNano()) }

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	c.touch()
	if n > 0 && c.progress != nil {
		c.progress(c.base+c.n, c.total)
	}
	if err == io.EOF {
		c.finished.Store(true)
	}
	return n, err
}
