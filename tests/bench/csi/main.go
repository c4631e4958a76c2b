// Command csi measures the node side of the CSI driver images.vimg.dev
// (csi/driver over csi/cache and csi/mount) against the goals and
// prints the figures next to cp's:
//
//   - cold publish: NodePublishVolume of a Filesystem volume whose image is
//     not on the node. The call fills the cache (parallel ranged reads from
//     DVCR, sha256 of the rebuilt layer, fsync, commit) and bind-mounts the
//     disk. Its throughput is compared with `cp` of the registry's blob file
//     to the same disk (goal: ≥ 0.8× cp), and, for reference, with cp
//     followed by an fsync, since the fill makes its file durable.
//   - warm publish: with the image cached, -pods new targets of the same
//     volume (as many pods) published one after the other, each call timed,
//     then unpublished (goal: ≤ 100 ms a publish); Filesystem (bind mount),
//     Block (a loop device, if the machine has them) and, for reference,
//     Filesystem with all -pods publishes at once, as a kubelet starting
//     that many pods calls them.
//
// The registry is the real bin/dvcr process (TLS, token auth, filesystem
// storage in -dir); the image is -size bytes of pseudo-random data pushed as
// an ISO: not zeros, which the cache does not write and would flatter it.
// The driver runs in this process and is called as the kubelet calls it,
// without the gRPC hop. Every cold run starts from a new, empty cache and
// driver state, after a sync; the page cache is not dropped, so DVCR and cp
// both read from memory and what is compared is the write path. Times are
// the median of -runs.
//
// Publishing needs root (mount(2), loop devices). A missed goal is
// reported, not an error: the command exits non-zero only when something
// fails.
//
//	go run ./tests/bench/csi -dvcr bin/dvcr
package main

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"vimg.dev/vimg/csi/cache"
	"vimg.dev/vimg/csi/driver"
	"vimg.dev/vimg/csi/mount"
	"vimg.dev/vimg/dvcr/client"
	"vimg.dev/vimg/dvcr/layout"
	"vimg.dev/vimg/tests/bench/internal/benchdvcr"
	"vimg.dev/vimg/tests/bench/internal/benchfile"
)

// Goals of the issue.
const (
	goalFillVsCp = 0.8
	goalWarm     = 100 * time.Millisecond
)

const volumeID = "bench-cdrom"

// workFiles are the names a work directory of this command may hold; a
// directory with anything else is refused, since it is removed at the end.
var workFiles = []string{"input.img", "copy.img", "state", "pods", "storage", "dvcr.log", "csi.log",
	"tls.crt", "tls.key", "users", "token.key"}

