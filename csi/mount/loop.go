package mount

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

const (
	loopControl = "/dev/loop-control"
	loopMajor   = 7
	// attachTries bounds the retries when another process takes the free
	// device LOOP_CTL_GET_FREE handed to us too (it hands it to everyone
	// who asks until someone binds it).
	attachTries = 5
)

// ioctlLoopConfigure is replaced in tests to exercise the pre-5.8 path.
var ioctlLoopConfigure = unix.IoctlLoopConfigure

// AttachLoop attaches file read-only to a free loop device and returns the
// device path (/dev/loopN). tag is stored in the device's lo_file_name so
// FindLoop can find the device again after a restart; the kernel keeps only
// its first LO_NAME_SIZE-1 (63) bytes. The device is not autoclear: it must
// outlive every close by the pod and is freed by DetachLoop alone.
func AttachLoop(file, tag string) (string, error) {
	if tag == "" {
		return "", fmt.Errorf("attach %s: empty loop tag", file)
	}
	// The backing file is opened read-only: the kernel then makes the
	// device read-only whatever the flags say, which is the guarantee on
	// the LOOP_SET_FD path, where LO_FLAGS_READ_ONLY cannot be set.
	fd, err := unix.Open(file, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", fmt.Errorf("open %s: %w", file, err)
	}
	defer unix.Close(fd)
	var lastErr error
	for range attachTries {
		dev, err := freeLoop()
		if err != nil {
			return "", fmt.Errorf("attach %s: %w", file, err)
		}
		lastErr = bindLoop(dev, fd, tag)
		if lastErr == nil {
			return dev, nil
		}
		if !errors.Is(lastErr, unix.EBUSY) {
			return "", fmt.Errorf("attach %s: %w", file, lastErr)
		}
	}
	return "", fmt.Errorf("attach %s: loop devices kept being taken, %d tries: %w", file, attachTries, lastErr)
}

// freeLoop asks the kernel for a free loop device (allocating one if need
// be) and returns its path, making the node when /dev has none, as in a
// container whose /dev was populated before the device existed.
func freeLoop() (string, error) {
	ctl, err := unix.Open(loopControl, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", fmt.Errorf("open %s: %w", loopControl, err)
	}
	defer unix.Close(ctl)
	n, err := unix.IoctlRetInt(ctl, unix.LOOP_CTL_GET_FREE)
	if err != nil {
		return "", fmt.Errorf("get free loop device from %s: %w", loopControl, err)
	}
	dev := fmt.Sprintf("/dev/loop%d", n)
	if err := ensureNode(dev, n); err != nil {
		return "", err
	}
	return dev, nil
}

func ensureNode(dev string, n int) error {
	if _, err := os.Stat(dev); !errors.Is(err, os.ErrNotExist) {
		return err
	}
	rdev := loopDevNumber(n)
	err := unix.Mknod(dev, unix.S_IFBLK|0o660, int(rdev))
	if err != nil && !errors.Is(err, unix.EEXIST) { // EEXIST: udev was faster
		return fmt.Errorf("mknod %s: %w", dev, err)
	}
	return nil
}

// loopDevNumber is loopN's device number. sysfs has it; minor N is only
// right when the loop driver reserves no minors for partitions (max_part=0).
func loopDevNumber(n int) uint64 {
	data, err := os.ReadFile(fmt.Sprintf("/sys/block/loop%d/dev", n))
	var major, minor uint32
	if err == nil {
		if _, err := fmt.Sscanf(string(data), "%d:%d", &major, &minor); err == nil {
			return unix.Mkdev(major, minor)
		}
	}
	return unix.Mkdev(loopMajor, uint32(n))
}

