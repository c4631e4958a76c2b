package worker

import (
	"bytes"
	"context"
	"encoding/pem"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"

	"vimg.dev/vimg/dvcr/auth"
	"vimg.dev/vimg/dvcr/client"
	"vimg.dev/vimg/dvcr/server"
	"vimg.dev/vimg/pkg/diskimage/testimg"
	"vimg.dev/vimg/pkg/importer"
	"vimg.dev/vimg/pkg/worker/api"
)

// dvcrFixture is DVCR in-process over TLS and a push token for one
// repository, as the controller hands a worker.
type dvcrFixture struct {
	address string
	ca      []byte
	token   string
}

func newDVCR(t *testing.T, repo string) dvcrFixture {
	t.Helper()
	key := bytes.Repeat([]byte("w"), 32)
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
	now := time.Now()
	tok, err := auth.Mint(key, auth.Claims{Subject: "worker", Audience: auth.DefaultService, IssuedAt: now, ExpiresAt: now.Add(time.Hour),
		Access: []auth.ResourceActions{{Type: "repository", Name: repo, Actions: []string{"pull", "push", "delete"}}}})
	if err != nil {
		t.Fatal(err)
	}
	return dvcrFixture{
		address: strings.TrimPrefix(ts.URL, "https://"),
		ca:      pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ts.Certificate().Raw}),
		token:   tok,
	}
}

func (f dvcrFixture) client(t *testing.T) *client.Client {
	t.Helper()
	c, err := client.New(f.address, client.Options{Token: f.token, CABundle: f.ca})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestRun_ImportsAnUploadedBlob(t *testing.T) {
	const repo, ref = "vi/ns/uploaded", "vi/ns/uploaded:0c5e6a1e-0000-4000-8000-000000000001"
	reg := newDVCR(t, repo)
	disk := filepath.Join(t.TempDir(), "disk.raw")
	testimg.Pattern(t, disk, 3<<20, 5)
	data, err := os.ReadFile(disk)
	if err != nil {
		t.Fatal(err)
	}
	c := reg.client(t)
	desc, err := c.PushBlob(context.Background(), repo, bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}

	req := api.Request{
		Source: api.SourceSpec{Type: api.SourceDVCRBlob, URL: desc.Digest.String(), Size: desc.Size},
		DVCR:   api.DVCRSpec{Address: reg.address, Ref: ref, Token: reg.token, CABundle: reg.ca},
	}
	out := run(context.Background(), Config{RequestPath: writeRequest(t, req)})
	if out.Result == nil {
		t.Fatalf("import of an uploaded blob failed: %+v", out)
	}
	if out.Result.Format != "raw" || out.Result.SourceSize != int64(len(data)) || out.Result.VirtualSize != int64(len(data)) {
		t.Errorf("result %+v, want a raw disk of %d bytes", out.Result, len(data))
	}
	im, err := c.Open(context.Background(), ref)
	if err != nil {
		t.Fatal(err)
	}
	if im.Size() != int64(len(data)) {
		t.Errorf("stored disk has %d bytes, want %d", im.Size(), len(data))
	}
}

func TestOpenSource_MissingUploadIsPermanent(t *testing.T) {
	const repo = "vi/ns/gone"
	reg := newDVCR(t, repo)
	src, err := openSource(context.Background(), api.SourceSpec{
		Type: api.SourceDVCRBlob, URL: "sha256:" + strings.Repeat("ab", 32), Size: 10,
	}, reg.client(t), repo+":uid")
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	if src.Size() != 10 || src.ReaderAt() != nil {
		t.Errorf("Size %d, ReaderAt %v; want 10 and none", src.Size(), src.ReaderAt())
	}
	_, err = src.Stream()
	e := importer.Classify(err)
	if e == nil || !e.Permanent || e.Reason != importer.ReasonSourceNotFound || !strings.Contains(e.Message, "upload") {
		t.Fatalf("Stream of a missing blob: %+v", e)
	}
	if _, err := src.Stream(); err == nil {
		t.Error("a second Stream succeeded")
	}
}

func TestOpenSource_BadBlobSpecsAreRefused(t *testing.T) {
	for name, tc := range map[string]struct {
		spec api.SourceSpec
		ref  string
	}{
		"bad digest":    {api.SourceSpec{Type: api.SourceDVCRBlob, URL: "md5:xyz", Size: 1}, "vi/ns/x:uid"},
		"no tag in ref": {api.SourceSpec{Type: api.SourceDVCRBlob, URL: "sha256:" + strings.Repeat("ab", 32)}, "dvcr.example:5000/vi/ns/x"},
		"negative size": {api.SourceSpec{Type: api.SourceDVCRBlob, URL: "sha256:" + strings.Repeat("ab", 32), Size: -1}, "vi/ns/x:uid"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := openSource(context.Background(), tc.spec, nil, tc.ref)
			if e := importer.Classify(err); e == nil || !e.Permanent {
				t.Fatalf("openSource = %v, want a permanent error", err)
			}
		})
	}
}
