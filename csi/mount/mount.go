// Package mount is the small OS layer the CSI node driver needs to publish
// cached disk images into pods: read-only bind mounts, and read-only loop
// devices for Block volumes. Everything is done with syscalls and ioctls,
// never by running mount(8) or losetup(8), so the driver image needs no
// util-linux and errors carry the kernel's errno.
package mount

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

const mountInfoPath = "/proc/self/mountinfo"

// BindReadOnly bind-mounts src (a directory, a file or a device node) onto
// target read-only, nosuid, noexec and, unless src is a block device node,
// nodev. It is idempotent: a target already bind-mounted read-only from src
// is left alone, so a retried publish succeeds.
//
// The mount is made read-only before it is attached (open_tree, then
// mount_setattr, then move_mount), for two reasons. The node plugin runs in
// a container whose kubelet directory has Bidirectional propagation: only
// the attach propagates to the host, a later read-only remount does not,
// so a bind-then-remount leaves the kubelet's copy writable. And there is
// no moment at which the target is writable. Kernels before 5.12 (ENOSYS)
// get bind-then-remount, which is right only without propagation.
func BindReadOnly(src, target string) error {
	same, err := sameFile(src, target)
	if err != nil {
		return err
	}
	mounted, readOnly, err := MountInfo(target)
	if err != nil {
		return err
	}
	switch {
	case mounted && same && readOnly:
		return nil
	case mounted && !same:
		return fmt.Errorf("bind %s onto %s: target is already a mount point of something else", src, target)
	case mounted:
		// Left writable by an attempt that died between bind and remount:
		// made again, since a remount would not reach the propagated copies.
		if err := Unmount(target); err != nil {
			return err
		}
	}
	err = attachReadOnly(src, target)
	if !errors.Is(err, unix.ENOSYS) {
		return err
	}
	if err := unix.Mount(src, target, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind %s onto %s: %w", src, target, err)
	}
	return remountReadOnly(src, target)
}

// attachReadOnly clones src as a detached mount, makes it read-only (and
// nosuid, noexec, nodev but for block devices), then attaches it at target.
func attachReadOnly(src, target string) error {
	flags, err := bindFlags(src)
	if err != nil {
		return err
	}
	attr := uint64(unix.MOUNT_ATTR_RDONLY | unix.MOUNT_ATTR_NOSUID | unix.MOUNT_ATTR_NOEXEC)
	if flags&unix.MS_NODEV != 0 {
		attr |= unix.MOUNT_ATTR_NODEV
	}
	fd, err := unix.OpenTree(unix.AT_FDCWD, src, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC)
	if err != nil {
		return fmt.Errorf("open_tree %s: %w", src, err)
	}
	defer unix.Close(fd)
	if err := unix.MountSetattr(fd, "", unix.AT_EMPTY_PATH, &unix.MountAttr{Attr_set: attr}); err != nil {
		return fmt.Errorf("mount_setattr on the clone of %s: %w", src, err)
	}
	if err := unix.MoveMount(fd, "", unix.AT_FDCWD, target, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return fmt.Errorf("move_mount of %s onto %s: %w", src, target, err)
	}
	return nil
}

// remountReadOnly applies the per-mount flags to the bind at target. The
// kernel ignores everything but MS_BIND (and MS_REC) on the first bind
// mount, so read-only and friends take a second, remount step. A bind that
// cannot be made read-only must not stay: it would expose the cache
// writable to the pod.
func remountReadOnly(src, target string) error {
	flags, err := bindFlags(src)
	if err != nil {
		return err
	}
	err = unix.Mount("", target, "", unix.MS_BIND|unix.MS_REMOUNT|flags, "")
	if err == nil {
		return nil
	}
	err = fmt.Errorf("remount bind of %s on %s read-only: %w", src, target, err)
	if uerr := unix.Unmount(target, 0); uerr != nil {
		return errors.Join(err, fmt.Errorf("undo bind on %s: %w", target, uerr))
	}
	return err
}

