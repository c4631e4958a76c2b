package worker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"vimg.dev/vimg/dvcr/client"
	"vimg.dev/vimg/pkg/diskimage"
	"vimg.dev/vimg/pkg/diskimage/sink"
	"vimg.dev/vimg/pkg/diskimage/source"
	"vimg.dev/vimg/pkg/importer"
	"vimg.dev/vimg/pkg/version"
	"vimg.dev/vimg/pkg/worker/api"
)

// PopulateConfig wires a populate run: Config's pod and reporting fields,
// plus where the volume is (the api paths in a pod; tests point them at
// files) and, for a request FromSource, the import request naming the
// source.
type PopulateConfig struct {
	Config
	DevicePath, MountPath string
	// SourceRequestPath is the import request (api.Request) a request
	// FromSource writes the source of; RequestDir/RequestFile by default.
	SourceRequestPath string
}

// Populate writes the image a populate request names onto the volume and
// records the outcome in the termination message, like Run.
func Populate(ctx context.Context, cfg PopulateConfig) error {
	if cfg.DevicePath == "" {
		cfg.DevicePath = api.PopulateDevicePath
	}
	if cfg.MountPath == "" {
		cfg.MountPath = api.PopulateMountPath
	}
	if cfg.SourceRequestPath == "" {
		cfg.SourceRequestPath = api.RequestDir + "/" + api.RequestFile
	}
	return conclude(ctx, cfg.Config, populate(ctx, cfg), "Volume populated", "Populating failed")
}

// record writes an outcome into the termination message.
func record(ctx context.Context, cfg Config, out api.Outcome) {
	if cfg.TerminationMessagePath == "" {
		return
	}
	if err := os.WriteFile(cfg.TerminationMessagePath, out.Encode(), 0o644); err != nil {
		klog.FromContext(ctx).Error(err, "Writing the termination message failed")
	}
}

func populate(ctx context.Context, cfg PopulateConfig) api.Outcome {
	req, err := readPopulateRequest(cfg.RequestPath)
	if err != nil {
		return api.Outcome{Reason: importer.ReasonInternal, Message: err.Error(), Permanent: true}
	}
	if req.Cloned {
		return adoptClone(ctx, cfg, req)
	}
	if req.FromSource {
		return populateFromSource(ctx, cfg, req)
	}
	dvcr, err := client.New(req.DVCR.Address, client.Options{
		Token:     req.DVCR.Token,
		CABundle:  req.DVCR.CABundle,
		UserAgent: "vimg-populate/" + version.Version,
	})
	if err != nil {
		return api.Outcome{Reason: importer.ReasonInternal, Message: "DVCR client: " + err.Error(), Permanent: true}
	}
	im, err := dvcr.Open(ctx, req.DVCR.Ref)
	if errors.Is(err, client.ErrNotFound) {
		return api.Outcome{Reason: api.ReasonImageChanged, Message: fmt.Sprintf("%s is no longer in DVCR: the image was deleted or imported again", req.DVCR.Ref)}
	}
	if err != nil {
		return api.Outcome{Reason: importer.ReasonTransient, Message: "reading the image's manifest from DVCR: " + err.Error()}
	}
	src := source.NewRangeSource(ctx, im.Ref, im.Size(), func(ctx context.Context, off int64, p []byte) error {
		n, err := im.ReadAtContext(ctx, p, off)
		if n == len(p) {
			return nil
		}
		if err == nil || errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return err
	}, source.RangeOptions{})
	defer src.Close()

	res, err := (&volume{cfg: cfg, req: req}).fill(ctx, src, nil)
	if err != nil {
		var e *importer.Error
		if errors.As(err, &e) {
			return api.Outcome{Reason: e.Reason, Message: e.Message, Permanent: e.Permanent}
		}
		if ctx.Err() != nil {
			return api.Outcome{Reason: importer.ReasonTransient, Message: "interrupted: " + err.Error()}
		}
		// The image was validated when it was imported: a failure now is
		// the registry or the volume, worth another attempt.
		return api.Outcome{Reason: importer.ReasonTransient, Message: err.Error()}
	}
	return api.Outcome{Populated: res}
}

