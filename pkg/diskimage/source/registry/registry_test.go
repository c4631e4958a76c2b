package registry

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	ggcrregistry "github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"vimg.dev/vimg/pkg/diskimage/source"
)

// checkDisk asserts that ref streams disk, whole, and describes it right.
func checkDisk(t *testing.T, ref string, opts Options, disk []byte, img v1.Image) *Image {
	t.Helper()
	src, got, n, err := readAll(t, ref, opts)
	if err != nil {
		t.Fatalf("reading %s: %v", ref, err)
	}
	if n != int64(len(disk)) || got != sha(disk) {
		t.Fatalf("streamed %d bytes with sha256 %s, want %d bytes with %s", n, got, len(disk), sha(disk))
	}
	if src.Size() != int64(len(disk)) {
		t.Errorf("Size() = %d, want %d", src.Size(), len(disk))
	}
	if src.ReaderAt() != nil {
		t.Error("ReaderAt() is not nil")
	}
	if src.Name() != ref {
		t.Errorf("Name() = %q, want %q", src.Name(), ref)
	}
	if img != nil {
		d, err := img.Digest()
		if err != nil {
			t.Fatal(err)
		}
		if src.ImageDigest() != d.String() {
			t.Errorf("ImageDigest() = %s, want %s", src.ImageDigest(), d)
		}
	}
	return src
}

