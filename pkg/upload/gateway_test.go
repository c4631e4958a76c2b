package upload

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	v1 "github.com/opencontainers/image-spec/specs-go/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"vimg.dev/vimg/pkg/worker/api"
)

func TestGateway_CurlUploadWithContentLengthCommitsTheBlob(t *testing.T) {
	f := newFixture(t)
	u := f.addUpload(time.Time{})
	path, data := testFile(t, 5<<20+123)
	status, body := f.curl(nil, "-T", path, u.url)
	if status != http.StatusCreated {
		t.Fatalf("curl -T: %d %s", status, body)
	}
	var res Result
	if err := json.Unmarshal([]byte(body), &res); err != nil {
		t.Fatalf("answer %q: %v", body, err)
	}
	if res.Digest != sha(data) || res.Size != int64(len(data)) {
		t.Fatalf("answer %+v, want %s and %d bytes", res, sha(data), len(data))
	}
	st := f.idle(u)
	if !st.Done || st.Digest != sha(data) || st.Size != int64(len(data)) || st.Received != st.Size || st.StartedAt.IsZero() {
		t.Fatalf("state %+v, want done with the file's digest and size", st)
	}
	if got := f.blob(u, res.Digest); !bytes.Equal(got, data) {
		t.Fatal("the blob in DVCR differs from the file")
	}
	resp := f.head(u.url)
	if resp.StatusCode != 200 || resp.Header.Get(HeaderDone) != "true" || resp.Header.Get(HeaderOffset) != strconv.Itoa(len(data)) || resp.Header.Get(HeaderDigest) != sha(data) {
		t.Errorf("HEAD after completion: %d %v", resp.StatusCode, resp.Header)
	}
}

func TestGateway_CurlChunkedUploadFromAPipe(t *testing.T) {
	f := newFixture(t)
	_, data := testFile(t, 3<<20+7)
	for name, args := range map[string][]string{
		"curl -T -":                      {"-T", "-"},
		"curl --data-binary @- -X PUT":   {"--data-binary", "@-", "-X", "PUT"},
		"curl -T - with a trailing name": {"-T", "-"},
	} {
		t.Run(name, func(t *testing.T) {
			u := f.addUpload(time.Time{})
			url := u.url
			if strings.Contains(name, "trailing") {
				url += "/disk.qcow2"
			}
			// A bytes.Reader as stdin reaches curl through a pipe: no
			// length, so -T - sends the body chunked.
			status, body := f.curl(bytes.NewReader(data), append(args, url)...)
			if status != http.StatusCreated || !strings.Contains(body, sha(data)) {
				t.Fatalf("%s: %d %s", name, status, body)
			}
			if st := f.idle(u); !st.Done || st.Digest != sha(data) || st.Size != int64(len(data)) {
				t.Fatalf("state %+v", st)
			}
			if got := f.blob(u, sha(data)); !bytes.Equal(got, data) {
				t.Fatal("the blob differs from what was sent")
			}
		})
	}
}

func TestGateway_InterruptedUploadResumesWithContentRange(t *testing.T) {
	f := newFixture(t)
	u := f.addUpload(time.Time{})
	path, data := testFile(t, 4<<20+321)
	half := len(data) / 2

	// A client that sends half of what it announced, then drops the
	// connection.
	p := f.startPut(u.url, "Content-Length: "+strconv.Itoa(len(data)))
	p.write(data[:half])
	st := p.drop(u, int64(half))
	if st.Done || st.Received != int64(half) || st.Total != int64(len(data)) || st.Session == "" || len(st.HashState) == 0 {
		t.Fatalf("state after the cut %+v; want %d of %d bytes and a session", st, half, len(data))
	}
	resp := f.head(u.url)
	if resp.StatusCode != 200 || resp.Header.Get(HeaderOffset) != strconv.Itoa(half) ||
		resp.Header.Get(HeaderLength) != strconv.Itoa(len(data)) || resp.Header.Get(HeaderDone) != "false" {
		t.Fatalf("HEAD: %d %v", resp.StatusCode, resp.Header)
	}
	if got := resp.Header.Get(HeaderReceivedDigest); got != sha(data[:half]) {
		t.Errorf("%s = %q, want the digest of the first half %s", HeaderReceivedDigest, got, sha(data[:half]))
	}

	// curl -C <offset> -T sends Content-Range: bytes <offset>-<last>/<size>.
	status, body := f.curl(nil, "-C", strconv.Itoa(half), "-T", path, u.url)
	if status != http.StatusCreated || !strings.Contains(body, sha(data)) {
		t.Fatalf("resume: %d %s", status, body)
	}
	if got := f.blob(u, sha(data)); !bytes.Equal(got, data) {
		t.Fatal("the resumed blob differs from the file")
	}
	if st := f.idle(u); !st.Done || st.Size != int64(len(data)) {
		t.Fatalf("state %+v", st)
	}
}

