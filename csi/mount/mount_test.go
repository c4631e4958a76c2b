package mount

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("mount and loop syscalls need root (CAP_SYS_ADMIN)")
	}
}

// unmountOnCleanup makes sure no mount outlives the test, even a failed
// one. Registered after t.TempDir, it runs before the directory is removed.
func unmountOnCleanup(t *testing.T, target string) {
	t.Cleanup(func() {
		if err := Unmount(target); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
}

func assertMount(t *testing.T, path string, wantMounted, wantRO bool) {
	t.Helper()
	mounted, ro, err := MountInfo(path)
	if err != nil {
		t.Fatalf("MountInfo(%s): %v", path, err)
	}
	if mounted != wantMounted || ro != wantRO {
		t.Fatalf("MountInfo(%s) = mounted %v, readOnly %v; want %v, %v", path, mounted, ro, wantMounted, wantRO)
	}
}

func assertContent(t *testing.T, path string, want []byte) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("read %s: got %d bytes, not the %d expected", path, len(got), len(want))
	}
}

func testBindDir(t *testing.T, target string) {
	src := t.TempDir()
	want := []byte("disk image\n")
	if err := os.WriteFile(filepath.Join(src, "disk.img"), want, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(target, 0o755); err != nil {
		t.Fatal(err)
	}
	unmountOnCleanup(t, target)

	if err := BindReadOnly(src, target); err != nil {
		t.Fatal(err)
	}
	assertContent(t, filepath.Join(target, "disk.img"), want)
	err := os.WriteFile(filepath.Join(target, "new"), nil, 0o644)
	if !errors.Is(err, syscall.EROFS) {
		t.Fatalf("create in read-only bind: got %v, want EROFS", err)
	}
	assertMount(t, target, true, true)

	if err := BindReadOnly(src, target); err != nil {
		t.Fatalf("second BindReadOnly: %v", err)
	}
	if err := Unmount(target); err != nil {
		t.Fatal(err)
	}
	// A second bind would have stacked a second mount here.
	assertMount(t, target, false, false)
	if err := Unmount(target); err != nil {
		t.Fatalf("Unmount of an unmounted target: %v", err)
	}
	if err := Unmount(filepath.Join(target, "missing")); err != nil {
		t.Fatalf("Unmount of a missing path: %v", err)
	}
}

func TestBindReadOnlyDir(t *testing.T) {
	requireRoot(t)
	testBindDir(t, filepath.Join(t.TempDir(), "target"))
}

func TestBindReadOnlyPathWithSpace(t *testing.T) {
	requireRoot(t)
	testBindDir(t, filepath.Join(t.TempDir(), "pvc x\tdir", "mount"))
}

func TestBindReadOnlyFile(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	src, target := filepath.Join(dir, "disk.img"), filepath.Join(dir, "target")
	want := []byte("file contents")
	if err := os.WriteFile(src, want, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(target, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	unmountOnCleanup(t, target)

	if err := BindReadOnly(src, target); err != nil {
		t.Fatal(err)
	}
	assertContent(t, target, want)
	assertMount(t, target, true, true)
	_, err := os.OpenFile(target, os.O_WRONLY, 0)
	if !errors.Is(err, syscall.EROFS) {
		t.Fatalf("open read-only bind for writing: got %v, want EROFS", err)
	}
	if err := Unmount(target); err != nil {
		t.Fatal(err)
	}
	assertMount(t, target, false, false)
}

// TestBindReadOnlyPropagatesReadOnly: the node plugin mounts into the
// kubelet's directory through a shared mount (Bidirectional propagation),
// and the copy the kubelet and the pod see must be read-only too. Here
// peer is a peer of shared: what is mounted below one appears below the
// other, and must be read-only in both.
func TestBindReadOnlyPropagatesReadOnly(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	shared, peer, src := filepath.Join(dir, "shared"), filepath.Join(dir, "peer"), filepath.Join(dir, "src")
	for _, d := range []string{shared, peer, src} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(src, "disk.img"), []byte("cdrom"), 0o444); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(shared, shared, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(shared, unix.MNT_DETACH) })
	if err := unix.Mount("", shared, "", unix.MS_SHARED, ""); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(shared, peer, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(peer, unix.MNT_DETACH) })
	target := filepath.Join(shared, "target")
	if err := os.Mkdir(target, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(filepath.Join(peer, "target"), unix.MNT_DETACH) })
	unmountOnCleanup(t, target)

	if err := BindReadOnly(src, target); err != nil {
		t.Fatal(err)
	}
	for _, m := range []string{target, filepath.Join(peer, "target")} {
		mounted, readOnly, err := MountInfo(m)
		if err != nil || !mounted || !readOnly {
			t.Errorf("%s: mounted %v, read-only %v (%v); want a read-only mount", m, mounted, readOnly, err)
		}
		if err := os.WriteFile(filepath.Join(m, "disk.img"), []byte("x"), 0o444); !errors.Is(err, unix.EROFS) {
			t.Errorf("writing through %s: %v, want EROFS", m, err)
		}
	}
	if got, _ := os.ReadFile(filepath.Join(src, "disk.img")); string(got) != "cdrom" {
		t.Errorf("the source changed: %q", got)
	}
}

