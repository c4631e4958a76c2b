package driver

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"vimg.dev/vimg/csi/mount"
	"vimg.dev/vimg/dvcr/dvcrtest"
)

func capability(block bool, mode csi.VolumeCapability_AccessMode_Mode) *csi.VolumeCapability {
	c := &csi.VolumeCapability{AccessMode: &csi.VolumeCapability_AccessMode{Mode: mode}}
	if block {
		c.AccessType = &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}}
	} else {
		c.AccessType = &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}}
	}
	return c
}

func publishReq(volumeID, target string, block bool, pin Pin) *csi.NodePublishVolumeRequest {
	return &csi.NodePublishVolumeRequest{
		VolumeId:         volumeID,
		TargetPath:       target,
		VolumeCapability: capability(block, csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER),
		VolumeContext:    pin.Context(),
	}
}

// checkFilesystemTarget checks a published Filesystem target: a read-only
// mount holding disk.img with the image's bytes, owned by qemu.
func checkFilesystemTarget(t *testing.T, target string, want []byte) {
	t.Helper()
	mounted, ro, err := mount.MountInfo(target)
	if err != nil || !mounted || !ro {
		t.Fatalf("%s: mounted %v, read-only %v, %v; want a read-only mount", target, mounted, ro, err)
	}
	disk := filepath.Join(target, "disk.img")
	got, err := os.ReadFile(disk)
	if err != nil {
		t.Fatal(err)
	}
	if sha256Hex(got) != sha256Hex(want) {
		t.Fatalf("%s has sha256 %s, the image %s", disk, sha256Hex(got), sha256Hex(want))
	}
	fi, err := os.Stat(disk)
	if err != nil {
		t.Fatal(err)
	}
	if st := fi.Sys().(*syscall.Stat_t); st.Uid != 107 || st.Gid != 107 {
		t.Errorf("%s is owned by %d:%d, want 107:107 (qemu)", disk, st.Uid, st.Gid)
	}
	if f, err := os.OpenFile(disk, os.O_WRONLY, 0); !errors.Is(err, syscall.EROFS) {
		if err == nil {
			f.Close()
		}
		t.Errorf("opening %s for writing: %v, want EROFS", disk, err)
	}
	if err := os.WriteFile(filepath.Join(target, "new"), []byte("x"), 0o644); !errors.Is(err, syscall.EROFS) {
		t.Errorf("creating a file in %s: %v, want EROFS", target, err)
	}
}

func checkBlockTarget(t *testing.T, target string, want []byte) {
	t.Helper()
	f, err := os.Open(target)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Type() != os.ModeDevice {
		t.Fatalf("%s is %v, want a block device", target, fi.Mode().Type())
	}
	got := make([]byte, len(want))
	if _, err := io.ReadFull(f, got); err != nil {
		t.Fatalf("reading %s: %v", target, err)
	}
	if sha256Hex(got) != sha256Hex(want) {
		t.Fatalf("%s has sha256 %s, the image %s", target, sha256Hex(got), sha256Hex(want))
	}
	// The kernel may let the device be opened for writing (the mount's
	// read-only flag does not apply to device nodes), but the read-only
	// loop device refuses the write.
	w, err := os.OpenFile(target, os.O_WRONLY, 0)
	if err == nil {
		_, err = w.Write(make([]byte, 4096))
		w.Close()
	}
	if !errors.Is(err, syscall.EROFS) && !errors.Is(err, syscall.EPERM) && !errors.Is(err, syscall.EACCES) {
		t.Errorf("writing to %s: %v, want EROFS, EPERM or EACCES", target, err)
	}
}

func checkUnpublished(t *testing.T, target string) {
	t.Helper()
	if m, _, err := mount.MountInfo(target); err != nil || m {
		t.Errorf("%s: mounted %v (%v) after unpublish", target, m, err)
	}
	if _, err := os.Lstat(target); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s still exists after unpublish (%v)", target, err)
	}
	if devs, err := mount.FindLoop(loopTag(target)); err != nil || len(devs) > 0 {
		t.Errorf("%s: loop devices %v (%v) still attached after unpublish", target, devs, err)
	}
}

