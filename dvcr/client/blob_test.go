package client

import (
	"bytes"
	"context"
	"encoding/pem"
	"errors"
	"io"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	"golang.org/x/crypto/bcrypt"

	"vimg.dev/vimg/dvcr/auth"
	"vimg.dev/vimg/dvcr/layout"
	"vimg.dev/vimg/dvcr/server"
)

func TestPushBlob_StreamOfUnknownLengthRoundTrips(t *testing.T) {
	reg := newRegistry(t)
	c := reg.client(t)
	ctx := context.Background()
	data := diskBytes(t, 3<<20+5)
	const repo = "vi/ns/spill"
	// MultiReader hides the length: the PATCH goes chunked.
	desc, err := c.PushBlob(ctx, repo, io.MultiReader(bytes.NewReader(data)))
	if err != nil {
		t.Fatal(err)
	}
	if desc.Digest != digest.FromBytes(data) || desc.Size != int64(len(data)) {
		t.Fatalf("pushed %+v; want %s, %d bytes", desc, digest.FromBytes(data), len(data))
	}
	if n := reg.n.patch.Load(); n != 1 {
		t.Errorf("%d PATCH requests, want one streamed PATCH", n)
	}
	if n, err := c.HeadBlob(ctx, repo, desc.Digest); err != nil || n != desc.Size {
		t.Errorf("HeadBlob = %d, %v; want %d", n, err, desc.Size)
	}
	rc, err := c.BlobReader(ctx, repo, desc.Digest)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("BlobReader gave %d bytes (%v), differing from the %d pushed", len(got), err, len(data))
	}

	if err := c.DeleteBlob(ctx, repo, desc.Digest); err != nil {
		t.Fatal(err)
	}
	if _, err := c.HeadBlob(ctx, repo, desc.Digest); !errors.Is(err, ErrNotFound) {
		t.Errorf("HeadBlob after DeleteBlob = %v, want not found", err)
	}
	if _, err := c.BlobReader(ctx, repo, desc.Digest); !errors.Is(err, ErrNotFound) {
		t.Errorf("BlobReader after DeleteBlob = %v, want not found", err)
	}
	if err := c.DeleteBlob(ctx, repo, desc.Digest); !errors.Is(err, ErrNotFound) {
		t.Errorf("second DeleteBlob = %v, want not found", err)
	}

	empty, err := c.PushBlob(ctx, repo, io.MultiReader())
	if err != nil || empty.Size != 0 || empty.Digest != digest.FromBytes(nil) {
		t.Errorf("PushBlob of an empty stream = %+v, %v", empty, err)
	}
}

// brokenReader yields n bytes, then fails.
type brokenReader struct{ n int }

func (b *brokenReader) Read(p []byte) (int, error) {
	if b.n == 0 {
		return 0, errors.New("the disk is on fire")
	}
	k := min(len(p), b.n)
	clear(p[:k])
	b.n -= k
	return k, nil
}

func TestPushBlob_SourceFailureIsTheError(t *testing.T) {
	reg := newRegistry(t)
	c := reg.client(t)
	_, err := c.PushBlob(context.Background(), "vi/ns/broken", &brokenReader{n: 3 << 20})
	if err == nil || !strings.Contains(err.Error(), "the disk is on fire") || !strings.Contains(err.Error(), "reading source at byte 3145728") {
		t.Fatalf("PushBlob of a failing reader: %v, want the reader's error", err)
	}
}

