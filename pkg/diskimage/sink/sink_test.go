package sink

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

const mib = 1 << 20

// blocks returns the 512-byte blocks a file has allocated.
func blocks(t *testing.T, path string) int64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Blocks
}

func readAll(t *testing.T, path string, n int64) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

func fill(n int, c byte) []byte { return bytes.Repeat([]byte{c}, n) }

func TestRegularFile(t *testing.T) {
	for _, noPunch := range []bool{false, true} {
		name := "punch"
		if noPunch {
			name = "write-zeros"
		}
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "disk.raw")
			// An old file with content everywhere: Open must discard it.
			if err := os.WriteFile(path, fill(12*mib, 0xee), 0o644); err != nil {
				t.Fatal(err)
			}
			const size = 8*mib + 1234
			tg, err := Open(path, size)
			if err != nil {
				t.Fatal(err)
			}
			defer tg.Close()
			tg.(*fileTarget).noFastZero.Store(noPunch)
			if tg.Size() != size {
				t.Fatalf("Size() = %d, want %d", tg.Size(), size)
			}
			if b := blocks(t, path); b != 0 {
				t.Fatalf("fresh target has %d blocks allocated, want a hole", b)
			}
			// Zeroing a fresh file is free: it stays a hole.
			if err := tg.Zero(0, size); err != nil {
				t.Fatal(err)
			}
			if b := blocks(t, path); b != 0 {
				t.Fatalf("after Zero on a fresh file: %d blocks, want 0", b)
			}

			want := make([]byte, size)
			write := func(off int64, p []byte) {
				t.Helper()
				if n, err := tg.WriteAt(p, off); err != nil || n != len(p) {
					t.Fatalf("WriteAt(%d bytes, %d) = %d, %v", len(p), off, n, err)
				}
				copy(want[off:], p)
			}
			zero := func(off, n int64) {
				t.Helper()
				if err := tg.Zero(off, n); err != nil {
					t.Fatal(err)
				}
				clear(want[off : off+n])
			}
			write(0, fill(mib, 1))
			write(3*mib, fill(2*mib, 2))
			write(size-10, fill(10, 3)) // the very end
			written := blocks(t, path)
			zero(6*mib, mib)      // never written: stays a hole
			zero(3*mib+4096, mib) // written, aligned: hole punched
			zero(100, 1000)       // written, inside one block
			zero(mib-7, 3*mib)    // spans written and unwritten
			zero(size-3, 3)       // the tail
			if err := tg.Sync(); err != nil {
				t.Fatal(err)
			}
			if got := readAll(t, path, size); !bytes.Equal(got, want) {
				t.Fatal("content differs from what was written and zeroed")
			}
			fi, _ := os.Stat(path)
			if fi.Size() != size {
				t.Fatalf("file is %d bytes, want %d", fi.Size(), size)
			}
			after := blocks(t, path)
			t.Logf("blocks: %d after writes, %d after zeroing", written, after)
			if !noPunch && after >= written {
				t.Fatalf("punching holes freed nothing: %d blocks before, %d after", written, after)
			}
			if !noPunch && after > (4*mib+8192)/512 {
				t.Fatalf("%d blocks allocated for at most 4 MiB of data", after)
			}
		})
	}
}

func TestBounds(t *testing.T) {
	path := filepath.Join(t.TempDir(), "disk.raw")
	tg, err := Open(path, mib)
	if err != nil {
		t.Fatal(err)
	}
	defer tg.Close()
	mem := FromWriterAt(&memWriter{b: make([]byte, mib)}, mib)
	for name, tg := range map[string]Target{"file": tg, "writerat": mem} {
		for _, c := range []struct {
			off int64
			n   int
		}{{mib - 1, 2}, {mib, 1}, {-1, 1}, {1 << 62, 1}, {mib + 4096, 0}} {
			if _, err := tg.WriteAt(make([]byte, c.n), c.off); err == nil || !strings.Contains(err.Error(), "refusing to write") {
				t.Errorf("%s: WriteAt(%d bytes, %d): err=%v, want a refusal", name, c.n, c.off, err)
			}
			if err := tg.Zero(c.off, int64(c.n)+1); err == nil {
				t.Errorf("%s: Zero(%d, %d) past the end succeeded", name, c.off, c.n+1)
			}
		}
		if err := tg.Zero(0, -1); err == nil {
			t.Errorf("%s: Zero with a negative length succeeded", name)
		}
		if _, err := tg.WriteAt([]byte{1}, mib-1); err != nil {
			t.Errorf("%s: writing the last byte: %v", name, err)
		}
	}
	if fi, _ := os.Stat(path); fi.Size() != mib {
		t.Fatalf("file grew to %d bytes", fi.Size())
	}
}

