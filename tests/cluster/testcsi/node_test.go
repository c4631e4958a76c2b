package testcsi

import (
	"bytes"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
)

func TestNodeInfo(t *testing.T) {
	d := newTestDriver(t, t.TempDir())
	info, err := d.NodeGetInfo(t.Context(), &csi.NodeGetInfoRequest{})
	if err != nil || info.GetNodeId() != nodeID || info.GetAccessibleTopology().GetSegments()[TopologyKey] != nodeID {
		t.Errorf("NodeGetInfo = %v, %v", info, err)
	}
	if caps, err := d.NodeGetCapabilities(t.Context(), &csi.NodeGetCapabilitiesRequest{}); err != nil || len(caps.GetCapabilities()) != 0 {
		t.Errorf("NodeGetCapabilities = %v, %v; want none", caps, err)
	}
}

func TestNodeRejectsInvalidRequests(t *testing.T) {
	d := newTestDriver(t, t.TempDir())
	vol := createVolume(t, d, "pvc-1", fsCap, 0)
	target := filepath.Join(t.TempDir(), "target")
	for _, tc := range []struct {
		name string
		req  *csi.NodePublishVolumeRequest
		want codes.Code
	}{
		{"no volume ID", &csi.NodePublishVolumeRequest{TargetPath: target, VolumeCapability: fsCap}, codes.InvalidArgument},
		{"no target", &csi.NodePublishVolumeRequest{VolumeId: vol.GetVolumeId(), VolumeCapability: fsCap}, codes.InvalidArgument},
		{"relative target", &csi.NodePublishVolumeRequest{VolumeId: vol.GetVolumeId(), TargetPath: "target", VolumeCapability: fsCap}, codes.InvalidArgument},
		{"no capability", &csi.NodePublishVolumeRequest{VolumeId: vol.GetVolumeId(), TargetPath: target}, codes.InvalidArgument},
		{"block access to a filesystem volume", &csi.NodePublishVolumeRequest{VolumeId: vol.GetVolumeId(), TargetPath: target, VolumeCapability: blockCap}, codes.InvalidArgument},
		{"unknown volume", &csi.NodePublishVolumeRequest{VolumeId: "missing", TargetPath: target, VolumeCapability: fsCap}, codes.NotFound},
	} {
		_, err := d.NodePublishVolume(t.Context(), tc.req)
		wantCode(t, "publish: "+tc.name, err, tc.want)
	}
	_, err := d.NodeUnpublishVolume(t.Context(), &csi.NodeUnpublishVolumeRequest{VolumeId: vol.GetVolumeId()})
	wantCode(t, "unpublish without target", err, codes.InvalidArgument)
	_, err = d.NodeUnpublishVolume(t.Context(), &csi.NodeUnpublishVolumeRequest{TargetPath: target})
	wantCode(t, "unpublish without volume ID", err, codes.InvalidArgument)
	_, err = d.NodeUnpublishVolume(t.Context(), &csi.NodeUnpublishVolumeRequest{VolumeId: "missing", TargetPath: target})
	wantCode(t, "unpublish of an unknown volume", err, codes.NotFound)
	if _, err := os.Stat(target); !os.IsNotExist(err) {
		t.Errorf("rejected publishes created the target: %v", err)
	}
}

// requireRoot skips tests that mount and attach loop devices, except in CI,
// where nothing may skip.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatal("this test mounts and attaches loop devices and needs root; CI must run it")
	}
	t.Skip("needs root to mount and attach loop devices")
}

// cleanupHost undoes what a failing test leaves on the host: mounts under
// dir and loop devices on disk. It must be registered after the TempDirs it
// cleans, so that it runs before they are removed.
func cleanupHost(t *testing.T, disk, dir string) {
	t.Cleanup(func() {
		points, err := mountPoints()
		if err != nil {
			t.Error(err)
		}
		// Innermost first, so that stacked mounts come off in order.
		slices.Reverse(points)
		for _, p := range points {
			if strings.HasPrefix(p, dir+"/") {
				if err := unix.Unmount(p, unix.MNT_DETACH); err != nil {
					t.Errorf("unmount %s: %v", p, err)
				}
			}
		}
		if disk != "" {
			if err := detachUnusedLoops(disk, nil); err != nil {
				t.Error(err)
			}
		}
	})
}

func publish(t *testing.T, d *Driver, vol *csi.Volume, c *csi.VolumeCapability, target string, readOnly bool) {
	t.Helper()
	if _, err := d.NodePublishVolume(t.Context(), &csi.NodePublishVolumeRequest{
		VolumeId: vol.GetVolumeId(), TargetPath: target, VolumeCapability: c, Readonly: readOnly,
	}); err != nil {
		t.Fatalf("publish on %s: %v", target, err)
	}
}

func unpublish(t *testing.T, d *Driver, vol *csi.Volume, target string) {
	t.Helper()
	if _, err := d.NodeUnpublishVolume(t.Context(), &csi.NodeUnpublishVolumeRequest{
		VolumeId: vol.GetVolumeId(), TargetPath: target,
	}); err != nil {
		t.Fatalf("unpublish from %s: %v", target, err)
	}
	if _, err := os.Lstat(target); !os.IsNotExist(err) {
		t.Errorf("target %s still there after unpublish: %v", target, err)
	}
}