// TestDockerRegistry pulls every layer and manifest flavour from Debian's
// docker-registry (distribution 2.8), the registry most containerDisks live
// in, with images pushed by go-containerregistry.
func TestDockerRegistry(t *testing.T) {
	host := dockerRegistry(t, nil)
	p := pusher{host: host}
	disk := qcow2Disk(t)
	opts := Options{PlainHTTP: true}

	for _, c := range []struct {
		name, path string
		kind       layerKind
		oci        bool
	}{
		{"gzip-docker", "disk/disk.qcow2", gzipLayer, false},
		{"gzip-oci", "disk/disk.qcow2", gzipLayer, true},
		{"zstd-oci", "disk/disk.qcow2", zstdLayer, true},
		{"uncompressed-oci", "disk/disk.qcow2", plainLayer, true},
		{"dot-slash", "./disk/disk.qcow2", gzipLayer, false},
		{"absolute", "/disk/disk.qcow2", zstdLayer, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			img := diskImage(t, c.kind, c.oci, c.path, disk)
			ref := p.push(t, "disks/"+c.name+":v1", img)
			src := checkDisk(t, ref, opts, disk, img)
			if src.Digest() != src.ImageDigest() {
				t.Errorf("Digest() = %s, ImageDigest() = %s: a plain image has one digest", src.Digest(), src.ImageDigest())
			}
			if src.DiskPath() != "/disk/disk.qcow2" {
				t.Errorf("DiskPath() = %q", src.DiskPath())
			}
			layers, err := img.Layers()
			if err != nil {
				t.Fatal(err)
			}
			ld, err := layers[0].Digest()
			if err != nil {
				t.Fatal(err)
			}
			if src.LayerDigest() != ld.String() {
				t.Errorf("LayerDigest() = %s, want %s", src.LayerDigest(), ld)
			}
			// By digest too, as an importer pins it.
			byDigest := host + "/disks/" + c.name + "@" + src.Digest()
			checkDisk(t, byDigest, opts, disk, img)
		})
	}

	t.Run("skopeo-agrees-on-digest", func(t *testing.T) {
		img := diskImage(t, gzipLayer, false, "disk/disk.qcow2", disk)
		ref := p.push(t, "disks/skopeo:v1", img)
		raw := run(t, "skopeo", "skopeo", "inspect", "--raw", "--tls-verify=false", "docker://"+ref)
		src, err := Open(context.Background(), ref, opts)
		if err != nil {
			t.Fatal(err)
		}
		defer src.Close()
		if want := "sha256:" + sha(raw); src.Digest() != want {
			t.Errorf("Digest() = %s, skopeo's manifest hashes to %s", src.Digest(), want)
		}
	})

	t.Run("disk-in-lower-layer", func(t *testing.T) {
		img := imageOf(t, false, "",
			layerOf(t, gzipLayer, tarOf(t, dir("disk/"), file("disk/disk.qcow2", disk))),
			layerOf(t, gzipLayer, tarOf(t, dir("etc/"), file("etc/motd", []byte("hello\n")))),
			layerOf(t, zstdLayer, tarOf(t, dir("usr/"), file("usr/README", randomBytes(t, 100<<10)))),
		)
		ref := p.push(t, "disks/lower:v1", img)
		src := checkDisk(t, ref, opts, disk, img)
		layers, _ := img.Layers()
		ld, _ := layers[0].Digest()
		if src.LayerDigest() != ld.String() {
			t.Errorf("LayerDigest() = %s, want the lowest layer's %s", src.LayerDigest(), ld)
		}
	})

	t.Run("oci-index", func(t *testing.T) {
		armDisk := randomBytes(t, 1<<20)
		amd := diskImage(t, gzipLayer, true, "disk/disk.qcow2", disk)
		arm := diskImage(t, zstdLayer, true, "disk/disk.raw", armDisk)
		idx := mutate.AppendManifests(mutate.IndexMediaType(empty.Index, types.OCIImageIndex),
			mutate.IndexAddendum{Add: arm, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "arm64", Variant: "v8"}}},
			mutate.IndexAddendum{Add: amd, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "amd64"}}},
		)
		ref := p.pushIndex(t, "disks/multi:v1", idx)
		idxDigest, err := idx.Digest()
		if err != nil {
			t.Fatal(err)
		}
		src := checkDisk(t, ref, opts, disk, amd)
		if src.Digest() != idxDigest.String() {
			t.Errorf("Digest() = %s, want the index's %s", src.Digest(), idxDigest)
		}
		armOpts := opts
		armOpts.Platform = "linux/arm64"
		checkDisk(t, ref, armOpts, armDisk, arm)
	})

	t.Run("docker-manifest-list", func(t *testing.T) {
		amd := imageOf(t, false, "linux/amd64", layerOf(t, gzipLayer, tarOf(t, dir("disk/"), file("disk/disk.qcow2", disk))))
		idx := mutate.AppendManifests(mutate.IndexMediaType(empty.Index, types.DockerManifestList),
			mutate.IndexAddendum{Add: amd, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "amd64"}}},
		)
		ref := p.pushIndex(t, "disks/list:v1", idx)
		checkDisk(t, ref, opts, disk, amd)
	})

	t.Run("unknown-tag", func(t *testing.T) {
		p.push(t, "disks/known:v1", diskImage(t, gzipLayer, false, "disk/disk.qcow2", disk))
		checkNotFound(t, host+"/disks/known:nope", opts)
	})
	t.Run("unknown-repository", func(t *testing.T) {
		checkNotFound(t, host+"/disks/never-pushed:v1", opts)
	})
}

func checkNotFound(t *testing.T, ref string, opts Options) {
	t.Helper()
	_, err := Open(context.Background(), ref, opts)
	if !errors.Is(err, ErrNotFound) || errors.Is(err, ErrUnauthorized) {
		t.Fatalf("Open(%s) = %v, want ErrNotFound", ref, err)
	}
	var terr *transport.Error
	if !errors.As(err, &terr) || terr.StatusCode != http.StatusNotFound {
		t.Errorf("Open(%s) = %v: want a *transport.Error with status 404 in the chain", ref, err)
	}
	t.Logf("not found reads: %v", err)
}