func main() {
	var (
		dvcrBin  = flag.String("dvcr", "bin/dvcr", "dvcr binary to run")
		dir      = flag.String("dir", filepath.Join(os.TempDir(), "vimg-bench-csi"), "work directory: input, registry storage, driver state and cache, targets, cp's copy (one disk)")
		sizeArg  = flag.String("size", "1GiB", "image size: bytes, or with a suffix K, M, G (KiB, MiB, GiB)")
		runs     = flag.Int("runs", 3, "cold runs of each side; the median is reported")
		pods     = flag.Int("pods", 20, "targets published in each warm series")
		parallel = flag.Int("parallel", 0, "cache fill: concurrent ranged reads (0: the cache's default, as vimg-csi runs it)")
		chunk    = flag.String("chunk", "0", "cache fill: bytes per ranged read (0: the cache's default)")
		keep     = flag.Bool("keep", false, "keep the work directory (the input is reused by the next run)")
		cpuProf  = flag.String("cpuprofile", "", "write this process's CPU profile here (driver, cache, DVCR client)")
	)
	flag.Parse()
	size, err := parseSize(*sizeArg)
	if err == nil && (size <= 0 || size > driver.MaxDiskSize) {
		err = fmt.Errorf("-size %s: want 1 byte to %d bytes", *sizeArg, int64(driver.MaxDiskSize))
	}
	if err != nil {
		fatal(err)
	}
	chunkSize, err := parseSize(*chunk)
	if err != nil {
		fatal(err)
	}
	if *runs < 1 || *pods < 1 {
		fatal(errors.New("-runs and -pods must be at least 1"))
	}
	if os.Geteuid() != 0 {
		fatal(errors.New("publishing needs root (mount(2), loop devices): run as root"))
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	opts := cache.Options{Parallelism: *parallel, ChunkSize: chunkSize}
	if err := run(ctx, *dvcrBin, *dir, size, *runs, *pods, opts, *keep, *cpuProf); err != nil {
		fatal(err)
	}
}

func run(ctx context.Context, dvcrBin, dir string, size int64, runs, pods int, opts cache.Options, keep bool, cpuProf string) (err error) {
	dir, err = prepareDir(ctx, dir)
	if err != nil {
		return err
	}
	// The driver's log goes to a file (errors to stderr too): its Info
	// lines would drown the table.
	logFile, err := os.Create(filepath.Join(dir, "csi.log"))
	if err != nil {
		return err
	}
	defer logFile.Close()
	klog.LogToStderr(false)
	klog.SetOutput(logFile)
	defer klog.Flush()

	b := &bench{dir: dir, state: filepath.Join(dir, "state"), input: filepath.Join(dir, "input.img"), size: size,
		opts: opts, published: map[string]bool{}}
	defer func() {
		if cerr := b.close(keep); err == nil {
			err = cerr
		}
	}()
	if err := benchfile.Random(ctx, b.input, size); err != nil {
		return err
	}
	if err := b.setup(ctx, dvcrBin); err != nil {
		return err
	}
	if cpuProf != "" {
		f, err := os.Create(cpuProf)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}

	cold, err := b.cold(ctx, runs)
	if err != nil {
		return err
	}
	warm := []*series{{name: "Filesystem, one by one"}}
	if _, err := os.Stat("/dev/loop-control"); err == nil {
		warm = append(warm, &series{name: "Block, one by one", block: true})
	} else {
		fmt.Fprintf(os.Stderr, "bench csi: no loop devices (%v): Block not measured\n", err)
	}
	warm = append(warm, &series{name: fmt.Sprintf("Filesystem, %d at once", pods), concurrent: true})
	for _, s := range warm {
		if err := b.warm(ctx, s, pods); err != nil {
			return fmt.Errorf("warm publish, %s: %w", s.name, err)
		}
	}
	pprof.StopCPUProfile()
	if err := b.checkClean(); err != nil {
		return err
	}
	b.report(cold, warm, runs, pods)
	return nil
}

// prepareDir makes dir (absolute, symlinks resolved: mountinfo lists
// resolved paths) and empties it of an earlier run's state, unpublishing
// what a killed run left published. The input is kept.
func prepareDir(ctx context.Context, dir string) (string, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	if dir, err = filepath.EvalSymlinks(dir); err != nil {
		return "", err
	}
	des, err := os.ReadDir(dir)
	if err != nil {
		return "", err
	}
	for _, de := range des {
		if !slices.Contains(workFiles, de.Name()) {
			return "", fmt.Errorf("-dir %s holds %s: not a work directory of this command (it is emptied and removed)", dir, de.Name())
		}
	}
	if err := recoverPublishes(ctx, filepath.Join(dir, "state")); err != nil {
		return "", fmt.Errorf("unpublishing what an earlier run left: %w", err)
	}
	if err := checkNoMounts(dir); err != nil {
		return "", err
	}
	for _, de := range des {
		if de.Name() != "input.img" {
			if err := os.RemoveAll(filepath.Join(dir, de.Name())); err != nil {
				return "", err
			}
		}
	}
	return dir, nil
}

// recoverPublishes unpublishes the targets recorded in an earlier run's
// driver state, as a restarted node plugin would be asked to.
func recoverPublishes(ctx context.Context, state string) error {
	recs, err := filepath.Glob(filepath.Join(state, "publishes", "*.json"))
	if err != nil || len(recs) == 0 {
		return err
	}
	ch, err := cache.Open(filepath.Join(state, "cache"), cache.Options{})
	if err != nil {
		return err
	}
	defer ch.Close()
	noRegistry := func(context.Context, string) (cache.Source, error) { return nil, errors.New("no registry") }
	d, err := driver.New(driver.Config{NodeID: "bench-node", StateDir: state, Cache: ch, Open: noRegistry})
	if err != nil {
		return err
	}
	for _, path := range recs {
		var rec struct {
			VolumeID string `json:"volumeID"`
			Target   string `json:"target"`
		}
		data, err := os.ReadFile(path)
		if err == nil {
			err = json.Unmarshal(data, &rec)
		}
		if err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		if _, err := d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: rec.VolumeID, TargetPath: rec.Target}); err != nil {
			return err
		}
	}
	return nil
}

