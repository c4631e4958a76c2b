package source

import (
	"errors"
	"fmt"
	"io"
	"net/http"
)

func (s *httpSource) Stream() (io.ReadCloser, error) {
	s.mu.Lock()
	if s.streamed {
		s.mu.Unlock()
		return nil, ErrStreamUsed
	}
	if s.closed {
		s.mu.Unlock()
		return nil, s.wrap(ErrClosed)
	}
	s.streamed = true
	s.mu.Unlock()
	st := &httpStream{s: s, rs: retryState{s: s}, end: -1}
	st.resp, st.a, st.end = s.takeProbe()
	return st, nil
}

// httpStream is one GET from offset 0, continued with "Range: bytes=N-"
// whenever the connection is lost, where N counts the bytes received.
type httpStream struct {
	s          *httpSource
	resp       *http.Response
	a          *attempt
	end        int64 // offset just past what resp promises, -1 unknown
	off        int64 // bytes delivered
	progressed bool  // data arrived since the last failure
	rs         retryState
	err        error // sticky
}

func (st *httpStream) Read(p []byte) (int, error) {
	if st.err != nil {
		return 0, st.err
	}
	if len(p) == 0 {
		return 0, nil
	}
	s := st.s
	for {
		if st.resp == nil {
			if s.size >= 0 && st.off >= s.size {
				st.err = io.EOF
				return 0, io.EOF
			}
			if err := st.open(); err != nil {
				if err = st.fail(err); err != nil {
					return 0, err
				}
				continue
			}
		}
		if s.size >= 0 && st.off >= s.size {
			st.closeResp()
			st.err = io.EOF
			return 0, io.EOF
		}
		if s.size >= 0 && int64(len(p)) > s.size-st.off {
			// Never hand out more than the size the probe promised.
			p = p[:s.size-st.off]
		}
		a := st.a
		n, err := a.read(st.resp.Body, p)
		st.off += int64(n)
		if n > 0 {
			st.progressed = true
		}
		if err == nil {
			return n, nil
		}
		st.closeResp()
		if err == io.EOF {
			switch {
			case st.end >= 0 && st.off < st.end:
				err = io.ErrUnexpectedEOF
			case s.size >= 0 && st.off < s.size && st.end == st.off:
				// The server sent a shorter range than asked for:
				// ask for the rest, no failure.
				if n > 0 {
					return n, nil
				}
				continue
			case s.size >= 0 && st.off < s.size:
				err = io.ErrUnexpectedEOF
			default:
				st.err = io.EOF
				return n, io.EOF
			}
		} else {
			err = s.bodyErr(a, err)
		}
		if err = st.fail(err); err != nil && n == 0 {
			return 0, err
		}
		if n > 0 {
			return n, nil
		}
	}
}

// fail decides whether a failed attempt can be resumed, waiting out the
// backoff if so. It returns the sticky error otherwise.
func (st *httpStream) fail(err error) error {
	s := st.s
	switch {
	case s.ctx.Err() != nil:
		err = s.ctxErr()
	case st.off > 0 && !s.resumable && !isPermanent(err):
		err = fmt.Errorf("connection lost after %d bytes and the server does not support Range requests: %w", st.off, err)
	default:
		progressed := st.progressed
		st.progressed = false
		if err = st.rs.next(err, progressed); err == nil {
			return nil
		}
		if !isPermanent(err) && s.ctx.Err() == nil && st.off > 0 {
			err = fmt.Errorf("connection lost after %d bytes, %w", st.off, err)
		}
	}
	st.err = s.wrap(err)
	return st.err
}

// open starts the request for the bytes from st.off on. A server without
// Range support can still be asked again from the start, as long as
// nothing was delivered yet.
func (st *httpStream) open() error {
	s := st.s
	a := s.newAttempt()
	rangeHdr := ""
	if s.resumable {
		rangeHdr = fmt.Sprintf("bytes=%d-", st.off)
	}
	resp, err := s.do(a, s.url, rangeHdr, st.off > 0)
	if err != nil {
		a.end()
		return err
	}
	end, err := s.checkResponse(resp, st.off, -1)
	if err != nil {
		drainClose(resp)
		a.end()
		return err
	}
	st.resp, st.a, st.end = resp, a, end
	return nil
}

func (st *httpStream) closeResp() {
	if st.resp != nil {
		st.resp.Body.Close()
		st.a.end()
		st.resp, st.a = nil, nil
	}
}

// Close ends the stream; the Source stays open.
func (st *httpStream) Close() error {
	st.closeResp()
	if st.err == nil || errors.Is(st.err, io.EOF) {
		st.err = errors.New("source: read from a closed stream")
	}
	return nil
}