func TestGateway_ResumeAtTheWrongOffsetIs416(t *testing.T) {
	f := newFixture(t)
	u := f.addUpload(time.Time{})
	path, data := testFile(t, 1<<20)
	p := f.startPut(u.url, "Content-Length: "+strconv.Itoa(len(data)))
	p.write(data[:1000])
	p.drop(u, 1000)

	// `curl -C -` sends Content-Range: bytes 0-<last>/<size> for an upload.
	for _, start := range []string{"-", "999", "1001"} {
		status, body, header := f.curlH(nil, "-C", start, "-T", path, u.url)
		if status != http.StatusRequestedRangeNotSatisfiable || !strings.Contains(body, "holds 1000 bytes") || !strings.Contains(body, "bytes 1000-") ||
			!strings.Contains(header, "Upload-Offset: 1000") {
			t.Errorf("resume at %s: %d %s", start, status, body)
		}
	}
	resp, _ := f.do(http.MethodPut, u.url, bytes.NewReader(data[5:10]), map[string]string{"Content-Range": fmt.Sprintf("bytes 5-9/%d", len(data))})
	if resp.StatusCode != http.StatusRequestedRangeNotSatisfiable || resp.Header.Get(HeaderOffset) != "1000" {
		t.Errorf("PUT at 5: %d, Upload-Offset %q; want 416 and 1000", resp.StatusCode, resp.Header.Get(HeaderOffset))
	}
	if st := f.idle(u); st.Received != 1000 {
		t.Errorf("a refused resume changed the state: %+v", st)
	}
}

func TestGateway_PieceByPieceWithContentRange(t *testing.T) {
	f := newFixture(t)
	u := f.addUpload(time.Time{})
	_, data := testFile(t, 2<<20+5)
	cut := []int{0, 700000, 1500000, len(data)}
	for i := 0; i+1 < len(cut); i++ {
		a, b := cut[i], cut[i+1]
		resp, body := f.do(http.MethodPut, u.url, bytes.NewReader(data[a:b]), map[string]string{"Content-Range": fmt.Sprintf("bytes %d-%d/%d", a, b-1, len(data))})
		want := http.StatusAccepted
		if b == len(data) {
			want = http.StatusCreated
		}
		if resp.StatusCode != want || (want == http.StatusAccepted && resp.Header.Get(HeaderOffset) != strconv.Itoa(b)) {
			t.Fatalf("piece %d-%d: %d %s %v", a, b, resp.StatusCode, body, resp.Header)
		}
	}
	if got := f.blob(u, sha(data)); !bytes.Equal(got, data) {
		t.Fatal("blob differs")
	}
}

func TestGateway_PlainPutRestartsAPartialUpload(t *testing.T) {
	f := newFixture(t)
	u := f.addUpload(time.Time{})
	path, data := testFile(t, 1<<20)
	p := f.startPut(u.url, "Content-Length: 5000")
	p.write(bytes.Repeat([]byte("x"), 3000))
	p.drop(u, 3000)
	status, body := f.curl(nil, "-T", path, u.url)
	if status != http.StatusCreated || !strings.Contains(body, sha(data)) {
		t.Fatalf("restart: %d %s", status, body)
	}
}