func TestOpenRefuses(t *testing.T) {
	dir := t.TempDir()
	if _, err := Open(dir, mib); err == nil || !strings.Contains(err.Error(), "neither a regular file nor a block device") {
		t.Errorf("directory: err=%v", err)
	}
	if _, err := Open("/dev/null", mib); err == nil {
		t.Errorf("character device: no error")
	}
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err == nil {
		if _, err := Open(fifo, mib); err == nil {
			t.Errorf("fifo: no error")
		}
	}
	if _, err := Open(filepath.Join(dir, "no", "such", "dir"), mib); err == nil {
		t.Errorf("missing directory: no error")
	}
	if _, err := Open(filepath.Join(dir, "x"), -2); err == nil {
		t.Errorf("negative size: no error")
	}
}

// TestOpenUnknownSizeGrows covers raw streams whose length is known only at
// their end: the file takes writes anywhere, then Truncate fixes its size.
func TestOpenUnknownSizeGrows(t *testing.T) {
	p := filepath.Join(t.TempDir(), "grow.raw")
	tg, err := Open(p, Unknown)
	if err != nil {
		t.Fatal(err)
	}
	defer tg.Close()
	if _, err := tg.WriteAt([]byte("tail"), 5*mib); err != nil {
		t.Fatal(err)
	}
	if err := tg.(Truncater).Truncate(6 * mib); err != nil {
		t.Fatal(err)
	}
	if tg.Size() != 6*mib {
		t.Fatalf("size %d after Truncate, want %d", tg.Size(), 6*mib)
	}
	if _, err := tg.WriteAt([]byte("x"), 6*mib); err == nil {
		t.Fatal("write past the fixed size accepted")
	}
	if err := tg.Zero(0, 5*mib); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(b)) != 6*mib || string(b[5*mib:5*mib+4]) != "tail" {
		t.Fatalf("file is %d bytes with %q at 5 MiB", len(b), b[5*mib:5*mib+4])
	}
}

// memWriter is an in-memory io.WriterAt.
type memWriter struct {
	b              []byte
	synced, closed bool
}

func (m *memWriter) WriteAt(p []byte, off int64) (int, error) { return copy(m.b[off:], p), nil }
func (m *memWriter) Sync() error                              { m.synced = true; return nil }
func (m *memWriter) Close() error                             { m.closed = true; return nil }

// zeroingWriter also zeroes by itself.
type zeroingWriter struct {
	memWriter
	zeroed [][2]int64
}

func (z *zeroingWriter) Zero(off, n int64) error {
	z.zeroed = append(z.zeroed, [2]int64{off, n})
	clear(z.b[off : off+n])
	return nil
}

func TestFromWriterAt(t *testing.T) {
	m := &memWriter{b: fill(3*mib, 0xff)}
	tg := FromWriterAt(m, 3*mib)
	if tg.Size() != 3*mib {
		t.Fatalf("Size() = %d", tg.Size())
	}
	if err := tg.Zero(5, 2*mib+3); err != nil { // several 256 KiB pieces
		t.Fatal(err)
	}
	want := fill(3*mib, 0xff)
	clear(want[5 : 5+2*mib+3])
	if !bytes.Equal(m.b, want) {
		t.Fatal("Zero did not write zeros over exactly the range")
	}
	if tg.Sync() != nil || tg.Close() != nil || !m.synced || !m.closed {
		t.Fatal("Sync and Close are not passed on")
	}

	z := &zeroingWriter{memWriter: memWriter{b: fill(mib, 0xff)}}
	if err := FromWriterAt(z, mib).Zero(10, 20); err != nil {
		t.Fatal(err)
	}
	if len(z.zeroed) != 1 || z.zeroed[0] != [2]int64{10, 20} {
		t.Fatalf("the writer's own Zero was not used: %v", z.zeroed)
	}
}

