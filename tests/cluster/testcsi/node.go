package testcsi

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
)

func (d *Driver) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	return &csi.NodeGetCapabilitiesResponse{}, nil
}

func (d *Driver) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{NodeId: d.cfg.NodeID, AccessibleTopology: d.topology()}, nil
}

func (d *Driver) NodePublishVolume(_ context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	id, target := req.GetVolumeId(), req.GetTargetPath()
	if id == "" || !filepath.IsAbs(target) || req.GetVolumeCapability() == nil {
		return nil, status.Error(codes.InvalidArgument, "volume ID, absolute target path and volume capability are required")
	}
	kind, err := capabilityKind(req.GetVolumeCapability())
	if err != nil {
		return nil, err
	}
	target = filepath.Clean(target)
	readOnly := req.GetReadonly() ||
		req.GetVolumeCapability().GetAccessMode().GetMode() == csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY

	d.mu.Lock()
	defer d.mu.Unlock()
	v := d.store.vols[id]
	if v == nil {
		return nil, status.Errorf(codes.NotFound, "volume %s does not exist", id)
	}
	if kind != v.Kind {
		return nil, status.Errorf(codes.InvalidArgument, "volume %s is a %s volume, not %s", id, v.Kind, kind)
	}
	if ro, ok := v.Publishes[target]; ok && ro != readOnly {
		return nil, status.Errorf(codes.AlreadyExists, "volume %s is already published on %s with readonly=%t", id, target, ro)
	}
	if kind == blockVolume {
		err = publishBlock(d.store.dataPath(v), target, readOnly)
	} else {
		err = publishFilesystem(d.store.dataPath(v), target, readOnly)
	}
	if err != nil {
		return nil, status.Errorf(codes.Internal, "publish volume %s: %v", id, err)
	}
	nv := v.clone()
	if nv.Publishes == nil {
		nv.Publishes = map[string]bool{}
	}
	nv.Publishes[target] = readOnly
	if err := d.store.put(nv); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	klog.InfoS("Published volume", "volumeID", id, "target", target, "readOnly", readOnly)
	return &csi.NodePublishVolumeResponse{}, nil
}

func (d *Driver) NodeUnpublishVolume(_ context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	id, target := req.GetVolumeId(), req.GetTargetPath()
	if id == "" || !filepath.IsAbs(target) {
		return nil, status.Error(codes.InvalidArgument, "volume ID and absolute target path are required")
	}
	target = filepath.Clean(target)

	d.mu.Lock()
	defer d.mu.Unlock()
	v := d.store.vols[id]
	if v == nil {
		return nil, status.Errorf(codes.NotFound, "volume %s does not exist", id)
	}
	mounted, err := isMountPoint(target)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	if mounted {
		if err := unix.Unmount(target, 0); err != nil {
			return nil, status.Errorf(codes.Internal, "unmount %s: %v", target, err)
		}
	}
	// Remove, not RemoveAll: should the unmount not have taken, this must not
	// delete the volume's data through the mount.
	if err := os.Remove(target); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, status.Errorf(codes.Internal, "remove target: %v", err)
	}
	nv := v.clone()
	delete(nv.Publishes, target)
	// The publish stays recorded until its loop device is gone, so a retry
	// detaches it.
	if nv.Kind == blockVolume {
		if err := detachUnusedLoops(d.store.dataPath(nv), nv.Publishes); err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
	}
	if err := d.store.put(nv); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	klog.InfoS("Unpublished volume", "volumeID", id, "target", target)
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

func publishFilesystem(dir, target string, readOnly bool) error {
	if err := os.MkdirAll(target, 0o750); err != nil {
		return err
	}
	return ensureBindMount(dir, target, readOnly)
}

func publishBlock(disk, target string, readOnly bool) error {
	dev, err := attachLoop(disk, readOnly)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(target), 0o750); err != nil {
		return err
	}
	// A device node can only be bind-mounted onto a file.
	f, err := os.OpenFile(target, os.O_CREATE|os.O_RDONLY, 0o640)
	if err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return ensureBindMount(dev, target, readOnly)
}

// ensureBindMount leaves target alone when something is mounted there: that
// is an earlier publish of this volume, perhaps one that failed before it
// was recorded.
func ensureBindMount(source, target string, readOnly bool) error {
	mounted, err := isMountPoint(target)
	if err != nil || mounted {
		return err
	}
	if err := unix.Mount(source, target, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind-mount %s on %s: %w", source, target, err)
	}
	if !readOnly {
		return nil
	}
	// The kernel ignores MS_RDONLY when creating a bind mount; only a remount
	// applies it.
	if err := unix.Mount("", target, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY, ""); err != nil {
		// A writable mount left here would pass for a finished publish on retry.
		return errors.Join(fmt.Errorf("remount %s read-only: %w", target, err), unix.Unmount(target, 0))
	}
	return nil
}

// mountPathEscapes undoes the octal escapes of /proc/self/mountinfo.
var mountPathEscapes = strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`)

func isMountPoint(path string) (bool, error) {
	// mountinfo shows resolved paths, and kubelet directories may be symlinked.
	if resolved, err := filepath.EvalSymlinks(path); err == nil {
		path = resolved
	}
	points, err := mountPoints()
	return slices.Contains(points, path), err
}

func mountPoints() ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var points []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// Field 5 is the mount point.
		if fields := strings.Fields(sc.Text()); len(fields) > 4 {
			points = append(points, mountPathEscapes.Replace(fields[4]))
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	return points, nil
}

// attachLoop reuses a loop device already backed by disk, so that publishes
// of one volume share one device, and its cache, as they would share a
// disk. Read-only publishes get a read-only device of their own because a
// read-only mount of a device node still lets writes through to the device.
func attachLoop(disk string, readOnly bool) (string, error) {
	devs, err := loopDevices(disk)
	if err != nil {
		return "", err
	}
	for dev, ro := range devs {
		if ro == readOnly {
			return dev, nil
		}
	}
	args := []string{"--find", "--show"}
	if readOnly {
		args = append(args, "--read-only")
	}
	out, err := run("losetup", append(args, disk)...)
	return strings.TrimSpace(out), err
}

// detachUnusedLoops detaches the loop devices of disk that none of the
// remaining publishes (target path → read-only) uses, including any left by
// a publish that failed half-way.
func detachUnusedLoops(disk string, publishes map[string]bool) error {
	used := map[bool]bool{}
	for _, readOnly := range publishes {
		used[readOnly] = true
	}
	devs, err := loopDevices(disk)
	if err != nil {
		return err
	}
	for dev, readOnly := range devs {
		if used[readOnly] {
			continue
		}
		if _, err := run("losetup", "--detach", dev); err != nil {
			return err
		}
	}
	return nil
}

// loopDevices maps the loop devices backed by disk to whether they are
// read-only.
func loopDevices(disk string) (map[string]bool, error) {
	out, err := run("losetup", "--list", "--noheadings", "--raw", "--output", "NAME,RO", "--associated", disk)
	if err != nil {
		return nil, err
	}
	devs := map[string]bool{}
	for line := range strings.Lines(out) {
		if name, ro, ok := strings.Cut(strings.TrimSpace(line), " "); ok {
			devs[name] = ro == "1"
		}
	}
	return devs, nil
}

func run(name string, args ...string) (string, error) {
	var stderr strings.Builder
	cmd := exec.Command(name, args...)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}