type bench struct {
	dir, state, input string
	size              int64
	opts              cache.Options

	srv  *benchdvcr.Server
	dvcr *client.Client
	pin  driver.Pin
	blob string // the registry's file of the layer, what cp copies

	ch *cache.Cache
	d  *driver.Driver

	mu        sync.Mutex
	published map[string]bool // targets to unpublish on the way out
}

// setup starts DVCR, pushes the input as an ISO and reads back its Pin, as
// the controller would hand it to the node in a volume context.
func (b *bench) setup(ctx context.Context, dvcrBin string) error {
	srv, err := benchdvcr.Start(dvcrBin, b.dir, false)
	if err != nil {
		return err
	}
	b.srv = srv
	b.dvcr, err = client.New(srv.Addr, client.Options{Username: benchdvcr.User, Password: srv.Password, CABundle: srv.CA})
	if err != nil {
		return err
	}
	f, err := os.Open(b.input)
	if err != nil {
		return err
	}
	defer f.Close()
	repo := layout.Repository(layout.KindVirtualImage, "bench", "cdrom")
	p, err := b.dvcr.Push(ctx, layout.Ref(repo, "bench"), f, b.size, layout.Meta{Format: layout.FormatISO}, client.PushOptions{})
	if err != nil {
		return err
	}
	ref := repo + "@" + p.Digest.String()
	im, err := b.dvcr.Open(ctx, ref)
	if err != nil {
		return err
	}
	b.pin = driver.Pin{Ref: ref, Layer: im.Layer.Digest.String(), File: im.Meta.Name(), Size: im.Size()}
	if err := b.pin.Validate(); err != nil {
		return fmt.Errorf("pin of the pushed image: %w", err)
	}
	// distribution's filesystem layout; the input (the same disk bytes)
	// stands in if it ever changes.
	hex := strings.TrimPrefix(b.pin.Layer, "sha256:")
	b.blob = filepath.Join(srv.Storage, "docker/registry/v2/blobs/sha256", hex[:2], hex, "data")
	if _, err := os.Stat(b.blob); err != nil {
		fmt.Fprintf(os.Stderr, "bench csi: no blob file (%v): cp copies the input\n", err)
		b.blob = b.input
	}
	return nil
}

// openNode opens the cache and a driver on the state directory, as
// cmd/vimg-csi does in node mode.
func (b *bench) openNode() error {
	ch, err := cache.Open(filepath.Join(b.state, "cache"), b.opts)
	if err != nil {
		return err
	}
	d, err := driver.New(driver.Config{NodeID: "bench-node", Version: "bench", StateDir: b.state, Cache: ch,
		Open: func(ctx context.Context, ref string) (cache.Source, error) {
			im, err := b.dvcr.Open(ctx, ref)
			if err != nil {
				return nil, err
			}
			return im, nil
		}})
	if err != nil {
		ch.Close()
		return err
	}
	b.ch, b.d = ch, d
	return nil
}

func (b *bench) closeNode() {
	if b.ch != nil {
		b.ch.Close()
		b.ch, b.d = nil, nil
	}
}

// freshNode gives a node with an empty cache and no driver state.
func (b *bench) freshNode() error {
	if len(b.published) > 0 {
		return fmt.Errorf("targets still published: %v", b.published)
	}
	b.closeNode()
	if err := os.RemoveAll(b.state); err != nil {
		return err
	}
	return b.openNode()
}