func TestGateway_WrongTokenAndUnknownUploadAre404(t *testing.T) {
	f := newFixture(t)
	u := f.addUpload(time.Time{})
	wrongToken := f.srv.URL + api.UploadPathPrefix + u.uid + "/" + strings.Repeat("0", 64)
	unknown := f.srv.URL + api.UploadPathPrefix + "00000000-0000-4000-8000-000000000000/" + u.token
	malformed := f.srv.URL + api.UploadPathPrefix + u.uid
	var bodies []string
	for _, url := range []string{wrongToken, unknown, malformed} {
		for _, method := range []string{http.MethodPut, http.MethodGet} {
			resp, body := f.do(method, url, bytes.NewReader([]byte("data")), nil)
			if resp.StatusCode != http.StatusNotFound {
				t.Errorf("%s with a bad URL: %d %s", method, resp.StatusCode, body)
			}
			bodies = append(bodies, body)
		}
		if resp := f.head(url); resp.StatusCode != http.StatusNotFound {
			t.Errorf("HEAD with a bad URL: %d", resp.StatusCode)
		}
	}
	for _, b := range bodies[1:] {
		if b != bodies[0] {
			t.Errorf("answers differ, telling which part is wrong: %q vs %q", b, bodies[0])
		}
	}
	if st, h := f.state(u); st.Session != "" || h.ID != "" {
		t.Errorf("a refused request touched the upload: %+v %+v", st, h)
	}
}

func TestGateway_ExpiredUploadCannotStart(t *testing.T) {
	f := newFixture(t)
	expires := f.clock.At(-time.Minute)
	u := f.addUpload(expires)
	path, _ := testFile(t, 100000)
	status, body := f.curl(nil, "-T", path, u.url)
	if status != http.StatusForbidden || !strings.Contains(body, "timed out") || !strings.Contains(body, "delete the image and create it again") {
		t.Fatalf("upload after the deadline: %d %s", status, body)
	}
	if st, h := f.state(u); st.Session != "" || st.Received != 0 || h.ID != "" {
		t.Fatalf("a refused upload left a session: %+v %+v", st, h)
	}
	resp := f.head(u.url)
	if resp.Header.Get(HeaderExpires) != expires.UTC().Format(time.RFC3339) {
		t.Errorf("HEAD %s = %q", HeaderExpires, resp.Header.Get(HeaderExpires))
	}
}

func TestGateway_UploadStartedBeforeItsDeadlineMayResumeAfterIt(t *testing.T) {
	f := newFixture(t)
	u := f.addUpload(f.clock.At(time.Minute))
	path, data := testFile(t, 1<<20)
	p := f.startPut(u.url, "Content-Length: "+strconv.Itoa(len(data)))
	p.write(data[:4096])
	p.drop(u, 4096)
	f.clock.Advance(2 * time.Minute)
	status, body := f.curl(nil, "-C", "4096", "-T", path, u.url)
	if status != http.StatusCreated {
		t.Fatalf("resume after the deadline: %d %s", status, body)
	}
}

func TestGateway_ConcurrentPutIs409(t *testing.T) {
	f := newFixture(t)
	u := f.addUpload(time.Time{})
	path, data := testFile(t, 1<<20)
	p := f.startPut(u.url, "Content-Length: "+strconv.Itoa(len(data)))
	p.write(data[:1000])
	waitFor(t, "the first upload to be received", func() bool { return f.gw.transferOf(u.uid) != nil })

	status, body := f.curl(nil, "-T", path, u.url)
	if status != http.StatusConflict || !strings.Contains(body, "in progress") {
		t.Fatalf("second PUT: %d %s", status, body)
	}
	// On another replica too: the claim is in the Secret.
	other := f.serve(f.newGateway())
	resp, body := f.do(http.MethodPut, strings.Replace(u.url, f.srv.URL, other.URL, 1), bytes.NewReader(data), nil)
	if resp.StatusCode != http.StatusConflict {
		t.Fatalf("PUT on another replica: %d %s", resp.StatusCode, body)
	}
	p.write(data[1000:])
	if resp, body := p.response(); resp.StatusCode != http.StatusCreated {
		t.Fatalf("the first upload: %d %s", resp.StatusCode, body)
	}
}