func TestBindReadOnlyRefusesOtherMount(t *testing.T) {
	requireRoot(t)
	a, b, target := t.TempDir(), t.TempDir(), t.TempDir()
	unmountOnCleanup(t, target)
	if err := BindReadOnly(a, target); err != nil {
		t.Fatal(err)
	}
	if err := BindReadOnly(b, target); err == nil {
		t.Fatal("BindReadOnly over a bind of another source succeeded")
	}
}

func TestLoop(t *testing.T) {
	requireLoop(t)
	saved := ioctlLoopConfigure
	t.Cleanup(func() { ioctlLoopConfigure = saved })
	var configureErr error
	ioctlLoopConfigure = func(fd int, c *unix.LoopConfig) error {
		configureErr = saved(fd, c)
		return configureErr
	}
	testLoop(t)
	t.Logf("LOOP_CONFIGURE returned %v", configureErr)
}

// TestLoopSetFD runs the pre-5.8 path, LOOP_SET_FD + LOOP_SET_STATUS64,
// where LO_FLAGS_READ_ONLY is not settable and read-only comes from the
// backing file being opened read-only.
func TestLoopSetFD(t *testing.T) {
	requireLoop(t)
	saved := ioctlLoopConfigure
	t.Cleanup(func() { ioctlLoopConfigure = saved })
	ioctlLoopConfigure = func(int, *unix.LoopConfig) error { return unix.ENOTTY }
	testLoop(t)
}

func requireLoop(t *testing.T) {
	requireRoot(t)
	if _, err := os.Stat(loopControl); err != nil {
		t.Skipf("no loop devices here (%v)", err)
	}
}