// loopDevice attaches a loop device to a file of size bytes filled with
// 0xff and returns both paths. It needs root and losetup: without them it
// skips outside CI and fails in CI.
func loopDevice(t *testing.T, size int64) (dev, backing string) {
	t.Helper()
	skip := func(format string, args ...any) {
		t.Helper()
		if os.Getenv("CI") == "true" {
			t.Fatalf("block device test cannot run in CI: "+format, args...)
		}
		t.Skipf("skipping block device test: "+format, args...)
	}
	if os.Geteuid() != 0 {
		skip("needs root for losetup")
	}
	if _, err := exec.LookPath("losetup"); err != nil {
		skip("losetup is not installed (Debian package mount)")
	}
	backing = filepath.Join(t.TempDir(), "backing.img")
	if err := os.WriteFile(backing, fill(int(size), 0xff), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("losetup", "-f", "--show", backing).CombinedOutput()
	if err != nil {
		skip("no loop device available: losetup: %v: %s", err, out)
	}
	dev = strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup -d %s: %v: %s", dev, err, out)
		}
	})
	return dev, backing
}

func TestBlockDevice(t *testing.T) {
	const size = 8 * mib
	dev, backing := loopDevice(t, size)

	// Too small for the disk: refused, saying both sizes.
	_, err := Open(dev, size+512)
	if err == nil || !strings.Contains(err.Error(), "is 8388608 bytes, smaller than the 8389120 bytes the disk needs") {
		t.Fatalf("too small: err=%v", err)
	}

	for _, noZeroout := range []bool{false, true} {
		tg, err := Open(dev, 4*mib) // a smaller disk fits; Size is the device's
		if err != nil {
			t.Fatal(err)
		}
		ft := tg.(*fileTarget)
		ft.noFastZero.Store(noZeroout)
		if tg.Size() != size {
			t.Fatalf("Size() = %d, want the device's %d", tg.Size(), size)
		}
		// A second exclusive open is refused while the first is live.
		if _, err := Open(dev, mib); err == nil || !strings.Contains(err.Error(), "in use") {
			t.Errorf("second open: err=%v, want 'in use'", err)
		}

		want := fill(size, 0xff)
		zero := func(off, n int64) {
			t.Helper()
			if err := tg.Zero(off, n); err != nil {
				t.Fatal(err)
			}
			clear(want[off : off+n])
		}
		zero(0, mib)          // aligned: BLKZEROOUT
		zero(2*mib+100, mib)  // unaligned at both ends
		zero(4*mib+7, 300)    // inside one sector
		zero(6*mib-512, 512)  // exactly one sector
		zero(size-1000, 1000) // the end of the device
		if _, err := tg.WriteAt(fill(700, 5), 5*mib+1); err != nil {
			t.Fatal(err)
		}
		copy(want[5*mib+1:], fill(700, 5))
		if _, err := tg.WriteAt([]byte{1, 2}, size-1); err == nil {
			t.Fatal("a write across the end of the device succeeded")
		}
		if err := tg.Sync(); err != nil {
			t.Fatal(err)
		}
		if !noZeroout && ft.noFastZero.Load() {
			t.Error("BLKZEROOUT was refused by a loop device; it should work there")
		}
		if got := readAll(t, dev, size); !bytes.Equal(got, want) {
			t.Fatalf("noZeroout=%v: device content differs", noZeroout)
		}
		if err := tg.Close(); err != nil {
			t.Fatal(err)
		}
		if got := readAll(t, backing, size); !bytes.Equal(got, want) {
			t.Fatalf("noZeroout=%v: backing file content differs after Sync", noZeroout)
		}
		// Refill for the next round.
		f, err := os.OpenFile(dev, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteAt(fill(size, 0xff), 0); err != nil {
			t.Fatal(err)
		}
		f.Sync()
		f.Close()
	}
	if _, err := os.Stat(backing); errors.Is(err, os.ErrNotExist) {
		t.Fatal("backing file vanished")
	}
}
