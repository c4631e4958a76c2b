//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1 "vimg.dev/vimg/pkg/apis/virtualization/v1alpha2"
	"vimg.dev/vimg/pkg/diskimage/testimg"
	"vimg.dev/vimg/tests/e2e/framework"
)

const (
	csiDriver = "images.vimg.dev"
	csiNS     = "vimg-csi"
	// cdromClass is the StorageClass deploy/csi.yaml makes.
	cdromClass = "vimg-cdrom"
)

// csiState is the node plugin's state directory on the test node
// (tests/cluster/deploy.sh).
func csiState() string { return filepath.Join(framework.LabDir(), "vimg-csi") }

// debianISO serves the grub-rescue-pc ISO (a real Debian package's) and
// returns its URL and sha256.
func debianISO(t *testing.T) (url, sum string) {
	t.Helper()
	iso := testimg.RequireFile(t, "/usr/lib/grub-rescue/grub-rescue-cdrom.iso", "grub-rescue-pc")
	dir := t.TempDir()
	testimg.Run(t, "cp", iso, filepath.Join(dir, "rescue.iso"))
	srv := startFileServer(t, dir)
	return srv.url("rescue.iso"), testimg.SHA256File(t, iso)
}

// cdromReader prints what a VM sees of a CD-ROM volume, then tries to
// write to it, and prints whether the write was refused and why.
func cdromReader(mode string) string {
	try := func(what, cmd string) string {
		return fmt.Sprintf(`if out=$(sh -c %q 2>&1); then echo %s=accepted; else echo %s=refused "$out"; fi; `, cmd, what, what)
	}
	if mode == "Block" {
		return "echo size=$(blockdev --getsize64 /dev/xvda) sum=$(sha256sum /dev/xvda | cut -d' ' -f1) ro=$(blockdev --getro /dev/xvda); " +
			try("write", "dd if=/dev/zero of=/dev/xvda bs=4096 count=1 conv=notrunc,fsync")
	}
	return "echo size=$(stat -c %s /data/disk.img) owner=$(stat -c %u:%g /data/disk.img) sum=$(sha256sum /data/disk.img | cut -d' ' -f1); " +
		try("write", "echo x >> /data/disk.img") + try("create", "touch /data/new")
}

