// Package benchfile makes and compares the input files of the benchmark
// commands.
package benchfile

import (
	"context"
	"fmt"
	mrand "math/rand/v2"
	"os"
	"os/exec"
)

// Random writes size pseudo-random bytes to path (incompressible, with no
// zero chunks: the worst case for every layer, and nothing a sparse writer
// may skip) unless a file of that size is already there. The bytes are
// the same on every run.
func Random(ctx context.Context, path string, size int64) error {
	if st, err := os.Stat(path); err == nil && st.Size() == size {
		return nil
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	rng := mrand.NewChaCha8([32]byte{1})
	buf := make([]byte, 4<<20)
	for left := size; left > 0; left -= int64(len(buf)) {
		if err := ctx.Err(); err != nil {
			return err
		}
		b := buf[:min(int64(len(buf)), left)]
		rng.Read(b)
		if _, err := f.Write(b); err != nil {
			return err
		}
	}
	return f.Close()
}

// Same checks with cmp(1) that the files a and b hold the same bytes.
func Same(a, b string) error {
	out, err := exec.Command("cmp", a, b).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s differs from %s: %v: %s", b, a, err, out)
	}
	return nil
}
