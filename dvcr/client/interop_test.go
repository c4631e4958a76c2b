package client

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"vimg.dev/vimg/dvcr/layout"
	"vimg.dev/vimg/pkg/diskimage/testimg"
	"vimg.dev/vimg/pkg/selfsigned"
)

// peerRegistry is Debian's docker-registry (distribution 2.8) running as a
// process with TLS and htpasswd auth.
type peerRegistry struct {
	host       string
	caPEM      []byte
	user, pass string
}

// startPeerRegistry starts it with htpasswd auth, or with the given YAML
// "auth:" section.
func startPeerRegistry(t *testing.T, authYAML ...string) *peerRegistry {
	t.Helper()
	bin := testimg.Require(t, "docker-registry")
	dir := t.TempDir()
	caPEM := writeSelfSigned(t, dir)
	const user, pass = "vimg", "s3cret-pass"
	htpasswd := testimg.Run(t, "htpasswd", "-Bbn", user, pass)
	if err := os.WriteFile(filepath.Join(dir, "htpasswd"), htpasswd, 0o600); err != nil {
		t.Fatal(err)
	}
	auth := fmt.Sprintf("auth:\n  htpasswd:\n    realm: vimg-test\n    path: %s\n", filepath.Join(dir, "htpasswd"))
	if len(authYAML) > 0 {
		auth = authYAML[0]
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	cfg := fmt.Sprintf(`version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: %s
  secret: test-secret
  tls:
    certificate: %s
    key: %s
%s`, filepath.Join(dir, "data"), addr, filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem"), auth)
	cfgPath := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	cmd := exec.Command(bin, "serve", cfgPath)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("docker-registry output:\n%s", out.String())
		}
	})
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}, Timeout: 2 * time.Second}
	// Wait until it answers (401: auth is on).
	for i := 0; ; i++ {
		resp, err := hc.Get("https://" + addr + "/v2/")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusUnauthorized {
				break
			}
		}
		select {
		case <-exited:
			t.Fatalf("docker-registry exited:\n%s", out.String())
		case <-time.After(100 * time.Millisecond):
		}
		if i > 300 {
			t.Fatalf("docker-registry did not come up on %s (last: %v):\n%s", addr, err, out.String())
		}
	}
	return &peerRegistry{host: addr, caPEM: caPEM, user: user, pass: pass}
}

// writeSelfSigned writes cert.pem and key.pem for 127.0.0.1 into dir and
// returns the certificate PEM.
func writeSelfSigned(t *testing.T, dir string) []byte {
	t.Helper()
	certPEM, keyPEM, err := selfsigned.Loopback("vimg test registry")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "cert.pem"), certPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "key.pem"), keyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	return certPEM
}