// TestCSI_CDROMClaimsServeTheISOReadOnly: claims of class vimg-cdrom whose
// dataSourceRef names a VirtualImage or ClusterVirtualImage of a real
// Debian ISO become bound to a volume of the images.vimg.dev driver,
// pinned by digest; a pod reads exactly the ISO from it, in Filesystem
// (disk.img, 107:107) and Block mode, and every write is refused. The
// volume goes with its claim.
func TestCSI_CDROMClaimsServeTheISOReadOnly(t *testing.T) {
	f := framework.New(t)
	url, sum := debianISO(t)
	f.Apply(viManifest("rescue", url, ""))
	cvi := f.Namespace + "-rescue"
	f.Apply(fmt.Sprintf("apiVersion: virtualization.deckhouse.io/v1alpha2\nkind: ClusterVirtualImage\nmetadata:\n  name: %s\nspec:\n  dataSource:\n    type: HTTP\n    http:\n      url: %q\n", cvi, url))
	t.Cleanup(func() { f.TryKubectl("", "delete", "cvi", cvi, "--wait=false") })

	// The claims come first: they wait for their images.
	cases := []struct{ name, kind, image, mode, access string }{
		{"vi-fs", "VirtualImage", "rescue", "Filesystem", "ReadOnlyMany"},
		{"vi-block", "VirtualImage", "rescue", "Block", "ReadOnlyMany"},
		// RWX: what a live-migratable VM's CD-ROM asks for.
		{"cvi-fs", "ClusterVirtualImage", cvi, "Filesystem", "ReadWriteMany"},
	}
	for _, c := range cases {
		claim := strings.Replace(imageClaim(c.name, cdromClass, c.mode, c.kind, c.image, "1Mi"), "ReadWriteOnce", c.access, 1)
		f.Apply(claim + "---\n" + shellPod(c.name, c.name, c.mode, cdromReader(c.mode)))
	}
	// A second pod of the same claim on the node, as a CD-ROM hotplugged
	// into a second VM.
	f.Apply(shellPod("vi-fs-again", "vi-fs", "Filesystem", cdromReader("Filesystem")))
	st := waitPhase(f, "vi", "rescue", v1.ImagePhaseReady, 4*time.Minute)
	if st.Format != v1.ImageFormatISO {
		t.Fatalf("the image's format is %q, want iso", st.Format)
	}

	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := f.For(t)
			f.WaitForPodPhase(c.name, corev1.PodSucceeded, 4*time.Minute)
			out := f.PodLogs(c.name)
			if got := field(out, "sum"); got != sum {
				t.Fatalf("the volume's sha256 is %s, the ISO's %s (reader: %q)", got, sum, out)
			}
			if field(out, "write") != "refused" || c.mode == "Filesystem" && field(out, "create") != "refused" {
				t.Fatalf("a write was accepted: %q", out)
			}
			if c.mode == "Filesystem" {
				if o := field(out, "owner"); o != "107:107" {
					t.Errorf("disk.img belongs to %s, want 107:107", o)
				}
				if !strings.Contains(out, "Read-only file system") {
					t.Errorf("the write was not refused as EROFS: %q", out)
				}
			} else if field(out, "ro") != "1" {
				t.Errorf("the block device is not read-only: %q", out)
			}

			pvc, err := f.Client.CoreV1().PersistentVolumeClaims(f.Namespace).Get(f.Ctx(time.Minute), c.name, metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			pv, err := f.Client.CoreV1().PersistentVolumes().Get(f.Ctx(time.Minute), pvc.Spec.VolumeName, metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if pv.Spec.CSI == nil || pv.Spec.CSI.Driver != csiDriver {
				t.Fatalf("volume %s is not of driver %s: %+v", pv.Name, csiDriver, pv.Spec.PersistentVolumeSource)
			}
			ref := pv.Spec.CSI.VolumeAttributes["vimg.dev/image-ref"]
			if !strings.Contains(ref, "@sha256:") {
				t.Errorf("volume %s pins no digest: image-ref %q", pv.Name, ref)
			}
			if p := pvc.Annotations["vimg.dev/populate-progress"]; p != "100%" {
				t.Errorf("progress annotation %q, want 100%%", p)
			}
		})
	}

	f.WaitForPodPhase("vi-fs-again", corev1.PodSucceeded, 4*time.Minute)
	if out := f.PodLogs("vi-fs-again"); field(out, "sum") != sum || field(out, "write") != "refused" {
		t.Errorf("a second pod of claim vi-fs read %q; want the ISO's sha256 %s and the write refused", out, sum)
	}

	// The volumes go with their claims; nothing is left of the populator.
	var volumes []string
	for _, c := range cases {
		pvc, err := f.Client.CoreV1().PersistentVolumeClaims(f.Namespace).Get(f.Ctx(time.Minute), c.name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		volumes = append(volumes, pvc.Spec.VolumeName)
	}
	f.Kubectl("", "delete", "pods,pvc", "--all", "--wait=true", "--timeout=3m")
	f.WaitFor("the CD-ROM volumes to be deleted", 2*time.Minute, func(ctx context.Context) (bool, error) {
		for _, v := range volumes {
			if _, err := f.Client.CoreV1().PersistentVolumes().Get(ctx, v, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
				return false, nil
			}
		}
		return true, nil
	})
	waitPopulateGone(f)
}

