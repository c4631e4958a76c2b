package source

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log"
	"math/big"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// reqLog is what a test server saw.
type reqLog struct {
	Path, Range, IfRange, Auth, Token string
}

// rangeServer serves data with optional Range support, and can cut
// responses short, change its ETag, or lie in Content-Range.
type rangeServer struct {
	*httptest.Server
	data      []byte
	noRange   bool
	chunked   bool
	drops     atomic.Int32 // this many next responses are cut after dropAfter body bytes
	dropAfter int
	etag      func(n int) string // per request number; nil means a fixed one
	badRange  bool               // Content-Range start off by one for ranged requests not at 0
	maxChunk  int                // cap on the bytes of a 206
	hook      func(w http.ResponseWriter, r *http.Request, n int) bool

	mu  sync.Mutex
	log []reqLog
}

func newRangeServer(t testing.TB, data []byte) *rangeServer {
	s := &rangeServer{data: data}
	s.Server = httptest.NewServer(s)
	t.Cleanup(s.Close)
	return s
}

func (s *rangeServer) requests() []reqLog {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]reqLog(nil), s.log...)
}

func (s *rangeServer) ranges() []string {
	var out []string
	for _, l := range s.requests() {
		out = append(out, l.Range)
	}
	return out
}

func (s *rangeServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	n := len(s.log)
	s.log = append(s.log, reqLog{Path: r.URL.Path, Range: r.Header.Get("Range"), IfRange: r.Header.Get("If-Range"),
		Auth: r.Header.Get("Authorization"), Token: r.Header.Get("X-Token")})
	s.mu.Unlock()
	if s.hook != nil && s.hook(w, r, n) {
		return
	}
	h := w.Header()
	if s.etag != nil {
		h.Set("ETag", s.etag(n))
	} else {
		h.Set("ETag", `"v1"`)
	}
	body, status := s.data, http.StatusOK
	if !s.noRange {
		h.Set("Accept-Ranges", "bytes")
		if rg := r.Header.Get("Range"); rg != "" {
			a, b, ok := parseRangeHeader(rg, len(s.data))
			if !ok {
				h.Set("Content-Range", fmt.Sprintf("bytes */%d", len(s.data)))
				w.WriteHeader(http.StatusRequestedRangeNotSatisfiable)
				return
			}
			if s.maxChunk > 0 && b-a+1 > s.maxChunk {
				b = a + s.maxChunk - 1
			}
			body, status = s.data[a:b+1], http.StatusPartialContent
			cs := a
			if s.badRange && a > 0 {
				cs++
			}
			h.Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", cs, b, len(s.data)))
		}
	}
	if !s.chunked {
		h.Set("Content-Length", strconv.Itoa(len(body)))
	}
	if s.drops.Add(-1) >= 0 && len(body) > s.dropAfter {
		cutConnection(w, status, body, s.dropAfter, s.chunked)
		return
	}
	w.WriteHeader(status)
	if s.chunked {
		for len(body) > 0 {
			k := min(len(body), 10000)
			w.Write(body[:k])
			w.(http.Flusher).Flush()
			body = body[k:]
		}
		return
	}
	w.Write(body)
}

// cutConnection writes the headers and the first n bytes of body, then
// closes the TCP connection under the client's feet.
func cutConnection(w http.ResponseWriter, status int, body []byte, n int, chunked bool) {
	hdr := w.Header().Clone()
	conn, bw, err := w.(http.Hijacker).Hijack()
	if err != nil {
		panic(err)
	}
	defer conn.Close()
	fmt.Fprintf(bw, "HTTP/1.1 %d %s\r\n", status, http.StatusText(status))
	if chunked {
		hdr.Set("Transfer-Encoding", "chunked")
	}
	hdr.Write(bw)
	bw.WriteString("\r\n")
	if chunked {
		fmt.Fprintf(bw, "%x\r\n", len(body))
	}
	bw.Write(body[:n])
	bw.Flush()
}

func parseRangeHeader(v string, size int) (int, int, bool) {
	spec, ok := strings.CutPrefix(v, "bytes=")
	if !ok {
		return 0, 0, false
	}
	as, bs, ok := strings.Cut(spec, "-")
	if !ok {
		return 0, 0, false
	}
	a, err := strconv.Atoi(as)
	if err != nil || a >= size {
		return 0, 0, false
	}
	b := size - 1
	if bs != "" {
		if b, err = strconv.Atoi(bs); err != nil || b < a {
			return 0, 0, false
		}
		b = min(b, size-1)
	}
	return a, b, true
}