func TestPublish_TargetsShareOneCacheEntryAndSurviveRestart(t *testing.T) {
	requireRoot(t)
	requireLoop(t)
	c := dvcrtest.Start(t)
	data := isoBytes(t, 3<<20)
	pin := pushImage(t, c, "cdrom", data)
	state := t.TempDir()
	pods := t.TempDir()
	fsTargets := []string{filepath.Join(pods, "a", "disk"), filepath.Join(pods, "b", "disk"), filepath.Join(pods, "c", "disk")}
	blockTarget := filepath.Join(pods, "d", "dev")
	cleanupTargets(t, append(fsTargets, blockTarget)...)
	ctx := context.Background()

	d, ch := newNodeDriver(t, state, c)
	for _, target := range fsTargets {
		if _, err := d.NodePublishVolume(ctx, publishReq("vol-1", target, false, pin)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := d.NodePublishVolume(ctx, publishReq("vol-1", blockTarget, true, pin)); err != nil {
		t.Fatal(err)
	}
	if st := ch.Stats(); st.Entries != 1 || st.Fills != 1 {
		t.Fatalf("cache stats %+v: want 1 entry from 1 fill for 4 targets", st)
	}
	for _, target := range fsTargets {
		checkFilesystemTarget(t, target, data)
	}
	checkBlockTarget(t, blockTarget, data)

	// Publishing again is a no-op; another volume on a used target is refused.
	if _, err := d.NodePublishVolume(ctx, publishReq("vol-1", fsTargets[0], false, pin)); err != nil {
		t.Fatalf("publishing again: %v", err)
	}
	if _, err := d.NodePublishVolume(ctx, publishReq("vol-1", blockTarget, true, pin)); err != nil {
		t.Fatalf("publishing the block target again: %v", err)
	}
	if _, err := d.NodePublishVolume(ctx, publishReq("vol-2", fsTargets[0], false, pin)); status.Code(err) != codes.AlreadyExists {
		t.Fatalf("publishing another volume on a used target: %v, want AlreadyExists", err)
	}
	if _, err := d.NodePublishVolume(ctx, publishReq("vol-1", fsTargets[0], true, pin)); status.Code(err) != codes.AlreadyExists {
		t.Fatalf("publishing as Block on a Filesystem target: %v, want AlreadyExists", err)
	}
	checkFilesystemTarget(t, fsTargets[0], data)

	// Restart: a new cache and a new driver on the same directories.
	ch.Close()
	d, ch = newNodeDriver(t, state, c)
	for _, target := range append(fsTargets, blockTarget) {
		if _, _, ok := ch.Pinned(pinID("vol-1", target)); !ok {
			t.Errorf("after restart, the cache lost the pin of %s", target)
		}
		if _, err := d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "vol-1", TargetPath: target}); err != nil {
			t.Fatalf("unpublishing %s after restart: %v", target, err)
		}
		checkUnpublished(t, target)
		if _, _, ok := ch.Pinned(pinID("vol-1", target)); ok {
			t.Errorf("%s is still pinned after unpublish", target)
		}
		// Unpublishing again is a no-op.
		if _, err := d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "vol-1", TargetPath: target}); err != nil {
			t.Fatalf("unpublishing %s again: %v", target, err)
		}
	}
	if _, err := os.Stat(d.viewDir(pin.Key())); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the view outlives its last target: %v", err)
	}
	if des, _ := os.ReadDir(filepath.Join(state, "publishes")); len(des) != 0 {
		t.Errorf("%d publish records left after unpublishing everything", len(des))
	}

	// The restarted driver publishes from the cache, without a download.
	if _, err := d.NodePublishVolume(ctx, publishReq("vol-1", fsTargets[0], false, pin)); err != nil {
		t.Fatal(err)
	}
	checkFilesystemTarget(t, fsTargets[0], data)
	if st := ch.Stats(); st.Entries != 1 || st.Fills != 0 {
		t.Errorf("cache stats after restart %+v: want the 1 entry, no fill", st)
	}
	if _, err := d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "vol-1", TargetPath: fsTargets[0]}); err != nil {
		t.Fatal(err)
	}
	checkUnpublished(t, fsTargets[0])
}

func TestPublish_FailedFillLeavesNothingBehind(t *testing.T) {
	requireRoot(t)
	c := dvcrtest.Start(t)
	pin := pushImage(t, c, "cdrom", isoBytes(t, 1<<20))
	pin.Size++ // the registry's image is not what the volume pins
	state := t.TempDir()
	target := filepath.Join(t.TempDir(), "disk")
	cleanupTargets(t, target)
	d, ch := newNodeDriver(t, state, c)
	_, err := d.NodePublishVolume(context.Background(), publishReq("vol-1", target, false, pin))
	if status.Code(err) != codes.Internal {
		t.Fatalf("publishing an image of the wrong size: %v, want Internal", err)
	}
	t.Log(err)
	checkUnpublished(t, target)
	if st := ch.Stats(); st.Entries != 0 {
		t.Errorf("cache stats %+v: want no entry", st)
	}
	if _, _, ok := ch.Pinned(pinID("vol-1", target)); ok {
		t.Error("a failed publish left its pin")
	}
	if des, _ := os.ReadDir(filepath.Join(state, "publishes")); len(des) != 0 {
		t.Errorf("a failed publish left %d records", len(des))
	}
}
