//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	v1 "vimg.dev/vimg/pkg/apis/virtualization/v1alpha2"
	"vimg.dev/vimg/tests/e2e/framework"
)

// cloneClasses makes classes of the test CSI driver marked as cloning
// (vimg.dev/csi-clone): Immediate, WaitForFirstConsumer, and one whose
// driver refuses clones (its "cloning: unsupported" parameter), as a class
// marked wrongly would. They are named after the test's namespace.
func cloneClasses(t *testing.T, f *framework.Framework) (immediate, wffc, refused string) {
	t.Helper()
	mk := func(suffix string, mode storagev1.VolumeBindingMode, params map[string]string) string {
		sc := &storagev1.StorageClass{
			ObjectMeta:        metav1.ObjectMeta{Name: f.Namespace + "-" + suffix, Annotations: map[string]string{"vimg.dev/csi-clone": "true"}},
			Provisioner:       "hostpath.test.vimg.dev",
			VolumeBindingMode: ptr.To(mode),
			Parameters:        params,
		}
		if _, err := f.Client.StorageV1().StorageClasses().Create(f.Ctx(time.Minute), sc, metav1.CreateOptions{}); err != nil {
			t.Fatalf("creating StorageClass %s: %v", sc.Name, err)
		}
		t.Cleanup(func() {
			_ = f.Client.StorageV1().StorageClasses().Delete(context.Background(), sc.Name, metav1.DeleteOptions{})
		})
		return sc.Name
	}
	return mk("clone", storagev1.VolumeBindingImmediate, nil),
		mk("clone-wffc", storagev1.VolumeBindingWaitForFirstConsumer, nil),
		mk("clone-refused", storagev1.VolumeBindingImmediate, map[string]string{"cloning": "unsupported"})
}