func (b *bench) publish(ctx context.Context, target string, block bool) (time.Duration, error) {
	c := &csi.VolumeCapability{AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY}}
	if block {
		c.AccessType = &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}}
	} else {
		c.AccessType = &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}}
	}
	req := &csi.NodePublishVolumeRequest{VolumeId: volumeID, TargetPath: target, VolumeCapability: c,
		Readonly: true, VolumeContext: b.pin.Context()}
	b.mu.Lock()
	b.published[target] = true // a failed publish is undone by the driver; unpublishing again is harmless
	b.mu.Unlock()
	// Kubelet gives a publish about 2 minutes and retries; a fill of a
	// large image may take longer, so only a hang is cut short here.
	ctx, cancel := context.WithTimeout(ctx, 30*time.Minute)
	defer cancel()
	start := time.Now()
	_, err := b.d.NodePublishVolume(ctx, req)
	return time.Since(start), err
}

func (b *bench) unpublish(ctx context.Context, target string) (time.Duration, error) {
	start := time.Now()
	_, err := b.d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: volumeID, TargetPath: target})
	d := time.Since(start)
	if err == nil {
		b.mu.Lock()
		delete(b.published, target)
		b.mu.Unlock()
	}
	return d, err
}

// close unpublishes what is still published, stops everything and removes
// the work directory (unless keep, or something could not be undone).
func (b *bench) close(keep bool) error {
	var errs []error
	if b.d != nil {
		for target := range b.published {
			if _, err := b.unpublish(context.Background(), target); err != nil {
				errs = append(errs, err)
			}
		}
	}
	b.closeNode()
	if b.srv != nil {
		b.srv.Stop()
	}
	if err := b.checkClean(); err != nil {
		errs = append(errs, fmt.Errorf("%w; %s is left in place", err, b.dir))
		return errors.Join(errs...)
	}
	if !keep {
		if err := os.RemoveAll(b.dir); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// checkClean fails if a mount or a loop device of the work directory is
// left: after unpublishing, the driver must have undone them all.
func (b *bench) checkClean() error {
	if err := checkNoMounts(b.dir); err != nil {
		return err
	}
	devs, err := loopsUnder(b.dir)
	if err != nil {
		return err
	}
	if len(devs) > 0 {
		return fmt.Errorf("loop devices backed by files in %s are left: %s", b.dir, strings.Join(devs, ", "))
	}
	return nil
}

// result is one timed operation.
type result struct {
	d         time.Duration
	cpu, dvcr time.Duration // this process's (and its children's), dvcr's
}

type coldOp struct {
	name  string
	bytes int64
	fn    func() (time.Duration, error)
	runs  []result
}

// cold times, -runs times each: a cold publish, cp, and cp + fsync. Before
// each, cp's copy is removed (and before a publish, the cache and the
// driver state), so that blocks are freed outside the timed part (costly
// on a filesystem mounted with discard), and everything is synced, so that
// no write-back of one lands in the next.
func (b *bench) cold(ctx context.Context, runs int) ([]*coldOp, error) {
	copyPath := filepath.Join(b.dir, "copy.img")
	target := filepath.Join(b.dir, "pods", "cold", "mount")
	st, err := os.Stat(b.blob)
	if err != nil {
		return nil, err
	}
	cp := func() error {
		out, err := exec.CommandContext(ctx, "cp", b.blob, copyPath).CombinedOutput()
		if err != nil {
			return fmt.Errorf("cp: %v: %s", err, out)
		}
		return nil
	}
	ops := []*coldOp{
		{name: "cold publish (cache fill)", bytes: b.size, fn: func() (time.Duration, error) { return b.publish(ctx, target, false) }},
		{name: "cp", bytes: st.Size(), fn: func() (time.Duration, error) { return timed(cp) }},
		{name: "cp + fsync", bytes: st.Size(), fn: func() (time.Duration, error) {
			return timed(func() error {
				if err := cp(); err != nil {
					return err
				}
				f, err := os.Open(copyPath)
				if err != nil {
					return err
				}
				defer f.Close()
				return f.Sync()
			})
		}},
	}
	for i := range runs {
		for _, op := range ops {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			if err := os.Remove(copyPath); err != nil && !errors.Is(err, os.ErrNotExist) {
				return nil, err
			}
			if op == ops[0] {
				// Truly cold: no cache, no driver state. (The fill's file
				// is left while cp runs: it was synced, and the warm
				// series use the last one.)
				if err := b.freshNode(); err != nil {
					return nil, err
				}
			}
			syscall.Sync()
			c0, s0 := benchdvcr.SelfCPU(true), b.srv.CPU()
			d, err := op.fn()
			if err != nil {
				return nil, fmt.Errorf("%s: %w", op.name, err)
			}
			op.runs = append(op.runs, result{d, benchdvcr.SelfCPU(true) - c0, b.srv.CPU() - s0})
			if op != ops[0] {
				continue
			}
			if n := b.ch.Stats().Fills; n != 1 {
				return nil, fmt.Errorf("cold publish: %d cache fills, want 1", n)
			}
			if i == runs-1 {
				// The last run's disk is checked byte for byte (the
				// cache checked the layer digest; this checks the mount).
				if err := checkMounted(target); err != nil {
					return nil, err
				}
				if err := benchfile.Same(b.input, filepath.Join(target, "disk.img")); err != nil {
					return nil, err
				}
			}
			if _, err := b.unpublish(ctx, target); err != nil {
				return nil, err
			}
		}
	}
	os.Remove(copyPath)
	return ops, nil
}

func timed(fn func() error) (time.Duration, error) {
	start := time.Now()
	err := fn()
	return time.Since(start), err
}

// series is one warm series: n targets of the same volume published, then
// unpublished.
type series struct {
	name       string
	block      bool
	concurrent bool // all publishes (then all unpublishes) at once
	pub, unpub []time.Duration
	wall       time.Duration // of the publishes
}

// warm publishes n targets of the volume with the image in the cache (the
// cold runs left it there), checks them, and unpublishes them.
func (b *bench) warm(ctx context.Context, s *series, n int) error {
	if b.ch.Stats().Entries != 1 {
		return fmt.Errorf("the cache holds %d entries, want the image's", b.ch.Stats().Entries)
	}
	fills := b.ch.Stats().Fills
	kind := "fs"
	if s.block {
		kind = "block"
	}
	if s.concurrent {
		kind += "-concurrent"
	}
	targets := make([]string, n)
	for i := range targets {
		name := "mount"
		if s.block {
			name = "dev"
		}
		targets[i] = filepath.Join(b.dir, "pods", fmt.Sprintf("%s-%02d", kind, i), name)
	}
	syscall.Sync() // nothing of the cold runs is left to write back
	s.pub = make([]time.Duration, n)
	s.unpub = make([]time.Duration, n)
	var err error
	start := time.Now()
	if s.concurrent {
		err = concurrently(n, func(i int) (err error) {
			s.pub[i], err = b.publish(ctx, targets[i], s.block)
			return err
		})
	} else {
		for i, t := range targets {
			if s.pub[i], err = b.publish(ctx, t, s.block); err != nil {
				break
			}
		}
	}
	s.wall = time.Since(start)
	if err != nil {
		return err
	}
	for _, t := range targets {
		if err := b.checkTarget(t, s.block); err != nil {
			return err
		}
	}
	if got := b.ch.Stats().Fills; got != fills {
		return fmt.Errorf("%d cache fills during warm publishes, want none", got-fills)
	}
	if s.concurrent {
		return concurrently(n, func(i int) (err error) {
			s.unpub[i], err = b.unpublish(ctx, targets[i])
			return err
		})
	}
	for i, t := range targets {
		if s.unpub[i], err = b.unpublish(ctx, t); err != nil {
			return err
		}
	}
	return nil
}

func concurrently(n int, fn func(i int) error) error {
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { errs[i] = fn(i) })
	}
	wg.Wait()
	return errors.Join(errs...)
}

