//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1 "vimg.dev/vimg/pkg/apis/virtualization/v1alpha2"
	"vimg.dev/vimg/pkg/worker/api"
	"vimg.dev/vimg/tests/e2e/framework"
)

// pvcImage is a VirtualImage stored in its own claim; class "" leaves
// spec.persistentVolumeClaim out (the cluster's default class, local-wffc).
func pvcImage(name, class, dataSource string) string {
	pvc := ""
	if class != "" {
		pvc = fmt.Sprintf("  persistentVolumeClaim:\n    storageClassName: %s\n", class)
	}
	return fmt.Sprintf(`apiVersion: virtualization.deckhouse.io/v1alpha2
kind: VirtualImage
metadata:
  name: %s
spec:
  storage: PersistentVolumeClaim
%s  dataSource:
%s`, name, pvc, dataSource)
}

func httpSource(url string) string {
	return fmt.Sprintf("    type: HTTP\n    http:\n      url: %q\n", url)
}

// imageClaimOf checks what a Ready image stored in a claim shows and
// returns its claim's name.
func imageClaimOf(f *framework.Framework, name, class string, format v1.ImageFormat, virtual int64) string {
	t := f.T
	st, m := imageStatus(f, "vi", name)
	claim := api.ImageClaimName(name, string(m.UID))
	if st.Target.PersistentVolumeClaimName != claim || st.Target.RegistryURL != "" || st.StorageClassName != class {
		t.Fatalf("%s: target %+v, class %q; want claim %s of class %s and nothing in DVCR", name, st.Target, st.StorageClassName, claim, class)
	}
	if st.Format != format || st.Size.UnpackedBytes != fmt.Sprint(virtual) || st.CDROM != (format == v1.ImageFormatISO) || st.Progress != "100%" {
		t.Fatalf("%s: format %s unpacked %s cdrom %v progress %s; want %s, %d", name, st.Format, st.Size.UnpackedBytes, st.CDROM, st.Progress, format, virtual)
	}
	if c := meta.FindStatusCondition(st.Conditions, v1.ConditionStorageClassReady); c == nil || c.Status != metav1.ConditionTrue {
		t.Fatalf("%s: StorageClassReady %+v", name, c)
	}
	pvc, err := f.Client.CoreV1().PersistentVolumeClaims(f.Namespace).Get(f.Ctx(time.Minute), claim, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if pvc.Status.Phase != corev1.ClaimBound || *pvc.Spec.StorageClassName != class {
		t.Fatalf("%s: claim %s is %s of class %s", name, claim, pvc.Status.Phase, *pvc.Spec.StorageClassName)
	}
	return claim
}

// TestPVCStorage_ImagesLiveInTheirOwnClaimFilledStraightFromTheSource: an
// image with storage PersistentVolumeClaim, from HTTP (every format), an
// upload or another image, ends Ready with a claim of its own, in the class
// it names or the cluster's default, that holds exactly the disk — and
// nothing in DVCR. Its claim deleted, the image is PVCLost; the image
// deleted, its claim and source Secret go.
func TestPVCStorage_ImagesLiveInTheirOwnClaimFilledStraightFromTheSource(t *testing.T) {
	f := framework.New(t)
	dir := t.TempDir()
	imgs := makePopulateImages(t, dir)
	srv := startFileServer(t, dir)
	f.Apply(viManifest("in-dvcr", srv.url(imgs["raw"].file), ""))

	cases := []struct {
		name, class, want string // want: the class the image gets
		format            v1.ImageFormat
		img               string
		source            string
	}{
		{"http-qcow2", "", "local-wffc", v1.ImageFormatQCOW2, "qcow2", httpSource(srv.url(imgs["qcow2"].file))},
		{"http-vmdk", "local-wffc", "local-wffc", v1.ImageFormatVMDK, "vmdk", httpSource(srv.url(imgs["vmdk"].file))},
		{"http-xz", "local-immediate", "local-immediate", v1.ImageFormatQCOW2, "xz", httpSource(srv.url(imgs["xz"].file))},
		{"http-iso", "local-immediate", "local-immediate", v1.ImageFormatISO, "iso", httpSource(srv.url(imgs["iso"].file))},
		{"upload-vdi", "local-immediate", "local-immediate", v1.ImageFormatVDI, "vdi", "    type: Upload\n"},
		{"copy", "local-wffc", "local-wffc", v1.ImageFormatRaw, "raw", "    type: ObjectRef\n    objectRef:\n      kind: VirtualImage\n      name: in-dvcr\n"},
		{"copy-of-claim", "local-immediate", "local-immediate", v1.ImageFormatVMDK, "vmdk", "    type: ObjectRef\n    objectRef:\n      kind: VirtualImage\n      name: http-vmdk\n"},
	}
	for _, c := range cases {
		f.Apply(pvcImage(c.name, c.class, c.source))
	}
	// The upload, as the docs do it.
	st := waitPhase(f, "vi", "upload-vdi", v1.ImagePhaseWaitForUserUpload, time.Minute)
	_, caFile, _ := gateway(f)
	if _, err := curl(t, nil, st.ImageUploadURLs.External, "--fail", "--cacert", caFile, "-T", filepath.Join(dir, imgs["vdi"].file)); err != nil {
		t.Fatal(err)
	}
	claims := map[string]string{}
	for _, c := range cases {
		waitPhase(f, "vi", c.name, v1.ImagePhaseReady, 5*time.Minute)
		fi, err := os.Stat(imgs[c.img].raw)
		if err != nil {
			t.Fatal(err)
		}
		claims[c.name] = imageClaimOf(f, c.name, c.want, c.format, fi.Size())
		f.Apply(shellPod("read-"+c.name, claims[c.name], "Filesystem", readerScript("Filesystem")))
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := f.For(t)
			f.WaitForPodPhase("read-"+c.name, corev1.PodSucceeded, 3*time.Minute)
			checkVolume(t, f, claims[c.name], "Filesystem", f.PodLogs("read-"+c.name), imgs[c.img])
		})
	}

	t.Run("claim deleted: PVCLost", func(t *testing.T) {
		f := f.For(t)
		f.Kubectl("", "delete", "pod", "read-http-qcow2", "--timeout=2m")
		f.Kubectl("", "delete", "pvc", claims["http-qcow2"], "--timeout=2m")
		st := waitPhase(f, "vi", "http-qcow2", v1.ImagePhasePVCLost, time.Minute)
		if c := meta.FindStatusCondition(st.Conditions, v1.ConditionReady); c == nil || !strings.Contains(c.Message, "re-create the image") {
			t.Fatalf("Ready condition %+v", c)
		}
	})
	t.Run("image deleted: its claim goes", func(t *testing.T) {
		f := f.For(t)
		_, m := imageStatus(f, "vi", "http-xz")
		f.Kubectl("", "delete", "pod", "read-http-xz", "--timeout=2m")
		f.Kubectl("", "delete", "vi", "http-xz", "--timeout=2m")
		f.WaitFor("the image's claim to go", 2*time.Minute, func(ctx context.Context) (bool, error) {
			_, err := f.Client.CoreV1().PersistentVolumeClaims(f.Namespace).Get(ctx, claims["http-xz"], metav1.GetOptions{})
			return apierrors.IsNotFound(err), nil
		})
		if _, err := f.Client.CoreV1().Secrets(populateNS).Get(f.Ctx(time.Minute), api.SourceSecretName(string(m.UID)), metav1.GetOptions{}); !apierrors.IsNotFound(err) {
			t.Fatalf("the image's source secret is still there: %v", err)
		}
	})
}