// TestPVCStorage_CopiesAreCSIClonesWhereTheClassClones: where the class
// clones, a claim filled from an image stored in a claim of that class (and
// the claim of an image copying it) is a CSI clone of the image's claim,
// its disk.img grown to the larger claim; a Block claim is streamed, as a
// clone cannot change the volume mode; a class whose driver refuses the
// clone falls back to a streamed copy and says so. Every volume holds
// exactly the image, and no clone claim is left.
func TestPVCStorage_CopiesAreCSIClonesWhereTheClassClones(t *testing.T) {
	f := framework.New(t)
	immediate, wffc, refused := cloneClasses(t, f)
	srv, raw := serveQcow2(t, 40<<20, 23, true)
	src := httpSource(srv.url("disk.qcow2"))
	images := map[string]string{"golden": immediate, "golden-wffc": wffc, "golden-refused": refused}
	for name, class := range images {
		f.Apply(pvcImage(name, class, src))
	}
	imageClaims := map[string]string{}
	for name, class := range images {
		waitPhase(f, "vi", name, v1.ImagePhaseReady, 4*time.Minute)
		imageClaims[name] = imageClaimOf(f, name, class, v1.ImageFormatQCOW2, 40<<20)
	}
	// An image that copies one stored in a cloning class: its own claim is
	// a clone too.
	f.Apply(pvcImage("golden-copy", immediate, "    type: ObjectRef\n    objectRef:\n      kind: VirtualImage\n      name: golden\n"))
	waitPhase(f, "vi", "golden-copy", v1.ImagePhaseReady, 4*time.Minute)
	imageClaims["golden-copy"] = imageClaimOf(f, "golden-copy", immediate, v1.ImageFormatQCOW2, 40<<20)
	f.Apply(shellPod("read-golden-copy", imageClaims["golden-copy"], "Filesystem", readerScript("Filesystem")))

	cases := []struct {
		claim, class, mode, image, size string
		cloned                          bool
		says                            string
	}{
		{"cloned", immediate, "Filesystem", "golden", "128Mi", true, "Cloning claim"},
		{"cloned-wffc", wffc, "Filesystem", "golden-wffc", "96Mi", true, "Cloning claim"},
		{"block", immediate, "Block", "golden", "64Mi", false, "from its claim"},
		{"refused", refused, "Filesystem", "golden-refused", "64Mi", false, "CloneFailed"},
	}
	for _, c := range cases {
		f.Apply(imageClaim(c.claim, c.class, c.mode, "VirtualImage", c.image, c.size) + "---\n" + shellPod(c.claim, c.claim, c.mode, readerScript(c.mode)))
	}
	check := func(t *testing.T, f *framework.Framework, claim, image, mode, pod string, cloned bool) {
		f.WaitForPodPhase(pod, corev1.PodSucceeded, 5*time.Minute)
		checkVolume(t, f, claim, mode, f.PodLogs(pod), populateImage{raw: raw})
		pvc, err := f.Client.CoreV1().PersistentVolumeClaims(f.Namespace).Get(f.Ctx(time.Minute), claim, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		pv, err := f.Client.CoreV1().PersistentVolumes().Get(f.Ctx(time.Minute), pvc.Spec.VolumeName, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		from := pv.Annotations["vimg.dev/cloned-from"]
		if want := f.Namespace + "/" + imageClaims[image]; cloned && from != want {
			t.Fatalf("volume %s of claim %s: cloned-from %q, want %q (a clone of the image's claim)", pv.Name, claim, from, want)
		}
		if !cloned && from != "" {
			t.Fatalf("volume %s of claim %s says it was cloned from %s; want a streamed copy", pv.Name, claim, from)
		}
	}
	t.Run("image copying an image: its claim is a clone", func(t *testing.T) {
		check(t, f.For(t), imageClaims["golden-copy"], "golden", "Filesystem", "read-golden-copy", true)
	})
	for _, c := range cases {
		t.Run(c.claim, func(t *testing.T) {
			f := f.For(t)
			check(t, f, c.claim, c.image, c.mode, c.claim, c.cloned)
			if ev := claimEvents(f, c.claim); !strings.Contains(ev, c.says) {
				t.Fatalf("the claim's events do not say %q:\n%s", c.says, ev)
			}
		})
	}
	t.Run("refused: the claim says why it was not cloned", func(t *testing.T) {
		pvc, err := f.Client.CoreV1().PersistentVolumeClaims(f.Namespace).Get(f.Ctx(time.Minute), "refused", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if why := pvc.Annotations["vimg.dev/clone-failed"]; !strings.Contains(why, "was not bound within") {
			t.Fatalf("vimg.dev/clone-failed = %q", why)
		}
	})

	f.WaitFor("no clone claim to be left", time.Minute, func(ctx context.Context) (bool, error) {
		clones, err := f.Client.CoreV1().PersistentVolumeClaims(f.Namespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=clone"})
		return err == nil && len(clones.Items) == 0, err
	})
	f.Kubectl("", "delete", "pods", "--all", "--wait=true", "--timeout=2m")
	f.Kubectl("", "delete", "pvc", "-l", "!vimg.dev/image-uid", "--wait=true", "--timeout=2m")
	f.Kubectl("", "delete", "vi", "--all", "--wait=true", "--timeout=2m")
	waitPopulateGone(f)
}

// TestPVCStorage_PopulatorMayCreateOnlyCloneClaimsOutsideItsNamespace: the
// populator's right to create and delete claims anywhere (for clones) is
// held by an admission policy.
func TestPVCStorage_PopulatorMayCreateOnlyCloneClaimsOutsideItsNamespace(t *testing.T) {
	f := framework.New(t)
	as := "--as=system:serviceaccount:vimg-system:vimg-populator"
	plain := pvc("plain", "local-immediate", "Filesystem")
	f.Apply(plain)
	for name, c := range map[string]struct {
		args []string
		in   string
	}{
		"create an empty claim":       {[]string{"create", "-f", "-"}, strings.Replace(plain, "name: plain", "name: other", 1)},
		"create an unlabelled clone":  {[]string{"create", "-f", "-"}, strings.Replace(plain, "name: plain", "name: unlabelled", 1) + "  dataSource: {kind: PersistentVolumeClaim, name: plain}\n"},
		"delete a claim of the users": {[]string{"delete", "pvc", "plain", "--wait=false"}, ""},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := f.TryKubectl(c.in, append([]string{as}, c.args...)...)
			if err == nil || !strings.Contains(err.Error(), "may create and delete clone claims only") {
				t.Fatalf("%s as the populator: %v; want a denial", name, err)
			}
		})
	}
	labelled := fmt.Sprintf("%s  dataSource: {kind: PersistentVolumeClaim, name: plain}\n",
		strings.Replace(plain, "name: plain", "name: allowed\n  labels: {app.kubernetes.io/component: clone}", 1))
	if _, err := f.TryKubectl(labelled, as, "create", "-f", "-"); err != nil {
		t.Fatalf("creating a clone claim as the populator: %v", err)
	}
	if _, err := f.TryKubectl("", as, "delete", "pvc", "allowed", "--wait=false"); err != nil {
		t.Fatalf("deleting a clone claim as the populator: %v", err)
	}
}
