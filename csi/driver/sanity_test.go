package driver

// TestSanity runs csi-sanity (kubernetes-csi/csi-test) against the driver
// serving a real DVCR image from a real node cache, on a unix socket.
//
// Specs that skip, all through sanity's own capability checks:
//   - NodeStageVolume, NodeUnstageVolume: no STAGE_UNSTAGE_VOLUME (a publish
//     is a bind mount of the shared cache; there is nothing to stage).
//   - NodeGetVolumeStats, NodeExpandVolume, NodeGetVolumeHealth,
//     NodeGetStorageHealth: not advertised (a read-only image has no usage
//     to report and cannot grow).
//   - "with single node multi writer capability": SINGLE_NODE_MULTI_WRITER
//     is not advertised; every publish is read-only, so writer exclusivity
//     has nothing to protect.
//   - GetCapacity, ListVolumes, ControllerPublish/Unpublish and the volume
//     lifecycle specs that need it, snapshots, cloning, expansion, modify,
//     volume health: not advertised (CREATE_DELETE_VOLUME only).
//
// The node lifecycle specs ("should work", "should be idempotent",
// "should remove target path") publish real read-only bind mounts of the
// cached disk; CheckPath, which sanity calls on a published target, also
// checks that the target is a read-only mount holding the image's bytes.

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"

	"vimg.dev/vimg/csi/mount"
	"vimg.dev/vimg/dvcr/dvcrtest"
)

func TestSanity(t *testing.T) {
	requireRoot(t)
	c := dvcrtest.Start(t)
	data := isoBytes(t, 4<<20)
	pin := pushImage(t, c, "sanity-cdrom", data)
	dir := t.TempDir()
	mounts := filepath.Join(dir, "mount")
	cleanupMountsUnder(t, dir)

	d, ch := newNodeDriver(t, filepath.Join(dir, "state"), c)
	ctx, cancel := context.WithCancel(context.Background())
	sock := filepath.Join(dir, "csi.sock")
	served := make(chan error, 1)
	go func() { served <- Serve(ctx, "unix://"+sock, d) }()
	t.Cleanup(func() {
		cancel()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	waitForSocket(t, sock)

	var checkedMounts atomic.Int64
	cfg := sanity.NewTestConfig()
	cfg.Address = "unix://" + sock
	cfg.TargetPath = mounts
	cfg.StagingPath = filepath.Join(dir, "staging")
	cfg.TestVolumeParameters = pin.Context()
	cfg.TestVolumeSize = pin.Size
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
		if mounted, _, _ := mount.MountInfo(path); mounted {
			if err := checkPublished(path, data); err != nil {
				return sanity.PathIsDir, err
			}
			checkedMounts.Add(1)
		}
		return sanity.PathIsDir, nil
	}
	sanity.Test(t, cfg)

	if checkedMounts.Load() == 0 {
		t.Error("sanity never checked a published target")
	}
	if st := ch.Stats(); st.Entries != 1 || st.Fills != 1 {
		t.Errorf("cache stats after sanity %+v: want 1 entry from 1 fill", st)
	}
	d.mu.Lock()
	left := len(d.publishes)
	d.mu.Unlock()
	if left != 0 {
		t.Errorf("%d publishes left after sanity cleaned up", left)
	}
}

// checkPublished checks a published Filesystem target as a pod would see it.
func checkPublished(target string, want []byte) error {
	mounted, ro, err := mount.MountInfo(target)
	if err != nil || !mounted || !ro {
		return fmt.Errorf("%s: mounted %v, read-only %v (%v): want a read-only mount", target, mounted, ro, err)
	}
	got, err := os.ReadFile(filepath.Join(target, "disk.img"))
	if err != nil {
		return err
	}
	if sha256Hex(got) != sha256Hex(want) {
		return fmt.Errorf("%s/disk.img is not the image", target)
	}
	if err := os.WriteFile(filepath.Join(target, "x"), nil, 0o644); !errors.Is(err, syscall.EROFS) {
		return fmt.Errorf("writing in %s: %v, want EROFS", target, err)
	}
	return nil
}