// TestDockerRegistryBasicAuth pulls from docker-registry with htpasswd
// auth, as a pull secret would.
func TestDockerRegistryBasicAuth(t *testing.T) {
	const user, pass = "vimg", "s3cret-pass"
	htpasswd := run(t, "apache2-utils", "htpasswd", "-Bbn", user, pass)
	host := dockerRegistry(t, htpasswd)
	p := pusher{host: host, auth: &authn.Basic{Username: user, Password: pass}}
	disk := qcow2Disk(t)
	img := diskImage(t, gzipLayer, false, "disk/disk.qcow2", disk)
	ref := p.push(t, "private/disk:v1", img)

	checkDisk(t, ref, Options{PlainHTTP: true, Username: user, Password: pass}, disk, img)

	// Credentials that came out of a pull secret work the same.
	cfg := []byte(`{"auths":{"http://` + host + `":{"username":"` + user + `","password":"` + pass + `"}}}`)
	u, pw, err := AuthFromDockerConfig(cfg, ref)
	if err != nil {
		t.Fatal(err)
	}
	checkDisk(t, ref, Options{PlainHTTP: true, Username: u, Password: pw}, disk, img)

	for _, c := range []struct {
		name, user, pass string
	}{
		{"wrong-password", user, "wrong-pass-x"},
		{"unknown-user", "nobody", "wrong-pass-x"},
		{"anonymous", "", ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := Open(context.Background(), ref, Options{PlainHTTP: true, Username: c.user, Password: c.pass})
			checkUnauthorized(t, err, "wrong-pass-x")
		})
	}
	t.Run("unknown-tag", func(t *testing.T) {
		checkNotFound(t, host+"/private/disk:nope", Options{PlainHTTP: true, Username: user, Password: pass})
	})
}

func checkUnauthorized(t *testing.T, err error, secret string) {
	t.Helper()
	if !errors.Is(err, ErrUnauthorized) || errors.Is(err, ErrNotFound) {
		t.Fatalf("got %v, want ErrUnauthorized", err)
	}
	var terr *transport.Error
	if !errors.As(err, &terr) || (terr.StatusCode != http.StatusUnauthorized && terr.StatusCode != http.StatusForbidden) {
		t.Errorf("%v: want a *transport.Error with status 401 or 403 in the chain", err)
	}
	if secret != "" && strings.Contains(err.Error(), secret) {
		t.Errorf("the error shows the password: %v", err)
	}
	t.Logf("unauthorized reads: %v", err)
}

// TestAuthInProcess covers basic auth and a 403 with go-containerregistry's
// own registry behind auth handlers.
func TestAuthInProcess(t *testing.T) {
	disk := randomBytes(t, 256<<10)
	img := diskImage(t, gzipLayer, true, "disk/disk.img", disk)

	t.Run("basic", func(t *testing.T) {
		host := inProcessRegistry(t, basicAuth("alice", "pa55word"))
		ref := pusher{host: host, auth: &authn.Basic{Username: "alice", Password: "pa55word"}}.push(t, "vm/disk:1", img)
		checkDisk(t, ref, Options{PlainHTTP: true, Username: "alice", Password: "pa55word"}, disk, img)
		_, err := Open(context.Background(), ref, Options{PlainHTTP: true, Username: "alice", Password: "guessed-wrong"})
		checkUnauthorized(t, err, "guessed-wrong")
	})
	t.Run("forbidden", func(t *testing.T) {
		var deny atomic.Bool
		host := inProcessRegistry(t, func(next http.Handler) http.Handler {
			return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if deny.Load() && r.URL.Path != "/v2/" {
					w.Header().Set("Content-Type", "application/json")
					w.WriteHeader(http.StatusForbidden)
					io.WriteString(w, `{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}`)
					return
				}
				next.ServeHTTP(w, r)
			})
		})
		ref := pusher{host: host}.push(t, "vm/disk:1", img)
		deny.Store(true)
		_, err := Open(context.Background(), ref, Options{PlainHTTP: true})
		checkUnauthorized(t, err, "")
	})
}

