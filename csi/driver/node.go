package driver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"vimg.dev/vimg/csi/cache"
	"vimg.dev/vimg/csi/mount"
)

// viewFile is the name of the disk in a Filesystem volume: KubeVirt looks
// for disk.img at the root of a filesystem PVC.
const viewFile = "disk.img"

func (d *Driver) NodeGetInfo(ctx context.Context, req *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	if d.cfg.NodeID == "" {
		return nil, status.Error(codes.FailedPrecondition, "NodeGetInfo: this instance serves no node (no node ID)")
	}
	// No attach limit: a volume costs a bind mount, or a loop device for Block.
	return &csi.NodeGetInfoResponse{NodeId: d.cfg.NodeID}, nil
}

// NodeGetCapabilities: none. There is no staging: the cache is shared by
// every volume of an image and a publish is a bind mount of it.
func (d *Driver) NodeGetCapabilities(ctx context.Context, req *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	return &csi.NodeGetCapabilitiesResponse{}, nil
}

// volumeAndTarget checks the volume ID and target path every node call
// carries, and cleans the path.
func volumeAndTarget(method, id, target string) (string, string, error) {
	if id == "" {
		return "", "", status.Errorf(codes.InvalidArgument, "%s: no volume ID", method)
	}
	if target == "" || !filepath.IsAbs(target) {
		return "", "", status.Errorf(codes.InvalidArgument, "%s %s: target path %q: want an absolute path", method, id, target)
	}
	return id, filepath.Clean(target), nil
}

// NodePublishVolume makes the volume's disk available read-only at the
// target, filling the cache first if this node does not have it yet.
func (d *Driver) NodePublishVolume(ctx context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	id, target, err := volumeAndTarget("NodePublishVolume", req.GetVolumeId(), req.GetTargetPath())
	if err != nil {
		return nil, err
	}
	block, err := checkCapability(req.GetVolumeCapability())
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "NodePublishVolume %s: %v", id, err)
	}
	if d.cfg.Cache == nil {
		return nil, status.Errorf(codes.FailedPrecondition, "NodePublishVolume %s: this instance serves no node (no cache)", id)
	}
	pin, err := d.publishPin(ctx, req.GetVolumeContext())
	if err != nil {
		return nil, status.Errorf(status.Code(err), "NodePublishVolume %s: %s", id, status.Convert(err).Message())
	}
	logger := klog.FromContext(ctx).WithValues("volumeID", id, "target", target)
	ctx = klog.NewContext(ctx, logger)

	unlock := d.locks.lock("target/" + target)
	defer unlock()
	d.mu.Lock()
	rec, had := d.publishes[target]
	d.mu.Unlock()
	if had {
		if rec.VolumeID != id {
			return nil, status.Errorf(codes.AlreadyExists, "NodePublishVolume %s: volume %s is published at %s", id, rec.VolumeID, target)
		}
		if rec.Block != block || rec.Key != pin.Key() {
			return nil, status.Errorf(codes.AlreadyExists, "NodePublishVolume %s: published at %s already with another capability or image (block %v, %s)", id, target, rec.Block, rec.Key)
		}
	} else {
		// Recorded before anything is pinned or mounted: whatever a crash
		// leaves, NodeUnpublishVolume finds it.
		rec = publishRecord{VolumeID: id, Target: target, Key: pin.Key(), Block: block}
		if err := d.putPublish(rec); err != nil {
			return nil, status.Errorf(codes.Internal, "NodePublishVolume %s: %v", id, err)
		}
	}
	if err := d.publish(ctx, &rec, pin, had); err != nil {
		if !had {
			// Undo this call's work; a retry starts afresh.
			if uerr := d.unpublish(ctx, rec); uerr != nil {
				logger.Error(uerr, "Undoing a failed publish")
			}
		}
		return nil, status.Errorf(publishCode(err), "NodePublishVolume %s at %s: %v", id, target, err)
	}
	logger.Info("Published volume", "ref", pin.Ref, "block", block, "loop", rec.Loop)
	return &csi.NodePublishVolumeResponse{}, nil
}

// publishCode is the status of a failed publish: the caller's deadline or
// cancellation as such (kubelet retries and joins the fill in progress),
// anything else Internal.
func publishCode(err error) codes.Code {
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		return codes.DeadlineExceeded
	case errors.Is(err, context.Canceled):
		return codes.Canceled
	}
	return codes.Internal
}