func openHTTP(t testing.TB, u string, opts HTTPOptions) Source {
	t.Helper()
	src, err := OpenHTTP(context.Background(), u, opts)
	if err != nil {
		t.Fatalf("OpenHTTP: %v", err)
	}
	t.Cleanup(func() { src.Close() })
	return src
}

func TestHTTPFileServer(t *testing.T) {
	data := testData(3<<20+12345, 10)
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "x.img"), data, 0o644)
	var mu sync.Mutex
	var ranges []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		ranges = append(ranges, r.Header.Get("Range"))
		mu.Unlock()
		http.FileServer(http.Dir(dir)).ServeHTTP(w, r)
	}))
	defer srv.Close()

	src := openHTTP(t, srv.URL+"/x.img", HTTPOptions{ReadAhead: 256 << 10})
	if src.Size() != int64(len(data)) {
		t.Fatalf("Size = %d, want %d", src.Size(), len(data))
	}
	if got := readStream(t, src); !bytes.Equal(got, data) {
		t.Fatal("stream differs")
	}
	if len(ranges) != 1 || ranges[0] != "bytes=0-" {
		t.Fatalf("stream made requests %q, want just the probe", ranges)
	}

	src = openHTTP(t, srv.URL+"/x.img", HTTPOptions{ReadAhead: 256 << 10})
	ra := src.ReaderAt()
	if ra == nil {
		t.Fatal("ReaderAt is nil for http.FileServer")
	}
	checkReaderAt(t, ra, data)
	concurrentReads(t, ra, data, 8, 100)
}

// concurrentReads reads random pieces from several goroutines.
func concurrentReads(t *testing.T, ra io.ReaderAt, data []byte, workers, reads int) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for g := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := mrand.New(mrand.NewPCG(uint64(g), 99))
			for range reads {
				off := rng.Int64N(int64(len(data)))
				n := 1 + rng.IntN(150000)
				buf := make([]byte, n)
				got, err := ra.ReadAt(buf, off)
				end := min(off+int64(n), int64(len(data)))
				if got != int(end-off) || (err != nil && err != io.EOF) || !bytes.Equal(buf[:got], data[off:end]) {
					errs <- fmt.Errorf("ReadAt(%d at %d) = %d, %v or wrong bytes", n, off, got, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

func TestHTTPReaderAtConcurrent(t *testing.T) {
	data := testData(3<<20+777, 11)
	srv := newRangeServer(t, data)
	src := openHTTP(t, srv.URL+"/x.img", HTTPOptions{ReadAhead: 64 << 10})
	ra := src.ReaderAt()
	if ra == nil {
		t.Fatal("ReaderAt is nil")
	}
	concurrentReads(t, ra, data, 8, 200)
	checkReaderAt(t, ra, data)
	h := ra.(*httpReaderAt)
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.nbufs > cacheWindows || len(h.entries) > cacheWindows {
		t.Fatalf("cache holds %d buffers, %d windows; limit %d", h.nbufs, len(h.entries), cacheWindows)
	}
}

// TestHTTPReaderAtRequestCount reads like a converter: four goroutines
// taking ascending 64 KiB clusters in turn. Each window must be fetched
// about once.
func TestHTTPReaderAtRequestCount(t *testing.T) {
	const ws = 256 << 10
	data := testData(4<<20+100, 12)
	srv := newRangeServer(t, data)
	src := openHTTP(t, srv.URL+"/x.img", HTTPOptions{ReadAhead: ws})
	ra := src.ReaderAt()
	const cluster = 64 << 10
	nclusters := (len(data) + cluster - 1) / cluster
	var next atomic.Int64
	var wg sync.WaitGroup
	var bad atomic.Bool
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, cluster)
			for {
				i := int(next.Add(1) - 1)
				if i >= nclusters {
					return
				}
				off := int64(i) * cluster
				n, err := ra.ReadAt(buf, off)
				end := min(off+cluster, int64(len(data)))
				if (err != nil && err != io.EOF) || !bytes.Equal(buf[:n], data[off:end]) {
					bad.Store(true)
				}
			}
		}()
	}
	wg.Wait()
	if bad.Load() {
		t.Fatal("wrong bytes")
	}
	nwin := (len(data) + ws - 1) / ws
	reqs := srv.requests()
	// The probe serves window 0; every other window costs one request.
	if len(reqs) > nwin+1 {
		t.Fatalf("%d requests for %d windows: %q", len(reqs), nwin, srv.ranges())
	}
	t.Logf("%d requests for %d windows", len(reqs), nwin)
}