// populateFromSource writes the source of the import request at
// cfg.SourceRequestPath onto the volume, checking its checksum. Unlike an
// image in DVCR, the source was never validated: what is wrong with it is
// classified as for an import.
func populateFromSource(ctx context.Context, cfg PopulateConfig, req api.PopulateRequest) api.Outcome {
	o, err := openRequest(ctx, cfg.SourceRequestPath, "vimg-populate/", false)
	if err != nil {
		return failure(err)
	}
	defer o.src.Close()
	res, err := (&volume{cfg: cfg, req: req}).fill(ctx, o.src, o.checksum)
	if err != nil {
		return failure(err)
	}
	return api.Outcome{Populated: res}
}

// adoptClone takes over the disk.img a CSI clone left on the volume. The
// image is already there, so nothing is read or written: disk.img only
// grows (sparsely) to this volume's usable size, never shrinks, and goes
// to the guest's user.
func adoptClone(ctx context.Context, cfg PopulateConfig, req api.PopulateRequest) api.Outcome {
	v := &volume{cfg: cfg, req: req, path: filepath.Join(cfg.MountPath, api.DiskFile)}
	// Lstat: a symlink must not make us grow or chown a file elsewhere.
	fi, err := os.Lstat(v.path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return api.Outcome{Reason: importer.ReasonInternal, Permanent: true, Message: "the cloned volume holds no " + api.DiskFile}
	case err != nil:
		return api.Outcome{Reason: importer.ReasonTransient, Message: fmt.Sprintf("checking %s: %v", api.DiskFile, err)}
	case !fi.Mode().IsRegular():
		return api.Outcome{Reason: importer.ReasonInternal, Permanent: true, Message: fmt.Sprintf(
			"the cloned volume's %s is %s, not a regular file", api.DiskFile, fileKind(fi.Mode()))}
	}
	size := fi.Size()
	if size < req.VirtualSize {
		// The source's disk.img always holds the whole image: this clone
		// is of something else.
		return api.Outcome{Reason: importer.ReasonInternal, Permanent: true, Message: fmt.Sprintf(
			"the cloned volume's %s holds %s (%d bytes), less than the image's virtual size %s (%d bytes): the clone is not the image",
			api.DiskFile, api.BytesIEC(size), size, api.BytesIEC(req.VirtualSize), req.VirtualSize)}
	}
	usable, err := v.usable()
	if err != nil {
		return api.Outcome{Reason: importer.ReasonTransient, Message: err.Error()}
	}
	if usable < size {
		// Shrinking would cut off the end of the disk: keep it whole.
		klog.FromContext(ctx).Info("Keeping the cloned disk.img larger than the volume's usable size",
			"size", size, "usable", usable)
	} else if usable > size {
		if err := os.Truncate(v.path, usable); err != nil {
			return api.Outcome{Reason: importer.ReasonTransient, Message: fmt.Sprintf("growing %s: %v", api.DiskFile, err)}
		}
		size = usable
	}
	if err := v.finish(); err != nil {
		return api.Outcome{Reason: importer.ReasonTransient, Message: err.Error()}
	}
	// Nothing ticks for an adoption this quick: write 100% at once, so the
	// pod's progress ends there as after a fill.
	rep := newReporter(cfg.Config)
	rep.report(api.Progress{Fraction: 1})
	if cfg.PodName != "" && cfg.Kube != nil {
		rep.flush(ctx)
	}
	return api.Outcome{Populated: &api.PopulateResult{
		VirtualSize: req.VirtualSize,
		DiskSize:    size,
		Format:      "raw",
	}}
}

// fileKind names what a file of mode m is, for messages.
func fileKind(m fs.FileMode) string {
	switch {
	case m&fs.ModeSymlink != 0:
		return "a symbolic link"
	case m.IsDir():
		return "a directory"
	default:
		return "a special file (" + m.Type().String() + ")"
	}
}