// publishPin is the Pin a publish serves: the one in the volume context,
// or for an ephemeral inline volume the one its image resolves to.
func (d *Driver) publishPin(ctx context.Context, vc map[string]string) (Pin, error) {
	if vc[keyEphemeral] == "true" {
		kind, ns, name, err := inlineTarget(vc)
		if err != nil {
			return Pin{}, status.Error(codes.InvalidArgument, err.Error())
		}
		return d.resolve(ctx, kind, ns, name)
	}
	pin, err := PinFromContext(vc)
	if err != nil {
		return Pin{}, status.Errorf(codes.InvalidArgument, "volume context: %v", err)
	}
	return pin, nil
}

// publish pins the disk in the cache and mounts it at the target; every
// step is idempotent, so a retried publish (had) redoes only what is
// missing.
func (d *Driver) publish(ctx context.Context, rec *publishRecord, pin Pin, had bool) error {
	path, err := d.cfg.Cache.Acquire(ctx, pin.Key(), rec.pinID(), d.opener(pin))
	if err != nil {
		return err
	}
	if rec.Block {
		return d.publishBlock(rec, path, had)
	}
	if err := os.MkdirAll(rec.Target, 0o750); err != nil {
		return fmt.Errorf("creating the target directory: %w", err)
	}
	unlock := d.locks.lock("view/" + rec.Key.Digest)
	view, err := d.ensureView(rec.Key, path)
	unlock()
	if err != nil {
		return err
	}
	return mount.BindReadOnly(view, rec.Target)
}

func (d *Driver) publishBlock(rec *publishRecord, path string, had bool) error {
	if err := os.MkdirAll(filepath.Dir(rec.Target), 0o750); err != nil {
		return fmt.Errorf("creating the target's directory: %w", err)
	}
	f, err := os.OpenFile(rec.Target, os.O_RDONLY|os.O_CREATE, 0o640)
	if err != nil {
		return fmt.Errorf("creating the target file: %w", err)
	}
	f.Close()
	tag := loopTag(rec.Target)
	var found []string
	if had {
		// A retry, or a crash between attaching and recording: reuse the
		// device carrying this target's tag.
		if found, err = mount.FindLoop(tag); err != nil {
			return err
		}
	}
	dev := ""
	switch {
	case slices.Contains(found, rec.Loop):
		dev = rec.Loop
	case len(found) > 0:
		dev = found[0]
	default:
		if dev, err = mount.AttachLoop(path, tag); err != nil {
			return err
		}
	}
	for _, extra := range found {
		if extra != dev {
			if err := mount.DetachLoop(extra, tag); err != nil {
				return err
			}
		}
	}
	if rec.Loop != dev {
		rec.Loop = dev
		if err := d.putPublish(*rec); err != nil {
			return err
		}
	}
	return mount.BindReadOnly(dev, rec.Target)
}

// opener opens the pinned image for a fill, and refuses one whose disk
// is not the size pinned. (The fill itself checks the layer digest.)
func (d *Driver) opener(pin Pin) cache.Opener {
	return func(ctx context.Context, k cache.Key) (cache.Source, error) {
		src, err := d.cfg.Open(ctx, pin.Ref)
		if err != nil {
			return nil, err
		}
		if src.Size() != pin.Size {
			if c, ok := src.(io.Closer); ok {
				c.Close()
			}
			return nil, fmt.Errorf("%s has a disk of %d bytes, but the volume pins %d", pin.Ref, src.Size(), pin.Size)
		}
		return src, nil
	}
}

func (d *Driver) viewDir(k cache.Key) string {
	return filepath.Join(d.cfg.StateDir, "views", strings.TrimPrefix(k.Digest, "sha256:"))
}