func TestHTTPStreamResume(t *testing.T) {
	data := testData(1<<20+5, 13)
	srv := newRangeServer(t, data)
	srv.dropAfter = 100000
	srv.drops.Store(6)
	// Two retries are enough because each retry makes progress.
	src := openHTTP(t, srv.URL+"/x.img", HTTPOptions{Retries: 2})
	if got := readStream(t, src); !bytes.Equal(got, data) {
		t.Fatalf("stream differs (%d bytes, want %d)", len(got), len(data))
	}
	reqs := srv.requests()
	want := []string{"bytes=0-"}
	for i := 1; i <= 6; i++ {
		want = append(want, fmt.Sprintf("bytes=%d-", i*100000))
	}
	if got := srv.ranges(); strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("Range headers %q, want %q", got, want)
	}
	for _, r := range reqs[1:] {
		if r.IfRange != `"v1"` {
			t.Fatalf("resume without If-Range: %+v", r)
		}
	}
}

func TestHTTPStreamGivesUp(t *testing.T) {
	data := testData(100000, 14)
	srv := newRangeServer(t, data)
	srv.dropAfter = 0 // no progress at all
	srv.drops.Store(100)
	_, err := OpenHTTP(context.Background(), srv.URL+"/x.img", HTTPOptions{Retries: 3})
	if err == nil {
		src := openHTTP(t, srv.URL+"/x.img", HTTPOptions{Retries: 3})
		st, _ := src.Stream()
		_, err = io.ReadAll(st)
	}
	if err == nil || !strings.Contains(err.Error(), "gave up after 3 retries") {
		t.Fatalf("err = %v, want giving up after 3 retries", err)
	}
}

func TestHTTPReaderAtResume(t *testing.T) {
	const ws = 256 << 10
	data := testData(1<<20+5, 15)
	srv := newRangeServer(t, data)
	src := openHTTP(t, srv.URL+"/x.img", HTTPOptions{ReadAhead: ws, Retries: 1})
	srv.dropAfter = 50000
	srv.drops.Store(3)
	ra := src.ReaderAt()
	buf := make([]byte, 1000)
	if _, err := ra.ReadAt(buf, ws+10); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf, data[ws+10:ws+1010]) {
		t.Fatal("wrong bytes")
	}
	want := []string{"bytes=0-"}
	for i := range 4 {
		want = append(want, fmt.Sprintf("bytes=%d-%d", ws+i*50000, 2*ws-1))
	}
	if got := srv.ranges(); strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("Range headers %q, want %q", got, want)
	}
	// Everything else still reads right with drops going on.
	srv.drops.Store(5)
	checkReaderAt(t, ra, data)
	concurrentReads(t, ra, data, 4, 50)
}

func TestHTTPShortRanges(t *testing.T) {
	data := testData(1<<20+5, 16)
	srv := newRangeServer(t, data)
	srv.maxChunk = 300000
	src := openHTTP(t, srv.URL+"/x.img", HTTPOptions{Retries: -1, ReadAhead: 512 << 10})
	if got := readStream(t, src); !bytes.Equal(got, data) {
		t.Fatal("stream differs")
	}
	src = openHTTP(t, srv.URL+"/x.img", HTTPOptions{Retries: -1, ReadAhead: 512 << 10})
	checkReaderAt(t, src.ReaderAt(), data)
}

func TestHTTPNoRange(t *testing.T) {
	data := testData(700001, 17)
	for _, chunked := range []bool{false, true} {
		t.Run(fmt.Sprintf("chunked=%v", chunked), func(t *testing.T) {
			srv := newRangeServer(t, data)
			srv.noRange = true
			srv.chunked = chunked
			src := openHTTP(t, srv.URL+"/x.img", HTTPOptions{})
			if src.ReaderAt() != nil {
				t.Fatal("ReaderAt must be nil without Range support")
			}
			wantSize := int64(len(data))
			if chunked {
				wantSize = -1
			}
			if src.Size() != wantSize {
				t.Fatalf("Size = %d, want %d", src.Size(), wantSize)
			}
			if got := readStream(t, src); !bytes.Equal(got, data) {
				t.Fatal("stream differs")
			}
			if n := len(srv.requests()); n != 1 {
				t.Fatalf("%d requests, want 1", n)
			}
		})
	}
}