// bindFlags are the remount flags for a bind of src. nodev is left off for
// a block device node: nodev applies to the mount the node is reached
// through, so it would make the published device unopenable by the pod.
func bindFlags(src string) (uintptr, error) {
	var st unix.Stat_t
	if err := unix.Stat(src, &st); err != nil {
		return 0, fmt.Errorf("stat %s: %w", src, err)
	}
	flags := uintptr(unix.MS_RDONLY | unix.MS_NOSUID | unix.MS_NOEXEC)
	if st.Mode&unix.S_IFMT != unix.S_IFBLK {
		flags |= unix.MS_NODEV
	}
	return flags, nil
}

// sameFile reports whether a and b are the same inode, which is how a bind
// mount of a onto b looks from outside.
func sameFile(a, b string) (bool, error) {
	var sa, sb unix.Stat_t
	if err := unix.Stat(a, &sa); err != nil {
		return false, fmt.Errorf("stat %s: %w", a, err)
	}
	if err := unix.Stat(b, &sb); err != nil {
		return false, fmt.Errorf("stat %s: %w", b, err)
	}
	return sa.Dev == sb.Dev && sa.Ino == sb.Ino, nil
}

// Unmount unmounts target, once and not lazily: a busy mount should fail
// loudly rather than linger detached. A target that is not a mount point
// (EINVAL) or does not exist is already unmounted.
func Unmount(target string) error {
	err := unix.Unmount(target, 0)
	if err == nil || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
		return nil
	}
	return fmt.Errorf("unmount %s: %w", target, err)
}

// MountInfo reports whether path is a mount point and, if so, whether its
// topmost mount is read-only, from /proc/self/mountinfo. Symlinks in path are
// resolved first, since mountinfo lists resolved paths. A path that does not
// exist is not mounted.
func MountInfo(path string) (mounted, readOnly bool, err error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return false, false, fmt.Errorf("resolve %s: %w", path, err)
	}
	resolved, err := filepath.EvalSymlinks(abs)
	if errors.Is(err, fs.ErrNotExist) {
		return false, false, nil
	}
	if err != nil {
		return false, false, fmt.Errorf("resolve %s: %w", path, err)
	}
	data, err := os.ReadFile(mountInfoPath)
	if err != nil {
		return false, false, fmt.Errorf("read %s: %w", mountInfoPath, err)
	}
	return findMount(data, resolved)
}

// findMount looks for mountPoint in mountinfo text. Mounts stacked on the
// same point are listed bottom first, so the last match is the one seen.
func findMount(data []byte, mountPoint string) (mounted, readOnly bool, err error) {
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		// id parent major:minor root mount-point options [optional...] - ...
		fields := strings.Fields(sc.Text())
		if len(fields) < 6 {
			return false, false, fmt.Errorf("parse %s: short line %q", mountInfoPath, sc.Text())
		}
		if unescapeOctal(fields[4]) != mountPoint {
			continue
		}
		mounted = true
		readOnly = hasOption(fields[5], "ro")
	}
	if err := sc.Err(); err != nil {
		return false, false, fmt.Errorf("read %s: %w", mountInfoPath, err)
	}
	return mounted, readOnly, nil
}

func hasOption(options, opt string) bool {
	for o := range strings.SplitSeq(options, ",") {
		if o == opt {
			return true
		}
	}
	return false
}

// unescapeOctal undoes the kernel's \ooo escaping of space, tab, newline
// and backslash in mountinfo paths.
func unescapeOctal(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) && isOctal(s[i+1]) && isOctal(s[i+2]) && isOctal(s[i+3]) {
			b.WriteByte((s[i+1]-'0')<<6 | (s[i+2]-'0')<<3 | (s[i+3] - '0'))
			i += 3
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isOctal(c byte) bool { return c >= '0' && c <= '7' }