func TestGateway_DoneUploadIs409(t *testing.T) {
	f := newFixture(t)
	u := f.addUpload(time.Time{})
	path, _ := testFile(t, 10000)
	if status, body := f.curl(nil, "-T", path, u.url); status != http.StatusCreated {
		t.Fatalf("upload: %d %s", status, body)
	}
	f.idle(u)
	status, body := f.curl(nil, "-T", path, u.url)
	if status != http.StatusConflict || !strings.Contains(body, "complete") {
		t.Fatalf("second upload: %d %s", status, body)
	}
	resp, _ := f.do(http.MethodPut, u.url, bytes.NewReader([]byte("x")), map[string]string{"Content-Range": "bytes 10000-10000/10001"})
	if resp.StatusCode != http.StatusConflict || resp.Header.Get(HeaderDone) != "true" {
		t.Fatalf("resume of a complete upload: %d %v", resp.StatusCode, resp.Header)
	}
}

func TestGateway_IdleClientIsDroppedAndItsBytesKept(t *testing.T) {
	f := newFixture(t)
	f.gw = f.newGateway(func(c *Config) { c.IdleTimeout = 400 * time.Millisecond })
	f.srv = f.serve(f.gw)
	u := f.addUpload(time.Time{})
	path, data := testFile(t, 1<<20)
	p := f.startPut(u.url, "Content-Length: "+strconv.Itoa(len(data)))
	p.write(data[:5000])
	resp, body := p.response()
	if resp.StatusCode != http.StatusRequestTimeout || resp.Header.Get(HeaderOffset) != "5000" || !strings.Contains(body, "bytes 5000-") {
		t.Fatalf("idle client: %d %v %s", resp.StatusCode, resp.Header, body)
	}
	if st := f.idle(u); st.Received != 5000 {
		t.Fatalf("state %+v", st)
	}
	if status, body := f.curl(nil, "-C", "5000", "-T", path, u.url); status != http.StatusCreated {
		t.Fatalf("resume: %d %s", status, body)
	}
}

func TestGateway_ProgressIsRecordedWhileReceiving(t *testing.T) {
	f := newFixture(t)
	u := f.addUpload(time.Time{})
	_, data := testFile(t, 1<<20)
	p := f.startPut(u.url, "Transfer-Encoding: chunked")
	chunk := func(b []byte) { p.write([]byte(fmt.Sprintf("%x\r\n%s\r\n", len(b), b))) }
	chunk(data[:300000])
	var st api.UploadState
	var h Holder
	waitFor(t, "the progress to be recorded", func() bool {
		st, h = f.state(u)
		return st.Received == 300000
	})
	if st.Total != -1 || st.StartedAt.IsZero() || st.UpdatedAt.IsZero() || h.ID == "" || st.Done {
		t.Errorf("state while receiving %+v, holder %+v", st, h)
	}
	resp := f.head(u.url)
	if resp.Header.Get(HeaderOffset) != "300000" || resp.Header.Get(HeaderLength) != "" {
		t.Errorf("HEAD while receiving: %v", resp.Header)
	}
	chunk(data[300000:])
	p.write([]byte("0\r\n\r\n"))
	if resp, body := p.response(); resp.StatusCode != http.StatusCreated {
		t.Fatalf("%d %s", resp.StatusCode, body)
	}
	if st := f.idle(u); !st.Done || st.Digest != sha(data) || st.Speed != 0 {
		t.Fatalf("final state %+v", st)
	}
}

func TestGateway_LostSessionRestartsFromZero(t *testing.T) {
	f := newFixture(t)
	u := f.addUpload(time.Time{})
	path, data := testFile(t, 1<<20)
	p := f.startPut(u.url, "Content-Length: "+strconv.Itoa(len(data)))
	p.write(data[:2000])
	st := p.drop(u, 2000)

	// A gateway that died in the middle of a request leaves DVCR holding
	// bytes the state does not describe.
	c := f.dvcrClient(u)
	s, err := c.ResumeBlobUpload(context.Background(), u.repo, st.Session, st.Received, st.HashState)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Append(context.Background(), bytes.NewReader([]byte("more"))); err != nil {
		t.Fatal(err)
	}
	resp := f.head(u.url)
	if resp.StatusCode != 200 || resp.Header.Get(HeaderOffset) != "0" || !strings.Contains(resp.Header.Get(HeaderMessage), "2000 bytes received so far were lost") {
		t.Fatalf("HEAD of a lost session: %d %v", resp.StatusCode, resp.Header)
	}
	if st := f.idle(u); st.Session != "" || st.Received != 0 || st.StartedAt.IsZero() {
		t.Fatalf("state after the reset %+v", st)
	}
	if status, body := f.curl(nil, "-T", path, u.url); status != http.StatusCreated {
		t.Fatalf("upload again: %d %s", status, body)
	}
}