// checkTarget checks a published target: a read-only mount of the disk, or
// a block device of the image's size whose first and last MiB are the
// image's.
func (b *bench) checkTarget(target string, block bool) error {
	if err := checkMounted(target); err != nil {
		return err
	}
	if !block {
		fi, err := os.Stat(filepath.Join(target, "disk.img"))
		if err != nil {
			return err
		}
		if fi.Size() != b.size {
			return fmt.Errorf("%s/disk.img has %d bytes, want %d", target, fi.Size(), b.size)
		}
		return nil
	}
	dev, err := os.Open(target)
	if err != nil {
		return err
	}
	defer dev.Close()
	in, err := os.Open(b.input)
	if err != nil {
		return err
	}
	defer in.Close()
	if n, err := dev.Seek(0, io.SeekEnd); err != nil || n != b.size {
		return fmt.Errorf("%s: a device of %d bytes (%v), want %d", target, n, err, b.size)
	}
	piece := min(b.size, 1<<20)
	got, want := make([]byte, piece), make([]byte, piece)
	for _, off := range []int64{0, b.size - piece} {
		if _, err := dev.ReadAt(got, off); err != nil {
			return fmt.Errorf("reading %s: %w", target, err)
		}
		if _, err := in.ReadAt(want, off); err != nil {
			return err
		}
		if string(got) != string(want) {
			return fmt.Errorf("%s: bytes at %d differ from the image's", target, off)
		}
	}
	return nil
}

