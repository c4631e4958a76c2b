package sink

import (
	"errors"
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// openBlock opens a block device for writing, exclusively, and checks that
// it can hold size bytes.
func openBlock(path string, size int64) (Target, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.EBUSY) {
		return nil, fmt.Errorf("sink: %s is in use (mounted, or held by another program): %w", path, err)
	}
	if err != nil {
		return nil, fmt.Errorf("sink: %w", err)
	}
	t, err := blockTarget(f, path, size)
	if err != nil {
		f.Close()
		return nil, err
	}
	return t, nil
}

func blockTarget(f *os.File, path string, size int64) (*fileTarget, error) {
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("sink: %w", err)
	}
	if fi.Mode()&os.ModeDevice == 0 || fi.Mode()&os.ModeCharDevice != 0 {
		return nil, fmt.Errorf("sink: %s is no longer a block device", path)
	}
	var devSize uint64
	var lbs int
	err = control(f, func(fd uintptr) error {
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, fd, unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&devSize))); e != 0 {
			return fmt.Errorf("BLKGETSIZE64: %w", e)
		}
		var err error
		if lbs, err = unix.IoctlGetInt(int(fd), unix.BLKSSZGET); err != nil {
			return fmt.Errorf("BLKSSZGET: %w", err)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("sink: sizing block device %s: %w", path, err)
	}
	if devSize > 1<<62 || lbs < 512 || lbs > 1<<16 || lbs&(lbs-1) != 0 {
		return nil, fmt.Errorf("sink: block device %s reports an implausible geometry (%d bytes, %d-byte sectors)", path, devSize, lbs)
	}
	if int64(devSize) < size {
		return nil, fmt.Errorf("sink: block device %s is %d bytes, smaller than the %d bytes the disk needs", path, devSize, size)
	}
	return &fileTarget{f: f, path: path, size: int64(devSize), block: true, lbs: int64(lbs)}, nil
}

// control runs fn on f's descriptor without detaching it from the runtime.
func control(f *os.File, fn func(fd uintptr) error) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = fn(fd) }); err != nil {
		return err
	}
	return ferr
}

// unsupported tells the errors that mean "this target cannot do that" from
// real failures.
func unsupported(err error) bool {
	return errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) ||
		errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOTTY)
}

// punchHole deallocates [off, off+n) of a regular file, keeping its size;
// the range then reads as zeros.
func punchHole(f *os.File, off, n int64) error {
	err := control(f, func(fd uintptr) error {
		return unix.Fallocate(int(fd), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	})
	if unsupported(err) {
		return errUnsupported
	}
	return err
}

// zeroOut issues BLKZEROOUT for [off, off+n), both aligned to the logical
// block size.
func zeroOut(f *os.File, off, n int64) error {
	r := [2]uint64{uint64(off), uint64(n)}
	err := control(f, func(fd uintptr) error {
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, fd, unix.BLKZEROOUT, uintptr(unsafe.Pointer(&r))); e != 0 {
			return e
		}
		return nil
	})
	if unsupported(err) {
		return errUnsupported
	}
	return err
}
