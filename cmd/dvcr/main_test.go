package main

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/google/go-containerregistry/pkg/v1/validate"
	"golang.org/x/crypto/bcrypt"

	"vimg.dev/vimg/dvcr/client"
	"vimg.dev/vimg/dvcr/layout"
	"vimg.dev/vimg/pkg/diskimage/testimg"
	"vimg.dev/vimg/pkg/selfsigned"
)

const (
	adminUser, adminPass = "controller", "admin-pw"
	pullUser, pullPass   = "node", "node-pw"
)

// buildDVCR compiles this command into a temporary directory.
func buildDVCR(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "dvcr")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// selfSigned writes a certificate for 127.0.0.1 and returns its files and
// a pool that trusts it.
func selfSigned(t *testing.T, dir string) (certFile, keyFile string, pool *x509.CertPool) {
	t.Helper()
	certPEM, keyPEM, err := selfsigned.Loopback("dvcr test")
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	writeFile(t, certFile, certPEM)
	writeFile(t, keyFile, keyPEM)
	pool = x509.NewCertPool()
	if !pool.AppendCertsFromPEM(certPEM) {
		t.Fatal("the generated certificate does not parse")
	}
	return certFile, keyFile, pool
}

func writeFile(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

// authFiles writes a users file and a token key file.
func authFiles(t *testing.T, dir string) (users, keys string) {
	t.Helper()
	var b strings.Builder
	for _, u := range [][3]string{{"admin", adminUser, adminPass}, {"pull", pullUser, pullPass}} {
		h, err := bcrypt.GenerateFromPassword([]byte(u[2]), bcrypt.MinCost)
		if err != nil {
			t.Fatal(err)
		}
		b.WriteString(u[0] + ":" + u[1] + ":" + string(h) + "\n")
	}
	users, keys = filepath.Join(dir, "users"), filepath.Join(dir, "token-keys")
	writeFile(t, users, []byte(b.String()))
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		t.Fatal(err)
	}
	writeFile(t, keys, []byte(base64.StdEncoding.EncodeToString(k)+"\n"))
	return users, keys
}

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type process struct {
	cmd     *exec.Cmd
	addr    string
	storage string // filesystem storage root
	logs    *syncBuffer
	client  *http.Client
	exited  chan struct{}
}