// TestInvalidImages feeds images a containerDisk must not be, each refused
// with a message that says what is wrong.
func TestInvalidImages(t *testing.T) {
	host := inProcessRegistry(t, nil)
	p := pusher{host: host}
	disk := randomBytes(t, 64<<10)
	for _, c := range []struct {
		name   string
		layers [][]entry // lowest first
		raw    v1.Layer  // instead of layers
		// wantOpen is in Open's error; wantStream in the stream's, when
		// Open succeeds (the problem lies after the disk's data).
		wantOpen, wantStream []string
	}{
		{name: "no-disk", layers: [][]entry{{dir("etc/"), file("etc/motd", []byte("hi"))}},
			wantOpen: []string{"has no disk file under /disk/: build it FROM scratch with COPY <file> /disk/"}},
		{name: "empty-disk-dir", layers: [][]entry{{dir("disk/")}},
			wantOpen: []string{"has no disk file under /disk/"}},
		{name: "only-subdirectory", layers: [][]entry{{dir("disk/"), dir("disk/sub/"), file("disk/sub/disk.img", disk)}},
			wantOpen: []string{"has no disk file under /disk/"}},
		{name: "disk-is-a-file", layers: [][]entry{{file("disk", disk)}},
			wantOpen: []string{"has no disk file under /disk/", "/disk is a regular file, not a directory", "trailing slash"}},
		{name: "two-files", layers: [][]entry{{dir("disk/"), file("disk/a.img", disk), file("disk/b.img", disk)}},
			wantStream: []string{"more than one file under /disk/", "/disk/a.img, /disk/b.img"}},
		{name: "file-then-symlink", layers: [][]entry{{file("disk/a.img", disk), symlink("disk/b.img", "a.img")}},
			wantStream: []string{"more than one file under /disk/", "/disk/a.img, /disk/b.img (symlink)"}},
		{name: "escape", layers: [][]entry{{file("../escape", []byte("x")), file("disk/a.img", disk)}},
			wantOpen: []string{`"../escape"`, "climbs out of the image root"}},
		{name: "escape-in-disk-dir", layers: [][]entry{{file("disk/../../escape", disk)}},
			wantOpen: []string{"climbs out of the image root"}},
		{name: "escape-after-disk", layers: [][]entry{{file("disk/a.img", disk), file("./../etc/passwd", []byte("x"))}},
			wantStream: []string{"climbs out of the image root"}},
		{name: "escape-in-upper-layer", layers: [][]entry{{file("disk/a.img", disk)}, {file("/../../x", []byte("x"))}},
			wantOpen: []string{"climbs out of the image root"}},
		{name: "symlink", layers: [][]entry{{dir("disk/"), symlink("disk/disk.img", "/etc/passwd")}},
			wantOpen: []string{"/disk/disk.img", "is a symlink", "regular file"}},
		{name: "hardlink", layers: [][]entry{{file("etc/x", disk), hardlink("disk/disk.img", "etc/x")}},
			wantOpen: []string{"/disk/disk.img", "is a hard link"}},
		{name: "device", layers: [][]entry{{{name: "disk/sda", typ: '3'}}},
			wantOpen: []string{"/disk/sda", "is a character device"}},
		{name: "symlink-over-lower-disk", layers: [][]entry{{file("disk/a.img", disk)}, {symlink("disk/a.img", "/dev/sda")}},
			wantOpen: []string{"is a symlink"}},
		{name: "oversized", layers: [][]entry{{{name: "disk/huge.img", typ: '0', size: 65 << 40}}},
			wantOpen: []string{"/disk/huge.img", "beyond the 64 TiB limit"}},
		{name: "empty-file", layers: [][]entry{{file("disk/a.img", []byte{})}},
			wantOpen: []string{"/disk/a.img", "is empty"}},
		{name: "opaque-whiteout", layers: [][]entry{{file("disk/a.img", disk)}, {dir("disk/"), file("disk/.wh..wh..opq", nil)}},
			wantOpen: []string{"has no disk file under /disk/"}},
		{name: "dir-whiteout", layers: [][]entry{{file("disk/a.img", disk)}, {file(".wh.disk", nil)}},
			wantOpen: []string{"has no disk file under /disk/"}},
		{name: "file-whiteout", layers: [][]entry{{file("disk/a.img", disk)}, {file("disk/.wh.a.img", nil)}},
			wantOpen: []string{"has no disk file under /disk/"}},
		{name: "not-a-layer", raw: static.NewLayer([]byte("{}"), types.MediaType("application/vnd.oci.empty.v1+json")),
			wantOpen: []string{"not a filesystem layer"}},
		{name: "not-a-tar", raw: static.NewLayer(bytes.Repeat([]byte("garbage!"), 200), types.OCIUncompressedLayer),
			wantOpen: []string{"reading layer 1 of 1"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			var layers []v1.Layer
			for i, es := range c.layers {
				kind := []layerKind{gzipLayer, zstdLayer, plainLayer}[i%3]
				layers = append(layers, layerOf(t, kind, tarOf(t, es...)))
			}
			if c.raw != nil {
				layers = append(layers, c.raw)
			}
			ref := p.push(t, "bad/"+c.name+":v1", imageOf(t, true, "", layers...))
			ctx := context.Background()
			src, err := Open(ctx, ref, Options{PlainHTTP: true})
			if c.wantOpen != nil {
				checkErr(t, "Open", err, c.wantOpen)
				return
			}
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			defer src.Close()
			rc, err := src.Stream()
			if err != nil {
				t.Fatal(err)
			}
			defer rc.Close()
			n, err := io.Copy(io.Discard, rc)
			if n != src.Size() {
				t.Errorf("streamed %d bytes before the error, want the disk's %d", n, src.Size())
			}
			checkErr(t, "stream", err, c.wantStream)
		})
	}
}