func TestGateway_ResumeOfALostSessionIs416FromZero(t *testing.T) {
	f := newFixture(t)
	u := f.addUpload(time.Time{})
	path, data := testFile(t, 1<<20)
	p := f.startPut(u.url, "Content-Length: "+strconv.Itoa(len(data)))
	p.write(data[:2000])
	st := p.drop(u, 2000)
	s, err := f.dvcrClient(u).ResumeBlobUpload(context.Background(), u.repo, st.Session, st.Received, st.HashState)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Append(context.Background(), bytes.NewReader([]byte("more"))); err != nil {
		t.Fatal(err)
	}
	status, body, header := f.curlH(nil, "-C", "2000", "-T", path, u.url)
	if status != http.StatusRequestedRangeNotSatisfiable || !strings.Contains(header, "Upload-Offset: 0") || !strings.Contains(body, "were lost") {
		t.Fatalf("resume of a lost session: %d %s", status, body)
	}
}

func TestGateway_ShutdownEndsUploadsSoTheyResumeElsewhere(t *testing.T) {
	f := newFixture(t)
	u := f.addUpload(time.Time{})
	path, data := testFile(t, 1<<20)
	p := f.startPut(u.url, "Content-Length: "+strconv.Itoa(len(data)))
	p.write(data[:70000])
	waitFor(t, "the bytes to arrive", func() bool {
		tr := f.gw.transferOf(u.uid)
		return tr != nil && tr.received.Load() == 70000
	})
	f.gw.Shutdown()
	resp, body := p.response()
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get(HeaderOffset) != "70000" {
		t.Fatalf("upload cut by the shutdown: %d %v %s", resp.StatusCode, resp.Header, body)
	}
	if st := f.idle(u); st.Received != 70000 {
		t.Fatalf("state %+v", st)
	}
	status, _ := f.curl(nil, "-C", "70000", "-T", path, u.url)
	if status != http.StatusServiceUnavailable {
		t.Errorf("a gateway shutting down took a new upload: %d", status)
	}
	other := f.serve(f.newGateway())
	status, body = f.curl(nil, "-C", "70000", "-T", path, strings.Replace(u.url, f.srv.URL, other.URL, 1))
	if status != http.StatusCreated || !strings.Contains(body, sha(data)) {
		t.Fatalf("resume on another replica: %d %s", status, body)
	}
}

func TestGateway_ChunkedUploadBeyondTheMaximumIs413(t *testing.T) {
	f := newFixture(t)
	f.gw = f.newGateway(func(c *Config) { c.MaxSize = 1 << 20 })
	f.srv = f.serve(f.gw)
	u := f.addUpload(time.Time{})
	_, data := testFile(t, 1<<20+1)
	if status, body := f.curl(bytes.NewReader(data), "-T", "-", u.url); status != http.StatusRequestEntityTooLarge {
		t.Fatalf("chunked upload over the maximum: %d %s", status, body)
	}
	path, _ := testFile(t, 1<<20+1)
	if status, body := f.curl(nil, "-T", path, u.url); status != http.StatusRequestEntityTooLarge {
		t.Fatalf("upload announced over the maximum: %d %s", status, body)
	}
	if st := f.idle(u); st.Done {
		t.Fatal("an upload over the maximum is done")
	}
}

// failing wraps the DVCR registry to break its sessions on purpose.
type failing struct {
	Registry
	commits  int // Commit calls that fail before one succeeds
	breakAt  int64
	appendFn func()
}