// startDVCR runs the real binary with TLS and filesystem storage and waits
// until /readyz answers.
func startDVCR(t *testing.T, extra ...string) *process {
	t.Helper()
	bin := buildDVCR(t)
	dir := t.TempDir()
	certFile, keyFile, pool := selfSigned(t, dir)
	users, keys := authFiles(t, dir)
	p := &process{addr: freeAddr(t), storage: filepath.Join(dir, "storage"), logs: &syncBuffer{}, exited: make(chan struct{})}
	args := append([]string{"--listen", p.addr, "--tls-cert-file", certFile, "--tls-key-file", keyFile,
		"--storage-root", p.storage, "--users-file", users, "--token-key-file", keys, "-v=2"}, extra...)
	p.cmd = exec.Command(bin, args...)
	p.cmd.Stdout, p.cmd.Stderr = p.logs, p.logs
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = p.cmd.Wait(); close(p.exited) }()
	t.Cleanup(func() {
		select {
		case <-p.exited:
		default:
			_ = p.cmd.Process.Kill()
			<-p.exited
		}
		if t.Failed() {
			t.Logf("dvcr logs:\n%s", p.logs.String())
		}
	})
	p.client = &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}}}

	// Not a timing assertion: a bound on how long a broken start may hang
	// the test.
	deadline := time.Now().Add(time.Minute)
	for {
		select {
		case <-p.exited:
			t.Fatalf("dvcr exited during start-up: %v\n%s", p.cmd.ProcessState, p.logs.String())
		default:
		}
		resp, err := p.client.Get("https://" + p.addr + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return p
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("dvcr not ready: %v\n%s", err, p.logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// diskImage is an image shaped like DVCR's: one uncompressed tar layer with
// disk/disk.img owned by 107:107.
func diskImage(t *testing.T) v1.Image {
	t.Helper()
	payload := bytes.Repeat([]byte("vimg disk sector "), 4096)
	var tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	if err := tw.WriteHeader(&tar.Header{Name: "disk/", Typeflag: tar.TypeDir, Mode: 0o755, Uid: 107, Gid: 107}); err != nil {
		t.Fatal(err)
	}
	if err := tw.WriteHeader(&tar.Header{Name: "disk/disk.img", Mode: 0o644, Uid: 107, Gid: 107, Size: int64(len(payload))}); err != nil {
		t.Fatal(err)
	}
	if _, err := tw.Write(payload); err != nil {
		t.Fatal(err)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	img, err := mutate.AppendLayers(mutate.MediaType(empty.Image, types.OCIManifestSchema1), static.NewLayer(tb.Bytes(), types.OCIUncompressedLayer))
	if err != nil {
		t.Fatal(err)
	}
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	return mutate.Annotations(img, map[string]string{"vimg.dev/format": "raw"}).(v1.Image)
}

func (p *process) push(t *testing.T, repo string) v1.Image {
	t.Helper()
	ref, err := name.ParseReference(p.addr + "/" + repo)
	if err != nil {
		t.Fatal(err)
	}
	img := diskImage(t)
	if err := remote.Write(ref, img, remote.WithTransport(p.client.Transport),
		remote.WithAuth(&authn.Basic{Username: adminUser, Password: adminPass})); err != nil {
		t.Fatalf("pushing %s: %v", repo, err)
	}
	return img
}

func TestDVCR_ServesTLSAndStopsOnSIGTERM(t *testing.T) {
	p := startDVCR(t)
	pushed := p.push(t, "vi/ns/disk:uid-1")

	ref, _ := name.ParseReference(p.addr + "/vi/ns/disk:uid-1")
	pulled, err := remote.Image(ref, remote.WithTransport(p.client.Transport),
		remote.WithAuth(&authn.Basic{Username: pullUser, Password: pullPass}))
	if err != nil {
		t.Fatalf("pulling: %v", err)
	}
	want, _ := pushed.Digest()
	got, err := pulled.Digest()
	if err != nil || got != want {
		t.Fatalf("pulled %s (%v), pushed %s", got, err, want)
	}
	layers, err := pulled.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("layers: %d, %v", len(layers), err)
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(rc)
	var names []string
	for {
		h, err := tr.Next()
		if err != nil {
			break
		}
		names = append(names, h.Name)
	}
	rc.Close()
	if strings.Join(names, ",") != "disk/,disk/disk.img" {
		t.Errorf("layer holds %v", names)
	}

	// Old TLS is refused: TLS 1.2 is the minimum.
	old := &tls.Config{InsecureSkipVerify: true, MaxVersion: tls.VersionTLS11} //nolint:gosec // the point of the test
	if conn, err := tls.Dial("tcp", p.addr, old); err == nil {
		conn.Close()
		t.Error("a TLS 1.1 handshake succeeded")
	}

	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.exited:
	case <-time.After(time.Minute):
		t.Fatal("dvcr did not exit within a minute of SIGTERM")
	}
	if code := p.cmd.ProcessState.ExitCode(); code != 0 {
		t.Errorf("exit code %d after SIGTERM, want 0", code)
	}
	for _, secret := range []string{adminPass, pullPass} {
		if strings.Contains(p.logs.String(), secret) {
			t.Errorf("the logs contain a password")
		}
	}
}

func TestDVCR_RefusesPlainHTTPUnlessAsked(t *testing.T) {
	bin := buildDVCR(t)
	dir := t.TempDir()
	users, keys := authFiles(t, dir)
	out, err := exec.Command(bin, "--listen", freeAddr(t), "--storage-root", filepath.Join(dir, "s"),
		"--users-file", users, "--token-key-file", keys).CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(string(out), "--insecure-http") {
		t.Errorf("without TLS files: err %v, output:\n%s", err, out)
	}
}

func TestDVCR_SkopeoInspects(t *testing.T) {
	skopeo := testimg.Require(t, "skopeo")
	p := startDVCR(t)
	pushed := p.push(t, "vi/ns/x:tag")
	want, _ := pushed.Digest()

	home := t.TempDir() // keep skopeo away from the real user's configuration
	inspect := func(creds string) ([]byte, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, skopeo, "inspect", "--tls-verify=false", "--creds", creds, "docker://"+p.addr+"/vi/ns/x:tag")
		cmd.Env = append(os.Environ(), "HOME="+home, "XDG_RUNTIME_DIR="+home, "XDG_CONFIG_HOME="+home)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			return stderr.Bytes(), err
		}
		return out, nil
	}
	out, err := inspect(pullUser + ":" + pullPass)
	if err != nil {
		t.Fatalf("skopeo inspect: %v\n%s", err, out)
	}
	var info struct {
		Digest string
		Layers []string
	}
	if err := json.Unmarshal(out, &info); err != nil {
		t.Fatalf("skopeo output: %v\n%s", err, out)
	}
	if info.Digest != want.String() || len(info.Layers) != 1 {
		t.Errorf("skopeo saw digest %s with %d layers, pushed %s with 1", info.Digest, len(info.Layers), want)
	}
	if out, err := inspect(pullUser + ":wrong"); err == nil {
		t.Errorf("skopeo with a wrong password succeeded:\n%s", out)
	}
}

func TestLoadStorageConfig_S3FromYAML(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "access"), []byte("AKIA-TEST\n"))
	writeFile(t, filepath.Join(dir, "secret"), []byte("very-secret\n"))
	cfg := filepath.Join(dir, "dvcr.yaml")
	writeFile(t, cfg, []byte(`storage:
  type: s3
  parameters:
    bucket: dvcr
    region: us-east-1
    regionendpoint: http://minio.storage:9000
    forcepathstyle: true
    chunksize: 10485760
  accessKeyFile: `+filepath.Join(dir, "access")+`
  secretKeyFile: `+filepath.Join(dir, "secret")+`
`))
	st, err := loadStorageConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	p := st.Parameters
	if st.Type != "s3" || p["bucket"] != "dvcr" || p["forcepathstyle"] != true || p["accesskey"] != "AKIA-TEST" || p["secretkey"] != "very-secret" {
		t.Errorf("storage = %+v", st)
	}
	// distribution's s3 driver parses integers from their printed form.
	if got := fmt.Sprint(p["chunksize"]); got != "10485760" {
		t.Errorf("chunksize prints as %s", got)
	}

	writeFile(t, cfg, []byte("storage:\n  type: s3\n  bukket: typo\n"))
	if _, err := loadStorageConfig(cfg); err == nil || !strings.Contains(err.Error(), "bukket") {
		t.Errorf("a misspelt field: err = %v", err)
	}
}