func checkErr(t *testing.T, what string, err error, want []string) {
	t.Helper()
	if err == nil {
		t.Fatalf("%s succeeded, want an error with %q", what, want)
	}
	if !errors.Is(err, ErrInvalidImage) {
		t.Errorf("%s: %v does not wrap ErrInvalidImage", what, err)
	}
	for _, w := range want {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("%s: %v\nwant it to contain %q", what, err, w)
		}
	}
	t.Logf("%s: %v", what, err)
}

// TestWhiteouts checks that the disk is the one the container's merged
// filesystem would show.
func TestWhiteouts(t *testing.T) {
	host := inProcessRegistry(t, nil)
	p := pusher{host: host}
	a, b := randomBytes(t, 64<<10), randomBytes(t, 96<<10)
	for _, c := range []struct {
		name   string
		layers [][]entry
		want   []byte
		path   string
	}{
		{"topmost-wins", [][]entry{{file("disk/a.img", a)}, {file("disk/b.img", b)}}, b, "/disk/b.img"},
		{"upper-deletes-middle", [][]entry{{file("disk/a.img", a)}, {file("disk/b.img", b)}, {file("disk/.wh.b.img", nil)}}, a, "/disk/a.img"},
		{"deleted-second-file", [][]entry{{file("disk/a.img", a), file("disk/b.img", b)}, {file("disk/.wh.b.img", nil), file("etc/x", nil)}}, a, "/disk/a.img"},
		{"upper-without-disk", [][]entry{{file("disk/a.img", a)}, {dir("disk/"), dir("disk/sub/"), file("disk/sub/notes", b)}}, a, "/disk/a.img"},
		{"replaced-after-opaque", [][]entry{{file("disk/a.img", a)}, {file("disk/.wh..wh..opq", nil), file("disk/b.img", b)}}, b, "/disk/b.img"},
	} {
		t.Run(c.name, func(t *testing.T) {
			var layers []v1.Layer
			for i, es := range c.layers {
				layers = append(layers, layerOf(t, []layerKind{plainLayer, gzipLayer, zstdLayer}[i%3], tarOf(t, es...)))
			}
			ref := p.push(t, "wh/"+c.name+":v1", imageOf(t, false, "", layers...))
			src := checkDisk(t, ref, Options{PlainHTTP: true}, c.want, nil)
			if src.DiskPath() != c.path {
				t.Errorf("DiskPath() = %q, want %q", src.DiskPath(), c.path)
			}
		})
	}
}

