// Command populate measures filling a volume from a zlib-compressed qcow2
// image served over HTTP, vimg's way against the way peer tools do it, on
// this machine, and prints the times, the ratios and the scratch space each
// way needs. The goal: vimg at least 2× faster, with 0 bytes of
// scratch.
//
// The three paths, each ending in a sparse raw disk file:
//
//   - peer ("download then convert"): GET the qcow2 into a scratch file,
//     fsync it, then `qemu-img convert -O raw` it onto the volume. This is
//     what KubeVirt CDI does whenever it needs scratch space (registry
//     imports, uploads, archives, HTTP with auth or a custom CA) and what
//     importers built on qemu-img do in general; the scratch file is as big
//     as the download.
//   - vimg through DVCR (VirtualImage → PVC): importer.Import reads the
//     HTTP source once into DVCR, the real bin/dvcr over TLS with token
//     auth; then worker.Populate, as a populate pod, writes disk.img from
//     DVCR with parallel ranged reads, converting the qcow2 on the fly. DVCR
//     keeps the image in its store for every later volume: that is not
//     scratch.
//   - vimg straight from the source (storage: PersistentVolumeClaim):
//     diskimage.Convert from the HTTP source into the volume.
//
// The input (-size of raw disk, about half of it data in 64 KiB–4 MiB
// extents of text and random bytes, the rest holes) is made once in -dir
// and kept; the raw file is the reference every result is compared with.
//
//	go run ./tests/bench/populate -dvcr bin/dvcr
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"k8s.io/klog/v2"

	"vimg.dev/vimg/dvcr/auth"
	"vimg.dev/vimg/dvcr/client"
	"vimg.dev/vimg/pkg/diskimage"
	"vimg.dev/vimg/pkg/diskimage/sink"
	"vimg.dev/vimg/pkg/diskimage/source"
	"vimg.dev/vimg/pkg/importer"
	"vimg.dev/vimg/pkg/worker"
	"vimg.dev/vimg/pkg/worker/api"
	"vimg.dev/vimg/tests/bench/internal/benchdvcr"
)

// The paths, in the order they run and are printed.
const (
	pathPeer   = "peer"
	pathDVCR   = "dvcr"
	pathDirect = "direct"
)

func main() {
	var (
		dvcrBin = flag.String("dvcr", "bin/dvcr", "dvcr binary to run")
		dir     = flag.String("dir", filepath.Join(os.TempDir(), "vimg-bench-populate"), "work directory: inputs (kept), DVCR storage, scratch, targets")
		sizeArg = flag.String("size", "2GiB", "virtual size of the test disk, a whole number of MiB (suffixes KiB, MiB, GiB)")
		runs    = flag.Int("runs", 2, "runs per path; the best is reported")
		only    = flag.String("only", "", "comma-separated paths to run: peer, dvcr, direct (default: all)")
		cpuProf = flag.String("cpuprofile", "", "write this process's CPU profile here (vimg's paths, the HTTP server, the peer's download)")
	)
	flag.Parse()
	paths := []string{pathPeer, pathDVCR, pathDirect}
	if *only != "" {
		paths = strings.Split(*only, ",")
	}
	// Errors come back here rather than exiting on the spot, so that dvcr
	// is stopped on the way out.
	if err := run(*dvcrBin, *dir, *sizeArg, *runs, paths, *cpuProf); err != nil {
		fmt.Fprintln(os.Stderr, "bench populate:", err)
		os.Exit(1)
	}
}

func run(dvcrBin, dir, sizeArg string, runs int, paths []string, cpuProf string) error {
	size, err := parseSize(sizeArg)
	if err != nil {
		return err
	}
	if size <= 0 || size%api.DiskAlign != 0 {
		// A populated disk.img is a whole number of MiB; so must the
		// reference be, for the three targets to be compared alike.
		return fmt.Errorf("-size %s: want a positive whole number of MiB", sizeArg)
	}
	for _, p := range paths {
		if p != pathPeer && p != pathDVCR && p != pathDirect {
			return fmt.Errorf("-only: unknown path %q", p)
		}
	}
	// The worker and importer log through klog; their Info lines would
	// drown the table (errors still show).
	ctx := klog.NewContext(context.Background(), klog.Background().V(100))

	b, err := setup(dir, size, dvcrBin, slices.Contains(paths, pathDVCR))
	if err != nil {
		return err
	}
	defer b.close()

	if cpuProf != "" {
		f, err := os.Create(cpuProf)
		if err != nil {
			return fmt.Errorf("creating the CPU profile: %w", err)
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return fmt.Errorf("starting the CPU profile: %w", err)
		}
		defer pprof.StopCPUProfile() // on errors; a no-op after the stop below
	}
	best := map[string]result{}
	dropped := true
	for i := 0; i < runs; i++ {
		for _, p := range paths {
			b.clean(p)
			dropped = dropCaches() && dropped
			r, err := b.run(ctx, p)
			if err != nil {
				return fmt.Errorf("%s path: %w", p, err)
			}
			if old, ok := best[p]; !ok || r.total().wall < old.total().wall {
				best[p] = r
			}
		}
	}
	pprof.StopCPUProfile() // the check below is not part of any path
	for _, p := range paths {
		// The last run's targets are kept until here.
		if err := sameDisk(b.raw, b.target(p)); err != nil {
			return fmt.Errorf("%s path: WRONG RESULT: %w", p, err)
		}
		b.clean(p)
	}
	b.report(paths, best, runs, dropped)
	return nil
}

