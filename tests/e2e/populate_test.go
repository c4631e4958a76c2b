//go:build e2e

package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1 "vimg.dev/vimg/pkg/apis/virtualization/v1alpha2"
	"vimg.dev/vimg/pkg/diskimage/testimg"
	"vimg.dev/vimg/pkg/worker/api"
	"vimg.dev/vimg/tests/e2e/framework"
)

// populateNS is where prime claims and populate pods live.
const populateNS = "vimg-populate"

// fsOverhead is the populator's default file system overhead.
const fsOverhead = 0.055

// volumeKinds are the test cluster's classes in both volume modes.
var volumeKinds = []struct{ class, mode string }{
	{"local-wffc", "Filesystem"}, {"local-wffc", "Block"},
	{"local-immediate", "Filesystem"}, {"local-immediate", "Block"},
}

// populateImage is one source file and the raw disk it must become.
type populateImage struct {
	file string // served name
	raw  string // qemu-img convert -O raw of the source
}

// makePopulateImages makes one image per format, each from its own raw
// pattern so that a volume filled from the wrong image is caught.
func makePopulateImages(t *testing.T, dir string) map[string]populateImage {
	t.Helper()
	imgs := map[string]populateImage{}
	for i, format := range []string{"qcow2", "vmdk", "vdi", "raw", "xz"} {
		raw := filepath.Join(dir, format+".raw")
		testimg.Pattern(t, raw, 48<<20, uint64(100+i))
		file := format + ".img"
		switch format {
		case "qcow2":
			testimg.QemuImg(t, "convert", "-O", "qcow2", "-c", raw, filepath.Join(dir, file))
		case "vmdk":
			testimg.QemuImg(t, "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, filepath.Join(dir, file))
		case "vdi":
			testimg.QemuImg(t, "convert", "-O", "vdi", raw, filepath.Join(dir, file))
		case "raw":
			testimg.Run(t, "cp", "--sparse=always", raw, filepath.Join(dir, file))
		case "xz":
			file = "disk.qcow2.xz"
			q := filepath.Join(dir, "disk.qcow2")
			testimg.QemuImg(t, "convert", "-O", "qcow2", raw, q)
			testimg.Run(t, "xz", "-T2", "-3", q)
		}
		// The reference is qemu-img's own reading of the source.
		ref := filepath.Join(dir, format+".ref")
		src := filepath.Join(dir, file)
		if format == "xz" {
			testimg.Run(t, "sh", "-c", "xz -dc "+src+" > "+filepath.Join(dir, "ref.qcow2"))
			src = filepath.Join(dir, "ref.qcow2")
		}
		testimg.QemuImg(t, "convert", "-O", "raw", src, ref)
		imgs[format] = populateImage{file: file, raw: ref}
	}
	iso := testimg.RequireFile(t, "/usr/lib/grub-rescue/grub-rescue-cdrom.iso", "grub-rescue-pc")
	testimg.Run(t, "cp", iso, filepath.Join(dir, "rescue.iso"))
	imgs["iso"] = populateImage{file: "rescue.iso", raw: iso}
	return imgs
}

// paddedSHA256 is the sha256 of the file followed by zeros up to size.
func paddedSHA256(t *testing.T, path string, size int64) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		t.Fatal(err)
	}
	if n > size {
		t.Fatalf("%s is %d bytes, more than the %d the volume holds", path, n, size)
	}
	if _, err := io.CopyN(h, zeroReader{}, size-n); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) { clear(p); return len(p), nil }

// imageClaim is a claim of size filled from an image.
func imageClaim(name, class, mode, kind, image, size string) string {
	return strings.Replace(pvc(name, class, mode), "storage: 64Mi", "storage: "+size, 1) + fmt.Sprintf(`  dataSourceRef:
    apiGroup: virtualization.deckhouse.io
    kind: %s
    name: %s
`, kind, image)
}

// readerScript prints what a VM would see: the disk's size, owner and
// sha256.
func readerScript(mode string) string {
	if mode == "Block" {
		return "echo size=$(blockdev --getsize64 /dev/xvda) owner=-; echo sum=$(sha256sum /dev/xvda | cut -d' ' -f1)"
	}
	return "echo size=$(stat -c %s /data/disk.img) owner=$(stat -c %u:%g /data/disk.img); echo sum=$(sha256sum /data/disk.img | cut -d' ' -f1)"
}