// TestPlatforms picks from a multi-arch index, skipping attestations, and
// names what an index has when the platform is missing.
func TestPlatforms(t *testing.T) {
	host := inProcessRegistry(t, nil)
	p := pusher{host: host}
	amdDisk, armDisk := randomBytes(t, 64<<10), randomBytes(t, 80<<10)
	amd := diskImage(t, zstdLayer, true, "disk/amd64.img", amdDisk)
	arm := diskImage(t, gzipLayer, true, "disk/arm64.img", armDisk)
	att := imageOf(t, true, "", static.NewLayer([]byte(`{"predicateType":"x"}`), "application/vnd.in-toto+json"))
	idx := mutate.AppendManifests(mutate.IndexMediaType(empty.Index, types.OCIImageIndex),
		mutate.IndexAddendum{Add: arm, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "arm64", Variant: "v8"}}},
		mutate.IndexAddendum{Add: amd, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "amd64"}}},
		mutate.IndexAddendum{Add: att, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "unknown", Architecture: "unknown"}}},
	)
	ref := p.pushIndex(t, "multi/disk:v1", idx)

	checkDisk(t, ref, Options{PlainHTTP: true}, amdDisk, amd)
	checkDisk(t, ref, Options{PlainHTTP: true, Platform: "linux/arm64"}, armDisk, arm)
	checkDisk(t, ref, Options{PlainHTTP: true, Platform: "linux/arm64/v8"}, armDisk, arm)

	_, err := Open(context.Background(), ref, Options{PlainHTTP: true, Platform: "linux/s390x"})
	checkErr(t, "Open", err, []string{"no image for platform linux/s390x", "it has linux/arm64/v8, linux/amd64"})

	_, err = Open(context.Background(), ref, Options{PlainHTTP: true, Platform: "linux/amd64/x/y/z"})
	if err == nil || !strings.Contains(err.Error(), "platform") {
		t.Errorf("a malformed platform gave %v", err)
	}
}

// TestStreamLifecycle checks Stream's once-only contract, Close at every
// stage, and cancellation through Open's context.
func TestStreamLifecycle(t *testing.T) {
	host := inProcessRegistry(t, nil)
	p := pusher{host: host}
	disk := randomBytes(t, 16<<20)
	ref := p.push(t, "life/disk:v1", diskImage(t, plainLayer, true, "disk/disk.img", disk))
	opts := Options{PlainHTTP: true}
	ctx := context.Background()

	t.Run("stream-once", func(t *testing.T) {
		src, err := Open(ctx, ref, opts)
		if err != nil {
			t.Fatal(err)
		}
		defer src.Close()
		rc, err := src.Stream()
		if err != nil {
			t.Fatal(err)
		}
		defer rc.Close()
		if _, err := src.Stream(); !errors.Is(err, source.ErrStreamUsed) {
			t.Errorf("second Stream() = %v, want ErrStreamUsed", err)
		}
	})
	t.Run("close-without-stream", func(t *testing.T) {
		src, err := Open(ctx, ref, opts)
		if err != nil {
			t.Fatal(err)
		}
		if err := src.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if err := src.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
		if _, err := src.Stream(); !errors.Is(err, source.ErrClosed) {
			t.Errorf("Stream after Close = %v, want ErrClosed", err)
		}
	})
	t.Run("close-while-streaming", func(t *testing.T) {
		src, err := Open(ctx, ref, opts)
		if err != nil {
			t.Fatal(err)
		}
		rc, err := src.Stream()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(rc, make([]byte, 1<<20)); err != nil {
			t.Fatal(err)
		}
		if err := src.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if _, err := io.Copy(io.Discard, rc); !errors.Is(err, source.ErrClosed) {
			t.Errorf("reading after Close = %v, want ErrClosed", err)
		}
		if err := rc.Close(); err != nil {
			t.Errorf("stream Close: %v", err)
		}
	})
	t.Run("read-after-stream-close", func(t *testing.T) {
		src, err := Open(ctx, ref, opts)
		if err != nil {
			t.Fatal(err)
		}
		defer src.Close()
		rc, err := src.Stream()
		if err != nil {
			t.Fatal(err)
		}
		rc.Close()
		if _, err := rc.Read(make([]byte, 10)); !errors.Is(err, source.ErrClosed) {
			t.Errorf("Read after the stream's Close = %v, want ErrClosed", err)
		}
	})
	t.Run("cancel", func(t *testing.T) {
		cctx, cancel := context.WithCancel(ctx)
		defer cancel()
		src, err := Open(cctx, ref, opts)
		if err != nil {
			t.Fatal(err)
		}
		defer src.Close()
		rc, err := src.Stream()
		if err != nil {
			t.Fatal(err)
		}
		defer rc.Close()
		if _, err := io.ReadFull(rc, make([]byte, 64<<10)); err != nil {
			t.Fatal(err)
		}
		cancel()
		if _, err := io.Copy(io.Discard, rc); !errors.Is(err, context.Canceled) {
			t.Errorf("reading after cancel = %v, want context.Canceled", err)
		}
	})
}