// bench holds what the runs share: the input, its HTTP server, DVCR.
type bench struct {
	dir, raw, qcow2 string
	size, stored    int64 // virtual size; bytes of the qcow2 file
	url             string
	httpSrv         *http.Server
	dvcr            *benchdvcr.Server
	dvcrClient      *client.Client
	tokenHTTP       *http.Client // for DVCR's token endpoint, as the populator asks it
	scratch         string       // the peer's download
	vol             string       // the populate pod's volume (MountPath)
	dvcrStored      int64        // bytes DVCR's store held after the last import
}

func setup(dir string, size int64, dvcrBin string, withDVCR bool) (*bench, error) {
	in := filepath.Join(dir, "input")
	if err := os.MkdirAll(in, 0o755); err != nil {
		return nil, err
	}
	b := &bench{
		dir:     dir,
		raw:     filepath.Join(in, fmt.Sprintf("disk-%d.raw", size)),
		qcow2:   filepath.Join(in, fmt.Sprintf("disk-%d.qcow2", size)),
		size:    size,
		scratch: filepath.Join(dir, "scratch.qcow2"),
		vol:     filepath.Join(dir, "volume"),
	}
	if err := makeInputs(b.raw, b.qcow2, size); err != nil {
		return nil, fmt.Errorf("making the input: %w", err)
	}
	st, err := os.Stat(b.qcow2)
	if err != nil {
		return nil, err
	}
	b.stored = st.Size()
	if err := os.MkdirAll(b.vol, 0o755); err != nil {
		return nil, err
	}

	// The source: a plain Go file server (Range support included), in
	// process, serving only the input directory.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("listening for the HTTP source: %w", err)
	}
	b.httpSrv = &http.Server{Handler: http.FileServer(http.Dir(in))}
	go b.httpSrv.Serve(ln)
	b.url = "http://" + ln.Addr().String() + "/" + filepath.Base(b.qcow2)

	if withDVCR {
		dd := filepath.Join(dir, "dvcr")
		if err := os.MkdirAll(dd, 0o755); err != nil {
			return nil, err
		}
		if b.dvcr, err = benchdvcr.Start(dvcrBin, dd, false); err != nil {
			b.close()
			return nil, fmt.Errorf("starting DVCR: %w", err)
		}
		// Importing takes push rights; the import pod gets a push token,
		// the admin's credentials do the same here.
		b.dvcrClient, err = client.New(b.dvcr.Addr, client.Options{Username: benchdvcr.User, Password: b.dvcr.Password, CABundle: b.dvcr.CA})
		if err != nil {
			b.close()
			return nil, fmt.Errorf("DVCR client: %w", err)
		}
		t, err := client.NewTransport(b.dvcr.CA, false)
		if err != nil {
			b.close()
			return nil, fmt.Errorf("DVCR transport: %w", err)
		}
		b.tokenHTTP = &http.Client{Transport: t, Timeout: 30 * time.Second}
	}
	return b, nil
}

func (b *bench) close() {
	b.httpSrv.Close()
	if b.dvcr != nil {
		b.dvcr.Stop()
	}
}

func (b *bench) target(path string) string {
	switch path {
	case pathPeer:
		return filepath.Join(b.dir, "target-peer.img")
	case pathDVCR:
		return filepath.Join(b.vol, api.DiskFile)
	}
	return filepath.Join(b.dir, "target-direct.img")
}