func TestHTTPNoRangeDrop(t *testing.T) {
	data := testData(700001, 18)
	for _, chunked := range []bool{false, true} {
		t.Run(fmt.Sprintf("chunked=%v", chunked), func(t *testing.T) {
			srv := newRangeServer(t, data)
			srv.noRange = true
			srv.chunked = chunked
			srv.dropAfter = 12345
			srv.drops.Store(1)
			src := openHTTP(t, srv.URL+"/x.img", HTTPOptions{})
			st, _ := src.Stream()
			got, err := io.ReadAll(st)
			want := "connection lost after 12345 bytes and the server does not support Range requests"
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Fatalf("err = %v, want %q", err, want)
			}
			if !strings.Contains(err.Error(), srv.URL+"/x.img") {
				t.Fatalf("err %q does not name the URL", err)
			}
			if !bytes.Equal(got, data[:12345]) {
				t.Fatalf("got %d bytes before the error", len(got))
			}
		})
	}
}

// A server without Range can still be asked again while nothing was
// delivered.
func TestHTTPNoRangeRestartFromZero(t *testing.T) {
	data := testData(70001, 19)
	srv := newRangeServer(t, data)
	srv.noRange = true
	srv.dropAfter = 0
	srv.drops.Store(2)
	src := openHTTP(t, srv.URL+"/x.img", HTTPOptions{})
	if got := readStream(t, src); !bytes.Equal(got, data) {
		t.Fatal("stream differs")
	}
	for _, r := range srv.ranges()[1:] {
		if r != "" {
			t.Fatalf("restart of a server without Range sent Range %q", r)
		}
	}
}

func TestHTTPStatusErrors(t *testing.T) {
	srv := newRangeServer(t, []byte("x"))
	srv.hook = func(w http.ResponseWriter, r *http.Request, n int) bool {
		switch r.URL.Path {
		case "/missing":
			http.NotFound(w, r)
		case "/busy":
			w.Header().Set("Retry-After", "0")
			w.WriteHeader(http.StatusServiceUnavailable)
		default:
			return false
		}
		return true
	}
	_, err := OpenHTTP(context.Background(), srv.URL+"/missing", HTTPOptions{})
	want := "GET " + srv.URL + "/missing: 404 Not Found"
	if err == nil || err.Error() != want {
		t.Fatalf("err = %v, want %q", err, want)
	}
	var se *StatusError
	if !errors.As(err, &se) || se.StatusCode != 404 {
		t.Fatalf("err %v is not a StatusError 404", err)
	}
	if n := len(srv.requests()); n != 1 {
		t.Fatalf("404 was retried: %d requests", n)
	}

	_, err = OpenHTTP(context.Background(), srv.URL+"/busy", HTTPOptions{Retries: 2})
	if err == nil || !strings.Contains(err.Error(), "503 Service Unavailable") || !strings.Contains(err.Error(), "gave up after 2 retries") {
		t.Fatalf("err = %v", err)
	}
	if n := len(srv.requests()); n != 1+3 {
		t.Fatalf("503: %d requests, want 3", n-1)
	}
}

func TestHTTPETagChange(t *testing.T) {
	const ws = 64 << 10
	data := testData(1<<20, 20)
	srv := newRangeServer(t, data)
	srv.etag = func(n int) string { return fmt.Sprintf(`"v%d"`, n) }
	src := openHTTP(t, srv.URL+"/x.img", HTTPOptions{ReadAhead: ws})
	_, err := src.ReaderAt().ReadAt(make([]byte, 100), 3*ws)
	if !errors.Is(err, ErrChanged) || !strings.Contains(err.Error(), "the file changed on the server during the download") {
		t.Fatalf("ReadAt err = %v, want ErrChanged", err)
	}

	srv.dropAfter = 1000
	srv.drops.Store(1)
	src = openHTTP(t, srv.URL+"/x.img", HTTPOptions{})
	st, _ := src.Stream()
	_, err = io.ReadAll(st)
	if !errors.Is(err, ErrChanged) {
		t.Fatalf("Stream err = %v, want ErrChanged", err)
	}
}

// With http.ServeContent, If-Range makes a changed file come back as 200.
func TestHTTPETagChangeServeContent(t *testing.T) {
	data := testData(1<<20, 21)
	var n atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("ETag", fmt.Sprintf(`"v%d"`, n.Add(1)))
		http.ServeContent(w, r, "x.img", time.Time{}, bytes.NewReader(data))
	}))
	defer srv.Close()
	src := openHTTP(t, srv.URL+"/x.img", HTTPOptions{ReadAhead: 64 << 10})
	_, err := src.ReaderAt().ReadAt(make([]byte, 100), 500000)
	if !errors.Is(err, ErrChanged) {
		t.Fatalf("ReadAt err = %v, want ErrChanged", err)
	}
}