// TestDVCR_CollectsDeletedImagesWhileServing runs the binary with a short
// garbage collection interval and grace: an image deleted by digest has its
// layer removed from disk while the registry keeps serving, and an image
// that shares nothing with it still pulls.
func TestDVCR_CollectsDeletedImagesWhileServing(t *testing.T) {
	p := startDVCR(t, "--gc-interval=500ms", "--gc-grace=2s")
	opts := []remote.Option{remote.WithTransport(p.client.Transport), remote.WithAuth(&authn.Basic{Username: adminUser, Password: adminPass})}
	gone := p.push(t, "vi/ns/gone:uid-1")
	kept, err := random.Image(1<<20, 1)
	if err != nil {
		t.Fatal(err)
	}
	keptRef, _ := name.ParseReference(p.addr + "/vi/ns/kept:uid-2")
	if err := remote.Write(keptRef, kept, opts...); err != nil {
		t.Fatal(err)
	}

	layers, _ := gone.Layers()
	ld, _ := layers[0].Digest()
	blob := filepath.Join(p.storage, "docker/registry/v2/blobs", ld.Algorithm, ld.Hex[:2], ld.Hex, "data")
	if _, err := os.Stat(blob); err != nil {
		t.Fatalf("the pushed layer is not where distribution keeps blobs: %v", err)
	}
	d, _ := gone.Digest()
	goneRef, _ := name.ParseReference(p.addr + "/vi/ns/gone@" + d.String())
	if err := remote.Delete(goneRef, opts...); err != nil {
		t.Fatalf("deleting the manifest: %v", err)
	}

	// Not a timing assertion: a bound on how long a broken collector may
	// hang the test (the grace is 2 s, passes every 0.5 s).
	deadline := time.Now().Add(time.Minute)
	for {
		if _, err := os.Stat(blob); errors.Is(err, os.ErrNotExist) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the deleted image's layer is still on disk after a minute\n%s", p.logs.String())
		}
		time.Sleep(200 * time.Millisecond)
	}
	pulled, err := remote.Image(keptRef, opts...)
	if err != nil {
		t.Fatalf("pulling the image that was not deleted: %v", err)
	}
	if err := validate.Image(pulled); err != nil {
		t.Errorf("the image that was not deleted is damaged: %v", err)
	}
	resp, err := p.client.Get("https://" + p.addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(body), "dvcr_gc_blobs_deleted_total") {
		t.Error("/metrics does not show the collector's counters")
	}
}

