package client

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"vimg.dev/vimg/pkg/upload"
)

func TestSender_ResumesAfterDroppedConnections(t *testing.T) {
	g := newGateway(t, nil)
	url := g.addUpload("", time.Time{})
	_, data := testFile(t, 3<<20, 1)
	// The first three connections break after 700 KB each.
	proxy := g.cutter(3, 700<<10, false)
	var notices []string
	s := g.sender(&notices)
	var last int64
	s.Progress = func(sent, total int64) {
		if total != int64(len(data)) || sent < 0 || sent > total {
			t.Errorf("progress %d of %d", sent, total)
		}
		last = sent
	}
	res, err := s.SendFile(context.Background(), proxy.url(url), bytes.NewReader(data), int64(len(data)))
	if err != nil {
		t.Fatalf("SendFile: %v (notices %q)", err, notices)
	}
	if res.Digest != sha(data) || res.Size != int64(len(data)) {
		t.Fatalf("result %+v, want %s", res, sha(data))
	}
	if last != int64(len(data)) {
		t.Errorf("last progress %d", last)
	}
	resumed := 0
	for _, n := range notices {
		if strings.HasPrefix(n, "resuming at byte") {
			resumed++
		}
	}
	if resumed == 0 {
		t.Errorf("no resumption among the notices %q", notices)
	}
	if st := g.state(uidOf(url)); !st.Done || st.Digest != sha(data) {
		t.Errorf("gateway state %+v", st)
	}
}

func TestSender_StalledConnectionIsAbandonedAndResumed(t *testing.T) {
	g := newGateway(t, func(c *upload.Config) { c.IdleTimeout = 700 * time.Millisecond })
	url := g.addUpload("", time.Time{})
	_, data := testFile(t, 2<<20, 2)
	proxy := g.cutter(1, 500<<10, true)
	var notices []string
	s := g.sender(&notices)
	s.StallTimeout = 500 * time.Millisecond
	res, err := s.SendFile(context.Background(), proxy.url(url), bytes.NewReader(data), int64(len(data)))
	if err != nil || res.Digest != sha(data) {
		t.Fatalf("SendFile = %+v, %v (notices %q)", res, err, notices)
	}
}

func TestSender_PartialUploadOfAnotherFileStartsOver(t *testing.T) {
	g := newGateway(t, nil)
	url := g.addUpload("", time.Time{})
	_, a := testFile(t, 1<<20, 3)
	_, b := testFile(t, 1<<20, 4)
	proxy := g.cutter(1, 300<<10, false)
	s := g.sender(nil)
	s.Attempts = 1
	if _, err := s.SendFile(context.Background(), proxy.url(url), bytes.NewReader(a), int64(len(a))); err == nil {
		t.Fatal("the cut upload succeeded")
	}
	if st := g.settled(uidOf(url)); st.Received == 0 || st.Done {
		t.Fatalf("state after the cut %+v", st)
	}
	var notices []string
	s = g.sender(&notices)
	res, err := s.SendFile(context.Background(), url, bytes.NewReader(b), int64(len(b)))
	if err != nil || res.Digest != sha(b) {
		t.Fatalf("SendFile of the other file = %+v, %v", res, err)
	}
	if !strings.Contains(strings.Join(notices, "\n"), "another file; starting over") {
		t.Errorf("notices %q do not say the upload started over", notices)
	}
}

func TestSender_ResumesAnEarlierRunOfTheSameFile(t *testing.T) {
	g := newGateway(t, nil)
	url := g.addUpload("", time.Time{})
	_, data := testFile(t, 1<<20, 5)
	proxy := g.cutter(1, 400<<10, false)
	s := g.sender(nil)
	s.Attempts = 1
	if _, err := s.SendFile(context.Background(), proxy.url(url), bytes.NewReader(data), int64(len(data))); err == nil {
		t.Fatal("the cut upload succeeded")
	}
	var notices []string
	s = g.sender(&notices)
	var first int64 = -1
	s.Progress = func(sent, _ int64) {
		if first < 0 {
			first = sent
		}
	}
	res, err := s.SendFile(context.Background(), url, bytes.NewReader(data), int64(len(data)))
	if err != nil || res.Digest != sha(data) {
		t.Fatalf("SendFile = %+v, %v", res, err)
	}
	if first < 100<<10 {
		t.Errorf("the second run started at byte %d, not where the first stopped (notices %q)", first, notices)
	}
}

