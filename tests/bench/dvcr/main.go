// Command dvcr measures pushing and pulling a disk file through DVCR on
// loopback against `cp` of the same bytes on the same disk, and prints the
// ratios (goal: ≥ 0.8).
//
// The registry is the real bin/dvcr process, over TLS with token auth, with
// filesystem storage in -dir, the directory cp writes to. The client is
// dvcr/client, as the import workers and the populator use it: the push is
// one streamed pass (tar framing and sha256 on the fly); the pulls are the
// whole-file stream (layer digest verified at the end) and parallel ranged
// reads (what the populator and the node cache do).
//
//	go run ./tests/bench/dvcr -dvcr bin/dvcr
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/pprof"
	"strings"
	"sync"
	"syscall"
	"time"

	"vimg.dev/vimg/dvcr/client"
	"vimg.dev/vimg/dvcr/layout"
	"vimg.dev/vimg/tests/bench/internal/benchdvcr"
	"vimg.dev/vimg/tests/bench/internal/benchfile"
)

func main() {
	var (
		dvcr     = flag.String("dvcr", "bin/dvcr", "dvcr binary to run")
		dir      = flag.String("dir", filepath.Join(os.TempDir(), "vimg-bench-dvcr"), "work directory: registry storage, cp target, pulled files")
		input    = flag.String("input", "", "disk file to move (default: a -size file of pseudo-random bytes made in -dir)")
		size     = flag.Int64("size", 2<<30, "size of the made input, in bytes")
		runs     = flag.Int("runs", 3, "runs per operation; the best is reported")
		parallel = flag.Int("parallel", 8, "concurrent ranged reads in the ranged pull")
		piece    = flag.Int64("piece", 8<<20, "bytes per ranged read")
		plain    = flag.Bool("insecure-http", false, "run dvcr without TLS, to see what TLS costs")
		cpuProf  = flag.String("cpuprofile", "", "write the client's CPU profile here")
	)
	flag.Parse()
	if err := os.MkdirAll(*dir, 0o755); err != nil {
		fatal(err)
	}
	in := *input
	if in == "" {
		in = filepath.Join(*dir, "input.img")
		if err := benchfile.Random(context.Background(), in, *size); err != nil {
			fatal(err)
		}
	}
	st, err := os.Stat(in)
	if err != nil {
		fatal(err)
	}
	n := st.Size()

	srv, err := benchdvcr.Start(*dvcr, *dir, *plain)
	if err != nil {
		fatal(err)
	}
	defer srv.Stop()

	c, err := client.New(srv.Addr, client.Options{Username: benchdvcr.User, Password: srv.Password, CABundle: srv.CA, PlainHTTP: *plain})
	if err != nil {
		fatal(err)
	}
	ctx := context.Background()
	ref := layout.Ref(layout.Repository("vi", "bench", "disk"), "bench")
	meta := layout.Meta{Format: "raw", VirtualSize: n, StoredSize: n}
	copyPath := filepath.Join(*dir, "copy.img")
	pulled := filepath.Join(*dir, "pulled.img")

	ops := []struct {
		name string
		fn   func() error
	}{
		{"cp", func() error {
			out, err := exec.Command("cp", in, copyPath).CombinedOutput()
			if err != nil {
				return fmt.Errorf("cp: %v: %s", err, out)
			}
			return nil
		}},
		{"read+write copy", func() error { return plainCopy(in, copyPath) }},
		{"push", func() error {
			f, err := os.Open(in)
			if err != nil {
				return err
			}
			defer f.Close()
			_, err = c.Push(ctx, ref, f, n, meta, client.PushOptions{})
			return err
		}},
		{"pull (stream)", func() error { return streamPull(ctx, c, ref, pulled) }},
		{"pull (stream, no disk)", func() error { return streamPull(ctx, c, ref, "") }},
		{fmt.Sprintf("pull (%d ranged)", *parallel), func() error { return rangedPull(ctx, c, ref, pulled, *parallel, *piece) }},
		{fmt.Sprintf("pull (%d ranged, no disk)", *parallel), func() error { return rangedPull(ctx, c, ref, "", *parallel, *piece) }},
	}

	if *cpuProf != "" {
		f, err := os.Create(*cpuProf)
		if err != nil {
			fatal(err)
		}
		pprof.StartCPUProfile(f)
		defer pprof.StopCPUProfile()
	}
	best := map[string]time.Duration{}
	cpu := map[string][2]time.Duration{} // client, server CPU of the best run
	for i := 0; i < *runs; i++ {
		for _, op := range ops {
			// Each operation writes a new file on a quiet disk: the
			// previous outputs are removed first and their blocks freed
			// (on a file system mounted with discard, freeing blocks
			// inside the timed part costs more than writing them).
			os.Remove(copyPath)
			if !strings.Contains(op.name, "no disk") {
				os.Remove(pulled) // kept from the last pull to disk for the check below
			}
			if op.name == "push" {
				srv.Reset()
			}
			syscall.Sync()
			c0, s0 := benchdvcr.SelfCPU(false), srv.CPU()
			start := time.Now()
			if err := op.fn(); err != nil {
				fatal(fmt.Errorf("%s: %w", op.name, err))
			}
			d := time.Since(start)
			if b, ok := best[op.name]; !ok || d < b {
				best[op.name] = d
				cpu[op.name] = [2]time.Duration{benchdvcr.SelfCPU(false) - c0, srv.CPU() - s0}
			}
		}
	}
	if err := benchfile.Same(in, pulled); err != nil {
		fatal(err)
	}

	transport := "TLS"
	if *plain {
		transport = "plain HTTP"
	}
	fmt.Printf("%d MiB through DVCR on loopback (%s, token auth, filesystem storage in %s), best of %d\n", n>>20, transport, *dir, *runs)
	fmt.Printf("%-24s %10s %10s %8s %12s %12s\n", "operation", "seconds", "MB/s", "vs cp", "client CPU s", "dvcr CPU s")
	cp := best["cp"]
	for _, op := range ops {
		d := best[op.name]
		fmt.Printf("%-24s %10.2f %10.0f %7.2fx %12.2f %12.2f\n", op.name, d.Seconds(), float64(n)/d.Seconds()/1e6, cp.Seconds()/d.Seconds(),
			cpu[op.name][0].Seconds(), cpu[op.name][1].Seconds())
	}
	fmt.Println("vs cp = cp's wall time / the operation's (goal ≥ 0.8; >1: faster than cp); CPU = user+system seconds of this process (the client) and of dvcr")
	fmt.Println("cp copies in the kernel (copy_file_range); read+write copy moves the same bytes through read(2) and write(2) in 1 MiB pieces, as any receiver of a network stream must")
	os.Remove(copyPath)
	os.Remove(pulled)
}