// TestPVCStorage_BadInputFailsClearlyAndLeavesNothing: a checksum that does
// not match fails the image with the reason, after which neither its claim
// nor a populate pod is left; a class that does not exist keeps it
// Pending with StorageClassReady saying so; a missing file fails at the
// probe, before any claim.
func TestPVCStorage_BadInputFailsClearlyAndLeavesNothing(t *testing.T) {
	f := framework.New(t)
	srv, _ := serveQcow2(t, 16<<20, 5, false)
	f.Apply(pvcImage("bad-sum", "local-immediate", httpSource(srv.url("disk.qcow2"))+"      checksum:\n        sha256: \""+strings.Repeat("0", 64)+"\"\n"))
	f.Apply(pvcImage("no-class", "no-such-class", httpSource(srv.url("disk.qcow2"))))
	f.Apply(pvcImage("no-file", "local-immediate", httpSource(srv.url("missing.qcow2"))))

	st := waitPhase(f, "vi", "bad-sum", v1.ImagePhaseFailed, 3*time.Minute)
	if msg := readyMessage(st); !strings.Contains(strings.ToLower(msg), "checksum") {
		t.Fatalf("bad-sum failed with %q, want a checksum mismatch", msg)
	}
	_, m := imageStatus(f, "vi", "bad-sum")
	f.WaitFor("the failed image's claim and populate work to go", 2*time.Minute, func(ctx context.Context) (bool, error) {
		_, err := f.Client.CoreV1().PersistentVolumeClaims(f.Namespace).Get(ctx, api.ImageClaimName("bad-sum", string(m.UID)), metav1.GetOptions{})
		if !apierrors.IsNotFound(err) {
			return false, nil
		}
		pods, err := f.Client.CoreV1().Pods(populateNS).List(ctx, metav1.ListOptions{LabelSelector: "vimg.dev/pvc-namespace=" + f.Namespace})
		return err == nil && len(pods.Items) == 0, err
	})

	st = waitPhase(f, "vi", "no-file", v1.ImagePhaseFailed, 3*time.Minute)
	if msg := readyMessage(st); !strings.Contains(msg, "404") {
		t.Fatalf("no-file failed with %q, want the HTTP status", msg)
	}
	if st.Target.PersistentVolumeClaimName != "" {
		t.Fatalf("no-file got a claim: %s", st.Target.PersistentVolumeClaimName)
	}

	st, _ = imageStatus(f, "vi", "no-class")
	c := meta.FindStatusCondition(st.Conditions, v1.ConditionStorageClassReady)
	if st.Phase != v1.ImagePhasePending || c == nil || c.Status != metav1.ConditionFalse || !strings.Contains(c.Message, `"no-such-class" not found`) {
		t.Fatalf("no-class: phase %s StorageClassReady %+v", st.Phase, c)
	}
}