// TestCorruptLayer serves a layer with one byte changed inside the disk:
// every byte still arrives, but the stream must end with the digest error,
// never io.EOF.
func TestCorruptLayer(t *testing.T) {
	disk := randomBytes(t, 1<<20)
	img := diskImage(t, plainLayer, true, "disk/disk.img", disk)
	layers, _ := img.Layers()
	ld, _ := layers[0].Digest()
	var corrupt atomic.Bool
	host := inProcessRegistry(t, func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if !corrupt.Load() || r.Method != http.MethodGet || !strings.HasSuffix(r.URL.Path, "/blobs/"+ld.String()) {
				next.ServeHTTP(w, r)
				return
			}
			rec := httptest.NewRecorder()
			next.ServeHTTP(rec, r)
			body := rec.Body.Bytes()
			body[len(body)/2] ^= 0xff
			for k, v := range rec.Header() {
				w.Header()[k] = v
			}
			w.WriteHeader(rec.Code)
			w.Write(body)
		})
	})
	ref := pusher{host: host}.push(t, "corrupt/disk:v1", img)
	corrupt.Store(true)
	_, _, n, err := readAll(t, ref, Options{PlainHTTP: true})
	if err == nil || !strings.Contains(err.Error(), "sha256") {
		t.Fatalf("streaming a corrupted layer ended with %v, want a digest error", err)
	}
	if n != int64(len(disk)) {
		t.Errorf("streamed %d bytes, want %d before the error", n, len(disk))
	}
	t.Logf("corrupt layer: %v", err)
}

// TestTLS pulls from a registry with a self-signed certificate.
func TestTLS(t *testing.T) {
	srv := httptest.NewUnstartedServer(ggcrregistry.New(ggcrregistry.Logger(log.New(io.Discard, "", 0))))
	// The handshakes refused on purpose would be logged to stderr.
	srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	srv.StartTLS()
	t.Cleanup(srv.Close)
	host := strings.TrimPrefix(srv.URL, "https://")
	disk := randomBytes(t, 128<<10)
	img := diskImage(t, gzipLayer, false, "disk/disk.img", disk)
	ref := pusher{host: host, rt: srv.Client().Transport}.push(t, "tls/disk:v1", img)
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})

	t.Run("unknown-ca", func(t *testing.T) {
		_, err := Open(context.Background(), ref, Options{})
		if err == nil || !strings.Contains(err.Error(), "certificate") {
			t.Fatalf("Open with an unknown CA = %v, want a certificate error", err)
		}
		if errors.Is(err, ErrNotFound) || errors.Is(err, ErrUnauthorized) {
			t.Errorf("a TLS failure is classified as %v", err)
		}
		t.Logf("unknown CA: %v", err)
	})
	t.Run("ca-bundle", func(t *testing.T) {
		checkDisk(t, ref, Options{CABundle: caPEM}, disk, img)
	})
	t.Run("insecure-skip-verify", func(t *testing.T) {
		checkDisk(t, ref, Options{InsecureSkipVerify: true}, disk, img)
	})
	t.Run("bad-ca-bundle", func(t *testing.T) {
		_, err := Open(context.Background(), ref, Options{CABundle: []byte("not PEM")})
		if err == nil || !strings.Contains(err.Error(), "no PEM certificate") {
			t.Fatalf("Open with a bad CA bundle = %v", err)
		}
	})
}