func TestSender_CompleteUploadOfTheSameSizeIsSuccess(t *testing.T) {
	g := newGateway(t, nil)
	url := g.addUpload("", time.Time{})
	_, data := testFile(t, 100000, 6)
	s := g.sender(nil)
	first, err := s.SendFile(context.Background(), url, bytes.NewReader(data), int64(len(data)))
	if err != nil {
		t.Fatal(err)
	}
	again, err := s.SendFile(context.Background(), url, bytes.NewReader(data), int64(len(data)))
	if err != nil || again != first {
		t.Fatalf("second SendFile = %+v, %v; want %+v", again, err, first)
	}
	if _, err := s.SendFile(context.Background(), url, bytes.NewReader(data[:10]), 10); err == nil || !strings.Contains(err.Error(), "delete the image") {
		t.Fatalf("SendFile of another size to a complete upload = %v", err)
	}
}

func TestSender_PermanentRefusalsStopAtOnce(t *testing.T) {
	g := newGateway(t, nil)
	expired := g.addUpload("", time.Now().Add(-time.Hour))
	_, data := testFile(t, 1000, 7)
	s := g.sender(nil)
	start := time.Now()
	_, err := s.SendFile(context.Background(), expired, bytes.NewReader(data), int64(len(data)))
	var he *HTTPError
	if !errors.As(err, &he) || he.Status != http.StatusForbidden || !strings.Contains(err.Error(), "timed out") {
		t.Fatalf("SendFile to an expired upload = %v", err)
	}
	if time.Since(start) > 2*time.Second {
		t.Errorf("a permanent refusal took %s", time.Since(start))
	}
	bad := strings.Replace(expired, uidOf(expired), "ffffffff-0000-4000-8000-000000000000", 1)
	if _, err := s.SendFile(context.Background(), bad, bytes.NewReader(data), int64(len(data))); !errors.As(err, &he) || he.Status != http.StatusNotFound ||
		strings.Contains(err.Error(), bad) {
		t.Fatalf("SendFile to an unknown upload = %v (the URL must not show: it holds the token)", err)
	}
}

func TestSender_GivesUpAfterAttemptsWithoutProgress(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "the registry is down", http.StatusBadGateway)
	}))
	defer srv.Close()
	s := &Sender{HTTP: srv.Client(), Attempts: 3, Backoff: time.Millisecond}
	_, err := s.SendFile(context.Background(), srv.URL+"/upload/u/t", bytes.NewReader([]byte("x")), 1)
	if err == nil || !strings.Contains(err.Error(), "giving up after 3 attempts") {
		t.Fatalf("SendFile against a failing gateway = %v", err)
	}
}

func TestSender_StreamIsSentOnceAndCannotResume(t *testing.T) {
	g := newGateway(t, nil)
	_, data := testFile(t, 1<<20, 8)
	s := g.sender(nil)
	url := g.addUpload("", time.Time{})
	res, err := s.SendStream(context.Background(), url, bytes.NewReader(data))
	if err != nil || res.Digest != sha(data) {
		t.Fatalf("SendStream = %+v, %v", res, err)
	}
	url = g.addUpload("", time.Time{})
	proxy := g.cutter(1, 200<<10, false)
	if _, err := s.SendStream(context.Background(), proxy.url(url), bytes.NewReader(data)); err == nil || !strings.Contains(err.Error(), "cannot be resumed") {
		t.Fatalf("SendStream cut off = %v", err)
	}
}
