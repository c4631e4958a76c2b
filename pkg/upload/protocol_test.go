package upload

import (
	"errors"
	"net/http"
	"testing"
	"time"

	"vimg.dev/vimg/pkg/worker/api"
)

func TestParsePath(t *testing.T) {
	for _, tc := range []struct {
		path       string
		uid, token string
	}{
		{"/upload/6f1c-2d9e/abc123", "6f1c-2d9e", "abc123"},
		{"/upload/6f1c-2d9e/abc123/", "6f1c-2d9e", "abc123"},
		{"/upload/6f1c-2d9e/abc123/disk.qcow2", "6f1c-2d9e", "abc123"},
		{"/upload/6f1c-2d9e", "", ""},
		{"/upload/6f1c-2d9e/", "", ""},
		{"/upload//abc", "", ""},
		{"/upload/UPPER/abc", "", ""},
		{"/upload/../abc", "", ""},
		{"/uploads/x/abc", "", ""},
		{"/upload/x/a.b", "", ""},
	} {
		uid, token, ok := parsePath(tc.path)
		if ok != (tc.uid != "") || uid != tc.uid || token != tc.token {
			t.Errorf("parsePath(%q) = %q, %q, %v", tc.path, uid, token, ok)
		}
	}
}

func TestParseContentRange(t *testing.T) {
	for _, tc := range []struct {
		h    string
		want contentRange
		ok   bool
	}{
		{"bytes 0-99/100", contentRange{start: 0, end: 99, total: 100}, true},
		{"bytes 100-199/*", contentRange{start: 100, end: 199, total: -1}, true},
		{"bytes */100", contentRange{start: 100, end: 99, total: 100, finish: true}, true},
		{"bytes */*", contentRange{}, false},
		{"bytes 0-100/100", contentRange{}, false},
		{"bytes 5-4/100", contentRange{}, false},
		{"bytes -5/100", contentRange{}, false},
		{"0-99/100", contentRange{}, false},
		{"bytes 0-99", contentRange{}, false},
		{"bytes 0-99/-1", contentRange{}, false},
	} {
		got, err := parseContentRange(tc.h)
		if (err == nil) != tc.ok || (tc.ok && got != tc.want) {
			t.Errorf("parseContentRange(%q) = %+v, %v", tc.h, got, err)
		}
	}
}

func TestParseRequest_BoundsAndConsistency(t *testing.T) {
	put := func(cl int64, cr string) *http.Request {
		r, _ := http.NewRequest(http.MethodPut, "https://gw/upload/u/t", http.NoBody)
		r.ContentLength = cl
		if cr != "" {
			r.Header.Set("Content-Range", cr)
		}
		return r
	}
	for _, tc := range []struct {
		name   string
		r      *http.Request
		status int // 0: accepted
		req    request
	}{
		{"content length", put(100, ""), 0, request{total: 100, length: 100}},
		{"chunked", put(-1, ""), 0, request{total: -1, length: -1}},
		{"range", put(10, "bytes 90-99/100"), 0, request{total: 100, length: 10}},
		{"range, chunked", put(-1, "bytes 90-99/*"), 0, request{total: -1, length: 10}},
		{"finish", put(0, "bytes */100"), 0, request{total: 100, length: 0}},
		{"length differs from range", put(11, "bytes 90-99/100"), http.StatusBadRequest, request{}},
		{"finish with a body", put(5, "bytes */100"), http.StatusBadRequest, request{}},
		{"too large", put(2000, ""), http.StatusRequestEntityTooLarge, request{}},
		{"range too large", put(1, "bytes 0-0/2000"), http.StatusRequestEntityTooLarge, request{}},
		{"bad range", put(1, "items 0-0/1"), http.StatusBadRequest, request{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, err := parseRequest(tc.r, 1000)
			var se *statusError
			switch {
			case tc.status == 0 && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.status != 0 && (!errors.As(err, &se) || se.status != tc.status):
				t.Fatalf("parseRequest = %v, want status %d", err, tc.status)
			case tc.status == 0 && (req.total != tc.req.total || req.length != tc.req.length):
				t.Fatalf("parseRequest = %+v, want %+v", req, tc.req)
			}
		})
	}
}

func TestDecide(t *testing.T) {
	now := time.Now()
	past, future := now.Add(-time.Minute), now.Add(time.Minute)
	rng := func(start, end, total int64) request {
		return request{rng: &contentRange{start: start, end: end, total: total}, total: total, length: end - start + 1}
	}
	fresh := request{total: 10, length: 10}
	partial := api.UploadState{Received: 5, Total: 10, Session: "s", StartedAt: past}
	for _, tc := range []struct {
		name   string
		u      Upload
		req    request
		start  bool
		status int
	}{
		{"new upload", Upload{State: api.UploadState{Total: -1}}, fresh, true, 0},
		{"restart", Upload{State: partial}, fresh, true, 0},
		{"resume", Upload{State: partial}, rng(5, 9, 10), false, 0},
		{"resume, size unknown", Upload{State: partial}, rng(5, 9, -1), false, 0},
		{"range at 0 of nothing", Upload{State: api.UploadState{Total: -1}}, rng(0, 9, 10), true, 0},
		{"wrong start", Upload{State: partial}, rng(4, 9, 10), false, http.StatusRequestedRangeNotSatisfiable},
		{"other size", Upload{State: partial}, rng(5, 19, 20), false, http.StatusBadRequest},
		{"done", Upload{State: api.UploadState{Done: true, Size: 10}}, fresh, false, http.StatusConflict},
		{"held", Upload{State: partial, Holder: Holder{ID: "other", Until: future}}, rng(5, 9, 10), false, http.StatusConflict},
		{"held, lease over", Upload{State: partial, Holder: Holder{ID: "other", Until: past}}, rng(5, 9, 10), false, 0},
		{"expired", Upload{Expires: past, State: api.UploadState{Total: -1}}, fresh, false, http.StatusForbidden},
		{"expired, range at 0", Upload{Expires: past, State: api.UploadState{Total: -1}}, rng(0, 9, 10), false, http.StatusForbidden},
		{"expired, started", Upload{Expires: past, State: partial}, rng(5, 9, 10), false, 0},
		{"expired, started, restart", Upload{Expires: past, State: partial}, fresh, true, 0},
		{"not yet expired", Upload{Expires: future, State: api.UploadState{Total: -1}}, fresh, true, 0},
		{"finish", Upload{State: api.UploadState{Received: 10, Total: 10, Session: "s"}}, request{rng: &contentRange{start: 10, end: 9, total: 10, finish: true}, total: 10}, false, 0},
		{"finish too early", Upload{State: partial}, request{rng: &contentRange{start: 10, end: 9, total: 10, finish: true}, total: 10}, false, http.StatusRequestedRangeNotSatisfiable},
	} {
		t.Run(tc.name, func(t *testing.T) {
			start, err := decide(&tc.u, tc.req, now, "me", time.Minute)
			var se *statusError
			switch {
			case tc.status == 0 && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.status != 0 && (!errors.As(err, &se) || se.status != tc.status):
				t.Fatalf("decide = %v, want status %d", err, tc.status)
			case start != tc.start:
				t.Fatalf("start = %v, want %v", start, tc.start)
			}
		})
	}
}