func TestInterop_Distribution28WithBasicAuth(t *testing.T) {
	reg := startPeerRegistry(t)
	ctx := context.Background()
	c, err := New(reg.host, Options{Username: reg.user, Password: reg.pass, CABundle: reg.caPEM})
	if err != nil {
		t.Fatal(err)
	}
	data := diskBytes(t, 3<<20+4321)
	meta := layout.Meta{Format: layout.FormatQcow2, VirtualSize: 64 << 20, SourceChecksum: "sha256:feed"}
	ref := layout.Ref(layout.Repository("vi", "team-a", "fedora.cloud"), layout.Tag("0b6f1e9c-1a2b-4c3d-8e4f-567890abcdef"))
	pushed, err := c.Push(ctx, ref, bytes.NewReader(data), int64(len(data)), meta, PushOptions{})
	if err != nil {
		t.Fatal(err)
	}
	im, err := c.Open(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	if im.Meta.Format != "qcow2" || im.Meta.StoredSize != int64(len(data)) || im.Meta.VirtualSize != 64<<20 || im.Meta.SourceChecksum != "sha256:feed" {
		t.Errorf("Meta = %+v", im.Meta)
	}
	rc, err := im.Reader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("Reader: %d bytes, %v; differ from the %d pushed", len(got), err, len(data))
	}
	checkReaderAt(t, im.ReaderAt(), data)

	dst := layout.Ref(layout.Repository("cvi", "", "fedora"), "u2")
	cp, err := c.Copy(ctx, ref, dst)
	if err != nil {
		t.Fatal(err)
	}
	if cp.Digest != pushed.Digest || cp.LayerUploaded {
		t.Errorf("Copy: %+v; want digest %s and no upload", cp, pushed.Digest)
	}

	t.Run("skopeo inspect", func(t *testing.T) {
		out := skopeo(t, reg, "inspect", "docker://"+reg.host+"/"+ref)
		var info struct {
			Labels map[string]string
			Layers []string
		}
		if err := json.Unmarshal(out, &info); err != nil {
			t.Fatalf("skopeo inspect output: %v\n%s", err, out)
		}
		if info.Labels[layout.KeyFormat] != "qcow2" || info.Labels[layout.KeyStoredSize] != fmt.Sprint(len(data)) {
			t.Errorf("skopeo sees labels %v", info.Labels)
		}
		if len(info.Layers) != 1 || info.Layers[0] != pushed.Layer.Digest.String() {
			t.Errorf("skopeo sees layers %v, want [%s]", info.Layers, pushed.Layer.Digest)
		}
		raw := skopeo(t, reg, "inspect", "--raw", "docker://"+reg.host+"/"+dst)
		if !bytes.Contains(raw, []byte(`"vimg.dev/virtual-size":"67108864"`)) {
			t.Errorf("manifest of the copy lacks the annotations:\n%s", raw)
		}
	})

	t.Run("skopeo copy", func(t *testing.T) {
		out := filepath.Join(t.TempDir(), "img")
		skopeo(t, reg, "copy", "docker://"+reg.host+"/"+dst, "dir:"+out)
		layer, err := os.ReadFile(filepath.Join(out, pushed.Layer.Digest.Encoded()))
		if err != nil {
			t.Fatal(err)
		}
		off, n, name, err := layout.ParseDiskOffset(layer)
		if err != nil {
			t.Fatal(err)
		}
		if name != "disk/disk.qcow2" || n != int64(len(data)) || !bytes.Equal(layer[off:off+n], data) {
			t.Errorf("layer copied by skopeo holds %s of %d bytes, not the pushed disk", name, n)
		}
	})

	if err := c.Delete(ctx, dst); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Head(ctx, dst); ErrorCode(err) != "MANIFEST_UNKNOWN" {
		t.Errorf("Head after Delete: %v, want MANIFEST_UNKNOWN", err)
	}
	if _, err := c.Head(ctx, ref); err != nil {
		t.Errorf("the source went with the copy: %v", err)
	}

	// Distribution 2.8 cannot delete a tag alone: deleting one of two tags
	// of one manifest must fail rather than take the other along.
	twin := layout.Ref(layout.Repository("vi", "team-a", "fedora.cloud"), "recreated-uid")
	if _, err := c.Push(ctx, twin, bytes.NewReader(data), int64(len(data)), meta, PushOptions{LayerDigest: pushed.Layer.Digest}); err != nil {
		t.Fatal(err)
	}
	if err := c.Delete(ctx, ref); err == nil || !strings.Contains(err.Error(), "has other tags") {
		t.Errorf("Delete of one of two tags on distribution 2.8: %v, want a refusal", err)
	}
	if _, err := c.Head(ctx, twin); err != nil {
		t.Errorf("the other tag is gone: %v", err)
	}

	bad, err := New(reg.host, Options{Username: reg.user, Password: "wrong", CABundle: reg.caPEM})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bad.Open(ctx, ref); ErrorCode(err) != "UNAUTHORIZED" {
		t.Errorf("Open with a wrong password: %v, want UNAUTHORIZED", err)
	}
	untrusting, err := New(reg.host, Options{Username: reg.user, Password: reg.pass})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := untrusting.Head(ctx, ref); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("Head without the CA: %v, want a certificate error", err)
	}
}

func skopeo(t *testing.T, reg *peerRegistry, args ...string) []byte {
	t.Helper()
	bin := testimg.Require(t, "skopeo")
	full := []string{"--insecure-policy", args[0]}
	switch args[0] {
	case "copy":
		full = append(full, "--src-creds", reg.user+":"+reg.pass, "--src-tls-verify=false")
	default:
		full = append(full, "--creds", reg.user+":"+reg.pass, "--tls-verify=false")
	}
	full = append(full, args[1:]...)
	cmd := exec.Command(bin, full...)
	// Keep skopeo away from the user's registry configuration.
	cmd.Env = append(os.Environ(), "HOME="+t.TempDir(), "REGISTRY_AUTH_FILE="+filepath.Join(t.TempDir(), "auth.json"))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("skopeo %s: %v\n%s", strings.Join(full, " "), err, stderr.String())
	}
	return out
}
