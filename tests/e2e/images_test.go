//go:build e2e

package e2e

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	dvcrclient "vimg.dev/vimg/dvcr/client"
	v1 "vimg.dev/vimg/pkg/apis/virtualization/v1alpha2"
	"vimg.dev/vimg/pkg/diskimage/testimg"
	"vimg.dev/vimg/tests/e2e/framework"
)

// nodeIP is the bridge address of the local cluster's node: pods reach the
// test process there.
const nodeIP = "10.244.0.1"

// fileServer serves a directory to pods over plain HTTP on the node's
// bridge address; /slow/ paths are throttled, so an import takes long
// enough to watch it.
type fileServer struct {
	dir  string
	base string
}

func startFileServer(t *testing.T, dir string) *fileServer {
	t.Helper()
	l, err := net.Listen("tcp", nodeIP+":0")
	if err != nil {
		t.Fatalf("listening on the node address: %v", err)
	}
	files := http.FileServer(http.Dir(dir))
	mux := http.NewServeMux()
	mux.Handle("/files/", http.StripPrefix("/files/", files))
	mux.HandleFunc("/slow/", func(w http.ResponseWriter, r *http.Request) {
		f, err := os.Open(filepath.Join(dir, filepath.Base(r.URL.Path)))
		if err != nil {
			http.NotFound(w, r)
			return
		}
		defer f.Close()
		st, _ := f.Stat()
		w.Header().Set("Content-Length", strconv.FormatInt(st.Size(), 10))
		buf := make([]byte, 256<<10)
		for {
			n, err := f.Read(buf)
			if n > 0 {
				if _, werr := w.Write(buf[:n]); werr != nil {
					return
				}
				w.(http.Flusher).Flush()
				time.Sleep(100 * time.Millisecond) // ~2.5 MiB/s
			}
			if err != nil {
				return
			}
		}
	})
	srv := &http.Server{Handler: mux}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return &fileServer{dir: dir, base: "http://" + l.Addr().String()}
}

func (s *fileServer) url(name string) string  { return s.base + "/files/" + name }
func (s *fileServer) slow(name string) string { return s.base + "/slow/" + name }

// imageStatus reads an image's status with kubectl, as a user would.
func imageStatus(f *framework.Framework, kind, name string) (v1.VirtualImageStatus, metav1.ObjectMeta) {
	f.T.Helper()
	out := f.Kubectl("", "get", kind, name, "-o", "json")
	var o struct {
		Metadata metav1.ObjectMeta     `json:"metadata"`
		Status   v1.VirtualImageStatus `json:"status"`
	}
	if err := json.Unmarshal([]byte(out), &o); err != nil {
		f.T.Fatalf("decoding %s %s: %v", kind, name, err)
	}
	return o.Status, o.Metadata
}

// waitPhase waits until the image reaches phase; a Failed image (when
// Failed is not wanted) fails the test at once with its condition.
func waitPhase(f *framework.Framework, kind, name string, phase v1.ImagePhase, timeout time.Duration) v1.VirtualImageStatus {
	f.T.Helper()
	var st v1.VirtualImageStatus
	f.WaitFor(fmt.Sprintf("%s %s to be %s", kind, name, phase), timeout, func(ctx context.Context) (bool, error) {
		st, _ = imageStatus(f, kind, name)
		if st.Phase == v1.ImagePhaseFailed && phase != v1.ImagePhaseFailed {
			return false, fmt.Errorf("%s %s failed: %s", kind, name, readyMessage(st))
		}
		return st.Phase == phase, nil
	})
	return st
}

func readyMessage(st v1.VirtualImageStatus) string {
	for _, c := range st.Conditions {
		if c.Type == v1.ConditionReady {
			return c.Reason + ": " + c.Message
		}
	}
	return ""
}