// bindLoop binds the backing fd to dev with LOOP_CONFIGURE, in one step, or
// on kernels before 5.8 (EINVAL, ENOTTY) with LOOP_SET_FD and then
// LOOP_SET_STATUS64. EBUSY means dev was taken meanwhile.
func bindLoop(dev string, fd int, tag string) error {
	lfd, err := unix.Open(dev, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", dev, err)
	}
	defer unix.Close(lfd)
	info := loopInfo(tag)
	err = ioctlLoopConfigure(lfd, &unix.LoopConfig{Fd: uint32(fd), Info: info})
	if !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOTTY) {
		return wrapErr(err, "LOOP_CONFIGURE "+dev)
	}
	klog.V(2).InfoS("LOOP_CONFIGURE unsupported, falling back to LOOP_SET_FD", "device", dev, "err", err)
	if err := unix.IoctlSetInt(lfd, unix.LOOP_SET_FD, fd); err != nil {
		return fmt.Errorf("LOOP_SET_FD %s: %w", dev, err)
	}
	if err := unix.IoctlLoopSetStatus64(lfd, &info); err != nil {
		err = fmt.Errorf("LOOP_SET_STATUS64 %s: %w", dev, err)
		// Unnamed, the device could never be found again: give it back.
		if cerr := unix.IoctlSetInt(lfd, unix.LOOP_CLR_FD, 0); cerr != nil {
			return errors.Join(err, fmt.Errorf("LOOP_CLR_FD %s: %w", dev, cerr))
		}
		return err
	}
	return nil
}

func loopInfo(tag string) unix.LoopInfo64 {
	info := unix.LoopInfo64{Flags: unix.LO_FLAGS_READ_ONLY}
	copy(info.File_name[:unix.LO_NAME_SIZE-1], tag)
	return info
}

// storedTag is tag as the kernel keeps it in lo_file_name.
func storedTag(tag string) string {
	info := loopInfo(tag)
	return cString(info.File_name[:])
}

// FindLoop returns the loop devices whose lo_file_name is tag (as
// truncated by AttachLoop). sysfs's backing_file shows the backing path,
// not the tag, so every /dev/loopN is asked with LOOP_GET_STATUS64.
func FindLoop(tag string) ([]string, error) {
	if tag == "" {
		return nil, errors.New("find loop device: empty tag")
	}
	devs, err := filepath.Glob("/dev/loop[0-9]*")
	if err != nil {
		return nil, fmt.Errorf("list loop devices: %w", err)
	}
	want := storedTag(tag)
	var found []string
	for _, dev := range devs {
		name, bound, err := loopName(dev)
		if err != nil {
			return nil, err
		}
		if bound && name == want {
			found = append(found, dev)
		}
	}
	return found, nil
}

// loopName returns dev's lo_file_name, and whether dev is bound at all
// (a free device answers ENXIO; a node gone since the listing is free too).
func loopName(dev string) (name string, bound bool, err error) {
	fd, err := unix.Open(dev, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENXIO) {
		return "", false, nil
	}
	if err != nil {
		return "", false, fmt.Errorf("open %s: %w", dev, err)
	}
	defer unix.Close(fd)
	info, err := unix.IoctlLoopGetStatus64(fd)
	if errors.Is(err, unix.ENXIO) {
		return "", false, nil
	}
	if err != nil {
		return "", false, fmt.Errorf("LOOP_GET_STATUS64 %s: %w", dev, err)
	}
	return cString(info.File_name[:]), true, nil
}

// DetachLoop detaches dev from its backing file if dev still carries tag.
// Device numbers are reused as soon as a device is free, so a path alone
// may by now name another process's device: the tag is checked on the same
// open file the detach goes through. A free device (ENXIO), or one bound
// under another tag, is left as it is. While anything else holds dev open
// the kernel defers the detach to the last close, so the device may linger
// briefly.
func DetachLoop(dev, tag string) error {
	if tag == "" {
		return fmt.Errorf("detach %s: empty loop tag", dev)
	}
	fd, err := unix.Open(dev, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENXIO) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("open %s: %w", dev, err)
	}
	defer unix.Close(fd)
	info, err := unix.IoctlLoopGetStatus64(fd)
	if errors.Is(err, unix.ENXIO) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("LOOP_GET_STATUS64 %s: %w", dev, err)
	}
	if name := cString(info.File_name[:]); name != storedTag(tag) {
		klog.V(2).InfoS("Loop device carries another tag; not detaching it", "device", dev, "tag", name, "want", storedTag(tag))
		return nil
	}
	err = unix.IoctlSetInt(fd, unix.LOOP_CLR_FD, 0)
	if errors.Is(err, unix.ENXIO) {
		return nil
	}
	return wrapErr(err, "LOOP_CLR_FD "+dev)
}

func cString(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

func wrapErr(err error, what string) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("%s: %w", what, err)
}
