//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1 "vimg.dev/vimg/pkg/apis/virtualization/v1alpha2"
	"vimg.dev/vimg/pkg/diskimage/testimg"
	"vimg.dev/vimg/tests/e2e/framework"
)

const uploadHost = "vimg-upload.vimg-system.svc"

// gateway finds the upload gateway's pod and the CA that signed its
// certificate: the test reaches it the way a pod would reach the Service
// (the node blackholes service addresses for its own traffic).
func gateway(f *framework.Framework) (podAddr, caFile string, pool *x509.CertPool) {
	f.T.Helper()
	ctx := f.Ctx(time.Minute)
	pods, err := f.Client.CoreV1().Pods("vimg-system").List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=vimg-upload"})
	if err != nil || len(pods.Items) == 0 || pods.Items[0].Status.PodIP == "" {
		f.T.Fatalf("finding the upload gateway pod: %v", err)
	}
	cm, err := f.Client.CoreV1().ConfigMaps("vimg-system").Get(ctx, "vimg-dvcr-ca", metav1.GetOptions{})
	if err != nil {
		f.T.Fatal(err)
	}
	caFile = filepath.Join(f.T.TempDir(), "ca.crt")
	if err := os.WriteFile(caFile, []byte(cm.Data["ca.crt"]), 0o644); err != nil {
		f.T.Fatal(err)
	}
	pool = x509.NewCertPool()
	pool.AppendCertsFromPEM([]byte(cm.Data["ca.crt"]))
	return net.JoinHostPort(pods.Items[0].Status.PodIP, "8443"), caFile, pool
}

func uploadVI(name string) string {
	return fmt.Sprintf(`apiVersion: virtualization.deckhouse.io/v1alpha2
kind: VirtualImage
metadata:
  name: %s
spec:
  storage: ContainerRegistry
  dataSource:
    type: Upload
`, name)
}

// uploadURL waits for an Upload image to wait for its bytes and returns its
// in-cluster URL.
func uploadURL(f *framework.Framework, name string) string {
	f.T.Helper()
	st := waitPhase(f, "vi", name, v1.ImagePhaseWaitForUserUpload, time.Minute)
	if st.ImageUploadURLs == nil || !strings.HasPrefix(st.ImageUploadURLs.InCluster, "https://"+uploadHost+"/upload/") {
		f.T.Fatalf("imageUploadURLs %+v", st.ImageUploadURLs)
	}
	if !strings.HasPrefix(st.ImageUploadURLs.External, "https://") {
		f.T.Fatalf("no external upload URL: %+v", st.ImageUploadURLs)
	}
	return st.ImageUploadURLs.InCluster
}

func curl(t *testing.T, stdin io.Reader, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(testimg.Require(t, "curl"), args...)
	cmd.Stdin = stdin
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if err != nil {
		err = fmt.Errorf("curl %v: %v: %s %s", args, err, out.String(), errb.String())
	}
	return out.String(), err
}