// clean removes what a path leaves (its target, the scratch file, the
// populate request, DVCR's images) and syncs, so that the path writes new
// files on a quiet disk and no import finds its blobs already stored.
func (b *bench) clean(path string) {
	os.Remove(b.target(path))
	os.Remove(b.scratch)
	os.Remove(filepath.Join(b.dir, api.RequestFile)) // it holds a token
	if b.dvcr != nil {
		b.dvcr.Reset()
	}
	syscall.Sync()
}

// dropCaches empties the page cache (root only), so that every path reads
// the source from disk, not from what the previous one left in memory.
func dropCaches() bool {
	syscall.Sync()
	return os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0) == nil
}

// stage is one timed part of a path.
type stage struct {
	name string
	wall time.Duration
	// cpu is the CPU time of everything the stage runs on: this process
	// (the HTTP source, vimg's code, the peer's download), waited-for
	// children (qemu-img) and dvcr, whose part dvcrCPU is.
	cpu, dvcrCPU time.Duration
}

// result is one run of one path.
type result struct {
	stages  []stage
	scratch int64 // peak bytes of scratch space
}

// total sums the stages.
func (r result) total() stage {
	t := stage{name: "total"}
	for _, s := range r.stages {
		t.wall += s.wall
		t.cpu += s.cpu
		t.dvcrCPU += s.dvcrCPU
	}
	return t
}

// run times one path.
func (b *bench) run(ctx context.Context, path string) (result, error) {
	switch path {
	case pathPeer:
		return b.peer()
	case pathDVCR:
		return b.throughDVCR(ctx)
	}
	return b.direct(ctx)
}

// timed runs fn and appends its wall and CPU time to r's stages.
func (b *bench) timed(r *result, name string, fn func() error) error {
	dvcrCPU := func() time.Duration {
		if b.dvcr == nil {
			return 0
		}
		return b.dvcr.CPU()
	}
	cpu0, dvcr0, start := benchdvcr.SelfCPU(true), dvcrCPU(), time.Now()
	if err := fn(); err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	wall, dvcr := time.Since(start), dvcrCPU()-dvcr0
	r.stages = append(r.stages, stage{name, wall, benchdvcr.SelfCPU(true) - cpu0 + dvcr, dvcr})
	return nil
}

// peer downloads the image into scratch space, then converts it with
// qemu-img, which reads the qcow2 with random access: it cannot from a
// stream.
func (b *bench) peer() (result, error) {
	var r result
	err := b.timed(&r, "download to scratch", func() error { return download(b.url, b.scratch) })
	if err != nil {
		return r, err
	}
	st, err := os.Stat(b.scratch)
	if err != nil {
		return r, err
	}
	r.scratch = st.Size()
	err = b.timed(&r, "qemu-img convert", func() error {
		// Default cache mode (writeback): qemu-img flushes the target
		// when it closes it, as vimg's sink syncs.
		out, err := exec.Command("qemu-img", "convert", "-O", "raw", b.scratch, b.target(pathPeer)).CombinedOutput()
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	})
	return r, err
}

// download GETs url into path and fsyncs it.
func download(url, path string) error {
	resp, err := http.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := io.Copy(f, resp.Body); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("syncing %s: %w", path, err)
	}
	return f.Close()
}

// throughDVCR is what vimg does for a VirtualImage and a claim made from
// it: an import pod stores the image in DVCR, a populate pod writes it
// onto the volume.
func (b *bench) throughDVCR(ctx context.Context) (result, error) {
	var r result
	const repo = "vi/bench/disk"
	var pinned string
	err := b.timed(&r, "import into DVCR", b.fromHTTP(ctx, func(src source.Source) error {
		res, err := importer.Import(ctx, importer.Request{Source: src, Client: b.dvcrClient, Ref: repo + ":uid-1"})
		if err != nil {
			return err
		}
		pinned = repo + "@" + res.ManifestDigest
		return nil
	}))
	if err != nil {
		return r, err
	}
	if b.dvcrStored, err = allocated(b.dvcr.Storage); err != nil {
		return r, err
	}
	err = b.timed(&r, "populate from DVCR", func() error {
		// What the populator hands a populate pod: a pull-only token for
		// the one repository and the image pinned by digest.
		tok, err := auth.RequestToken(ctx, b.tokenHTTP, b.dvcr.URL()+"/auth/token",
			benchdvcr.User, b.dvcr.Password, []string{"repository:" + repo + ":pull"}, 0)
		if err != nil {
			return err
		}
		req, err := json.Marshal(api.PopulateRequest{
			DVCR:     api.DVCRSpec{Address: b.dvcr.Addr, Ref: pinned, Token: tok.Token, CABundle: b.dvcr.CA},
			Capacity: b.size, UID: os.Getuid(), GID: os.Getgid(),
		})
		if err != nil {
			return err
		}
		reqPath := filepath.Join(b.dir, api.RequestFile)
		if err := os.WriteFile(reqPath, req, 0o600); err != nil {
			return err
		}
		return worker.Populate(ctx, worker.PopulateConfig{Config: worker.Config{RequestPath: reqPath}, MountPath: b.vol})
	})
	return r, err
}