func readPopulateRequest(path string) (api.PopulateRequest, error) {
	b, err := os.ReadFile(filepath.Clean(path))
	if err != nil {
		return api.PopulateRequest{}, fmt.Errorf("reading the populate request: %w", err)
	}
	var r api.PopulateRequest
	if err := json.Unmarshal(b, &r); err != nil {
		return api.PopulateRequest{}, fmt.Errorf("parsing the populate request: %w", err)
	}
	switch {
	case r.Cloned && r.FromSource:
		return api.PopulateRequest{}, errors.New("the populate request is both cloned and from a source")
	case r.Cloned && r.Block:
		return api.PopulateRequest{}, errors.New("a cloned volume is a Filesystem volume")
	case r.Cloned && r.VirtualSize <= 0:
		return api.PopulateRequest{}, errors.New("the cloned populate request names no virtual size")
	case !r.Cloned && !r.FromSource && (r.DVCR.Address == "" || r.DVCR.Ref == ""):
		return api.PopulateRequest{}, errors.New("the populate request names no DVCR address or reference")
	}
	if r.FilesystemOverhead < 0 || r.FilesystemOverhead > 0.5 {
		return api.PopulateRequest{}, fmt.Errorf("the populate request's file system overhead %v is outside 0..0.5", r.FilesystemOverhead)
	}
	return r, nil
}

// volume opens the populate pod's volume once the disk's size is known.
type volume struct {
	cfg    PopulateConfig
	req    api.PopulateRequest
	path   string
	target sink.Target
}

// fill converts src onto the volume, checking sum if set, reporting
// progress on the pod, and describes what it wrote.
func (v *volume) fill(ctx context.Context, src source.Source, sum *diskimage.Checksum) (*api.PopulateResult, error) {
	rep := newReporter(v.cfg.Config)
	stop := rep.start(ctx)
	began := time.Now()
	res, err := diskimage.Convert(ctx, src, diskimage.Options{
		OpenTarget: v.open,
		Checksum:   sum,
		Progress: func(p diskimage.Progress) {
			secs := max(time.Since(began).Seconds(), 0.001)
			rep.report(api.Progress{Fraction: p.Fraction, SourceRead: p.SourceRead, SourceTotal: p.SourceTotal,
				AvgSpeed: int64(float64(p.SourceRead) / secs)})
		},
	})
	if v.target != nil {
		if cerr := v.target.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("closing the volume: %w", cerr)
		}
	}
	if err == nil {
		err = v.finish()
	}
	if err != nil {
		stop()
		return nil, err
	}
	read := sourceSize(src.Size(), res.SourceRead)
	rep.report(api.Progress{Fraction: 1, SourceRead: read, SourceTotal: read})
	stop()
	return &api.PopulateResult{
		VirtualSize:    res.Info.VirtualSize,
		DiskSize:       v.target.Size(),
		Written:        res.Written,
		Read:           res.SourceRead,
		Format:         string(res.Info.Format),
		CDROM:          res.Info.CDROM,
		SourceSize:     sourceSize(res.Info.FileSize, res.SourceRead),
		SourceChecksum: res.Digest,
	}, nil
}

// open opens the volume for a disk of size bytes, or of a size known only
// at its end (-1: raw data decompressed from a source; never an image in
// DVCR), which then gets the whole volume.
func (v *volume) open(size int64) (diskimage.Target, error) {
	if size < 0 && !v.req.FromSource {
		// Images in DVCR always have a known size; a raw stream of
		// unknown length never reaches a populate pod.
		return nil, &importer.Error{Reason: importer.ReasonInternal, Message: "the image's size is unknown", Permanent: true}
	}
	if v.req.Block {
		v.path = v.cfg.DevicePath
		// Open with size 0 first so that a device too small is told
		// apart from every other failure.
		t, err := sink.Open(v.path, 0)
		if err != nil {
			return nil, fmt.Errorf("opening the volume: %w", err)
		}
		have := fmt.Sprintf("the block volume holds %s", api.BytesIEC(t.Size()))
		if t.Size() < size {
			t.Close()
			return nil, tooSmall(have, size, size)
		}
		return v.keep(t, size, have), nil
	}
	v.path = filepath.Join(v.cfg.MountPath, api.DiskFile)
	usable, err := v.usable()
	if err != nil {
		return nil, err
	}
	have := fmt.Sprintf("the file system volume leaves %s for %s (%s less %.1f%% for the file system)",
		api.BytesIEC(usable), api.DiskFile, api.BytesIEC(v.req.Capacity), v.req.FilesystemOverhead*100)
	if usable < size {
		return nil, tooSmall(have, size, api.FilesystemClaimSize(size, v.req.FilesystemOverhead))
	}
	t, err := sink.Open(v.path, usable)
	if err != nil {
		return nil, fmt.Errorf("creating %s on the volume: %w", api.DiskFile, err)
	}
	return v.keep(t, size, have), nil
}

