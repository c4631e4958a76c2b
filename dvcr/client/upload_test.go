package client

import (
	"bytes"
	"context"
	"encoding/pem"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/crypto/bcrypt"

	"vimg.dev/vimg/dvcr/auth"
	"vimg.dev/vimg/dvcr/server"
)

// readBlob reads blob d of repo whole.
func readBlob(t *testing.T, c *Client, repo string, d digest.Digest) []byte {
	t.Helper()
	rc, err := c.BlobReader(context.Background(), repo, d)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestBlobUpload_ResumedInAnotherClientGivesTheWholeBlob(t *testing.T) {
	reg := newRegistry(t)
	ctx := context.Background()
	data := diskBytes(t, 3<<20+333)
	const repo = "vi/ns/upload"
	cut := int64(1<<20 + 7)

	bu, err := reg.client(t).StartBlobUpload(ctx, repo)
	if err != nil {
		t.Fatal(err)
	}
	// A reader of unknown length, as a request body is.
	if n, err := bu.Append(ctx, io.MultiReader(bytes.NewReader(data[:cut]))); err != nil || n != cut {
		t.Fatalf("Append = %d, %v; want %d", n, err, cut)
	}
	loc, off, hs := bu.State()
	if off != cut || len(hs) == 0 || strings.Contains(loc, "digest=") {
		t.Fatalf("State = %q, %d, %d bytes of hash state", loc, off, len(hs))
	}

	// Another process: a client of its own, only the saved state.
	c2 := reg.client(t)
	bu2, err := c2.ResumeBlobUpload(ctx, repo, loc, off, hs)
	if err != nil {
		t.Fatal(err)
	}
	if n, err := bu2.Append(ctx, bytes.NewReader(data[cut:2*cut])); err != nil || n != cut {
		t.Fatalf("second Append = %d, %v", n, err)
	}
	if n, err := bu2.Append(ctx, bytes.NewReader(data[2*cut:])); err != nil || n != int64(len(data))-2*cut {
		t.Fatalf("third Append = %d, %v", n, err)
	}
	desc, err := bu2.Commit(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if desc.Digest != digest.FromBytes(data) || desc.Size != int64(len(data)) {
		t.Fatalf("committed %+v; want %s, %d bytes", desc, digest.FromBytes(data), len(data))
	}
	if got := readBlob(t, c2, repo, desc.Digest); !bytes.Equal(got, data) {
		t.Fatal("the committed blob differs from the bytes appended")
	}
	if _, err := bu2.Append(ctx, bytes.NewReader([]byte("more"))); err == nil {
		t.Error("Append after Commit succeeded")
	}
}

// failAfter yields data, then fails the way a request body does when its
// client goes away.
type failAfter struct {
	data []byte
	err  error
}

func (f *failAfter) Read(p []byte) (int, error) {
	if len(f.data) == 0 {
		return 0, f.err
	}
	n := copy(p, f.data)
	f.data = f.data[n:]
	return n, nil
}

func TestBlobUpload_FailingSourceKeepsEveryByteItGave(t *testing.T) {
	reg := newRegistry(t)
	ctx := context.Background()
	data := diskBytes(t, 2<<20+99)
	const repo = "vi/ns/cut"
	c := reg.client(t)
	bu, err := c.StartBlobUpload(ctx, repo)
	if err != nil {
		t.Fatal(err)
	}
	cut := int64(1<<20 + 12345)
	gone := errors.New("client went away")
	n, err := bu.Append(ctx, &failAfter{data: data[:cut], err: gone})
	var se *SourceError
	if !errors.As(err, &se) || !errors.Is(err, gone) || n != cut {
		t.Fatalf("Append of a failing source = %d, %v; want %d and a SourceError wrapping the source's", n, err, cut)
	}
	loc, off, hs := bu.State()
	if off != cut {
		t.Fatalf("offset %d after the failure, want %d", off, cut)
	}
	bu2, err := c.ResumeBlobUpload(ctx, repo, loc, off, hs)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bu2.Append(ctx, bytes.NewReader(data[cut:])); err != nil {
		t.Fatal(err)
	}
	desc, err := bu2.Commit(ctx)
	if err != nil || desc.Digest != digest.FromBytes(data) {
		t.Fatalf("Commit = %+v, %v; want %s", desc, err, digest.FromBytes(data))
	}
}

func TestResumeBlobUpload_MismatchesAreLost(t *testing.T) {
	reg := newRegistry(t)
	ctx := context.Background()
	data := diskBytes(t, 1<<20)
	const repo = "vi/ns/lost"
	c := reg.client(t)

	short, err := c.StartBlobUpload(ctx, repo)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := short.Append(ctx, bytes.NewReader(data[:1000])); err != nil {
		t.Fatal(err)
	}
	_, shortOff, shortHash := short.State()

	bu, err := c.StartBlobUpload(ctx, repo)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bu.Append(ctx, bytes.NewReader(data[:5000])); err != nil {
		t.Fatal(err)
	}
	loc, off, hs := bu.State()

	for name, tc := range map[string]struct {
		loc  string
		off  int64
		hash []byte
	}{
		// A state whose offset and hash agree, but the session holds more:
		// what a gateway that died in the middle of a PATCH leaves.
		"session holds more":      {loc, shortOff, shortHash},
		"hash covers other bytes": {loc, off, shortHash},
		"no hash state":           {loc, off, nil},
		"another host":            {strings.Replace(loc, reg.host, "evil.example:5000", 1), off, hs},
		"another repository":      {strings.Replace(loc, repo, "vi/ns/other", 1), off, hs},
	} {
		t.Run(name, func(t *testing.T) {
			if _, err := c.ResumeBlobUpload(ctx, repo, tc.loc, tc.off, tc.hash); !errors.Is(err, ErrUploadLost) {
				t.Fatalf("ResumeBlobUpload = %v, want ErrUploadLost", err)
			}
		})
	}

	if err := bu.Cancel(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ResumeBlobUpload(ctx, repo, loc, off, hs); !errors.Is(err, ErrUploadLost) {
		t.Fatalf("ResumeBlobUpload of a cancelled session = %v, want ErrUploadLost", err)
	}
}

// blockingReader yields data, then blocks until release is closed.
type blockingReader struct {
	data    []byte
	release chan struct{}
}

func (b *blockingReader) Read(p []byte) (int, error) {
	if len(b.data) == 0 {
		<-b.release
		return 0, io.EOF
	}
	n := copy(p, b.data)
	b.data = b.data[n:]
	return n, nil
}

func TestBlobUpload_AbortedPatchLeavesAStateThatIsCheckedOnResume(t *testing.T) {
	reg := newRegistry(t)
	data := diskBytes(t, 4<<20)
	const repo = "vi/ns/abort"
	c := reg.client(t)
	bu, err := c.StartBlobUpload(context.Background(), repo)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bu.Append(context.Background(), bytes.NewReader(data[:1<<20])); err != nil {
		t.Fatal(err)
	}
	loc, off, hs := bu.State()

	ctx, cancel := context.WithCancel(context.Background())
	src := &blockingReader{data: data[1<<20 : 3<<20], release: make(chan struct{})}
	time.AfterFunc(300*time.Millisecond, func() { cancel(); close(src.release) })
	if _, err := bu.Append(ctx, src); err == nil || errors.As(err, new(*SourceError)) {
		t.Fatalf("Append cut by its context = %v, want the registry side's error", err)
	}
	if gotLoc, gotOff, gotHash := bu.State(); gotLoc != loc || gotOff != off || !bytes.Equal(gotHash, hs) {
		t.Fatal("State after a broken Append is not the last confirmed one")
	}
	if _, err := bu.Append(context.Background(), bytes.NewReader(nil)); err == nil {
		t.Fatal("Append on a broken session succeeded")
	}
	// The registry may or may not have kept part of the aborted PATCH:
	// resuming either fails as lost or gives the right blob.
	bu2, err := c.ResumeBlobUpload(context.Background(), repo, loc, off, hs)
	if errors.Is(err, ErrUploadLost) {
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bu2.Append(context.Background(), bytes.NewReader(data[off:])); err != nil {
		t.Fatal(err)
	}
	desc, err := bu2.Commit(context.Background())
	if err != nil || desc.Digest != digest.FromBytes(data) {
		t.Fatalf("Commit = %+v, %v", desc, err)
	}
}

// lostAnswers performs PUTs but answers them with a transport error.
type lostAnswers struct{ rt http.RoundTripper }

func (l lostAnswers) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := l.rt.RoundTrip(r)
	if err == nil && r.Method == http.MethodPut {
		resp.Body.Close()
		return nil, errors.New("connection reset by peer")
	}
	return resp, err
}

func TestBlobUpload_CommitWhoseAnswerWasLostFindsTheBlob(t *testing.T) {
	reg := newRegistry(t)
	ctx := context.Background()
	c, err := New(reg.host, Options{PlainHTTP: true, Transport: lostAnswers{http.DefaultTransport}})
	if err != nil {
		t.Fatal(err)
	}
	data := diskBytes(t, 64<<10)
	bu, err := c.StartBlobUpload(ctx, "vi/ns/lostanswer")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bu.Append(ctx, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	desc, err := bu.Commit(ctx)
	if err != nil || desc.Digest != digest.FromBytes(data) || desc.Size != int64(len(data)) {
		t.Fatalf("Commit = %+v, %v", desc, err)
	}
}

func TestBlobUpload_EmptyBlob(t *testing.T) {
	reg := newRegistry(t)
	ctx := context.Background()
	c := reg.client(t)
	bu, err := c.StartBlobUpload(ctx, "vi/ns/empty")
	if err != nil {
		t.Fatal(err)
	}
	if n, err := bu.Append(ctx, bytes.NewReader(nil)); err != nil || n != 0 {
		t.Fatalf("Append of nothing = %d, %v", n, err)
	}
	loc, off, hs := bu.State()
	bu, err = c.ResumeBlobUpload(ctx, "vi/ns/empty", loc, off, hs)
	if err != nil {
		t.Fatal(err)
	}
	desc, err := bu.Commit(ctx)
	if err != nil || desc.Digest != digest.FromBytes(nil) || desc.Size != 0 {
		t.Fatalf("Commit = %+v, %v", desc, err)
	}
}

// TestBlobUpload_DVCRWithAPushToken runs a resumed upload against DVCR
// over TLS with a token scoped to the one repository, which is what the
// upload gateway holds.
func TestBlobUpload_DVCRWithAPushToken(t *testing.T) {
	key := bytes.Repeat([]byte("k"), 32)
	hash, err := bcrypt.GenerateFromPassword([]byte("pw"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	users, err := auth.ParseUsers(strings.NewReader("admin:ctl:" + string(hash) + "\n"))
	if err != nil {
		t.Fatal(err)
	}
	srv, err := server.New(context.Background(), server.Config{
		Storage: server.Storage{RootDirectory: t.TempDir()}, Users: users, TokenKeys: [][]byte{key},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	ts := httptest.NewTLSServer(srv.Handler())
	t.Cleanup(ts.Close)
	const repo = "vi/ns/pushed"
	now := time.Now()
	tok, err := auth.Mint(key, auth.Claims{Subject: "upload", Audience: auth.DefaultService, IssuedAt: now, ExpiresAt: now.Add(time.Hour),
		Access: []auth.ResourceActions{{Type: "repository", Name: repo, Actions: []string{"pull", "push"}}}})
	if err != nil {
		t.Fatal(err)
	}
	ca := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ts.Certificate().Raw})
	newClient := func() *Client {
		c, err := New(strings.TrimPrefix(ts.URL, "https://"), Options{Token: tok, CABundle: ca})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	ctx := context.Background()
	data := diskBytes(t, 2<<20+1)
	bu, err := newClient().StartBlobUpload(ctx, repo)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bu.Append(ctx, &failAfter{data: data[:777777], err: io.ErrUnexpectedEOF}); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("Append = %v", err)
	}
	loc, off, hs := bu.State()
	c := newClient()
	bu, err = c.ResumeBlobUpload(ctx, repo, loc, off, hs)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bu.Append(ctx, bytes.NewReader(data[off:])); err != nil {
		t.Fatal(err)
	}
	desc, err := bu.Commit(ctx)
	if err != nil || desc.Digest != digest.FromBytes(data) {
		t.Fatalf("Commit = %+v, %v", desc, err)
	}
	if got := readBlob(t, c, repo, desc.Digest); !bytes.Equal(got, data) {
		t.Fatal("blob differs")
	}
	// The token grants nothing elsewhere.
	if _, err := c.StartBlobUpload(ctx, "vi/ns/other"); err == nil || ErrorCode(err) != "UNAUTHORIZED" {
		t.Errorf("StartBlobUpload in another repository = %v, want UNAUTHORIZED", err)
	}
}

func TestCheckRange(t *testing.T) {
	for _, tc := range []struct {
		h    string
		want int64
		ok   bool
	}{
		{"0-0", 0, true}, {"0-0", 1, true}, {"0-0", 2, false},
		{"0-99", 100, true}, {"0-99", 99, false}, {"bytes=0-99", 100, true},
		{"", 0, true}, {"", 5, false}, {"5-9", 10, false}, {"0-x", 1, false},
	} {
		if err := checkRange(tc.h, tc.want); (err == nil) != tc.ok {
			t.Errorf("checkRange(%q, %d) = %v, want ok=%v", tc.h, tc.want, err, tc.ok)
		}
	}
}
