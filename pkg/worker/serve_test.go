package worker

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"vimg.dev/vimg/pkg/worker/api"
)

func TestServe_RangesOfTheImageOnlyWithTheToken(t *testing.T) {
	dir := t.TempDir()
	disk := filepath.Join(dir, "disk.img")
	data := bytes.Repeat([]byte("0123456789abcdef"), 4096) // 64 KiB: 48 image + 16 padding
	if err := os.WriteFile(disk, data, 0o600); err != nil {
		t.Fatal(err)
	}
	token := strings.Repeat("t", 40)
	srv := httptest.NewServer(ServeHandler(ServeConfig{Path: disk, Size: 48 << 10, Token: token}))
	defer srv.Close()
	get := func(auth, rng string) (*http.Response, []byte) {
		req, _ := http.NewRequest(http.MethodGet, srv.URL+api.ServePath, nil)
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		if rng != "" {
			req.Header.Set("Range", rng)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp, b
	}
	for _, auth := range []string{"", "Bearer wrong", "Bearer " + token[:39]} {
		if resp, _ := get(auth, ""); resp.StatusCode != http.StatusUnauthorized {
			t.Fatalf("Authorization %q: status %d, want 401", auth, resp.StatusCode)
		}
	}
	resp, b := get("Bearer "+token, "")
	if resp.StatusCode != http.StatusOK || !bytes.Equal(b, data[:48<<10]) || resp.Header.Get("Accept-Ranges") != "bytes" {
		t.Fatalf("whole disk: status %d, %d bytes, Accept-Ranges %q; want the image's 48 KiB", resp.StatusCode, len(b), resp.Header.Get("Accept-Ranges"))
	}
	resp, b = get("Bearer "+token, "bytes=100-199")
	if resp.StatusCode != http.StatusPartialContent || !bytes.Equal(b, data[100:200]) {
		t.Fatalf("range: status %d, %q", resp.StatusCode, b)
	}
	req, _ := http.NewRequest(http.MethodPut, srv.URL+api.ServePath, strings.NewReader("x"))
	req.Header.Set("Authorization", "Bearer "+token)
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusMethodNotAllowed {
		t.Fatalf("PUT: %v %v, want 405", resp.StatusCode, err)
	}
	if resp, err := http.Get(srv.URL + "/healthz"); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("healthz: %v %v", resp.StatusCode, err)
	}
}

func TestServe_NotReadyWhileTheDiskIsShorterThanTheImage(t *testing.T) {
	disk := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(disk, make([]byte, 1024), 0o600); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(ServeHandler(ServeConfig{Path: disk, Size: 4096, Token: strings.Repeat("t", 40)}))
	defer srv.Close()
	if resp, err := http.Get(srv.URL + "/healthz"); err != nil || resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("healthz of a short disk: %v %v, want 503", resp.StatusCode, err)
	}
}