// TestDVCR_SkopeoCopiesAPushedDiskImage: a disk image pushed by our client
// (the layout the importers write) is read out of the real dvcr process by
// skopeo with a pull-only user, and the disk file in the copied layer is the
// pushed bytes.
func TestDVCR_SkopeoCopiesAPushedDiskImage(t *testing.T) {
	skopeo := testimg.Require(t, "skopeo")
	p := startDVCR(t)
	disk := bytes.Repeat([]byte("a disk sector, then a hole "), 40000)
	disk = append(disk, make([]byte, 1<<20)...)
	c, err := client.New(p.addr, client.Options{Username: adminUser, Password: adminPass, Transport: p.client.Transport})
	if err != nil {
		t.Fatal(err)
	}
	ref := layout.Ref(layout.Repository("vi", "ns", "disk"), "uid-1")
	pushed, err := c.Push(context.Background(), ref, bytes.NewReader(disk), int64(len(disk)),
		layout.Meta{Format: "raw", VirtualSize: int64(len(disk))}, client.PushOptions{})
	if err != nil {
		t.Fatal(err)
	}

	home, out := t.TempDir(), filepath.Join(t.TempDir(), "copy")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, skopeo, "copy", "--src-tls-verify=false", "--src-creds", pullUser+":"+pullPass,
		"docker://"+p.addr+"/"+ref, "dir:"+out)
	cmd.Env = append(os.Environ(), "HOME="+home, "XDG_RUNTIME_DIR="+home, "XDG_CONFIG_HOME="+home)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("skopeo copy: %v\n%s", err, b)
	}
	f, err := os.Open(filepath.Join(out, pushed.Layer.Digest.Encoded()))
	if err != nil {
		t.Fatalf("skopeo did not copy the layer: %v", err)
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err != nil {
			t.Fatalf("no disk file in the copied layer: %v", err)
		}
		if h.Name != "disk/disk.img" {
			continue
		}
		if h.Uid != 107 || h.Gid != 107 {
			t.Errorf("disk file owned %d:%d, want 107:107", h.Uid, h.Gid)
		}
		got, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, disk) {
			t.Fatalf("the disk file skopeo copied (%d bytes) is not the pushed one (%d bytes)", len(got), len(disk))
		}
		return
	}
}