func TestHTTPBadContentRange(t *testing.T) {
	data := testData(1<<20, 22)
	srv := newRangeServer(t, data)
	srv.badRange = true
	src := openHTTP(t, srv.URL+"/x.img", HTTPOptions{ReadAhead: 64 << 10})
	_, err := src.ReaderAt().ReadAt(make([]byte, 100), 200000)
	if err == nil || !strings.Contains(err.Error(), "Content-Range") {
		t.Fatalf("err = %v, want a Content-Range complaint", err)
	}
}

func TestHTTPEmptyFile(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "empty.img"), nil, 0o644)
	srv := httptest.NewServer(http.FileServer(http.Dir(dir)))
	defer srv.Close()
	src := openHTTP(t, srv.URL+"/empty.img", HTTPOptions{})
	if src.Size() != 0 {
		t.Fatalf("Size = %d", src.Size())
	}
	if ra := src.ReaderAt(); ra != nil {
		if n, err := ra.ReadAt(make([]byte, 1), 0); n != 0 || err != io.EOF {
			t.Fatalf("ReadAt = %d, %v", n, err)
		}
	}
	if got := readStream(t, src); len(got) != 0 {
		t.Fatalf("stream gave %d bytes", len(got))
	}
}

func TestHTTPAcceptRangesVerify(t *testing.T) {
	data := testData(300000, 23)
	for _, liar := range []bool{false, true} {
		t.Run(fmt.Sprintf("liar=%v", liar), func(t *testing.T) {
			srv := newRangeServer(t, data)
			srv.hook = func(w http.ResponseWriter, r *http.Request, n int) bool {
				// Answers bytes=0- with the whole file, as some servers do.
				if rg := r.Header.Get("Range"); liar || rg == "bytes=0-" {
					w.Header().Set("Accept-Ranges", "bytes")
					w.Header().Set("Content-Length", strconv.Itoa(len(data)))
					w.Write(data)
					return true
				}
				return false
			}
			src := openHTTP(t, srv.URL+"/x.img", HTTPOptions{ReadAhead: 64 << 10})
			if (src.ReaderAt() == nil) != liar {
				t.Fatalf("ReaderAt = %v", src.ReaderAt())
			}
			if !liar {
				checkReaderAt(t, src.ReaderAt(), data)
			} else if got := readStream(t, src); !bytes.Equal(got, data) {
				t.Fatal("stream differs")
			}
		})
	}
}

const (
	secretPass = "s3cretPassw0rd"
	secretSig  = "SIGSECRET123"
	secretTok  = "tok-SECRET-456"
)

func assertNoSecrets(t *testing.T, what, s string) {
	t.Helper()
	for _, sec := range []string{secretPass, secretSig, secretTok} {
		if strings.Contains(s, sec) {
			t.Fatalf("%s leaks a secret: %q", what, s)
		}
	}
}