// TestPlainHTTPNeedsOptIn checks that an HTTP registry, even on loopback
// where go-containerregistry would fall back to HTTP, is refused unless
// PlainHTTP is set.
func TestPlainHTTPNeedsOptIn(t *testing.T) {
	var sawAuth atomic.Bool
	host := inProcessRegistry(t, func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Header.Get("Authorization") != "" {
				sawAuth.Store(true)
			}
			next.ServeHTTP(w, r)
		})
	})
	disk := randomBytes(t, 64<<10)
	img := diskImage(t, gzipLayer, false, "disk/disk.img", disk)
	ref := pusher{host: host}.push(t, "plain/disk:v1", img)
	_, err := Open(context.Background(), ref, Options{Username: "u", Password: "secret-pw"})
	if err == nil || !strings.Contains(err.Error(), "PlainHTTP") {
		t.Fatalf("Open over HTTP without PlainHTTP = %v, want a refusal naming PlainHTTP", err)
	}
	if sawAuth.Load() {
		t.Error("credentials were sent over plain HTTP")
	}
	checkDisk(t, ref, Options{PlainHTTP: true}, disk, img)
}

// TestNames checks Name() and that bad references are reported without the
// credentials someone may have put in them.
func TestNames(t *testing.T) {
	host := inProcessRegistry(t, nil)
	disk := randomBytes(t, 64<<10)
	img := diskImage(t, gzipLayer, false, "disk/disk.img", disk)
	ref := pusher{host: host}.push(t, "names/disk:v1", img)

	src, err := Open(context.Background(), "docker://"+ref, Options{PlainHTTP: true})
	if err != nil {
		t.Fatal(err)
	}
	src.Close()
	if src.Name() != ref {
		t.Errorf("Name() = %q, want %q", src.Name(), ref)
	}

	for _, bad := range []string{
		"https://bob:hunter2-secret@" + host + "/names/disk:v1",
		"bob:hunter2-secret@" + host + "/names/disk:v1",
		"docker://bob:hunter2-secret@registry.example.com/x",
	} {
		_, err := Open(context.Background(), bad, Options{PlainHTTP: true})
		if err == nil {
			t.Errorf("Open(%q) succeeded", bad)
			continue
		}
		if strings.Contains(err.Error(), "hunter2") {
			t.Errorf("the error shows the password: %v", err)
		}
		t.Logf("%v", err)
	}
	if _, err := Open(context.Background(), "UPPER/case", Options{}); err == nil || !strings.Contains(err.Error(), "UPPER/case") {
		t.Errorf("an invalid reference without credentials should be quoted: %v", err)
	}
}

// TestMemoryBounded streams a 48 MiB disk out of a zstd layer from
// docker-registry (a separate process, so its buffers are not ours) and
// checks that the heap never holds more than a small part of it.
func TestMemoryBounded(t *testing.T) {
	host := dockerRegistry(t, nil)
	const size = 48 << 20
	disk := randomBytes(t, size)
	want := sha(disk)
	tb := tarOf(t, dir("disk/"), file("disk/big.img", disk))
	disk = nil
	ref := pusher{host: host}.push(t, "big/disk:v1", imageOf(t, true, "", layerOf(t, zstdLayer, tb)))
	tb = nil

	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	base := ms.HeapInuse
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	src, err := Open(ctx, ref, Options{PlainHTTP: true})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	rc, err := src.Stream()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	h := sha256.New()
	buf := make([]byte, 1<<20)
	var peak uint64
	for {
		n, err := rc.Read(buf)
		h.Write(buf[:n])
		runtime.ReadMemStats(&ms)
		if ms.HeapInuse > peak {
			peak = ms.HeapInuse
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != want {
		t.Fatalf("sha256 %s, want %s", got, want)
	}
	growth := int64(peak) - int64(base)
	t.Logf("heap in use grew by %d KiB at most while streaming %d MiB", growth>>10, size>>20)
	if growth > 24<<20 {
		t.Errorf("heap grew by %d MiB while streaming a %d MiB disk: the layer is being buffered", growth>>20, size>>20)
	}
}