// keep keeps t, the volume open for a disk of size bytes, and returns
// the target to write: a disk of unknown size that outgrows the volume
// fails as too small (have says what the volume holds), not as a write out
// of range.
func (v *volume) keep(t sink.Target, size int64, have string) diskimage.Target {
	v.target = t
	if size >= 0 {
		return t
	}
	return growing{Target: t, have: have}
}

// growing is a volume written with a disk of unknown size. It has no
// Truncate: the disk keeps the volume's size.
type growing struct {
	sink.Target
	have string
}

func (g growing) WriteAt(p []byte, off int64) (int, error) {
	if end := off + int64(len(p)); end > g.Size() {
		return 0, &importer.Error{Reason: api.ReasonTooSmall, Permanent: true, Message: fmt.Sprintf(
			"%s but the image, whose size shows only once it is read whole, is larger (%s at least): the source has grown since its size was probed; create the image again",
			g.have, api.BytesIEC(end))}
	}
	return g.Target.WriteAt(p, off)
}

// usable is the size disk.img gets: the volume's capacity less the file
// system's overhead, no more than the file system has free (some
// provisioners hand out more capacity than they back), in whole MiB. Both
// a fill and a cloned volume use it.
func (v *volume) usable() (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(v.cfg.MountPath, &st); err != nil {
		return 0, fmt.Errorf("reading the volume's free space: %w", err)
	}
	free := int64(st.Bavail) * int64(st.Bsize)
	if fi, err := os.Stat(v.path); err == nil && fi.Mode().IsRegular() {
		// A disk.img already there keeps its space for the new one: a
		// fill replaces one left by an earlier attempt; a clone's is
		// grown. Its allocated blocks, not its size, are counted, so a
		// sparse clone is not taken for space the file system has not.
		if s, ok := fi.Sys().(*syscall.Stat_t); ok {
			free += s.Blocks * 512
		}
	}
	want := v.req.Capacity
	if want <= 0 {
		want = free
	}
	return min(api.UsableDiskSize(want, v.req.FilesystemOverhead), free/api.DiskAlign*api.DiskAlign), nil
}

// finish gives disk.img to the guest's user.
func (v *volume) finish() error {
	if v.req.Block || v.path == "" {
		return nil
	}
	fi, err := os.Stat(v.path)
	if err != nil {
		return fmt.Errorf("checking %s: %w", api.DiskFile, err)
	}
	if s, ok := fi.Sys().(*syscall.Stat_t); ok && (int(s.Uid) != v.req.UID || int(s.Gid) != v.req.GID) {
		if err := os.Chown(v.path, v.req.UID, v.req.GID); err != nil {
			return fmt.Errorf("giving %s to %d:%d: %w", api.DiskFile, v.req.UID, v.req.GID, err)
		}
	}
	if err := os.Chmod(v.path, 0o660); err != nil {
		return fmt.Errorf("setting the mode of %s: %w", api.DiskFile, err)
	}
	return nil
}

func tooSmall(have string, size, need int64) error {
	return &importer.Error{Reason: api.ReasonTooSmall, Permanent: true, Message: api.TooSmallMessage(have, size, need)}
}
