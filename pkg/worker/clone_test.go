package worker

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"vimg.dev/vimg/pkg/diskimage/testimg"
	"vimg.dev/vimg/pkg/importer"
	"vimg.dev/vimg/pkg/worker/api"
)

// owner is who a cloned disk.img is given to: the guest's user (qemu) when
// the tests run as root, so that the chown is seen; the tests' user
// otherwise.
func owner() (uid, gid int) {
	if os.Getuid() == 0 {
		return 107, 107
	}
	return os.Getuid(), os.Getgid()
}

// adopt runs a populate pod on a cloned Filesystem volume at mount.
func adopt(t *testing.T, mount string, capacity, virtualSize int64) api.Outcome {
	t.Helper()
	uid, gid := owner()
	req := api.PopulateRequest{Cloned: true, VirtualSize: virtualSize, Capacity: capacity,
		FilesystemOverhead: 0.055, UID: uid, GID: gid}
	return populate(context.Background(), PopulateConfig{Config: Config{RequestPath: writeRequest(t, req)}, MountPath: mount})
}

// needFree skips a test whose file system could bound disk.img below what
// the test expects.
func needFree(t *testing.T, dir string, n int64) {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	if free := int64(st.Bavail) * int64(st.Bsize); free < n {
		t.Skipf("%s has %d bytes free, the test needs %d", dir, free, n)
	}
}

// checkAdopted fails unless disk.img at mount is size bytes, mode 0660,
// owned by owner().
func checkAdopted(t *testing.T, mount string, size int64) {
	t.Helper()
	fi, err := os.Stat(filepath.Join(mount, api.DiskFile))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size() != size {
		t.Errorf("disk.img is %d bytes, want %d", fi.Size(), size)
	}
	if fi.Mode().Perm() != 0o660 {
		t.Errorf("disk.img mode %v, want 0660", fi.Mode().Perm())
	}
	uid, gid := owner()
	if s := fi.Sys().(*syscall.Stat_t); int(s.Uid) != uid || int(s.Gid) != gid {
		t.Errorf("disk.img owned by %d:%d, want %d:%d", s.Uid, s.Gid, uid, gid)
	}
}

// TestPopulate_ClonedDiskImgIsGrownInPlace: a clone's disk.img keeps its
// bytes and grows to the volume's usable size; nothing is read or written.
func TestPopulate_ClonedDiskImgIsGrownInPlace(t *testing.T) {
	mount := t.TempDir()
	needFree(t, mount, 256<<20)
	disk := filepath.Join(mount, api.DiskFile)
	testimg.Pattern(t, disk, 10<<20, 31)
	sum := testimg.SHA256File(t, disk)
	const capacity = 64 << 20
	out := adopt(t, mount, capacity, 9<<20)
	if out.Populated == nil {
		t.Fatalf("populate failed: %+v", out)
	}
	want := api.PopulateResult{VirtualSize: 9 << 20, DiskSize: api.UsableDiskSize(capacity, 0.055), Format: "raw"}
	if *out.Populated != want {
		t.Fatalf("result %+v, want %+v", *out.Populated, want)
	}
	checkAdopted(t, mount, want.DiskSize)
	if got := testimg.SHA256Prefix(t, disk, 10<<20); got != sum {
		t.Fatalf("the first 10 MiB of disk.img changed: sha256 %s, was %s", got, sum)
	}
}

// TestPopulate_ClonedDiskImgLargerIsKept: a disk.img already larger than
// this volume's usable size is not shrunk.
func TestPopulate_ClonedDiskImgLargerIsKept(t *testing.T) {
	mount := t.TempDir()
	disk := filepath.Join(mount, api.DiskFile)
	testimg.Pattern(t, disk, 4<<20, 32)
	const size = 80 << 20
	if err := os.Truncate(disk, size); err != nil {
		t.Fatal(err)
	}
	out := adopt(t, mount, 64<<20, 4<<20)
	if out.Populated == nil || out.Populated.DiskSize != size {
		t.Fatalf("outcome %+v, want disk size %d", out, size)
	}
	checkAdopted(t, mount, size)
}