// plainCopy copies in to out through a user-space buffer.
func plainCopy(in, out string) error {
	src, err := os.Open(in)
	if err != nil {
		return err
	}
	defer src.Close()
	dst, err := os.Create(out)
	if err != nil {
		return err
	}
	defer dst.Close()
	buf := make([]byte, 1<<20)
	// Hide WriterTo/ReaderFrom: io.Copy would use copy_file_range.
	if _, err := io.CopyBuffer(struct{ io.Writer }{dst}, struct{ io.Reader }{src}, buf); err != nil {
		return err
	}
	return dst.Close()
}

// streamPull reads the whole disk file as one stream (the layer digest
// checked at its end) into path ("" for nowhere).
func streamPull(ctx context.Context, c *client.Client, ref, path string) error {
	im, err := c.Open(ctx, ref)
	if err != nil {
		return err
	}
	r, err := im.Reader(ctx)
	if err != nil {
		return err
	}
	defer r.Close()
	if path == "" {
		_, err = io.Copy(io.Discard, r)
		return err
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := io.Copy(f, r); err != nil {
		return err
	}
	return f.Close()
}

// rangedPull reads the disk file in pieces with parallel ranged requests and
// writes each at its offset in path ("" for nowhere).
func rangedPull(ctx context.Context, c *client.Client, ref, path string, parallel int, piece int64) error {
	im, err := c.Open(ctx, ref)
	if err != nil {
		return err
	}
	size := im.Size()
	var w io.WriterAt = discardAt{}
	if path != "" {
		f, err := os.Create(path)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := f.Truncate(size); err != nil {
			return err
		}
		w = f
	}
	offs := make(chan int64)
	errs := make(chan error, parallel)
	var wg sync.WaitGroup
	ra := im.ReaderAt()
	for range parallel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, piece)
			for off := range offs {
				b := buf[:min(piece, size-off)]
				if _, err := ra.ReadAt(b, off); err != nil && !(errors.Is(err, io.EOF) && off+int64(len(b)) == size) {
					errs <- fmt.Errorf("reading %d bytes at %d: %w", len(b), off, err)
					return
				}
				if _, err := w.WriteAt(b, off); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	var first error
feed:
	for off := int64(0); off < size; off += piece {
		select {
		case offs <- off:
		case first = <-errs:
			break feed
		}
	}
	close(offs)
	wg.Wait()
	if first == nil {
		select {
		case first = <-errs:
		default:
		}
	}
	if first != nil {
		return first
	}
	if f, ok := w.(*os.File); ok {
		return f.Close()
	}
	return nil
}

// discardAt is an io.WriterAt that keeps nothing.
type discardAt struct{}

func (discardAt) WriteAt(p []byte, _ int64) (int, error) { return len(p), nil }

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "bench:", err)
	os.Exit(1)
}