// dvcr connects to the deployed DVCR as its admin, trusting the CA the
// controller made. It dials the DVCR pod itself: the node blackholes the
// service range for its own traffic (tests/cluster/README.md), while pod
// addresses are on its bridge.
func dvcr(f *framework.Framework) *dvcrclient.Client {
	f.T.Helper()
	ctx := f.Ctx(time.Minute)
	sec, err := f.Client.CoreV1().Secrets("vimg-system").Get(ctx, "vimg-dvcr-auth", metav1.GetOptions{})
	if err != nil {
		f.T.Fatal(err)
	}
	cm, err := f.Client.CoreV1().ConfigMaps("vimg-system").Get(ctx, "vimg-dvcr-ca", metav1.GetOptions{})
	if err != nil {
		f.T.Fatal(err)
	}
	pods, err := f.Client.CoreV1().Pods("vimg-system").List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=vimg-dvcr"})
	if err != nil || len(pods.Items) == 0 || pods.Items[0].Status.PodIP == "" {
		f.T.Fatalf("finding the DVCR pod: %v", err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM([]byte(cm.Data["ca.crt"]))
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.TLSClientConfig = &tls.Config{RootCAs: pool, ServerName: "vimg-dvcr.vimg-system.svc"}
	addr := net.JoinHostPort(pods.Items[0].Status.PodIP, "5000")
	t.DialContext = func(ctx context.Context, network, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, network, addr)
	}
	c, err := dvcrclient.New("vimg-dvcr.vimg-system.svc:443", dvcrclient.Options{
		Username: string(sec.Data["admin.username"]), Password: string(sec.Data["admin.password"]), Transport: t,
	})
	if err != nil {
		f.T.Fatal(err)
	}
	return c
}

// storedSHA256 pulls an image's disk file from DVCR and hashes it.
func storedSHA256(f *framework.Framework, c *dvcrclient.Client, registryURL string) string {
	f.T.Helper()
	ref := strings.TrimPrefix(registryURL, "vimg-dvcr.vimg-system.svc:443/")
	ctx := f.Ctx(5 * time.Minute)
	im, err := c.Open(ctx, ref)
	if err != nil {
		f.T.Fatalf("opening %s in DVCR: %v", ref, err)
	}
	rc, err := im.Reader(ctx)
	if err != nil {
		f.T.Fatal(err)
	}
	defer rc.Close()
	h := sha256.New()
	if _, err := io.Copy(h, rc); err != nil {
		f.T.Fatalf("pulling %s: %v", ref, err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

func viManifest(name, url, extra string) string {
	return fmt.Sprintf(`apiVersion: virtualization.deckhouse.io/v1alpha2
kind: VirtualImage
metadata:
  name: %s
spec:
  storage: ContainerRegistry
  dataSource:
    type: HTTP
    http:
      url: %q
%s`, name, url, extra)
}

// testImages makes the disk images the tests import, with qemu-img: each
// has a known virtual size and stored (decompressed) content.
type testImage struct {
	file        string // served name
	format      v1.ImageFormat
	virtualSize int64
	stored      string // sha256 of what DVCR must hold
	cdrom       bool
}

func makeImages(t *testing.T, dir string) map[string]testImage {
	t.Helper()
	raw := filepath.Join(dir, "disk.raw")
	testimg.Pattern(t, raw, 64<<20, 7)
	imgs := map[string]testImage{}
	add := func(key, file string, format v1.ImageFormat, stored string) {
		imgs[key] = testImage{file: file, format: format, virtualSize: 64 << 20, stored: testimg.SHA256File(t, filepath.Join(dir, stored))}
	}
	testimg.QemuImg(t, "convert", "-O", "qcow2", "-c", raw, filepath.Join(dir, "disk.qcow2"))
	testimg.QemuImg(t, "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, filepath.Join(dir, "disk.vmdk"))
	testimg.QemuImg(t, "convert", "-O", "vdi", raw, filepath.Join(dir, "disk.vdi"))
	testimg.Run(t, "xz", "-T2", "-k", "-3", raw)
	testimg.Run(t, "gzip", "-k", filepath.Join(dir, "disk.qcow2"))
	add("qcow2", "disk.qcow2", v1.ImageFormatQCOW2, "disk.qcow2")
	add("vmdk", "disk.vmdk", v1.ImageFormatVMDK, "disk.vmdk")
	add("vdi", "disk.vdi", v1.ImageFormatVDI, "disk.vdi")
	add("raw.xz", "disk.raw.xz", v1.ImageFormatRaw, "disk.raw")
	add("qcow2.gz", "disk.qcow2.gz", v1.ImageFormatQCOW2, "disk.qcow2")
	iso := testimg.RequireFile(t, "/usr/lib/grub-rescue/grub-rescue-cdrom.iso", "grub-rescue-pc")
	data, err := os.ReadFile(iso)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "rescue.iso"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	imgs["iso"] = testImage{file: "rescue.iso", format: v1.ImageFormatISO, virtualSize: int64(len(data)), stored: testimg.SHA256File(t, iso), cdrom: true}
	return imgs
}

// TestImages_HTTPImportsEveryFormatIntoDVCR imports each format (and two
// compressed files) over HTTP: the image becomes Ready with the format,
// sizes and cdrom flag of the file, and DVCR holds exactly the
// (decompressed) file.
func TestImages_HTTPImportsEveryFormatIntoDVCR(t *testing.T) {
	f := framework.New(t)
	dir := t.TempDir()
	imgs := makeImages(t, dir)
	srv := startFileServer(t, dir)
	reg := dvcr(f)
	for key, img := range imgs {
		name := "img-" + strings.ReplaceAll(key, ".", "-")
		f.Apply(viManifest(name, srv.url(img.file), ""))
	}
	for key, img := range imgs {
		t.Run(key, func(t *testing.T) {
			f := f.For(t)
			name := "img-" + strings.ReplaceAll(key, ".", "-")
			st := waitPhase(f, "vi", name, v1.ImagePhaseReady, 3*time.Minute)
			if st.Format != img.format || st.CDROM != img.cdrom || st.Progress != "100%" {
				t.Fatalf("format %q cdrom %v progress %q, want %q %v 100%%", st.Format, st.CDROM, st.Progress, img.format, img.cdrom)
			}
			if st.Size.UnpackedBytes != strconv.FormatInt(img.virtualSize, 10) {
				t.Fatalf("unpacked size %s (%s), want %d", st.Size.UnpackedBytes, st.Size.Unpacked, img.virtualSize)
			}
			if !strings.HasPrefix(st.Target.RegistryURL, "vimg-dvcr.vimg-system.svc:443/vi/"+f.Namespace+"/"+name+":") {
				t.Fatalf("registry URL %q", st.Target.RegistryURL)
			}
			if got := storedSHA256(f, reg, st.Target.RegistryURL); got != img.stored {
				t.Fatalf("DVCR holds sha256 %s, want %s (the decompressed source)", got, img.stored)
			}
		})
	}
	// Nothing of the imports is left running.
	f.WaitFor("import pods to be gone", time.Minute, func(ctx context.Context) (bool, error) {
		pods, err := f.Client.CoreV1().Pods("vimg-system").List(ctx, metav1.ListOptions{LabelSelector: "vimg.dev/image-namespace=" + f.Namespace})
		return err == nil && len(pods.Items) == 0, err
	})
}

// TestImages_BadSourcesFailWithTheirReason: each bad input reaches Failed
// with a specific reason and a message saying what to fix, and no retry
// storm (one import pod each).
func TestImages_BadSourcesFailWithTheirReason(t *testing.T) {
	f := framework.New(t)
	dir := t.TempDir()
	raw := filepath.Join(dir, "disk.raw")
	testimg.Pattern(t, raw, 8<<20, 3)
	testimg.QemuImg(t, "convert", "-O", "qcow2", raw, filepath.Join(dir, "base.qcow2"))
	testimg.QemuImg(t, "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", filepath.Join(dir, "backed.qcow2"))
	data, err := os.ReadFile(filepath.Join(dir, "base.qcow2"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "truncated.qcow2"), data[:len(data)/2], 0o644); err != nil {
		t.Fatal(err)
	}
	srv := startFileServer(t, dir)
	cases := []struct {
		name, url, extra, reason, says string
	}{
		{"not-found", srv.url("missing.qcow2"), "", "SourceNotFound", "404"},
		{"no-such-host", "http://images.does-not-exist.invalid/disk.qcow2", "", "SourceUnreachable", "images.does-not-exist.invalid"},
		{"checksum", srv.url("base.qcow2"), "      checksum:\n        sha256: \"" + strings.Repeat("0", 64) + "\"\n", "ChecksumMismatch", strings.Repeat("0", 64)},
		{"backing-file", srv.url("backed.qcow2"), "", "InvalidImage", "backing"},
		{"truncated", srv.url("truncated.qcow2"), "", "InvalidImage", ""},
	}
	for _, c := range cases {
		f.Apply(viManifest(c.name, c.url, c.extra))
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := f.For(t)
			st := waitPhase(f, "vi", c.name, v1.ImagePhaseFailed, 3*time.Minute)
			msg := readyMessage(st)
			if !strings.HasPrefix(msg, v1.ReasonProvisioningFailed+": "+c.reason+": ") || !strings.Contains(msg, c.says) {
				t.Fatalf("Ready condition %q, want reason %s mentioning %q", msg, c.reason, c.says)
			}
			if strings.Contains(msg, "gave up after") {
				t.Fatalf("a permanent error was retried: %q", msg)
			}
		})
	}
}

// TestImages_ProgressRisesAndSurvivesAControllerRestart watches a slow
// import with `kubectl get vi -w`: progress only rises and stays below
// 100% until Ready. The controller pod is killed mid-import; the import
// finishes without a second import pod and nothing leaks.
func TestImages_ProgressRisesAndSurvivesAControllerRestart(t *testing.T) {
	f := framework.New(t)
	dir := t.TempDir()
	raw := filepath.Join(dir, "big.raw")
	testimg.Pattern(t, raw, 96<<20, 11)
	srv := startFileServer(t, dir)

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	watch := exec.CommandContext(ctx, filepath.Join(framework.LabDir(), "bin", "kubectl"), "--kubeconfig="+f.Kubeconfig,
		"-n", f.Namespace, "get", "vi", "slow", "-w", "--no-headers", "-o", "custom-columns=PHASE:.status.phase,PROGRESS:.status.progress")
	out, err := watch.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var lines []string
	f.Apply(viManifest("slow", srv.slow("big.raw"), ""))
	if err := watch.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		b := make([]byte, 4096)
		var acc string
		for {
			n, err := out.Read(b)
			mu.Lock()
			acc += string(b[:n])
			for {
				i := strings.IndexByte(acc, '\n')
				if i < 0 {
					break
				}
				lines = append(lines, strings.Join(strings.Fields(acc[:i]), " "))
				acc = acc[i+1:]
			}
			mu.Unlock()
			if err != nil {
				return
			}
		}
	}()

	// Kill the controller once the import is under way.
	f.WaitFor("the import to make progress", 2*time.Minute, func(ctx context.Context) (bool, error) {
		st, _ := imageStatus(f, "vi", "slow")
		p, _ := strconv.ParseFloat(strings.TrimSuffix(st.Progress, "%"), 64)
		return p > 5, nil
	})
	f.Kubectl("", "-n", "vimg-system", "delete", "pod", "-l", "app.kubernetes.io/name=vimg-controller", "--wait=false")

	st := waitPhase(f, "vi", "slow", v1.ImagePhaseReady, 4*time.Minute)
	if st.Progress != "100%" {
		t.Fatalf("progress %q at Ready", st.Progress)
	}
	time.Sleep(2 * time.Second) // the watch prints the last update
	cancel()
	_ = watch.Wait()

	mu.Lock()
	defer mu.Unlock()
	var seen []float64
	for _, l := range lines {
		fields := strings.Fields(l)
		if len(fields) != 2 || fields[1] == "<none>" {
			continue
		}
		p, err := strconv.ParseFloat(strings.TrimSuffix(fields[1], "%"), 64)
		if err != nil {
			t.Fatalf("progress %q in %q", fields[1], l)
		}
		if fields[0] != string(v1.ImagePhaseReady) && p >= 100 {
			t.Fatalf("100%% before Ready: %q", l)
		}
		if len(seen) > 0 && p < seen[len(seen)-1] {
			t.Fatalf("progress went back: %v then %q", seen, l)
		}
		seen = append(seen, p)
	}
	distinct := map[float64]bool{}
	for _, p := range seen {
		if p < 100 {
			distinct[p] = true
		}
	}
	if len(distinct) < 3 {
		t.Fatalf("kubectl get vi -w showed %d progress values below 100%% (%v); want it to rise visibly", len(distinct), lines)
	}
	// One import pod ran (attempt 1): the restarted controller adopted it.
	events := f.Kubectl("", "get", "events", "--field-selector", "involvedObject.name=slow,reason=ImportStarted", "-o", "name")
	if n := len(strings.Fields(events)); n != 1 {
		t.Fatalf("%d ImportStarted events, want 1", n)
	}
	f.WaitFor("import pods to be gone", time.Minute, func(ctx context.Context) (bool, error) {
		pods, err := f.Client.CoreV1().Pods("vimg-system").List(ctx, metav1.ListOptions{LabelSelector: "vimg.dev/image-namespace=" + f.Namespace})
		return err == nil && len(pods.Items) == 0, err
	})
}

// TestImages_ClusterImageAndCopies: a ClusterVirtualImage imported over
// HTTP, a VirtualImage copied from it and a ClusterVirtualImage copied
// from that: copies hold the same bytes, made inside DVCR.
func TestImages_ClusterImageAndCopies(t *testing.T) {
	f := framework.New(t)
	dir := t.TempDir()
	raw := filepath.Join(dir, "disk.raw")
	testimg.Pattern(t, raw, 16<<20, 5)
	testimg.QemuImg(t, "convert", "-O", "qcow2", raw, filepath.Join(dir, "disk.qcow2"))
	want := testimg.SHA256File(t, filepath.Join(dir, "disk.qcow2"))
	srv := startFileServer(t, dir)
	reg := dvcr(f)
	cvi := "e2e-" + f.Namespace
	t.Cleanup(func() {
		f.TryKubectl("", "delete", "cvi", cvi, cvi+"-copy", "--ignore-not-found", "--wait=true", "--timeout=60s")
	})
	f.Apply(fmt.Sprintf(`apiVersion: virtualization.deckhouse.io/v1alpha2
kind: ClusterVirtualImage
metadata:
  name: %[1]s
spec:
  dataSource:
    type: HTTP
    http:
      url: %[2]q
---
apiVersion: virtualization.deckhouse.io/v1alpha2
kind: VirtualImage
metadata:
  name: from-cvi
spec:
  storage: ContainerRegistry
  dataSource:
    type: ObjectRef
    objectRef:
      kind: ClusterVirtualImage
      name: %[1]s
---
apiVersion: virtualization.deckhouse.io/v1alpha2
kind: ClusterVirtualImage
metadata:
  name: %[1]s-copy
spec:
  dataSource:
    type: ObjectRef
    objectRef:
      kind: VirtualImage
      name: from-cvi
      namespace: %[3]s
`, cvi, srv.url("disk.qcow2"), f.Namespace))
	for _, o := range [][2]string{{"cvi", cvi}, {"vi", "from-cvi"}, {"cvi", cvi + "-copy"}} {
		st := waitPhase(f, o[0], o[1], v1.ImagePhaseReady, 3*time.Minute)
		if st.Format != v1.ImageFormatQCOW2 || st.Size.UnpackedBytes != strconv.Itoa(16<<20) {
			t.Fatalf("%s %s: format %s size %s", o[0], o[1], st.Format, st.Size.UnpackedBytes)
		}
		if got := storedSHA256(f, reg, st.Target.RegistryURL); got != want {
			t.Fatalf("%s %s holds sha256 %s, want %s", o[0], o[1], got, want)
		}
	}
	// Deleting an image deletes its data in DVCR.
	st, _ := imageStatus(f, "cvi", cvi+"-copy")
	f.Kubectl("", "delete", "cvi", cvi+"-copy", "--wait=true", "--timeout=60s")
	ref := strings.TrimPrefix(st.Target.RegistryURL, "vimg-dvcr.vimg-system.svc:443/")
	if _, err := reg.Head(f.Ctx(time.Minute), ref); err == nil {
		t.Fatalf("%s is still in DVCR after its image was deleted", ref)
	}
}
