package testcsi

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"

	"golang.org/x/sys/unix"
)

// copyTree copies src to dst, which must not exist, keeping the mode and
// owner of every entry: a clone must look to its pod like the source did.
// Only regular files, directories and symlinks are copied, since nothing
// else belongs in a volume's data.
func copyTree(dst, src string) error {
	fi, err := os.Lstat(src)
	if err != nil {
		return err
	}
	switch fi.Mode().Type() {
	case 0:
		err = copySparse(dst, src)
	case fs.ModeDir:
		err = copyDir(dst, src)
	case fs.ModeSymlink:
		var target string
		if target, err = os.Readlink(src); err == nil {
			err = os.Symlink(target, dst)
		}
	default:
		return fmt.Errorf("copy %s: cannot copy a file of type %s", src, fi.Mode().Type())
	}
	if err != nil {
		return err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Errorf("copy %s: no owner in file info", src)
	}
	// Chown before chmod: chown clears the setuid and setgid bits.
	if err := os.Lchown(dst, int(st.Uid), int(st.Gid)); err != nil {
		return err
	}
	if fi.Mode().Type() == fs.ModeSymlink {
		return nil // Linux has no symlink modes
	}
	return os.Chmod(dst, fi.Mode()&(fs.ModePerm|fs.ModeSetuid|fs.ModeSetgid|fs.ModeSticky))
}

// copyDir leaves the directory's final mode to copyTree, which sets it once
// the entries are in: a read-only source directory must still be filled.
func copyDir(dst, src string) error {
	entries, err := os.ReadDir(src)
	if err != nil {
		return err
	}
	if err := os.Mkdir(dst, 0o700); err != nil {
		return err
	}
	for _, e := range entries {
		if err := copyTree(filepath.Join(dst, e.Name()), filepath.Join(src, e.Name())); err != nil {
			return err
		}
	}
	return nil
}

// copySparse copies the regular file src to dst, which must not exist,
// writing only src's data extents: holes stay holes, so a mostly empty disk
// image costs no more disk in the copy than in the source.
func copySparse(dst, src string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	err = copyExtents(out, in, fi.Size())
	if err == nil {
		// A trailing hole has no extent to write: only the size makes it.
		err = out.Truncate(fi.Size())
	}
	return errors.Join(err, out.Close())
}

func copyExtents(out, in *os.File, size int64) error {
	fd := int(in.Fd())
	buf := make([]byte, 1<<20)
	for off := int64(0); off < size; {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			return nil // nothing but a hole from off on
		}
		if err != nil {
			return fmt.Errorf("seek data in %s: %w", in.Name(), err)
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return fmt.Errorf("seek hole in %s: %w", in.Name(), err)
		}
		// Reads and writes at explicit offsets ignore where the seeks left
		// the file offset.
		if _, err := io.CopyBuffer(io.NewOffsetWriter(out, data), io.NewSectionReader(in, data, hole-data), buf); err != nil {
			return fmt.Errorf("copy %s: %w", in.Name(), err)
		}
		off = hole
	}
	return nil
}