// TestPopulate_ClonedVolumeNotTheImage: a clone without a regular disk.img
// at least as large as the image fails for good, and a symlink's target is
// left alone.
func TestPopulate_ClonedVolumeNotTheImage(t *testing.T) {
	permanent := func(t *testing.T, out api.Outcome, words ...string) {
		t.Helper()
		if out.Populated != nil || !out.Permanent || out.Reason != importer.ReasonInternal {
			t.Fatalf("outcome %+v, want a permanent %s", out, importer.ReasonInternal)
		}
		for _, w := range words {
			if !strings.Contains(out.Message, w) {
				t.Fatalf("message %q does not say %q", out.Message, w)
			}
		}
	}
	t.Run("no disk.img", func(t *testing.T) {
		permanent(t, adopt(t, t.TempDir(), 64<<20, 1<<20), "holds no disk.img")
	})
	t.Run("smaller than the image", func(t *testing.T) {
		mount := t.TempDir()
		testimg.Pattern(t, filepath.Join(mount, api.DiskFile), 4<<20, 33)
		permanent(t, adopt(t, mount, 64<<20, 5<<20), "disk.img", "not the image")
		if fi, err := os.Stat(filepath.Join(mount, api.DiskFile)); err != nil || fi.Size() != 4<<20 {
			t.Fatalf("disk.img changed: %v, %v", fi, err)
		}
	})
	t.Run("symlink", func(t *testing.T) {
		mount, elsewhere := t.TempDir(), filepath.Join(t.TempDir(), "other.img")
		testimg.Pattern(t, elsewhere, 4<<20, 34)
		if err := os.Chmod(elsewhere, 0o600); err != nil {
			t.Fatal(err)
		}
		before, err := os.Stat(elsewhere)
		if err != nil {
			t.Fatal(err)
		}
		sum := testimg.SHA256File(t, elsewhere)
		if err := os.Symlink(elsewhere, filepath.Join(mount, api.DiskFile)); err != nil {
			t.Fatal(err)
		}
		permanent(t, adopt(t, mount, 64<<20, 1<<20), "disk.img", "symbolic link")
		after, err := os.Stat(elsewhere)
		if err != nil {
			t.Fatal(err)
		}
		bs, as := before.Sys().(*syscall.Stat_t), after.Sys().(*syscall.Stat_t)
		if after.Size() != before.Size() || after.Mode() != before.Mode() || as.Uid != bs.Uid || as.Gid != bs.Gid ||
			testimg.SHA256File(t, elsewhere) != sum {
			t.Fatalf("the symlink's target changed: %v %d:%d, was %v %d:%d", after, as.Uid, as.Gid, before, bs.Uid, bs.Gid)
		}
	})
	t.Run("directory", func(t *testing.T) {
		mount := t.TempDir()
		if err := os.Mkdir(filepath.Join(mount, api.DiskFile), 0o755); err != nil {
			t.Fatal(err)
		}
		permanent(t, adopt(t, mount, 64<<20, 1<<20), "disk.img", "directory")
	})
}

// TestPopulate_ClonedRequestIsChecked: a cloned request is a Filesystem
// volume's, not from a source, and names the image's virtual size.
func TestPopulate_ClonedRequestIsChecked(t *testing.T) {
	for name, c := range map[string]struct {
		req  api.PopulateRequest
		want string
	}{
		"block":           {api.PopulateRequest{Cloned: true, Block: true, VirtualSize: 1 << 20}, "a cloned volume is a Filesystem volume"},
		"from source":     {api.PopulateRequest{Cloned: true, FromSource: true, VirtualSize: 1 << 20}, "both cloned and from a source"},
		"no virtual size": {api.PopulateRequest{Cloned: true}, "no virtual size"},
	} {
		t.Run(name, func(t *testing.T) {
			mount := t.TempDir()
			testimg.Pattern(t, filepath.Join(mount, api.DiskFile), 1<<20, 35)
			out := populate(context.Background(), PopulateConfig{Config: Config{RequestPath: writeRequest(t, c.req)}, MountPath: mount})
			if out.Populated != nil || !out.Permanent || out.Reason != importer.ReasonInternal || !strings.Contains(out.Message, c.want) {
				t.Fatalf("outcome %+v, want a permanent %s saying %q", out, importer.ReasonInternal, c.want)
			}
		})
	}
	// Without DVCR fields a cloned request is valid.
	if _, err := readPopulateRequest(writeRequest(t, api.PopulateRequest{Cloned: true, VirtualSize: 1 << 20})); err != nil {
		t.Fatalf("a cloned request without DVCR: %v", err)
	}
}

// TestPopulate_ClonedReportsFullProgress: the pod's progress annotation
// ends at 100% though nothing ticks during an adoption.
func TestPopulate_ClonedReportsFullProgress(t *testing.T) {
	mount := t.TempDir()
	testimg.Pattern(t, filepath.Join(mount, api.DiskFile), 1<<20, 36)
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "populate"}}
	kube := fake.NewSimpleClientset(pod)
	uid, gid := owner()
	req := api.PopulateRequest{Cloned: true, VirtualSize: 1 << 20, Capacity: 8 << 20, FilesystemOverhead: 0.055, UID: uid, GID: gid}
	out := populate(context.Background(), PopulateConfig{MountPath: mount, Config: Config{
		RequestPath: writeRequest(t, req), PodNamespace: "ns", PodName: "populate", Kube: kube,
	}})
	if out.Populated == nil {
		t.Fatalf("populate failed: %+v", out)
	}
	got, err := kube.CoreV1().Pods("ns").Get(context.Background(), "populate", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p, err := api.DecodeProgress(got.Annotations[api.AnnotationProgress])
	if err != nil || p.Fraction != 1 {
		t.Fatalf("progress annotation %q (%v), want 100%%", got.Annotations[api.AnnotationProgress], err)
	}
}
