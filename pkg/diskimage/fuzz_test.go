package diskimage_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"vimg.dev/vimg/pkg/diskimage"
	"vimg.dev/vimg/pkg/diskimage/sink"
	"vimg.dev/vimg/pkg/diskimage/source"
	"vimg.dev/vimg/pkg/diskimage/testimg"
)

// memTarget is a bounded in-memory disk.
type memTarget struct{ buf []byte }

func (m *memTarget) WriteAt(p []byte, off int64) (int, error) { return copy(m.buf[off:], p), nil }

// FuzzConvert feeds arbitrary bytes through detection and every reader, on
// both paths (random access and one pass): nothing may panic, hang or write
// outside the target.
func FuzzConvert(f *testing.F) {
	dir := f.TempDir()
	raw := filepath.Join(dir, "seed.raw")
	testimg.Pattern(f, raw, 256<<10+512, 7)
	seeds := []string{raw}
	for _, args := range [][]string{
		{"qcow2"}, {"qcow2", "-c"}, {"qcow2", "-o", "compat=0.10,cluster_size=4096"},
		{"vmdk", "-o", "subformat=streamOptimized"}, {"vmdk"}, {"vdi"},
	} {
		p := filepath.Join(dir, "seed."+args[0]+string(rune('a'+len(seeds))))
		testimg.QemuImg(f, append(append([]string{"convert", "-O"}, args...), raw, p)...)
		seeds = append(seeds, p)
	}
	for _, s := range seeds {
		b, err := os.ReadFile(s)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, false)
		f.Add(b, true)
	}
	f.Fuzz(func(t *testing.T, data []byte, sequential bool) {
		if len(data) > 4<<20 {
			t.Skip("inputs are capped at 4 MiB")
		}
		const limit = 4 << 20
		// A conversion that does not end is a bug: fail with the stacks.
		watchdog := time.AfterFunc(20*time.Second, func() {
			buf := make([]byte, 1<<20)
			panic("conversion hangs:\n" + string(buf[:runtime.Stack(buf, true)]))
		})
		defer watchdog.Stop()
		src := source.FromReader(bytes.NewReader(data), "fuzz")
		mem := &memTarget{}
		_, _ = diskimage.Convert(context.Background(), src, diskimage.Options{
			Sequential: sequential,
			MaxSize:    limit,
			SpillLimit: 1 << 20,
			OpenTarget: func(size int64) (diskimage.Target, error) {
				if size < 0 {
					size = limit
				}
				mem.buf = make([]byte, size)
				return sink.FromWriterAt(mem, size), nil
			},
		})
	})
}