// ensureView makes views/<hex>/disk.img a hard link to the cache file,
// owned by qemu (the cache file is 0444, so this gives nobody write
// access). The caller holds the view's lock.
func (d *Driver) ensureView(k cache.Key, path string) (string, error) {
	dir := d.viewDir(k)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("creating view: %w", err)
	}
	link := filepath.Join(dir, viewFile)
	want, err := os.Stat(path)
	if err != nil {
		return "", fmt.Errorf("creating view: %w", err)
	}
	if fi, err := os.Lstat(link); err == nil && os.SameFile(fi, want) {
		if st := fi.Sys().(*syscall.Stat_t); st.Uid == qemuUID && st.Gid == qemuGID {
			return dir, nil
		}
	}
	// Link under a temporary name, then rename over whatever is there: a
	// mount of the view never sees it without disk.img.
	tmp := filepath.Join(dir, "."+viewFile+".tmp")
	if err := os.Remove(tmp); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("creating view: %w", err)
	}
	if err := os.Link(path, tmp); err != nil {
		return "", fmt.Errorf("creating view (the cache and %s must be on one filesystem): %w", d.cfg.StateDir, err)
	}
	if err := os.Chown(tmp, qemuUID, qemuGID); err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("creating view: %w", err)
	}
	if err := os.Rename(tmp, link); err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("creating view: %w", err)
	}
	return dir, nil
}

// NodeUnpublishVolume undoes a publish: unmount, detach the loop device,
// remove the target, unpin. A target this driver does not know, or knows
// for another volume, is left alone: there is nothing of this volume there.
func (d *Driver) NodeUnpublishVolume(ctx context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	id, target, err := volumeAndTarget("NodeUnpublishVolume", req.GetVolumeId(), req.GetTargetPath())
	if err != nil {
		return nil, err
	}
	logger := klog.FromContext(ctx).WithValues("volumeID", id, "target", target)
	ctx = klog.NewContext(ctx, logger)

	unlock := d.locks.lock("target/" + target)
	defer unlock()
	d.mu.Lock()
	rec, ok := d.publishes[target]
	d.mu.Unlock()
	if !ok {
		logger.V(2).Info("Target is not published: nothing to do")
		return &csi.NodeUnpublishVolumeResponse{}, nil
	}
	if rec.VolumeID != id {
		logger.Info("Target holds another volume: left alone", "published", rec.VolumeID)
		return &csi.NodeUnpublishVolumeResponse{}, nil
	}
	if err := d.unpublish(ctx, rec); err != nil {
		return nil, status.Errorf(codes.Internal, "NodeUnpublishVolume %s at %s: %v", id, target, err)
	}
	logger.Info("Unpublished volume")
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

// unpublish undoes every step of publish that may have happened, in
// reverse, and drops the record last: a failure leaves it for a retry.
func (d *Driver) unpublish(ctx context.Context, rec publishRecord) error {
	if err := mount.Unmount(rec.Target); err != nil {
		return err
	}
	if rec.Block {
		// Only devices still carrying the target's tag are detached: after
		// a reboot the recorded /dev/loopN may serve something else.
		tag := loopTag(rec.Target)
		devs, err := mount.FindLoop(tag)
		if err != nil {
			return err
		}
		for _, dev := range devs {
			if err := mount.DetachLoop(dev, tag); err != nil {
				return err
			}
		}
	}
	if err := os.Remove(rec.Target); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("removing the target: %w", err)
	}
	if d.cfg.Cache != nil {
		if err := d.cfg.Cache.Release(rec.pinID()); err != nil {
			return err
		}
	}
	if !rec.Block {
		if err := d.dropViewIfUnused(rec); err != nil {
			return err
		}
	}
	if err := removeFile(d.publishPath(rec.Target)); err != nil {
		return fmt.Errorf("removing the publish record: %w", err)
	}
	d.mu.Lock()
	delete(d.publishes, rec.Target)
	d.mu.Unlock()
	return nil
}

// dropViewIfUnused removes the view of rec's image when no other
// Filesystem target uses it, so that its hard link does not keep an
// evicted cache file on disk.
func (d *Driver) dropViewIfUnused(rec publishRecord) error {
	unlock := d.locks.lock("view/" + rec.Key.Digest)
	defer unlock()
	d.mu.Lock()
	used := false
	for t, r := range d.publishes {
		if t != rec.Target && !r.Block && r.Key.Digest == rec.Key.Digest {
			used = true
			break
		}
	}
	d.mu.Unlock()
	if used {
		return nil
	}
	if err := os.RemoveAll(d.viewDir(rec.Key)); err != nil {
		return fmt.Errorf("removing the view: %w", err)
	}
	return nil
}

// putPublish records a publish, on disk first.
func (d *Driver) putPublish(rec publishRecord) error {
	if err := writeJSON(d.publishPath(rec.Target), rec); err != nil {
		return fmt.Errorf("recording the publish: %w", err)
	}
	d.mu.Lock()
	d.publishes[rec.Target] = rec
	d.mu.Unlock()
	return nil
}