// TestUpload_CurlChunkedResumedAndVimgUpload: uploads through the one
// gateway Service with plain curl (a file, and a stream of unknown length),
// an upload cut off and resumed with Content-Range, and `vimg upload
// --create` over the external URL; each image becomes Ready with exactly
// the uploaded (decompressed) bytes. A wrong token is refused.
func TestUpload_CurlChunkedResumedAndVimgUpload(t *testing.T) {
	f := framework.New(t)
	dir := t.TempDir()
	raw := filepath.Join(dir, "disk.raw")
	testimg.Pattern(t, raw, 24<<20, 21)
	qcow := filepath.Join(dir, "disk.qcow2")
	testimg.QemuImg(t, "convert", "-O", "qcow2", raw, qcow)
	iso := testimg.RequireFile(t, "/usr/lib/grub-rescue/grub-rescue-cdrom.iso", "grub-rescue-pc")
	testimg.Run(t, "sh", "-c", "xz -T2 -c "+iso+" > "+filepath.Join(dir, "rescue.iso.xz"))
	addr, caFile, pool := gateway(f)
	connect := uploadHost + ":443:" + addr // for curl --connect-to
	reg := dvcr(f)

	for _, n := range []string{"by-curl", "by-stream", "resumed"} {
		f.Apply(uploadVI(n))
	}

	t.Run("curl -T file", func(t *testing.T) {
		f := f.For(t)
		u := uploadURL(f, "by-curl")
		code, err := curl(t, nil, "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", caFile, "--connect-to", connect, "-T", qcow, u+"x")
		if err != nil || code != "404" {
			t.Fatalf("an upload with a wrong token: HTTP %s, %v; want 404", code, err)
		}
		if _, err := curl(t, nil, "-sS", "--fail", "--cacert", caFile, "--connect-to", connect, "-T", qcow, u); err != nil {
			t.Fatal(err)
		}
		st := waitPhase(f, "vi", "by-curl", v1.ImagePhaseReady, 3*time.Minute)
		if st.Format != v1.ImageFormatQCOW2 || st.Size.UnpackedBytes != strconv.Itoa(24<<20) || st.ImageUploadURLs != nil {
			t.Fatalf("status %+v", st)
		}
		if got, want := storedSHA256(f, reg, st.Target.RegistryURL), testimg.SHA256File(t, qcow); got != want {
			t.Fatalf("DVCR holds %s, want the uploaded file's %s", got, want)
		}
	})

	t.Run("curl -T - (chunked, xz)", func(t *testing.T) {
		f := f.For(t)
		u := uploadURL(f, "by-stream")
		xzf, err := os.Open(filepath.Join(dir, "rescue.iso.xz"))
		if err != nil {
			t.Fatal(err)
		}
		defer xzf.Close()
		// A pipe, so curl cannot know the length.
		if _, err := curl(t, io.MultiReader(xzf), "-sS", "--fail", "--cacert", caFile, "--connect-to", connect, "-T", "-", u); err != nil {
			t.Fatal(err)
		}
		st := waitPhase(f, "vi", "by-stream", v1.ImagePhaseReady, 3*time.Minute)
		if st.Format != v1.ImageFormatISO || !st.CDROM {
			t.Fatalf("status %+v", st)
		}
		if got, want := storedSHA256(f, reg, st.Target.RegistryURL), testimg.SHA256File(t, iso); got != want {
			t.Fatalf("DVCR holds %s, want the decompressed ISO's %s", got, want)
		}
	})

	t.Run("cut off, then resumed", func(t *testing.T) {
		f := f.For(t)
		u := uploadURL(f, "resumed")
		data, err := os.ReadFile(qcow)
		if err != nil {
			t.Fatal(err)
		}
		tr := &http.Transport{
			TLSClientConfig: &tls.Config{RootCAs: pool, ServerName: uploadHost},
			DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
				return (&net.Dialer{}).DialContext(ctx, network, addr)
			},
		}
		hc := &http.Client{Transport: tr, Timeout: 2 * time.Minute}
		// Announce the whole file, send a third of it, and hang up.
		pr, pw := io.Pipe()
		go func() {
			pw.Write(data[:len(data)/3])
			time.Sleep(2 * time.Second)
			pw.CloseWithError(io.ErrUnexpectedEOF)
		}()
		req, _ := http.NewRequest(http.MethodPut, u, pr)
		req.ContentLength = int64(len(data))
		if resp, err := hc.Do(req); err == nil {
			resp.Body.Close()
			t.Fatalf("the cut-off upload answered %s", resp.Status)
		}
		var offset int64
		f.WaitFor("the gateway to hold the bytes received", time.Minute, func(ctx context.Context) (bool, error) {
			req, _ := http.NewRequestWithContext(ctx, http.MethodHead, u, nil)
			resp, err := hc.Do(req)
			if err != nil {
				return false, nil
			}
			resp.Body.Close()
			offset, _ = strconv.ParseInt(resp.Header.Get("Upload-Offset"), 10, 64)
			return resp.StatusCode == http.StatusOK && offset > 0, nil
		})
		if offset > int64(len(data)/3) {
			t.Fatalf("the gateway holds %d bytes of the %d sent", offset, len(data)/3)
		}
		req, _ = http.NewRequest(http.MethodPut, u, bytes.NewReader(data[offset:]))
		req.Header.Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", offset, len(data)-1, len(data)))
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusCreated {
			t.Fatalf("resuming at %d: %s: %s", offset, resp.Status, body)
		}
		st := waitPhase(f, "vi", "resumed", v1.ImagePhaseReady, 3*time.Minute)
		if got, want := storedSHA256(f, reg, st.Target.RegistryURL), testimg.SHA256File(t, qcow); got != want {
			t.Fatalf("DVCR holds %s after the resumed upload, want %s", got, want)
		}
	})

	t.Run("vimg upload --create", func(t *testing.T) {
		f := f.For(t)
		vimg, err := filepath.Abs("../../bin/vimg")
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, vimg, "upload", "--create", "-n", f.Namespace, "--kubeconfig", f.Kubeconfig,
			"--cacert", caFile, "by-cli", qcow)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("vimg upload: %v\n%s", err, out)
		}
		t.Logf("vimg upload printed:\n%s", out)
		st, _ := imageStatus(f, "vi", "by-cli")
		if st.Phase != v1.ImagePhaseReady {
			t.Fatalf("vimg upload returned with the image %s", st.Phase)
		}
		if got, want := storedSHA256(f, reg, st.Target.RegistryURL), testimg.SHA256File(t, qcow); got != want {
			t.Fatalf("DVCR holds %s, want %s", got, want)
		}
	})
}