func field(out, key string) string {
	for _, w := range strings.Fields(out) {
		if v, ok := strings.CutPrefix(w, key+"="); ok {
			return v
		}
	}
	return ""
}

// checkVolume checks a reader pod's output against the image: the disk is
// as large as the claim allows (the whole device; the claim less the file
// system overhead, for disk.img) and holds the image padded with zeros.
func checkVolume(t *testing.T, f *framework.Framework, claim, mode, out string, img populateImage) {
	t.Helper()
	pvc, err := f.Client.CoreV1().PersistentVolumeClaims(f.Namespace).Get(f.Ctx(time.Minute), claim, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	q := pvc.Status.Capacity[corev1.ResourceStorage]
	capacity := q.Value()
	size, err := strconv.ParseInt(field(out, "size"), 10, 64)
	if err != nil {
		t.Fatalf("reader output %q: %v", out, err)
	}
	want := capacity
	if mode == "Filesystem" {
		want = api.UsableDiskSize(capacity, fsOverhead)
		if o := field(out, "owner"); o != "107:107" {
			t.Fatalf("disk.img belongs to %s, want 107:107", o)
		}
	}
	if size != want {
		t.Fatalf("the disk is %d bytes, want %d (claim capacity %d)", size, want, capacity)
	}
	if got, exp := field(out, "sum"), paddedSHA256(t, img.raw, size); got != exp {
		t.Fatalf("the volume's sha256 is %s, want %s (qemu-img convert -O raw, padded to %d bytes)", got, exp, size)
	}
	if p := pvc.Annotations["vimg.dev/populate-progress"]; p != "100%" {
		t.Fatalf("populate progress annotation %q, want 100%%", p)
	}
}

// TestPopulate_EveryFormatIntoEveryClassAndMode fills, for each format, a
// claim of every class and volume mode from a VirtualImage and from a
// ClusterVirtualImage; a pod then reads exactly the image's disk.
func TestPopulate_EveryFormatIntoEveryClassAndMode(t *testing.T) {
	f := framework.New(t)
	dir := t.TempDir()
	imgs := makePopulateImages(t, dir)
	srv := startFileServer(t, dir)
	cviPrefix := f.Namespace // cluster-scoped names unique to the test
	for format, img := range imgs {
		f.Apply(viManifest("vi-"+format, srv.url(img.file), ""))
		f.Apply(fmt.Sprintf(`apiVersion: virtualization.deckhouse.io/v1alpha2
kind: ClusterVirtualImage
metadata:
  name: %s-%s
spec:
  dataSource:
    type: HTTP
    http:
      url: %q
`, cviPrefix, format, srv.url(img.file)))
		t.Cleanup(func() {
			f.TryKubectl("", "delete", "cvi", cviPrefix+"-"+format, "--wait=false")
		})
	}
	// The claims are made at once, before the images are Ready: they
	// wait for them. One kind at a time keeps the node's pod count sane.
	for _, kind := range []string{"VirtualImage", "ClusterVirtualImage"} {
		short := map[string]string{"VirtualImage": "vi", "ClusterVirtualImage": "cvi"}[kind]
		name := func(format string, i int) string { return fmt.Sprintf("%s-%s-%d", short, format, i) }
		for format := range imgs {
			image := "vi-" + format
			if kind == "ClusterVirtualImage" {
				image = cviPrefix + "-" + format
			}
			for i, vk := range volumeKinds {
				n := name(format, i)
				f.Apply(imageClaim(n, vk.class, vk.mode, kind, image, "80Mi") + "---\n" + shellPod(n, n, vk.mode, readerScript(vk.mode)))
			}
		}
		for format, img := range imgs {
			for i, vk := range volumeKinds {
				t.Run(fmt.Sprintf("%s/%s/%s/%s", short, format, vk.class, vk.mode), func(t *testing.T) {
					f := f.For(t)
					n := name(format, i)
					f.WaitForPodPhase(n, corev1.PodSucceeded, 6*time.Minute)
					checkVolume(t, f, n, vk.mode, f.PodLogs(n), img)
				})
			}
		}
		f.Kubectl("", "delete", "pods,pvc", "--all", "--wait=true", "--timeout=3m")
	}
	waitPopulateGone(f)
}

// waitPopulateGone waits until nothing of the namespace's claims is left
// in the populator's namespace: no prime claim, no pod, no Secret.
func waitPopulateGone(f *framework.Framework) {
	f.T.Helper()
	sel := metav1.ListOptions{LabelSelector: "vimg.dev/pvc-namespace=" + f.Namespace}
	f.WaitFor("populate pods, secrets and prime claims to be gone", 2*time.Minute, func(ctx context.Context) (bool, error) {
		pods, err := f.Client.CoreV1().Pods(populateNS).List(ctx, sel)
		if err != nil {
			return false, err
		}
		secrets, err := f.Client.CoreV1().Secrets(populateNS).List(ctx, sel)
		if err != nil {
			return false, err
		}
		primes, err := f.Client.CoreV1().PersistentVolumeClaims(populateNS).List(ctx, metav1.ListOptions{})
		if err != nil {
			return false, err
		}
		return len(pods.Items) == 0 && len(secrets.Items) == 0 && len(primes.Items) == 0, nil
	})
}

// claimEvents returns "reason: message" of the claim's events.
func claimEvents(f *framework.Framework, claim string) string {
	evs, err := f.Client.CoreV1().Events(f.Namespace).List(f.Ctx(time.Minute), metav1.ListOptions{FieldSelector: "involvedObject.name=" + claim})
	if err != nil {
		return err.Error()
	}
	var b strings.Builder
	for _, e := range evs.Items {
		fmt.Fprintf(&b, "%s: %s\n", e.Reason, e.Message)
	}
	return b.String()
}

// TestPopulate_TooSmallClaimFailsClearly: a claim smaller than the image
// gets an event saying so and how large it must be, and no data: it stays
// Pending, no populate pod is ever started for it, and it goes away when
// deleted.
func TestPopulate_TooSmallClaimFailsClearly(t *testing.T) {
	f := framework.New(t)
	srv, _ := serveQcow2(t, 64<<20, 3, false)
	f.Apply(viManifest("big", srv.url("disk.qcow2"), ""))
	waitPhase(f, "vi", "big", v1.ImagePhaseReady, 3*time.Minute)
	for _, mode := range []string{"Block", "Filesystem"} {
		t.Run(mode, func(t *testing.T) {
			f := f.For(t)
			claim := "small-" + strings.ToLower(mode)
			// 66 MiB: enough for a 64 MiB block disk... but not with
			// the file system's 5.5% (62 MiB usable); 32 MiB for Block.
			size := "66Mi"
			if mode == "Block" {
				size = "32Mi"
			}
			f.Apply(imageClaim(claim, "local-immediate", mode, "VirtualImage", "big", size))
			var events string
			f.WaitFor("a VolumeTooSmall event", 2*time.Minute, func(ctx context.Context) (bool, error) {
				events = claimEvents(f, claim)
				return strings.Contains(events, "VolumeTooSmall"), nil
			})
			if !strings.Contains(events, "create the PersistentVolumeClaim again with at least") || !strings.Contains(events, "64Mi") {
				t.Fatalf("the event does not say what to do:\n%s", events)
			}
			time.Sleep(5 * time.Second) // room for a wrong retry to show
			pvc, err := f.Client.CoreV1().PersistentVolumeClaims(f.Namespace).Get(f.Ctx(time.Minute), claim, metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if pvc.Status.Phase != corev1.ClaimPending || pvc.Annotations["vimg.dev/populate-progress"] != "Failed" {
				t.Fatalf("claim is %s with progress %q, want Pending and Failed", pvc.Status.Phase, pvc.Annotations["vimg.dev/populate-progress"])
			}
			pods, err := f.Client.CoreV1().Pods(populateNS).List(f.Ctx(time.Minute), metav1.ListOptions{LabelSelector: "vimg.dev/pvc-uid=" + string(pvc.UID)})
			if err != nil || len(pods.Items) != 0 {
				t.Fatalf("populate pods for a too-small claim: %v %v", len(pods.Items), err)
			}
			f.Kubectl("", "delete", "pvc", claim, "--timeout=2m")
		})
	}
	waitPopulateGone(f)
}

// serveQcow2 serves disk.qcow2, a qcow2 (zlib-compressed clusters if
// compressed) of a pattern of size bytes made from seed, and returns the
// server and the raw disk.
func serveQcow2(t *testing.T, size int64, seed uint64, compressed bool) (*fileServer, string) {
	t.Helper()
	dir := t.TempDir()
	raw := filepath.Join(dir, "disk.raw")
	testimg.Pattern(t, raw, size, seed)
	args := []string{"convert", "-O", "qcow2"}
	if compressed {
		args = append(args, "-c")
	}
	testimg.QemuImg(t, append(args, raw, filepath.Join(dir, "disk.qcow2"))...)
	return startFileServer(t, dir), raw
}

// bigImage imports a 512 MiB image, large enough that its copy takes a
// while, and returns its reference raw file.
func bigImage(t *testing.T, f *framework.Framework, name string) string {
	srv, raw := serveQcow2(t, 512<<20, 9, true)
	f.Apply(viManifest(name, srv.url("disk.qcow2"), ""))
	waitPhase(f, "vi", name, v1.ImagePhaseReady, 5*time.Minute)
	return raw
}

// waitPopulatePod waits for the claim's populate pod to run.
func waitPopulatePod(f *framework.Framework, claim string) {
	f.T.Helper()
	f.WaitFor("the populate pod of "+claim+" to run", 3*time.Minute, func(ctx context.Context) (bool, error) {
		pods, err := f.Client.CoreV1().Pods(populateNS).List(ctx, metav1.ListOptions{LabelSelector: "vimg.dev/pvc-name=" + claim + ",vimg.dev/pvc-namespace=" + f.Namespace})
		return err == nil && len(pods.Items) == 1 && pods.Items[0].Status.Phase == corev1.PodRunning, err
	})
}

// TestPopulate_DeletingTheImageMidCopyLeavesNothingBehind: the image goes
// while its claim is being filled. Whether or not the copy made it, nothing
// of the populator is left for the claim, and the claim can be deleted.
func TestPopulate_DeletingTheImageMidCopyLeavesNothingBehind(t *testing.T) {
	f := framework.New(t)
	bigImage(t, f, "doomed")
	f.Apply(imageClaim("target", "local-immediate", "Block", "VirtualImage", "doomed", "600Mi"))
	waitPopulatePod(f, "target")
	f.Kubectl("", "delete", "vi", "doomed", "--wait=false")
	f.WaitFor("the claim to settle", 3*time.Minute, func(ctx context.Context) (bool, error) {
		pvc, err := f.Client.CoreV1().PersistentVolumeClaims(f.Namespace).Get(ctx, "target", metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		if pvc.Status.Phase == corev1.ClaimBound {
			t.Log("the copy finished before the image went: the claim is Bound")
			return true, nil
		}
		if strings.Contains(claimEvents(f, "target"), "does not exist") {
			t.Log("the image went mid-copy: the claim waits for it, Pending")
			return true, nil
		}
		return false, nil
	})
	waitPopulateGone(f)
	f.Kubectl("", "delete", "pvc", "target", "--timeout=2m")
	if _, err := f.Client.CoreV1().PersistentVolumeClaims(f.Namespace).Get(f.Ctx(time.Minute), "target", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Fatalf("the claim is still there: %v", err)
	}
}

// TestPopulate_PopulatorRestartMidCopyConverges: the populator is killed
// while a copy runs; its successor picks the claim up and it ends Bound
// with the image.
func TestPopulate_PopulatorRestartMidCopyConverges(t *testing.T) {
	f := framework.New(t)
	raw := bigImage(t, f, "steady")
	f.Apply(imageClaim("target", "local-wffc", "Filesystem", "VirtualImage", "steady", "600Mi") + "---\n" +
		shellPod("reader", "target", "Filesystem", readerScript("Filesystem")))
	waitPopulatePod(f, "target")
	f.Kubectl("", "-n", "vimg-system", "delete", "pod", "-l", "app.kubernetes.io/name=vimg-populator", "--wait=false")
	f.WaitForPodPhase("reader", corev1.PodSucceeded, 6*time.Minute)
	checkVolume(t, f, "target", "Filesystem", f.PodLogs("reader"), populateImage{raw: raw})
	f.Kubectl("", "delete", "pod,pvc", "--all", "--timeout=2m")
	waitPopulateGone(f)
}
