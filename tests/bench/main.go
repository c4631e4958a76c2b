// Command bench runs `vimg convert` and `qemu-img convert -O raw` side by
// side on the same inputs and prints throughput, peak RSS and the ratio.
//
// The inputs are made once (cached in -dir): an ext4 file system of -size
// bytes filled from a directory of real files (shared libraries by default:
// machine code and text, the mix of a cloud image), converted by qemu-img to
// zlib-compressed qcow2, plain qcow2 and streamOptimized VMDK, and compressed
// with xz. qemu-img cannot read xz, so its side of that row is what upstream
// importers do: decompress to scratch space, then convert.
//
//	go run ./tests/bench -vimg bin/vimg
package main

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

func main() {
	var (
		vimg   = flag.String("vimg", "bin/vimg", "vimg binary to measure")
		dir    = flag.String("dir", filepath.Join(os.TempDir(), "vimg-bench"), "where inputs are made and kept")
		size   = flag.String("size", "2G", "virtual size of the test disk")
		fill   = flag.String("fill", "/usr/lib/x86_64-linux-gnu", "directory whose files fill the test disk")
		runs   = flag.Int("runs", 3, "runs per tool and input; the best is reported")
		only   = flag.String("only", "", "comma-separated input names to run (default: all)")
		noKeep = flag.Bool("clean", false, "remove the inputs afterwards")
	)
	flag.Parse()
	if err := os.MkdirAll(*dir, 0o755); err != nil {
		fatal(err)
	}
	in, err := makeInputs(*dir, *size, *fill)
	if err != nil {
		fatal(err)
	}
	if *noKeep {
		defer os.RemoveAll(*dir)
	}
	out := filepath.Join(*dir, "out.raw")
	scratch := filepath.Join(*dir, "scratch.raw")
	fmt.Printf("%-18s %8s  %12s %10s  %12s %10s  %6s\n", "input", "virtual", "vimg MB/s", "vimg RSS", "qemu MB/s", "qemu RSS", "ratio")
	for _, c := range in {
		if *only != "" && !contains(strings.Split(*only, ","), c.name) {
			continue
		}
		var v, q result
		for i := 0; i < *runs; i++ {
			fresh(out)
			r, err := run(*vimg, "convert", "--progress=never", c.path, out)
			if err != nil {
				fatal(fmt.Errorf("vimg on %s: %w", c.name, err))
			}
			v = v.best(r)
			fresh(out)
			if c.xz {
				r, err = runScratch(c.path, scratch, out)
			} else {
				r, err = run("qemu-img", "convert", "-O", "raw", c.path, out)
			}
			if err != nil {
				fatal(fmt.Errorf("qemu-img on %s: %w", c.name, err))
			}
			q = q.best(r)
		}
		os.Remove(out)
		mbps := func(r result) float64 { return float64(c.virtual) / r.wall.Seconds() / 1e6 }
		fmt.Printf("%-18s %7.1fG  %12.1f %9dM  %12.1f %9dM  %5.2fx\n", c.name, float64(c.virtual)/(1<<30),
			mbps(v), v.rssKiB>>10, mbps(q), q.rssKiB>>10, q.wall.Seconds()/v.wall.Seconds())
	}
	fmt.Println("ratio = qemu-img wall time / vimg wall time (>1: vimg is faster); RSS = peak resident set of the process")
}

// fresh removes a previous output and syncs, so that neither tool pays in
// its timed run for freeing the other's blocks (on a file system mounted
// with discard that costs more than writing them) or for flushing them.
func fresh(out string) {
	os.Remove(out)
	syscall.Sync()
}

type input struct {
	name    string
	path    string
	virtual int64
	xz      bool
}

type result struct {
	wall   time.Duration
	rssKiB int64
}

func (r result) best(o result) result {
	if r.wall == 0 || o.wall < r.wall {
		o.rssKiB = max(o.rssKiB, r.rssKiB)
		return o
	}
	r.rssKiB = max(r.rssKiB, o.rssKiB)
	return r
}

func run(name string, args ...string) (result, error) {
	cmd := exec.Command(name, args...)
	cmd.Stderr = os.Stderr
	start := time.Now()
	if err := cmd.Run(); err != nil {
		return result{}, err
	}
	wall := time.Since(start)
	ru := cmd.ProcessState.SysUsage().(*syscall.Rusage)
	return result{wall: wall, rssKiB: ru.Maxrss}, nil
}

// runScratch is the decompress-then-convert path of importers that shell out
// to qemu-img.
func runScratch(src, scratch, out string) (result, error) {
	defer os.Remove(scratch)
	a, err := run("sh", "-c", fmt.Sprintf("xz -dc -T0 '%s' > '%s'", src, scratch))
	if err != nil {
		return a, err
	}
	b, err := run("qemu-img", "convert", "-O", "raw", scratch, out)
	return result{wall: a.wall + b.wall, rssKiB: max(a.rssKiB, b.rssKiB)}, err
}

func makeInputs(dir, size, fill string) ([]input, error) {
	raw := filepath.Join(dir, "disk.raw")
	stamp := filepath.Join(dir, "inputs-"+strings.NewReplacer("/", "_").Replace(size+fill))
	steps := [][]string{
		{"rm", "-f", raw},
		{"truncate", "-s", size, raw},
		// -d copies a directory tree into the new file system, no mount needed.
		{"mkfs.ext4", "-q", "-F", "-d", fill, raw},
		{"qemu-img", "convert", "-c", "-O", "qcow2", raw, filepath.Join(dir, "zlib.qcow2")},
		{"qemu-img", "convert", "-O", "qcow2", raw, filepath.Join(dir, "plain.qcow2")},
		{"qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, filepath.Join(dir, "stream.vmdk")},
		{"sh", "-c", fmt.Sprintf("xz -T0 -3 -c '%s' > '%s'", raw, filepath.Join(dir, "disk.raw.xz"))},
		{"touch", stamp},
	}
	if _, err := os.Stat(stamp); err != nil {
		fmt.Fprintf(os.Stderr, "making inputs in %s (once)...\n", dir)
		for _, s := range steps {
			cmd := exec.Command(s[0], s[1:]...)
			cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
			if err := cmd.Run(); err != nil {
				return nil, fmt.Errorf("%s: %w", strings.Join(s, " "), err)
			}
		}
	}
	st, err := os.Stat(raw)
	if err != nil {
		return nil, err
	}
	ins := []input{
		{name: "zlib.qcow2", path: filepath.Join(dir, "zlib.qcow2")},
		{name: "plain.qcow2", path: filepath.Join(dir, "plain.qcow2")},
		{name: "stream.vmdk", path: filepath.Join(dir, "stream.vmdk")},
		{name: "disk.raw.xz", path: filepath.Join(dir, "disk.raw.xz"), xz: true},
	}
	for i := range ins {
		ins[i].virtual = st.Size()
	}
	return ins, nil
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "bench:", err)
	os.Exit(1)
}