func TestBlobReader_CorruptBlobFailsAtTheEnd(t *testing.T) {
	reg := newRegistry(t)
	c := reg.client(t)
	ctx := context.Background()
	data := diskBytes(t, 1<<20)
	desc, err := c.PushBlob(ctx, "vi/ns/corrupt", bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	hex := desc.Digest.Encoded()
	blob := filepath.Join(reg.root, "docker/registry/v2/blobs/sha256", hex[:2], hex, "data")
	f, err := os.OpenFile(blob, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{data[777] ^ 0xff}, 777); err != nil {
		t.Fatal(err)
	}
	f.Close()
	rc, err := c.BlobReader(ctx, "vi/ns/corrupt", desc.Digest)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	if _, err := io.ReadAll(rc); err == nil || !strings.Contains(err.Error(), "content has digest") {
		t.Fatalf("reading a corrupt blob: %v, want a digest mismatch", err)
	}
}

func TestPush_FinalizeFillsMetadataAfterTheLayerUpload(t *testing.T) {
	reg := newRegistry(t)
	c := reg.client(t)
	ctx := context.Background()
	data := diskBytes(t, 1<<20+7)
	ref := "vi/ns/fin:u1"
	meta := layout.Meta{Format: layout.FormatQcow2}
	called := false
	_, err := c.Push(ctx, ref, bytes.NewReader(data), int64(len(data)), meta, PushOptions{
		Finalize: func(m *layout.Meta) error {
			called = true
			if reg.n.put.Load() != 1 {
				t.Errorf("Finalize called after %d upload commits, want 1 (the layer's)", reg.n.put.Load())
			}
			if _, err := c.Head(ctx, ref); !errors.Is(err, ErrNotFound) {
				t.Errorf("the manifest exists before Finalize returned: %v", err)
			}
			if m.StoredSize != int64(len(data)) {
				t.Errorf("Finalize sees stored size %d, want %d", m.StoredSize, len(data))
			}
			m.VirtualSize, m.SourceChecksum = 10<<20, "sha256:"+strings.Repeat("1", 64)
			return nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	if !called {
		t.Fatal("Finalize was not called")
	}
	im, err := c.Open(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	if im.Meta.VirtualSize != 10<<20 || im.Meta.SourceChecksum != "sha256:"+strings.Repeat("1", 64) {
		t.Errorf("stored metadata %+v lacks what Finalize set", im.Meta)
	}
}

func TestPush_FinalizeErrorOrChangeOfTheLayerLeavesNoManifest(t *testing.T) {
	reg := newRegistry(t)
	c := reg.client(t)
	ctx := context.Background()
	data := diskBytes(t, 256<<10)
	refused := errors.New("the image check failed")
	for name, f := range map[string]func(*layout.Meta) error{
		"error":               func(*layout.Meta) error { return refused },
		"format changed":      func(m *layout.Meta) error { m.Format = layout.FormatVMDK; return nil },
		"stored size changed": func(m *layout.Meta) error { m.StoredSize++; return nil },
		"invalid":             func(m *layout.Meta) error { m.VirtualSize = -1; return nil },
	} {
		t.Run(name, func(t *testing.T) {
			ref := "vi/ns/refused:" + strings.ReplaceAll(name, " ", "-")
			_, err := c.Push(ctx, ref, bytes.NewReader(data), int64(len(data)), rawMeta, PushOptions{Finalize: f})
			if err == nil || !strings.Contains(err.Error(), "finaliz") {
				t.Fatalf("Push = %v, want a finalizing error", err)
			}
			if name == "error" && !errors.Is(err, refused) {
				t.Errorf("Push error %v does not wrap Finalize's", err)
			}
			if _, err := c.Head(ctx, ref); !errors.Is(err, ErrNotFound) {
				t.Errorf("Head after a refused Finalize = %v, want not found", err)
			}
		})
	}
}

// TestBlobs_DVCRWithTokenAuth runs the blob calls against DVCR itself over
// TLS: a DELETE needs a token with the delete action, which the client
// gets from the challenge.
func TestBlobs_DVCRWithTokenAuth(t *testing.T) {
	hash, err := bcrypt.GenerateFromPassword([]byte("pw"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	users, err := auth.ParseUsers(strings.NewReader("admin:ctl:" + string(hash) + "\n"))
	if err != nil {
		t.Fatal(err)
	}
	srv, err := server.New(context.Background(), server.Config{
		Storage: server.Storage{RootDirectory: t.TempDir()}, Users: users, TokenKeys: [][]byte{bytes.Repeat([]byte("k"), 32)},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	ts := httptest.NewTLSServer(srv.Handler())
	t.Cleanup(ts.Close)
	c, err := New(strings.TrimPrefix(ts.URL, "https://"), Options{Username: "ctl", Password: "pw",
		CABundle: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ts.Certificate().Raw})})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	data := diskBytes(t, 2<<20+1)
	desc, err := c.PushBlob(ctx, "vi/ns/tok", io.MultiReader(bytes.NewReader(data)))
	if err != nil {
		t.Fatal(err)
	}
	rc, err := c.BlobReader(ctx, "vi/ns/tok", desc.Digest)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("BlobReader: %d bytes, %v", len(got), err)
	}
	if err := c.DeleteBlob(ctx, "vi/ns/tok", desc.Digest); err != nil {
		t.Fatal(err)
	}
	if _, err := c.HeadBlob(ctx, "vi/ns/tok", desc.Digest); !errors.Is(err, ErrNotFound) {
		t.Errorf("HeadBlob after DeleteBlob = %v, want not found", err)
	}
}

func TestBlobCalls_RefuseWhatIsNotARepository(t *testing.T) {
	c, err := New("registry.example:5000", Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	d := digest.FromBytes(nil)
	for _, repo := range []string{"", "vi/ns/x:tag", "vi/ns/x@" + d.String(), "host.example:5000/x", "vi/ns/x/"} {
		if _, err := c.PushBlob(ctx, repo, bytes.NewReader(nil)); err == nil || !strings.Contains(err.Error(), "invalid repository") {
			t.Errorf("PushBlob(%q) = %v, want invalid repository", repo, err)
		}
		if err := c.DeleteBlob(ctx, repo, d); err == nil || !strings.Contains(err.Error(), "invalid repository") {
			t.Errorf("DeleteBlob(%q) = %v, want invalid repository", repo, err)
		}
	}
}

func TestTransportError_DropsTheUploadStateFromTheURL(t *testing.T) {
	in := &url.Error{Op: "Patch", URL: "https://dvcr.example/v2/vi/ns/x/blobs/uploads/0a1b?_state=opaque-upload-state", Err: io.ErrUnexpectedEOF}
	out := transportError(in)
	if strings.Contains(out.Error(), "_state") || !strings.Contains(out.Error(), "https://dvcr.example/v2/vi/ns/x/blobs/uploads/0a1b") {
		t.Errorf("transportError gave %q", out)
	}
	if !errors.Is(out, io.ErrUnexpectedEOF) {
		t.Errorf("transportError lost the cause: %v", out)
	}
	plain := errors.New("not a url.Error")
	if transportError(plain) != plain {
		t.Error("transportError changed an error without a URL")
	}
}