func TestHTTPAuth(t *testing.T) {
	data := testData(600000, 24)
	srv := newRangeServer(t, data)
	srv.hook = func(w http.ResponseWriter, r *http.Request, n int) bool {
		u, p, ok := r.BasicAuth()
		if !ok || u != "alice" || p != secretPass || r.Header.Get("X-Token") != secretTok {
			w.WriteHeader(http.StatusUnauthorized)
			return true
		}
		if r.URL.Path == "/missing" {
			http.NotFound(w, r)
			return true
		}
		return false
	}
	hostport := strings.TrimPrefix(srv.URL, "http://")
	hdr := http.Header{"X-Token": {secretTok}}

	// Credentials in the URL.
	u := "http://alice:" + secretPass + "@" + hostport + "/x.img?sig=" + secretSig
	src := openHTTP(t, u, HTTPOptions{Header: hdr, ReadAhead: 64 << 10})
	if want := srv.URL + "/x.img?..."; src.Name() != want {
		t.Fatalf("Name = %q, want %q", src.Name(), want)
	}
	assertNoSecrets(t, "Name", src.Name())
	checkReaderAt(t, src.ReaderAt(), data)

	// Credentials in the options.
	src = openHTTP(t, srv.URL+"/x.img", HTTPOptions{Header: hdr, Username: "alice", Password: secretPass})
	if got := readStream(t, src); !bytes.Equal(got, data) {
		t.Fatal("stream differs")
	}
	for _, r := range srv.requests() {
		if r.Token != secretTok || !strings.HasPrefix(r.Auth, "Basic ") {
			t.Fatalf("request without credentials: %+v", r)
		}
	}

	// Errors.
	ctx := context.Background()
	_, err := OpenHTTP(ctx, "http://alice:"+secretPass+"@"+hostport+"/missing?sig="+secretSig, HTTPOptions{Header: hdr})
	if err == nil || !strings.Contains(err.Error(), "404") {
		t.Fatalf("err = %v", err)
	}
	assertNoSecrets(t, "404 error", err.Error())
	_, err = OpenHTTP(ctx, "http://alice:wrong"+secretPass+"@"+hostport+"/x.img?sig="+secretSig, HTTPOptions{})
	if err == nil || !strings.Contains(err.Error(), "401") {
		t.Fatalf("err = %v", err)
	}
	assertNoSecrets(t, "401 error", err.Error())

	l, _ := net.Listen("tcp", "127.0.0.1:0")
	closed := l.Addr().String()
	l.Close()
	_, err = OpenHTTP(ctx, "http://alice:"+secretPass+"@"+closed+"/x.img?sig="+secretSig, HTTPOptions{Retries: -1, Header: hdr})
	if err == nil {
		t.Fatal("connection to a closed port succeeded")
	}
	assertNoSecrets(t, "connection error", err.Error())
	_, err = OpenHTTP(ctx, "http://alice:"+secretPass+"@"+hostport+"/x.img?sig="+secretSig+"%zz", HTTPOptions{})
	if err == nil {
		t.Fatal("bad URL accepted")
	}
	assertNoSecrets(t, "URL parse error", err.Error())
}

func TestHTTPRedirect(t *testing.T) {
	data := testData(500000, 25)
	srv := newRangeServer(t, data)
	srv.hook = func(w http.ResponseWriter, r *http.Request, n int) bool {
		if r.URL.Path == "/start" {
			http.Redirect(w, r, "/x.img", http.StatusFound)
			return true
		}
		return false
	}
	src := openHTTP(t, srv.URL+"/start", HTTPOptions{ReadAhead: 64 << 10, Username: "u", Password: "p"})
	checkReaderAt(t, src.ReaderAt(), data)
	reqs := srv.requests()
	if reqs[0].Path != "/start" || reqs[1].Path != "/x.img" {
		t.Fatalf("requests %+v", reqs[:2])
	}
	for _, r := range reqs[2:] {
		if r.Path != "/x.img" || r.Auth == "" {
			t.Fatalf("ranged request %+v: want the final URL, with credentials (same host)", r)
		}
	}

	// To another host: no credentials, no extra headers.
	other := newRangeServer(t, data)
	_, port, _ := net.SplitHostPort(strings.TrimPrefix(other.URL, "http://"))
	srv.hook = func(w http.ResponseWriter, r *http.Request, n int) bool {
		http.Redirect(w, r, "http://localhost:"+port+"/x.img", http.StatusFound)
		return true
	}
	src = openHTTP(t, srv.URL+"/start", HTTPOptions{ReadAhead: 64 << 10, Username: "u", Password: secretPass,
		Header: http.Header{"X-Token": {secretTok}}})
	checkReaderAt(t, src.ReaderAt(), data)
	for _, r := range other.requests() {
		if r.Auth != "" || r.Token != "" {
			t.Fatalf("credentials sent to another host: %+v", r)
		}
	}

	// Redirect loop.
	srv.hook = func(w http.ResponseWriter, r *http.Request, n int) bool {
		http.Redirect(w, r, "/loop", http.StatusFound)
		return true
	}
	_, err := OpenHTTP(context.Background(), srv.URL+"/loop", HTTPOptions{})
	if err == nil || !strings.Contains(err.Error(), "redirects") {
		t.Fatalf("redirect loop: %v", err)
	}
}

// newCA makes a CA and a certificate it signed for 127.0.0.1.
func newCA(t *testing.T) (caPEM []byte, leaf tls.Certificate) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "vimg test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		KeyUsage:              x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "127.0.0.1"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	leaf = tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), leaf
}