// TestCSI_ClaimsOfImagesItCannotServeSayWhy: an image stored in a claim
// cannot be a CD-ROM volume, and a claim of the class naming no image is
// refused by the driver: both say so, and neither gets a volume.
func TestCSI_ClaimsOfImagesItCannotServeSayWhy(t *testing.T) {
	f := framework.New(t)
	url, _ := debianISO(t)
	f.Apply(pvcImage("in-claim", "local-immediate", httpSource(url)))
	f.Apply(imageClaim("from-claim", cdromClass, "Filesystem", "VirtualImage", "in-claim", "1Mi"))
	f.Apply(pvc("plain", cdromClass, "Filesystem"))
	waitPhase(f, "vi", "in-claim", v1.ImagePhaseReady, 4*time.Minute)
	f.WaitFor("the claim to say the image cannot be served", 2*time.Minute, func(context.Context) (bool, error) {
		return strings.Contains(claimEvents(f, "from-claim"), "ImageNotUsable: VirtualImage "+f.Namespace+"/in-claim is stored in a PersistentVolumeClaim"), nil
	})
	f.WaitFor("the provisioner to refuse a claim naming no image", 2*time.Minute, func(context.Context) (bool, error) {
		return strings.Contains(claimEvents(f, "plain"), "needs a dataSourceRef naming a VirtualImage or ClusterVirtualImage"), nil
	})
	for _, name := range []string{"from-claim", "plain"} {
		pvc, err := f.Client.CoreV1().PersistentVolumeClaims(f.Namespace).Get(f.Ctx(time.Minute), name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if pvc.Spec.VolumeName != "" || pvc.Status.Phase != corev1.ClaimPending {
			t.Errorf("claim %s is %s with volume %q, want Pending with none", name, pvc.Status.Phase, pvc.Spec.VolumeName)
		}
	}
}

// inlinePod is a pod reading an inline CSI volume of a VirtualImage, which
// stays up (the volume published) after printing the sum.
func inlinePod(name, image string) string {
	return fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata:
  name: %s
  labels: {app: cdrom-reader}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: sh
    image: %s
    imagePullPolicy: Never
    command: [/bin/sh, -ec, "echo sum=$(sha256sum /cdrom/disk.img | cut -d' ' -f1); exec sleep 3600"]
    volumeMounts: [{name: cdrom, mountPath: /cdrom, readOnly: true}]
    resources: {requests: {cpu: 1m, memory: 4Mi}}
  volumes:
  - name: cdrom
    csi:
      driver: %s
      readOnly: true
      volumeAttributes: {virtualImage: %s}
`, name, busybox, csiDriver, image)
}

// cacheEntries lists the node cache's committed entries.
func cacheEntries(t *testing.T) []string {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(csiState(), "cache", "entries"))
	if err != nil {
		t.Fatalf("reading the node cache: %v", err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

// podSum runs sha256sum of the CD-ROM in a running pod.
func podSum(f *framework.Framework, pod string) (string, error) {
	out, err := f.TryKubectl("", "exec", pod, "--", "sh", "-c", "sha256sum /cdrom/disk.img | cut -d' ' -f1")
	return strings.TrimSpace(out), err
}

// TestCSI_InlineVolumesShareOneCacheEntryAndOutliveThePlugin: 20 pods
// with an inline volume of one VirtualImage read the ISO from one cache
// entry; with the node plugin killed (SIGKILL) they keep reading, and a
// new pod still gets the volume once the plugin is back; writes are
// refused; deleting the pods unpublishes every target.
func TestCSI_InlineVolumesShareOneCacheEntryAndOutliveThePlugin(t *testing.T) {
	f := framework.New(t)
	url, sum := debianISO(t)
	f.Apply(viManifest("rescue", url, ""))
	waitPhase(f, "vi", "rescue", v1.ImagePhaseReady, 4*time.Minute)

	const pods = 20
	var all []string
	for i := range pods {
		all = append(all, inlinePod(fmt.Sprintf("reader-%02d", i), "rescue"))
	}
	f.Apply(strings.Join(all, "---\n"))
	for i := range pods {
		name := fmt.Sprintf("reader-%02d", i)
		f.WaitForPodPhase(name, corev1.PodRunning, 4*time.Minute)
		f.WaitFor(name+" to print the sum", time.Minute, func(context.Context) (bool, error) {
			return field(f.PodLogs(name), "sum") != "", nil
		})
		if got := field(f.PodLogs(name), "sum"); got != sum {
			t.Fatalf("%s read sha256 %s, the ISO's is %s", name, got, sum)
		}
	}
	recs := publishesOf(t, f)
	if len(recs) != pods {
		t.Fatalf("%d publish records for the %d pods", len(recs), pods)
	}
	layer := strings.TrimPrefix(recs[0].Key.Digest, "sha256:")
	for _, r := range recs {
		if r.Key.Digest != recs[0].Key.Digest {
			t.Fatalf("pods of one image publish different layers: %s and %s", r.Key.Digest, recs[0].Key.Digest)
		}
	}
	entries := cacheEntries(t)
	n := 0
	for _, e := range entries {
		if e == layer {
			n++
		}
	}
	if n != 1 {
		t.Fatalf("cache entries %v: want exactly one for layer %s, shared by %d pods", entries, layer, pods)
	}

	if out, err := f.TryKubectl("", "exec", "reader-00", "--", "sh", "-c", "echo x >> /cdrom/disk.img"); err == nil || !strings.Contains(err.Error(), "Read-only file system") {
		t.Fatalf("a write into the CD-ROM: %v, %q; want Read-only file system", err, out)
	}

	// Kill the node plugin outright, as an OOM kill or a crash would.
	before := pluginRestarts(t, f)
	if out, err := exec.Command("pkill", "-KILL", "-f", "^/usr/bin/vimg-csi --mode=node").CombinedOutput(); err != nil {
		t.Fatalf("killing the node plugin: %v %s", err, out)
	}
	for _, pod := range []string{"reader-00", "reader-19"} {
		if got, err := podSum(f, pod); err != nil || got != sum {
			t.Fatalf("%s reads %q (%v) with the plugin dead, want %s", pod, got, err, sum)
		}
	}
	f.WaitFor("the node plugin to be restarted", 2*time.Minute, func(context.Context) (bool, error) {
		return pluginRestarts(t, f) > before && pluginReady(t, f), nil
	})
	f.Apply(inlinePod("after-restart", "rescue"))
	f.WaitForPodPhase("after-restart", corev1.PodRunning, 3*time.Minute)
	f.WaitFor("after-restart to print the sum", time.Minute, func(context.Context) (bool, error) {
		return field(f.PodLogs("after-restart"), "sum") == sum, nil
	})
	if got, err := podSum(f, "reader-07"); err != nil || got != sum {
		t.Fatalf("reader-07 reads %q (%v) after the restart, want %s", got, err, sum)
	}

	// Every target is unpublished when the pods go: no publish record is
	// left, nor anything mounted on the targets.
	recs = publishesOf(t, f)
	f.Kubectl("", "delete", "pods", "--all", "--wait=true", "--timeout=3m")
	for _, r := range recs {
		if mounted(t, r.Target) {
			t.Errorf("%s is still mounted after its pod went", r.Target)
		}
	}
	left, _ := os.ReadDir(filepath.Join(csiState(), "publishes"))
	for _, e := range left {
		data, _ := os.ReadFile(filepath.Join(csiState(), "publishes", e.Name()))
		for _, r := range recs {
			if strings.Contains(string(data), r.Target) {
				t.Errorf("publish record %s of a deleted pod is left: %s", e.Name(), data)
			}
		}
	}
}

// publishRecord is the part of the node plugin's publish records
// (csi/driver) the tests read.
type publishRecord struct {
	Target string `json:"target"`
	Key    struct {
		Digest string
	} `json:"key"`
}

// publishesOf returns the node plugin's publish records of targets of the
// namespace's pods (a target path holds its pod's UID).
func publishesOf(t *testing.T, f *framework.Framework) []publishRecord {
	t.Helper()
	pods, err := f.Client.CoreV1().Pods(f.Namespace).List(f.Ctx(time.Minute), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(csiState(), "publishes")
	files, err := os.ReadDir(dir)
	if err != nil {
		t.Fatalf("reading the node plugin's publish records: %v", err)
	}
	var recs []publishRecord
	for _, e := range files {
		data, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			continue // unpublished meanwhile
		}
		var r publishRecord
		if err := json.Unmarshal(data, &r); err != nil {
			t.Fatalf("publish record %s: %v", e.Name(), err)
		}
		for _, p := range pods.Items {
			if strings.Contains(r.Target, "/pods/"+string(p.UID)+"/") {
				recs = append(recs, r)
			}
		}
	}
	return recs
}

// mounted tells whether path is a mount point on this machine (the node).
func mounted(t *testing.T, path string) bool {
	t.Helper()
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == path {
			return true
		}
	}
	return false
}

func nodePluginPod(t *testing.T, f *framework.Framework) *corev1.Pod {
	t.Helper()
	pods, err := f.Client.CoreV1().Pods(csiNS).List(f.Ctx(time.Minute), metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=vimg-csi-node"})
	if err != nil || len(pods.Items) != 1 {
		t.Fatalf("node plugin pods: %v, %v", pods, err)
	}
	return &pods.Items[0]
}

func pluginRestarts(t *testing.T, f *framework.Framework) int32 {
	for _, s := range nodePluginPod(t, f).Status.ContainerStatuses {
		return s.RestartCount
	}
	return 0
}

func pluginReady(t *testing.T, f *framework.Framework) bool {
	for _, s := range nodePluginPod(t, f).Status.ContainerStatuses {
		return s.Ready
	}
	return false
}

// TestCSI_SanityAgainstTheDeployedNodePlugin runs csi-sanity against the
// node plugin the DaemonSet runs, on its socket in the kubelet's
// directory, with the pin of a real vimg-cdrom volume of a Debian ISO.
// Targets are made in the kubelet's directory, which the plugin sees at the
// same path; every published target must reach this host (mount
// propagation) as a read-only mount holding the ISO.
func TestCSI_SanityAgainstTheDeployedNodePlugin(t *testing.T) {
	f := framework.New(t)
	url, sum := debianISO(t)
	f.Apply(viManifest("rescue", url, ""))
	f.Apply(imageClaim("cd", cdromClass, "Filesystem", "VirtualImage", "rescue", "1Mi"))
	waitPhase(f, "vi", "rescue", v1.ImagePhaseReady, 4*time.Minute)
	var attrs map[string]string
	f.WaitFor("claim cd to be bound", 2*time.Minute, func(ctx context.Context) (bool, error) {
		pvc, err := f.Client.CoreV1().PersistentVolumeClaims(f.Namespace).Get(ctx, "cd", metav1.GetOptions{})
		if err != nil || pvc.Spec.VolumeName == "" || pvc.Status.Phase != corev1.ClaimBound {
			return false, err
		}
		pv, err := f.Client.CoreV1().PersistentVolumes().Get(ctx, pvc.Spec.VolumeName, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		attrs = pv.Spec.CSI.VolumeAttributes
		return true, nil
	})
	size, err := strconv.ParseInt(attrs["vimg.dev/disk-size"], 10, 64)
	if err != nil {
		t.Fatalf("volume attributes %v: %v", attrs, err)
	}

	kubelet := filepath.Join(framework.LabDir(), "kubelet")
	dir := filepath.Join(kubelet, "plugins", csiDriver, "sanity-"+f.Namespace)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	var checked atomic.Int64
	cfg := sanity.NewTestConfig()
	cfg.Address = "unix://" + filepath.Join(kubelet, "plugins", csiDriver, "csi.sock")
	cfg.TargetPath = filepath.Join(dir, "mount")
	cfg.StagingPath = filepath.Join(dir, "staging")
	cfg.TestVolumeParameters = attrs
	cfg.TestVolumeSize = size
	cfg.CheckPath = func(path string) (sanity.PathKind, error) {
		fi, err := os.Lstat(path)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			return sanity.PathIsNotFound, nil
		case err != nil:
			return sanity.PathIsOther, err
		case !fi.IsDir():
			return sanity.PathIsOther, nil
		}
		if mounted(t, path) {
			if got := testimg.SHA256File(t, filepath.Join(path, "disk.img")); got != sum {
				return sanity.PathIsDir, fmt.Errorf("%s/disk.img has sha256 %s, the ISO %s", path, got, sum)
			}
			if err := os.WriteFile(filepath.Join(path, "x"), nil, 0o644); !errors.Is(err, syscall.EROFS) {
				return sanity.PathIsDir, fmt.Errorf("writing in %s: %v, want EROFS", path, err)
			}
			checked.Add(1)
		}
		return sanity.PathIsDir, nil
	}
	sanity.Test(t, cfg)
	if checked.Load() == 0 {
		t.Error("sanity never checked a published target")
	}
}
