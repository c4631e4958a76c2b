// Package testimg makes real disk images for tests (of this module only) with Debian's qemu-img,
// so that no opaque binary is checked in and every format variant comes from
// the reference implementation.
package testimg

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// Require returns the path of tool, or skips the test with a reason. In CI
// (CI=true) a missing tool fails the test instead: nothing may skip there.
func Require(t testing.TB, tool string) string {
	t.Helper()
	p, err := exec.LookPath(tool)
	if err == nil {
		return p
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("%s is required in CI (install it in .ci/run): %v", tool, err)
	}
	t.Skipf("skipping: %s is not installed (Debian package qemu-utils / xz-utils / zstd)", tool)
	return ""
}

// Run runs a command and fails the test with its output if it fails.
func Run(t testing.TB, name string, args ...string) []byte {
	t.Helper()
	Require(t, name)
	cmd := exec.Command(name, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out.String())
	}
	return out.Bytes()
}

// QemuImg runs qemu-img with args.
func QemuImg(t testing.TB, args ...string) []byte {
	t.Helper()
	return Run(t, "qemu-img", args...)
}

// Pattern writes a raw disk of size bytes to path with content a converter
// can get wrong: runs of zeros (whole clusters and partial ones), compressible
// text, incompressible noise, and data in the very last sector. seed makes
// it reproducible.
func Pattern(t testing.TB, path string, size int64, seed uint64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	const piece = 48 << 10 // not a power of two: pieces straddle clusters
	buf := make([]byte, piece)
	for off := int64(0); off < size; off += piece {
		n := int64(piece)
		if off+n > size {
			n = size - off
		}
		switch r.IntN(5) {
		case 0, 1: // leave a hole
			continue
		case 2: // compressible text
			line := []byte("vimg test pattern line at offset ")
			for i := range buf[:n] {
				buf[i] = line[(int64(i)+off)%int64(len(line))]
			}
		case 3: // noise
			for i := range buf[:n] {
				buf[i] = byte(r.Uint32())
			}
		case 4: // mostly zero with a few bytes set
			clear(buf[:n])
			for i := 0; i < 8; i++ {
				buf[r.IntN(int(n))] = byte(i + 1)
			}
		}
		if _, err := f.WriteAt(buf[:n], off); err != nil {
			t.Fatal(err)
		}
	}
	// Data in the last sector, so a converter that drops the tail is caught.
	tail := []byte("end-of-disk")
	if size >= int64(len(tail)) {
		if _, err := f.WriteAt(tail, size-int64(len(tail))); err != nil {
			t.Fatal(err)
		}
	}
}

// RawOf converts src to raw with qemu-img and returns the path of the result:
// the reference every reader is compared with.
func RawOf(t testing.TB, src string) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), filepath.Base(src)+".ref.raw")
	QemuImg(t, "convert", "-O", "raw", src, dst)
	return dst
}

// SHA256File returns the hex sha256 of a file.
func SHA256File(t testing.TB, path string) string {
	t.Helper()
	return SHA256Prefix(t, path, -1)
}

// SHA256Prefix returns the hex sha256 of the first n bytes of a file (all
// of it for n < 0).
func SHA256Prefix(t testing.TB, path string, n int64) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	var r io.Reader = f
	if n >= 0 {
		r = io.LimitReader(f, n)
	}
	if m, err := io.Copy(h, r); err != nil || (n >= 0 && m != n) {
		t.Fatalf("reading %s: %d bytes, %v", path, m, err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// SameContent fails the test unless the two files have the same size and bytes.
func SameContent(t testing.TB, want, got string) {
	t.Helper()
	wi, err := os.Stat(want)
	if err != nil {
		t.Fatal(err)
	}
	gi, err := os.Stat(got)
	if err != nil {
		t.Fatal(err)
	}
	if wi.Size() != gi.Size() {
		t.Fatalf("size: got %d bytes, want %d (%s vs %s)", gi.Size(), wi.Size(), got, want)
	}
	if w, g := SHA256File(t, want), SHA256File(t, got); w != g {
		t.Fatalf("content differs: sha256 %s, want %s (%s vs %s)", g, w, got, want)
	}
}

// RequireFile returns path if it exists, else skips (fails in CI) naming the
// Debian package that provides it.
func RequireFile(t testing.TB, path, pkg string) string {
	t.Helper()
	if _, err := os.Stat(path); err == nil {
		return path
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("%s is required in CI (Debian package %s; install it in .ci/run)", path, pkg)
	}
	t.Skipf("skipping: %s is missing (Debian package %s)", path, pkg)
	return ""
}

// Open opens path for reading until the test ends and returns it with its size.
func Open(t testing.TB, path string) (*os.File, int64) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	return f, st.Size()
}