func TestHTTPTLS(t *testing.T) {
	data := testData(300000, 26)
	caPEM, leaf := newCA(t)
	otherCA, _ := newCA(t)
	rs := &rangeServer{data: data}
	srv := httptest.NewUnstartedServer(rs)
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{leaf}}
	srv.Config.ErrorLog = log.New(io.Discard, "", 0) // the refused handshakes are the point
	srv.StartTLS()
	defer srv.Close()
	u := srv.URL + "/x.img"
	ctx := context.Background()

	_, err := OpenHTTP(ctx, u, HTTPOptions{})
	if err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("no trust: err = %v, want a certificate error", err)
	}
	_, err = OpenHTTP(ctx, u, HTTPOptions{CABundle: otherCA})
	if err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("wrong CA: err = %v, want a certificate error", err)
	}
	_, err = OpenHTTP(ctx, u, HTTPOptions{CABundle: []byte("not PEM")})
	if err == nil || !strings.Contains(err.Error(), "CA bundle") {
		t.Fatalf("bad bundle: err = %v", err)
	}
	for _, opts := range []HTTPOptions{{CABundle: caPEM}, {InsecureSkipVerify: true}} {
		src := openHTTP(t, u, opts)
		if src.ReaderAt() == nil {
			t.Fatal("ReaderAt nil over TLS")
		}
		checkReaderAt(t, src.ReaderAt(), data)
	}
	src := openHTTP(t, u, HTTPOptions{CABundle: caPEM})
	if got := readStream(t, src); !bytes.Equal(got, data) {
		t.Fatal("TLS stream differs")
	}

	// httptest's own self-signed certificate.
	self := httptest.NewUnstartedServer(&rangeServer{data: data})
	self.Config.ErrorLog = log.New(io.Discard, "", 0)
	self.StartTLS()
	defer self.Close()
	if _, err := OpenHTTP(ctx, self.URL+"/x.img", HTTPOptions{}); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("self-signed: err = %v", err)
	}
	openHTTP(t, self.URL+"/x.img", HTTPOptions{InsecureSkipVerify: true})
}

// blockingHook sends the headers and the first 1000 bytes of responses not
// at offset 0, or of every response, then hangs until the client goes.
func blockingHook(data []byte, all bool) func(w http.ResponseWriter, r *http.Request, n int) bool {
	return func(w http.ResponseWriter, r *http.Request, n int) bool {
		rg := r.Header.Get("Range")
		if !all && (rg == "" || rg == "bytes=0-") {
			return false
		}
		start := 0
		if rg != "" {
			start, _, _ = parseRangeHeader(rg, len(data))
		}
		w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", start, len(data)-1, len(data)))
		w.Header().Set("Content-Length", strconv.Itoa(len(data)-start))
		w.WriteHeader(http.StatusPartialContent)
		w.Write(data[start : start+1000])
		w.(http.Flusher).Flush()
		select {
		case <-r.Context().Done():
		case <-time.After(20 * time.Second):
		}
		return true
	}
}