func TestPublishFilesystem(t *testing.T) {
	requireRoot(t)
	dataDir, pods := t.TempDir(), t.TempDir()
	target := filepath.Join(pods, "pod-1", "volume")
	cleanupHost(t, "", pods)
	d := newTestDriver(t, dataDir)
	vol := createVolume(t, d, "pvc-fs", fsCap, 0)

	publish(t, d, vol, fsCap, target, false)
	publish(t, d, vol, fsCap, target, false) // the kubelet retries
	if err := os.WriteFile(filepath.Join(target, "hello"), []byte("world"), 0o644); err != nil {
		t.Fatalf("write through the target: %v", err)
	}
	_, err := d.NodePublishVolume(t.Context(), &csi.NodePublishVolumeRequest{
		VolumeId: vol.GetVolumeId(), TargetPath: target, VolumeCapability: fsCap, Readonly: true})
	wantCode(t, "re-publish read-only on the same target", err, codes.AlreadyExists)
	_, err = d.DeleteVolume(t.Context(), &csi.DeleteVolumeRequest{VolumeId: vol.GetVolumeId()})
	wantCode(t, "delete while published", err, codes.FailedPrecondition)

	unpublish(t, d, vol, target)
	unpublish(t, d, vol, target)
	if b, err := os.ReadFile(filepath.Join(dataDir, vol.GetVolumeId(), "data", "hello")); string(b) != "world" {
		t.Errorf("data in the volume: %q, %v; want %q", b, err, "world")
	}
	if _, err := d.DeleteVolume(t.Context(), &csi.DeleteVolumeRequest{VolumeId: vol.GetVolumeId()}); err != nil {
		t.Errorf("delete after unpublish: %v", err)
	}
}

func TestPublishFilesystemReadOnly(t *testing.T) {
	requireRoot(t)
	dataDir, pods := t.TempDir(), t.TempDir()
	target := filepath.Join(pods, "volume")
	cleanupHost(t, "", pods)
	d := newTestDriver(t, dataDir)
	vol := createVolume(t, d, "pvc-ro", fsCap, 0)
	if err := os.WriteFile(filepath.Join(dataDir, vol.GetVolumeId(), "data", "seed"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}

	publish(t, d, vol, fsCap, target, true)
	if _, err := os.ReadFile(filepath.Join(target, "seed")); err != nil {
		t.Errorf("read through a read-only target: %v", err)
	}
	if err := os.WriteFile(filepath.Join(target, "new"), nil, 0o644); !errors.Is(err, syscall.EROFS) {
		t.Errorf("write through a read-only target: %v, want EROFS", err)
	}
	unpublish(t, d, vol, target)
}

func TestPublishBlock(t *testing.T) {
	requireRoot(t)
	const capacity, offset = 16 << 20, 5<<20 + 123
	payload := []byte("written through the first publish")
	dataDir, pods := t.TempDir(), t.TempDir()
	first, second, readOnly := filepath.Join(pods, "a", "dev"), filepath.Join(pods, "b", "dev"), filepath.Join(pods, "ro")
	d := newTestDriver(t, dataDir)
	vol := createVolume(t, d, "pvc-block", blockCap, capacity)
	disk := filepath.Join(dataDir, vol.GetVolumeId(), "disk.img")
	cleanupHost(t, disk, pods)

	publish(t, d, vol, blockCap, first, false)
	if fi, err := os.Stat(first); err != nil || fi.Mode()&os.ModeDevice == 0 || fi.Mode()&os.ModeCharDevice != 0 {
		t.Fatalf("target is %v, %v; want a block device", fi, err)
	}
	f, err := os.OpenFile(first, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if size, err := f.Seek(0, io.SeekEnd); err != nil || size != capacity {
		t.Errorf("device size %d, %v; want %d", size, err, capacity)
	}
	if _, err := f.WriteAt(payload, offset); err != nil {
		t.Fatal(err)
	}
	if err := errors.Join(f.Sync(), f.Close()); err != nil {
		t.Fatal(err)
	}

	publish(t, d, vol, blockCap, second, false)
	if got := readAt(t, second, offset, len(payload)); !bytes.Equal(got, payload) {
		t.Errorf("second publish reads %q, want %q", got, payload)
	}
	if loops := attachedLoops(t, disk); len(loops) != 1 {
		t.Errorf("two writable publishes use loop devices %v, want one shared", loops)
	}

	publish(t, d, vol, blockCap, readOnly, true)
	if got := readAt(t, readOnly, offset, len(payload)); !bytes.Equal(got, payload) {
		t.Errorf("read-only publish reads %q, want %q", got, payload)
	}
	if f, err := os.OpenFile(readOnly, os.O_WRONLY, 0); err == nil {
		_, err = f.WriteAt(payload, 0)
		f.Close()
		if err == nil {
			t.Error("write through a read-only block publish succeeded")
		}
	}

	unpublish(t, d, vol, first)
	unpublish(t, d, vol, second)
	if loops := attachedLoops(t, disk); len(loops) != 1 {
		t.Errorf("loop devices %v while the read-only publish remains, want one", loops)
	}
	unpublish(t, d, vol, readOnly)
	if loops := attachedLoops(t, disk); len(loops) != 0 {
		t.Errorf("loop devices %v still attached after the last unpublish", loops)
	}
	if got := readAt(t, disk, offset, len(payload)); !bytes.Equal(got, payload) {
		t.Errorf("disk image holds %q, want %q", got, payload)
	}
	if _, err := d.DeleteVolume(t.Context(), &csi.DeleteVolumeRequest{VolumeId: vol.GetVolumeId()}); err != nil {
		t.Errorf("delete after unpublish: %v", err)
	}
}

func readAt(t *testing.T, path string, off int64, n int) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	return b
}

// attachedLoops asks losetup itself rather than the code under test.
func attachedLoops(t *testing.T, disk string) []string {
	t.Helper()
	out, err := exec.Command("losetup", "-j", disk).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup -j: %v: %s", err, out)
	}
	var devs []string
	for line := range strings.Lines(string(out)) {
		if dev, _, ok := strings.Cut(line, ":"); ok {
			devs = append(devs, dev)
		}
	}
	return devs
}