func checkMounted(target string) error {
	mounted, ro, err := mount.MountInfo(target)
	if err != nil {
		return err
	}
	if !mounted || !ro {
		return fmt.Errorf("%s: mounted %v, read-only %v: want a read-only mount", target, mounted, ro)
	}
	return nil
}

func (b *bench) report(cold []*coldOp, warm []*series, runs, pods int) {
	fmt.Printf("images.vimg.dev node publish of a %s image of pseudo-random bytes (%s, from DVCR on loopback: TLS, token auth)\n",
		sizeString(b.size), b.pin.File)
	fmt.Printf("work directory %s on %s; cache fill: %d ranged reads of %s at once\n", b.dir, fsType(b.dir),
		cmp.Or(b.opts.Parallelism, 4), sizeString(cmp.Or(b.opts.ChunkSize, 8<<20)))
	fmt.Println()
	fmt.Printf("cold publish: new empty cache each run, median of %d\n", runs)
	fmt.Printf("%-26s %10s %10s %8s %12s %12s\n", "operation", "seconds", "MB/s", "vs cp", "CPU s", "dvcr CPU s")
	mbps := map[string]float64{}
	for _, op := range cold {
		r := median(op.runs)
		mbps[op.name] = float64(op.bytes) / r.d.Seconds() / 1e6
	}
	for _, op := range cold {
		r := median(op.runs)
		fmt.Printf("%-26s %10.2f %10.0f %7.2fx %12.2f %12.2f\n", op.name, r.d.Seconds(), mbps[op.name], mbps[op.name]/mbps["cp"],
			r.cpu.Seconds(), r.dvcr.Seconds())
	}
	src := "the registry's blob file of the layer"
	if b.blob == b.input {
		src = "the input file"
	}
	fmt.Printf("vs cp = MB/s / cp's MB/s; cp copies %s to the same disk and leaves it to write-back,\n", src)
	fmt.Println("while the fill fsyncs its file before committing it (cp + fsync does too); CPU = user+system seconds of this process and its children, and of dvcr")
	fmt.Println()
	fmt.Printf("warm publish: image cached, %d new targets of the volume\n", pods)
	fmt.Printf("%-26s %12s %12s %12s %14s %14s\n", "series", "median ms", "max ms", "all ms", "unpub med ms", "unpub max ms")
	for _, s := range warm {
		fmt.Printf("%-26s %12.1f %12.1f %12.1f %14.1f %14.1f\n", s.name, ms(medianDur(s.pub)), ms(slices.Max(s.pub)), ms(s.wall),
			ms(medianDur(s.unpub)), ms(slices.Max(s.unpub)))
	}
	fmt.Println("ms of each NodePublishVolume call (all: of the whole series); one by one, the first Filesystem publish also makes the view")
	fmt.Println()
	ratio := mbps[cold[0].name] / mbps["cp"]
	fmt.Printf("goal: cold publish, cache fill ≥ %.1f× cp: %.2f× (%.0f vs %.0f MB/s) %s\n", goalFillVsCp, ratio,
		mbps[cold[0].name], mbps["cp"], verdict(ratio >= goalFillVsCp))
	for _, s := range warm {
		if s.concurrent {
			continue
		}
		mx := slices.Max(s.pub)
		fmt.Printf("goal: warm publish ≤ %d ms, %s: max %.1f ms (median %.1f) %s\n", goalWarm.Milliseconds(), s.name, ms(mx),
			ms(medianDur(s.pub)), verdict(mx <= goalWarm))
	}
}