type failingSession struct {
	BlobSession
	r *failing
}

func (r *failing) Start(ctx context.Context, token, repo string) (BlobSession, error) {
	s, err := r.Registry.Start(ctx, token, repo)
	if err != nil {
		return nil, err
	}
	return &failingSession{s, r}, nil
}

func (r *failing) Resume(ctx context.Context, token, repo, loc string, off int64, hs []byte) (BlobSession, error) {
	s, err := r.Registry.Resume(ctx, token, repo, loc, off, hs)
	if err != nil {
		return nil, err
	}
	return &failingSession{s, r}, nil
}

func (s *failingSession) Commit(ctx context.Context) (v1.Descriptor, error) {
	if s.r.commits > 0 {
		s.r.commits--
		return v1.Descriptor{}, errors.New("injected commit failure")
	}
	return s.BlobSession.Commit(ctx)
}

// Append breaks the connection to DVCR after breakAt bytes, when set.
func (s *failingSession) Append(ctx context.Context, r io.Reader) (int64, error) {
	if s.r.breakAt <= 0 {
		return s.BlobSession.Append(ctx, r)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	n := s.r.breakAt
	s.r.breakAt = 0
	return s.BlobSession.Append(ctx, &cancelAfter{r: r, left: n, cancel: cancel})
}

type cancelAfter struct {
	r      io.Reader
	left   int64
	cancel func()
}

func (c *cancelAfter) Read(p []byte) (int, error) {
	if c.left <= 0 {
		c.cancel()
		time.Sleep(200 * time.Millisecond) // let the PATCH die
		return 0, io.EOF
	}
	if int64(len(p)) > c.left {
		p = p[:c.left]
	}
	n, err := c.r.Read(p)
	c.left -= int64(n)
	return n, err
}

func TestGateway_FailedCommitIsFinishedWithAnEmptyPut(t *testing.T) {
	f := newFixture(t)
	reg := &failing{Registry: f.reg, commits: 1}
	f.gw = f.newGateway(func(c *Config) { c.Registry = reg })
	f.srv = f.serve(f.gw)
	u := f.addUpload(time.Time{})
	path, data := testFile(t, 300000)
	status, body := f.curl(nil, "-T", path, u.url)
	if status != http.StatusBadGateway || !strings.Contains(body, "bytes */300000") {
		t.Fatalf("upload whose commit fails: %d %s", status, body)
	}
	if st := f.idle(u); st.Received != int64(len(data)) || st.Done {
		t.Fatalf("state %+v", st)
	}
	resp, body := f.do(http.MethodPut, u.url, bytes.NewReader(nil), map[string]string{"Content-Range": "bytes */300000"})
	if resp.StatusCode != http.StatusCreated || !strings.Contains(body, sha(data)) {
		t.Fatalf("finishing PUT: %d %s", resp.StatusCode, body)
	}
}

func TestGateway_DVCRFailureMidRequestSaysWhereToResume(t *testing.T) {
	f := newFixture(t)
	reg := &failing{Registry: f.reg, breakAt: 1 << 20}
	f.gw = f.newGateway(func(c *Config) { c.Registry = reg })
	f.srv = f.serve(f.gw)
	u := f.addUpload(time.Time{})
	path, data := testFile(t, 3<<20)
	resp, body := f.do(http.MethodPut, u.url, bytes.NewReader(data), nil)
	if resp.StatusCode != http.StatusBadGateway || resp.Header.Get(HeaderOffset) == "" {
		t.Fatalf("PUT whose DVCR side breaks: %d %v %s", resp.StatusCode, resp.Header, body)
	}
	// Either DVCR kept none of the broken PATCH (resume at 0 from the
	// session) or some (start over): both say 0 here, and the upload
	// completes either way.
	off := resp.Header.Get(HeaderOffset)
	args := []string{"-T", path, u.url}
	if off != "0" {
		args = append([]string{"-C", off}, args...)
	}
	f.idle(u)
	if status, body := f.curl(nil, args...); status != http.StatusCreated || !strings.Contains(body, sha(data)) {
		t.Fatalf("upload after the failure: %d %s", status, body)
	}
}

func TestGateway_DeletedImageEndsItsUpload(t *testing.T) {
	f := newFixture(t)
	u := f.addUpload(time.Time{})
	_, data := testFile(t, 1<<20)
	p := f.startPut(u.url, "Content-Length: "+strconv.Itoa(len(data)))
	p.write(data[:1000])
	waitFor(t, "the upload to start", func() bool { return f.gw.transferOf(u.uid) != nil })
	if err := f.kube.CoreV1().Secrets(testNamespace).Delete(context.Background(), api.UploadSecretPrefix+u.uid, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	resp, body := p.response()
	if resp.StatusCode != http.StatusGone {
		t.Fatalf("upload of a deleted image: %d %s", resp.StatusCode, body)
	}
}

func TestGateway_OtherMethodsAre405(t *testing.T) {
	f := newFixture(t)
	u := f.addUpload(time.Time{})
	resp, _ := f.do(http.MethodPost, u.url, bytes.NewReader([]byte("x")), nil)
	if resp.StatusCode != http.StatusMethodNotAllowed || resp.Header.Get("Allow") == "" {
		t.Fatalf("POST: %d %v", resp.StatusCode, resp.Header)
	}
}

func TestGateway_GetAnswersJSON(t *testing.T) {
	f := newFixture(t)
	u := f.addUpload(f.clock.At(time.Hour))
	resp, body := f.do(http.MethodGet, u.url, nil, nil)
	var st statusBody
	if resp.StatusCode != 200 || json.Unmarshal([]byte(body), &st) != nil || st.Received != 0 || st.Done || st.Expires == nil || st.Total != -1 {
		t.Fatalf("GET: %d %s", resp.StatusCode, body)
	}
}

func TestGateway_ChunkedBodyShorterThanItsRangeIsNotTheEnd(t *testing.T) {
	f := newFixture(t)
	u := f.addUpload(time.Time{})
	p := f.startPut(u.url, "Transfer-Encoding: chunked", "Content-Range: bytes 0-999/*")
	p.write([]byte(fmt.Sprintf("%x\r\n%s\r\n0\r\n\r\n", 500, bytes.Repeat([]byte("z"), 500))))
	resp, body := p.response()
	if resp.StatusCode != http.StatusBadRequest || resp.Header.Get(HeaderOffset) != "500" {
		t.Fatalf("short chunked body: %d %v %s", resp.StatusCode, resp.Header, body)
	}
	if st := f.idle(u); st.Done || st.Received != 500 {
		t.Fatalf("state %+v", st)
	}
}

func TestGateway_ResumeRightAfterACutWaitsForTheCutRequestToEnd(t *testing.T) {
	f := newFixture(t)
	f.gw = f.newGateway(func(c *Config) { c.BusyWait = 5 * time.Second })
	f.srv = f.serve(f.gw)
	u := f.addUpload(time.Time{})
	path, data := testFile(t, 2<<20)
	for i := 0; i < 3; i++ {
		off := 0
		if i > 0 {
			resp := f.head(u.url)
			off, _ = strconv.Atoi(resp.Header.Get(HeaderOffset))
		}
		p := f.startPut(u.url, "Content-Length: "+strconv.Itoa(len(data)-off), fmt.Sprintf("Content-Range: bytes %d-%d/%d", off, len(data)-1, len(data)))
		p.write(data[off : off+500000])
		waitFor(t, "the bytes to arrive", func() bool {
			tr := f.gw.transferOf(u.uid)
			return tr != nil && tr.received.Load() == int64(off+500000)
		})
		// Cut, and resume at once: no 409 from the request still ending.
		p.conn.Close()
	}
	resp := f.head(u.url)
	off := resp.Header.Get(HeaderOffset)
	if off != "1500000" {
		t.Fatalf("HEAD right after the cut: Upload-Offset %q, want 1500000", off)
	}
	status, body := f.curl(nil, "-C", off, "-T", path, u.url)
	if status != http.StatusCreated || !strings.Contains(body, sha(data)) {
		t.Fatalf("resume right after the cut: %d %s", status, body)
	}
}