func testLoop(t *testing.T) {
	dir := t.TempDir()
	file, target := filepath.Join(dir, "disk.img"), filepath.Join(dir, "block")
	want := make([]byte, 4<<20)
	for i := range want {
		want[i] = byte(i*7 + i>>12)
	}
	if err := os.WriteFile(file, want, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(target, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	tag := fmt.Sprintf("vimg-test:%d:%d", os.Getpid(), time.Now().UnixNano())
	t.Cleanup(func() { detachTagged(t, tag) })
	unmountOnCleanup(t, target)

	dev, err := AttachLoop(file, tag)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("attached %s to %s", file, dev)
	assertLoopFlags(t, dev)
	assertDevice(t, dev, want)
	if devs, err := FindLoop(tag); err != nil || len(devs) != 1 || devs[0] != dev {
		t.Fatalf("FindLoop(%q) = %v, %v; want [%s]", tag, devs, err, dev)
	}
	// A detach under another tag (a stale path, a reused device) is a no-op.
	if err := DetachLoop(dev, tag+"-other"); err != nil {
		t.Fatalf("DetachLoop under another tag: %v", err)
	}
	if devs, err := FindLoop(tag); err != nil || len(devs) != 1 || devs[0] != dev {
		t.Fatalf("after a detach under another tag, FindLoop(%q) = %v, %v; want [%s]", tag, devs, err, dev)
	}
	assertDevice(t, dev, want)

	if err := BindReadOnly(dev, target); err != nil {
		t.Fatal(err)
	}
	assertMount(t, target, true, true)
	assertDevice(t, target, want)
	if err := Unmount(target); err != nil {
		t.Fatal(err)
	}

	if err := DetachLoop(dev, tag); err != nil {
		t.Fatal(err)
	}
	assertContent(t, file, want)
	if devs, err := FindLoop(tag); err != nil || len(devs) != 0 {
		t.Fatalf("FindLoop(%q) after detach = %v, %v; want none", tag, devs, err)
	}
	// Again: by now dev is free, or another process's device under
	// another tag; either way it is left alone.
	if err := DetachLoop(dev, tag); err != nil {
		t.Fatalf("DetachLoop of a free device: %v", err)
	}
}

// assertDevice checks dev reads as want and cannot be written. Linux lets
// a read-only block device be opened for writing (only the write fails,
// with EPERM), so either the open or the write must be refused.
func assertDevice(t *testing.T, dev string, want []byte) {
	t.Helper()
	f, err := os.Open(dev)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got := make([]byte, len(want)+1)
	n, err := io.ReadFull(f, got)
	if err != io.ErrUnexpectedEOF || !bytes.Equal(got[:n], want) {
		t.Fatalf("read %s: %d bytes (%v), want the %d written", dev, n, err, len(want))
	}
	w, err := os.OpenFile(dev, os.O_WRONLY, 0)
	if err == nil {
		_, err = w.Write(make([]byte, 4096))
		w.Close()
	}
	if !errors.Is(err, syscall.EROFS) && !errors.Is(err, syscall.EPERM) && !errors.Is(err, syscall.EACCES) {
		t.Fatalf("write to %s: got %v, want EROFS, EPERM or EACCES", dev, err)
	}
	t.Logf("write to %s refused: %v", dev, err)
}

// assertLoopFlags checks dev is read-only and not autoclear: a pod closing
// the device must not free it.
func assertLoopFlags(t *testing.T, dev string) {
	t.Helper()
	fd, err := unix.Open(dev, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	info, err := unix.IoctlLoopGetStatus64(fd)
	if err != nil {
		t.Fatal(err)
	}
	if info.Flags&unix.LO_FLAGS_READ_ONLY == 0 || info.Flags&unix.LO_FLAGS_AUTOCLEAR != 0 {
		t.Fatalf("%s flags %#x: want read-only, not autoclear", dev, info.Flags)
	}
}

// detachTagged frees every loop device the test attached, whatever
// happened to it.
func detachTagged(t *testing.T, tag string) {
	devs, err := FindLoop(tag)
	if err != nil {
		t.Errorf("cleanup: %v", err)
	}
	for _, dev := range devs {
		if err := DetachLoop(dev, tag); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	}
}

func TestUnescapeOctal(t *testing.T) {
	for in, want := range map[string]string{
		`/a\040b`:       "/a b",
		`/t\011n\012`:   "/t\tn\n",
		`/back\134`:     `/back\`,
		`/short\04`:     `/short\04`,
		`/plain`:        "/plain",
		`/not\9oct\040`: `/not\9oct `,
	} {
		if got := unescapeOctal(in); got != want {
			t.Errorf("unescapeOctal(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestFindMountStacked(t *testing.T) {
	info := []byte(`21 26 0:20 / /proc rw,relatime - proc proc rw
30 26 8:1 /x /mnt/a\040b rw,relatime shared:1 - ext4 /dev/sda1 rw
31 30 8:1 /y /mnt/a\040b ro,nosuid - ext4 /dev/sda1 rw
`)
	mounted, ro, err := findMount(info, "/mnt/a b")
	if err != nil || !mounted || !ro {
		t.Fatalf("findMount = %v, %v, %v; want mounted, read-only (top mount)", mounted, ro, err)
	}
	mounted, _, err = findMount(info, "/mnt/a")
	if err != nil || mounted {
		t.Fatalf("findMount(/mnt/a) = %v, %v; want not mounted", mounted, err)
	}
}