func verdict(ok bool) string {
	if ok {
		return "PASS"
	}
	return "MISS"
}

// median is the run of median duration.
func median(rs []result) result {
	rs = slices.Clone(rs)
	slices.SortFunc(rs, func(a, b result) int { return cmp.Compare(a.d, b.d) })
	return rs[len(rs)/2]
}

func medianDur(ds []time.Duration) time.Duration {
	ds = slices.Clone(ds)
	slices.Sort(ds)
	if n := len(ds); n%2 == 0 {
		return (ds[n/2-1] + ds[n/2]) / 2
	}
	return ds[len(ds)/2]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// checkNoMounts fails if anything is mounted under dir.
func checkNoMounts(dir string) error {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	var points []string
	for line := range strings.SplitSeq(string(data), "\n") {
		if f := strings.Fields(line); len(f) > 4 && strings.HasPrefix(unescape(f[4]), dir+"/") {
			points = append(points, unescape(f[4]))
		}
	}
	if len(points) > 0 {
		return fmt.Errorf("mounts under %s are left: %s", dir, strings.Join(points, ", "))
	}
	return nil
}

// unescape undoes mountinfo's \ooo escapes (of space, tab, newline, \).
func unescape(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// loopsUnder lists the loop devices backed by a file under dir.
func loopsUnder(dir string) ([]string, error) {
	files, err := filepath.Glob("/sys/block/loop*/loop/backing_file")
	if err != nil {
		return nil, err
	}
	var devs []string
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			continue // detached meanwhile
		}
		if strings.HasPrefix(strings.TrimSpace(string(data)), dir+"/") {
			devs = append(devs, "/dev/"+strings.Split(f, "/")[3])
		}
	}
	return devs, nil
}

// fsType names the filesystem dir is on.
func fsType(dir string) string {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return "?"
	}
	switch st.Type {
	case unix.EXT4_SUPER_MAGIC:
		return "ext2/3/4"
	case unix.XFS_SUPER_MAGIC:
		return "xfs"
	case unix.BTRFS_SUPER_MAGIC:
		return "btrfs"
	case unix.TMPFS_MAGIC:
		return "tmpfs (memory: not a disk)"
	case unix.OVERLAYFS_SUPER_MAGIC:
		return "overlayfs"
	}
	return fmt.Sprintf("filesystem 0x%x", st.Type)
}

// parseSize reads a number of bytes with an optional binary suffix: 1G,
// 1GiB, 512M, 64KiB.
func parseSize(s string) (int64, error) {
	num, mult := s, int64(1)
	for _, u := range []struct {
		suffixes []string
		mult     int64
	}{{[]string{"KiB", "K"}, 1 << 10}, {[]string{"MiB", "M"}, 1 << 20}, {[]string{"GiB", "G"}, 1 << 30}} {
		for _, suf := range u.suffixes {
			if strings.HasSuffix(s, suf) {
				num, mult = strings.TrimSuffix(s, suf), u.mult
			}
		}
	}
	n, err := strconv.ParseInt(num, 10, 64)
	if err != nil || n < 0 || n > (1<<62)/mult {
		return 0, fmt.Errorf("size %q: want a number of bytes, optionally with K, M or G", s)
	}
	return n * mult, nil
}

func sizeString(n int64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%d GiB", n>>30)
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	}
	return fmt.Sprintf("%d bytes", n)
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "bench csi:", err)
	os.Exit(1)
}