// TestPVCStorage_ImageFeedsOtherClaims: claims of every class and mode
// whose dataSourceRef names an image stored in a claim are filled from that
// claim (a serve pod in the image's namespace reads it, read-only), and
// hold exactly the image; nothing of the copies is left afterwards.
func TestPVCStorage_ImageFeedsOtherClaims(t *testing.T) {
	f := framework.New(t)
	srv, raw := serveQcow2(t, 40<<20, 17, true)
	// A name long enough that the image's claim's name (vi-<name>-<uid>)
	// does not fit a label value.
	golden := "golden-image-with-a-name-too-long-for-labels"
	f.Apply(pvcImage(golden, "local-immediate", httpSource(srv.url("disk.qcow2"))))
	waitPhase(f, "vi", golden, v1.ImagePhaseReady, 3*time.Minute)
	for i, vk := range volumeKinds {
		n := fmt.Sprintf("copy-%d", i)
		f.Apply(imageClaim(n, vk.class, vk.mode, "VirtualImage", golden, "64Mi") + "---\n" + shellPod(n, n, vk.mode, readerScript(vk.mode)))
	}
	for i, vk := range volumeKinds {
		t.Run(vk.class+"/"+vk.mode, func(t *testing.T) {
			f := f.For(t)
			n := fmt.Sprintf("copy-%d", i)
			f.WaitForPodPhase(n, corev1.PodSucceeded, 4*time.Minute)
			checkVolume(t, f, n, vk.mode, f.PodLogs(n), populateImage{raw: raw})
			if ev := claimEvents(f, n); !strings.Contains(ev, "from its claim") {
				t.Fatalf("the claim's events do not say it was copied from the image's claim:\n%s", ev)
			}
		})
	}
	f.WaitFor("the serve pods to go", 2*time.Minute, func(ctx context.Context) (bool, error) {
		pods, err := f.Client.CoreV1().Pods(f.Namespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=serve"})
		return err == nil && len(pods.Items) == 0, err
	})
	f.Kubectl("", "delete", "pods", "--all", "--wait=true", "--timeout=2m")
	f.Kubectl("", "delete", "pvc", "-l", "!vimg.dev/image-uid", "--wait=true", "--timeout=2m")
	waitPopulateGone(f)
}

// TestPVCStorage_PopulatorMayCreateOnlyServePodsOutsideItsNamespace: the
// populator's right to create pods anywhere (for serve pods) is held by an
// admission policy; as the populator, anything else is refused with a
// message saying why.
func TestPVCStorage_PopulatorMayCreateOnlyServePodsOutsideItsNamespace(t *testing.T) {
	f := framework.New(t)
	as := "--as=system:serviceaccount:vimg-system:vimg-populator"
	for name, c := range map[string]struct{ manifest, says string }{
		"any pod": {shellPod("plain", "nothing", "Filesystem", "true"), "may create serve pods only"},
		"a serve pod writing a claim": {`apiVersion: v1
kind: Pod
metadata:
  name: writer
  labels: {app.kubernetes.io/component: serve}
spec:
  automountServiceAccountToken: false
  securityContext: {runAsNonRoot: true, runAsUser: 107}
  containers:
  - name: serve
    image: ` + busybox + `
    command: [/usr/bin/vimg, worker, serve]
    securityContext: {allowPrivilegeEscalation: false}
    volumeMounts: [{name: v, mountPath: /source}]
  volumes:
  - name: v
    persistentVolumeClaim: {claimName: someone-else}
`, "mounts claims only, read-only"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := f.TryKubectl(c.manifest, as, "create", "-f", "-")
			if err == nil || !strings.Contains(err.Error(), c.says) {
				t.Fatalf("creating %s as the populator: %v; want a denial saying %q", name, err, c.says)
			}
		})
	}
}