// direct converts from the HTTP source straight onto the volume.
func (b *bench) direct(ctx context.Context) (result, error) {
	var r result
	err := b.timed(&r, "convert from HTTP", b.fromHTTP(ctx, func(src source.Source) error {
		var t sink.Target
		_, err := diskimage.Convert(ctx, src, diskimage.Options{OpenTarget: func(size int64) (diskimage.Target, error) {
			var oerr error
			t, oerr = sink.Open(b.target(pathDirect), size)
			return t, oerr
		}})
		if t != nil {
			if cerr := t.Close(); err == nil && cerr != nil {
				err = fmt.Errorf("closing the target: %w", cerr)
			}
		}
		return err
	}))
	return r, err
}

// fromHTTP returns a stage that opens the served image the way vimg's
// workers do (source.OpenHTTP: one GET, ranges when offered) and runs fn
// on it.
func (b *bench) fromHTTP(ctx context.Context, fn func(source.Source) error) func() error {
	return func() error {
		src, err := source.OpenHTTP(ctx, b.url, source.HTTPOptions{})
		if err != nil {
			return fmt.Errorf("opening %s: %w", b.url, err)
		}
		defer src.Close()
		return fn(src)
	}
}

func (b *bench) report(paths []string, best map[string]result, runs int, dropped bool) {
	names := map[string]string{
		pathPeer:   "peer: download + qemu-img (CDI, Deckhouse)",
		pathDVCR:   "vimg: through DVCR (VirtualImage)",
		pathDirect: "vimg: straight from HTTP (PVC source)",
	}
	mib := func(n int64) float64 { return float64(n) / (1 << 20) }
	fmt.Printf("Filling a volume from HTTP: %.0f MiB disk (raw), served as a %.0f MiB zlib qcow2 on loopback; best of %d run(s)\n",
		mib(b.size), mib(b.stored), runs)
	if dropped {
		fmt.Println("page cache dropped (/proc/sys/vm/drop_caches) before every path")
	} else {
		fmt.Println("page cache NOT dropped (not root, or /proc/sys read-only): the source may be read from memory")
	}
	fmt.Printf("%-44s %8s %7s %14s %7s %7s\n", "path", "seconds", "MB/s", "scratch bytes", "CPU s", "dvcr")
	row := func(name string, s stage, scratch string) {
		fmt.Printf("%-44s %8.2f %7.0f %14s %7.2f %7.2f\n", name, s.wall.Seconds(), float64(b.size)/s.wall.Seconds()/1e6,
			scratch, s.cpu.Seconds(), s.dvcrCPU.Seconds())
	}
	for _, p := range paths {
		r := best[p]
		row(names[p], r.total(), strconv.FormatInt(r.scratch, 10))
		if len(r.stages) > 1 {
			for _, s := range r.stages {
				row("    "+s.name, s, "")
			}
		}
	}
	fmt.Println("MB/s = virtual size / seconds; CPU s = user+system seconds of this process (HTTP server included), qemu-img and dvcr;")
	fmt.Println("dvcr = the dvcr process's part of it")
	if _, ok := best[pathDVCR]; ok {
		fmt.Printf("DVCR's image store holds %d bytes (the qcow2 as received) for every later volume of the image: kept, not scratch\n", b.dvcrStored)
	}
	peer, ok := best[pathPeer]
	if !ok {
		return
	}
	for _, p := range []string{pathDVCR, pathDirect} {
		if r, ok := best[p]; ok {
			ratio := peer.total().wall.Seconds() / r.total().wall.Seconds()
			verdict := "met"
			if ratio < 2 || r.scratch != 0 {
				verdict = "NOT met"
			}
			fmt.Printf("peer total / %s total = %.2fx (goal ≥ 2x and 0 scratch bytes: %s)\n", names[p], ratio, verdict)
		}
	}
}