func TestHTTPContextCancel(t *testing.T) {
	data := testData(1<<20, 27)
	srv := newRangeServer(t, data)
	srv.hook = blockingHook(data, true)

	check := func(what string, err error, start time.Time) {
		t.Helper()
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("%s: err = %v, want context.Canceled", what, err)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Fatalf("%s: took %v to notice the cancel", what, d)
		}
	}

	ctx, cancel := context.WithCancel(context.Background())
	src, err := OpenHTTP(ctx, srv.URL+"/x.img", HTTPOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	st, _ := src.Stream()
	buf := make([]byte, 1000)
	if _, err := io.ReadFull(st, buf); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	time.AfterFunc(100*time.Millisecond, cancel)
	_, err = io.ReadFull(st, buf)
	check("Stream", err, start)

	ctx, cancel = context.WithCancel(context.Background())
	src, err = OpenHTTP(ctx, srv.URL+"/x.img", HTTPOptions{ReadAhead: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	start = time.Now()
	time.AfterFunc(100*time.Millisecond, cancel)
	_, err = src.ReaderAt().ReadAt(make([]byte, 10), 300000)
	check("ReadAt", err, start)

	// A server that never answers.
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	ctx, cancel = context.WithCancel(context.Background())
	start = time.Now()
	time.AfterFunc(100*time.Millisecond, cancel)
	_, err = OpenHTTP(ctx, "http://"+l.Addr().String()+"/x.img", HTTPOptions{})
	check("OpenHTTP", err, start)
}

// A connection that stops delivering without closing is given up after
// Timeout and resumed.
func TestHTTPStall(t *testing.T) {
	data := testData(1<<20, 28)
	srv := newRangeServer(t, data)
	var stalls atomic.Int32
	stalls.Store(2)
	block := blockingHook(data, true)
	srv.hook = func(w http.ResponseWriter, r *http.Request, n int) bool {
		if stalls.Add(-1) >= 0 {
			return block(w, r, n)
		}
		return false
	}
	src := openHTTP(t, srv.URL+"/x.img", HTTPOptions{Timeout: 200 * time.Millisecond})
	start := time.Now()
	if got := readStream(t, src); !bytes.Equal(got, data) {
		t.Fatal("stream differs")
	}
	t.Logf("two stalls cost %v", time.Since(start))
	if got := srv.ranges(); len(got) != 3 || got[1] != "bytes=1000-" || got[2] != "bytes=2000-" {
		t.Fatalf("Range headers %q", got)
	}
}

func TestHTTPClose(t *testing.T) {
	data := testData(1<<20, 29)
	srv := newRangeServer(t, data)
	src := openHTTP(t, srv.URL+"/x.img", HTTPOptions{ReadAhead: 64 << 10})
	ra := src.ReaderAt()
	if _, err := ra.ReadAt(make([]byte, 10), 100); err != nil {
		t.Fatal(err)
	}
	src.Close()
	if _, err := ra.ReadAt(make([]byte, 10), 500000); !errors.Is(err, ErrClosed) {
		t.Fatalf("ReadAt after Close: %v", err)
	}
	if _, err := src.Stream(); err == nil {
		t.Fatal("Stream after Close succeeded")
	}
	if err := src.Close(); err != nil {
		t.Fatal(err)
	}
}

// patternReader is a large, cheap ReadSeeker for benchmarks.
type patternReader struct {
	pat  []byte
	size int64
}

func (p *patternReader) ReadAt(b []byte, off int64) (int, error) {
	if off >= p.size {
		return 0, io.EOF
	}
	n := 0
	for n < len(b) && off < p.size {
		k := copy(b[n:min(int64(len(b)), int64(n)+p.size-off)], p.pat[off%int64(len(p.pat)):])
		n += k
		off += int64(k)
	}
	if n < len(b) {
		return n, io.EOF
	}
	return n, nil
}

func benchServer(b *testing.B, size int64) *httptest.Server {
	pr := &patternReader{pat: testData(1<<20, 30), size: size}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.ServeContent(w, r, "x.img", time.Time{}, io.NewSectionReader(pr, 0, size))
	}))
	b.Cleanup(srv.Close)
	return srv
}

func BenchmarkHTTPStream256M(b *testing.B) {
	const size = 256 << 20
	srv := benchServer(b, size)
	buf := make([]byte, 1<<20)
	b.SetBytes(size)
	for b.Loop() {
		src, err := OpenHTTP(context.Background(), srv.URL+"/x.img", HTTPOptions{})
		if err != nil {
			b.Fatal(err)
		}
		st, _ := src.Stream()
		n, err := io.CopyBuffer(io.Discard, struct{ io.Reader }{st}, buf)
		if err != nil || n != size {
			b.Fatalf("copied %d, %v", n, err)
		}
		src.Close()
	}
}

func BenchmarkHTTPReaderAtSequential256M(b *testing.B) {
	const size = 256 << 20
	srv := benchServer(b, size)
	buf := make([]byte, 64<<10)
	b.SetBytes(size)
	for b.Loop() {
		src, err := OpenHTTP(context.Background(), srv.URL+"/x.img", HTTPOptions{})
		if err != nil {
			b.Fatal(err)
		}
		ra := src.ReaderAt()
		for off := int64(0); off < size; off += int64(len(buf)) {
			if _, err := ra.ReadAt(buf, off); err != nil && err != io.EOF {
				b.Fatal(err)
			}
		}
		src.Close()
	}
}

func FuzzParseContentRange(f *testing.F) {
	for _, s := range []string{"bytes 0-9/10", "bytes 5-5/*", "bytes */0", "bytes 0-18446744073709551615/5", "bytes -1-3/4", "bytes 3-2/10", "items 0-1/2"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		first, last, total, err := parseContentRange(s)
		if err != nil {
			return
		}
		if first == -1 {
			if last != -1 || total < 0 {
				t.Fatalf("%q: %d %d %d", s, first, last, total)
			}
			return
		}
		if first < 0 || last < first || (total >= 0 && last >= total) || total < -1 {
			t.Fatalf("%q: %d %d %d", s, first, last, total)
		}
	})
}