// sameDisk fails unless target holds ref's bytes, followed by nothing but
// zeros if it is larger.
func sameDisk(ref, target string) error {
	var files [2]*os.File
	for i, name := range []string{ref, target} {
		f, err := os.Open(name)
		if err != nil {
			return fmt.Errorf("checking the result: %w", err)
		}
		defer f.Close()
		files[i] = f
	}
	a, t := files[0], files[1]
	const chunk = 4 << 20
	ba, bt := make([]byte, chunk), make([]byte, chunk)
	for off := int64(0); ; off += chunk {
		na, erra := io.ReadFull(a, ba)
		nt, errt := io.ReadFull(t, bt[:na])
		if errt != nil && na > 0 {
			return fmt.Errorf("%s is shorter than %s (%d bytes at %d): %w", target, ref, nt, off, errt)
		}
		if !bytes.Equal(ba[:na], bt[:na]) {
			return fmt.Errorf("%s differs from %s in the %d bytes at %d", target, ref, na, off)
		}
		if errors.Is(erra, io.EOF) || errors.Is(erra, io.ErrUnexpectedEOF) {
			break
		}
		if erra != nil {
			return erra
		}
	}
	for {
		n, err := t.Read(bt)
		if !bytes.Equal(bt[:n], make([]byte, n)) {
			return fmt.Errorf("%s has non-zero bytes past the end of %s", target, ref)
		}
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// allocated is the disk space of the files under dir.
func allocated(dir string) (int64, error) {
	var n int64
	err := filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			n += st.Blocks * 512
		}
		return nil
	})
	return n, err
}

// makeInputs writes the raw reference and its zlib qcow2, unless both are
// there from an earlier run. Each is written under a temporary name and
// renamed, so that an interrupted run leaves nothing that looks finished.
func makeInputs(raw, qcow2 string, size int64) error {
	if st, err := os.Stat(raw); err == nil && st.Size() == size {
		if _, err := os.Stat(qcow2); err == nil {
			return nil
		}
	}
	fmt.Fprintf(os.Stderr, "making %s and %s (once)\n", raw, qcow2)
	if err := makeRaw(raw+".tmp", size); err != nil {
		return err
	}
	if err := os.Rename(raw+".tmp", raw); err != nil {
		return err
	}
	out, err := exec.Command("qemu-img", "convert", "-O", "qcow2", "-c", "-o", "compression_type=zlib", raw, qcow2+".tmp").CombinedOutput()
	if err != nil {
		return fmt.Errorf("qemu-img convert to qcow2: %v: %s", err, out)
	}
	return os.Rename(qcow2+".tmp", qcow2)
}

// makeRaw writes a sparse disk of size bytes that looks like a used one:
// extents of 64 KiB to 4 MiB, about half of them data (half of that text,
// which compresses several-fold; half random bytes, which do not) and the
// rest holes. The seed is fixed: every run and machine gets the same disk.
func makeRaw(path string, size int64) error {
	f, err := sink.Open(path, size) // a sparse file of size bytes
	if err != nil {
		return err
	}
	defer f.Close()
	src := mrand.NewChaCha8([32]byte{'v', 'i', 'm', 'g'})
	rng := mrand.New(src)
	text := makeText(rng, 8<<20)
	buf := make([]byte, 4<<20)
	for off := int64(0); off < size; {
		n := min(int64(1+rng.IntN(64))<<16, size-off)
		if rng.IntN(2) == 0 {
			b := buf[:n]
			if rng.IntN(2) == 0 {
				copy(b, text[rng.IntN(len(text)-len(b)):])
			} else {
				src.Read(b)
			}
			if _, err := f.WriteAt(b, off); err != nil {
				return err
			}
		}
		off += n
	}
	return f.Close()
}

// makeText returns n bytes of lines of words drawn from a small vocabulary:
// log- and config-like text.
func makeText(rng *mrand.Rand, n int) []byte {
	words := strings.Fields(`the a of to and in is for on with as by at from kernel system user file
		disk volume image error warning info debug service started stopped config value true false null
		/usr/lib /etc/passwd /var/log eth0 127.0.0.1 0x7fff 4096 1024 systemd sshd cron http GET POST 200
		404 500 request response timeout connection package version install update library module`)
	var b bytes.Buffer
	for b.Len() < n {
		for w := 4 + rng.IntN(12); w > 0; w-- {
			b.WriteString(words[rng.IntN(len(words))])
			b.WriteByte(' ')
		}
		b.WriteByte('\n')
	}
	return b.Bytes()[:n]
}

// parseSize reads "2GiB", "512MiB", "64KiB" or a number of bytes.
func parseSize(s string) (int64, error) {
	mult := int64(1)
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}} {
		if strings.HasSuffix(s, u.suffix) {
			s, mult = strings.TrimSuffix(s, u.suffix), u.mult
			break
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("size %q: %w", s, err)
	}
	return n * mult, nil
}
