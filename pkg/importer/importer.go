// Package importer is the data path of an import into DVCR: it reads a disk
// image from a source once, front to back, and stores it in the registry as
// a disk image (dvcr/layout), with no temporary file and no scratch volume.
//
// On the way the bytes are
//   - counted and hashed as received (the checksum asked for, else sha256),
//   - decompressed when they are gzip, xz or zstd (the image is stored
//     decompressed, in its own format: a qcow2.xz becomes a qcow2),
//   - and teed into the disk image engine's one-pass path
//     (diskimage.Convert with a target that discards), which checks the
//     image as it goes by: a corrupt or hostile image (backing files,
//     extents outside, decompression bombs, bad tables) fails the import
//     and no manifest is written. The engine also yields the virtual size.
//
// The layer's tar header carries the disk file's size, so a push needs it
// up front. When the source tells it and is not compressed, the layer is
// pushed directly. Otherwise (a compressed source, a stream of unknown
// length) the decompressed stream is spilled into DVCR itself, as a
// temporary blob of unknown length in the image's repository, and the layer
// is then pushed from that blob, whose size is now known; the blob is
// deleted afterwards (DVCR's garbage collector removes it anyway if that
// fails). This costs one more write and read inside DVCR, but needs no
// scratch volume and works for every source.
package importer

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	"k8s.io/klog/v2"

	"vimg.dev/vimg/dvcr/client"
	"vimg.dev/vimg/dvcr/layout"
	"vimg.dev/vimg/pkg/diskimage"
	"vimg.dev/vimg/pkg/diskimage/source"
)

// Request is one import into DVCR.
type Request struct {
	// Source is where the image comes from: HTTP, a file, an upload body.
	// Import reads its Stream once and does not close it.
	Source source.Source
	// Checksum, when set, is checked against the source bytes as received
	// (compressed, if the source is).
	Checksum *diskimage.Checksum
	// Client talks to DVCR.
	Client *client.Client
	// Ref is "<repository>:<tag>", the image to push.
	Ref string
	// MaxSize bounds the virtual size of the disk, and the size of the disk
	// file stored (which may exceed it by a container format's tables, at
	// most 1/32 and 64 MiB); 0 means diskimage.DefaultMaxSize.
	MaxSize int64
	// Progress is called every ProgressInterval (default 1 s) and once at
	// the end, never concurrently.
	Progress         func(Progress)
	ProgressInterval time.Duration
}

// Progress reports how far an import is.
type Progress struct {
	// SourceRead counts the bytes received from the source; SourceTotal is
	// the source's size, -1 when unknown.
	SourceRead, SourceTotal int64
	// Stored counts the bytes of the (decompressed) disk file sent to DVCR,
	// into the layer or, when the import spills, into the temporary blob.
	Stored int64
	// Copied counts the bytes of the temporary blob copied into the layer
	// (0 when the import does not spill).
	Copied int64
	// Fraction is how much of the import is done, 0..1, or -1 when it
	// cannot be told (the source pass of a stream of unknown length; its
	// copy into the layer then reports 0.8..1). Without a spill the source
	// pass is all of it; with one, the source pass counts for 0..0.8 and
	// the copy for 0.8..1. Known values only grow, and 1 comes only in the
	// last report of an import that succeeded.
	Fraction float64
	// AvgBytesPerSecond and CurrentBytesPerSecond are the source's download
	// speed since the start and over the last interval.
	AvgBytesPerSecond, CurrentBytesPerSecond int64
}

// Result describes an imported image.
type Result struct {
	ManifestDigest string
	LayerDigest    string
	Format         diskimage.Format
	// Compression is the source's wrapping; the image is stored without it.
	Compression diskimage.Compression
	// VirtualSize is the disk size the guest sees (for raw and ISO, the
	// file's length rounded up to 512 bytes, as qemu shows it); StoredSize
	// the size of the disk file in DVCR; SourceSize the bytes received
	// from the source.
	VirtualSize, StoredSize, SourceSize int64
	// SourceChecksum is "<algorithm>:<hex>" of the source as received: the
	// requested algorithm when Request.Checksum is set, else sha256.
	SourceChecksum string
	// CDROM is true for ISO images.
	CDROM bool
}

// firstPassShare is the part of Progress.Fraction the source pass stands
// for when the import spills: the copy of the blob into the layer moves
// the same bytes inside DVCR without the network to the source, so it is
// given the smaller rest.
const firstPassShare = 0.8

// Import reads req.Source once and stores the disk image as req.Ref in DVCR.
// On any failure no manifest is written, and the error can be classified
// with Classify.
func Import(ctx context.Context, req Request) (*Result, error) {
	if err := req.check(); err != nil {
		return nil, fmt.Errorf("importing into %s: %w", req.Ref, err)
	}
	repo, err := Repository(req.Ref)
	if err != nil {
		return nil, fmt.Errorf("importing into %s: %w", req.Ref, err)
	}
	log := klog.FromContext(ctx).WithValues("ref", req.Ref, "source", req.Source.Name())
	ctx = klog.NewContext(ctx, log)
	start := time.Now()
	imp := newImport(req, repo)
	stopProgress := imp.progress.start(req.Progress, req.ProgressInterval)
	res, err := imp.run(ctx)
	stopProgress(err == nil)
	if err != nil {
		log.V(1).Info("Import failed", "err", err, "sourceRead", imp.progress.read.Load(), "duration", time.Since(start))
		return nil, fmt.Errorf("importing %s into %s: %w", req.Source.Name(), req.Ref, err)
	}
	log.Info("Imported disk image", "digest", res.ManifestDigest, "format", res.Format, "compression", res.Compression,
		"virtualSize", res.VirtualSize, "storedSize", res.StoredSize, "sourceSize", res.SourceSize,
		"spilled", imp.spill, "duration", time.Since(start))
	return res, nil
}

// check refuses a request that cannot work, and puts the checksum in the
// canonical form it is compared in (lower case).
func (r *Request) check() error {
	switch {
	case r.Source == nil:
		return fmt.Errorf("%w: no source", errInvalidRequest)
	case r.Client == nil:
		return fmt.Errorf("%w: no DVCR client", errInvalidRequest)
	case r.MaxSize < 0:
		return fmt.Errorf("%w: negative size limit %d", errInvalidRequest, r.MaxSize)
	}
	if r.Checksum != nil {
		sum, err := diskimage.NewChecksum(r.Checksum.Algorithm, r.Checksum.Hex)
		if err != nil {
			return fmt.Errorf("%w: %w", errInvalidRequest, err)
		}
		r.Checksum = &sum
	}
	return nil
}

// Repository returns the repository of a DVCR reference "<repository>:<tag>",
// refusing a reference without a tag or with a digest.
func Repository(ref string) (string, error) {
	r, err := reference.Parse(ref)
	if err != nil {
		return "", fmt.Errorf("%w: reference %q: %w", errInvalidRequest, ref, err)
	}
	named, ok := r.(reference.Named)
	if _, tagged := r.(reference.Tagged); !ok || !tagged {
		return "", fmt.Errorf("%w: reference %q: want <repository>:<tag>", errInvalidRequest, ref)
	}
	if _, digested := r.(reference.Digested); digested {
		return "", fmt.Errorf("%w: reference %q: want a tag, not a digest", errInvalidRequest, ref)
	}
	return named.Name(), nil
}

// importRun is the state of one import.
type importRun struct {
	req      Request
	repo     string
	maxSize  int64
	progress *progress

	// Set while the header is read, before any byte is pushed.
	format      diskimage.Format
	compression diskimage.Compression
	spill       bool

	in  *sourceReader // the raw source: counted and hashed
	tee *tee          // the disk file: counted, bounded, teed to val
	val *validation

	verdictOnce sync.Once
	verdictErr  error
}

func newImport(req Request, repo string) *importRun {
	maxSize := req.MaxSize
	if maxSize == 0 {
		maxSize = diskimage.DefaultMaxSize
	}
	return &importRun{req: req, repo: repo, maxSize: maxSize, progress: newProgress(req.Source.Size())}
}

func (imp *importRun) run(ctx context.Context) (*Result, error) {
	rc, err := imp.req.Source.Stream()
	if err != nil {
		return nil, tag(stageSource, fmt.Errorf("opening the source stream: %w", err))
	}
	defer rc.Close()
	disk, closeDisk, err := imp.open(ctx, rc)
	if err != nil {
		return nil, err
	}
	defer closeDisk()

	pr, pw := io.Pipe()
	imp.tee = newTee(disk, pw, storedLimit(imp.format, imp.maxSize), imp.in, imp.compression != diskimage.NoCompression, &imp.progress.stored)
	vctx, cancel := context.WithCancel(ctx)
	imp.val = validate(vctx, pr, imp.req.Source.Name(), imp.maxSize)
	// Whatever happens, the engine is not left waiting for bytes.
	defer imp.stopValidation(cancel)

	if imp.spill {
		return imp.pushSpilled(ctx)
	}
	return imp.pushDirect(ctx, imp.req.Source.Size())
}

// open starts reading the source: it detects the compression and the
// format from the first bytes and returns the stream of the disk file.
func (imp *importRun) open(ctx context.Context, rc io.Reader) (*peekReader, func(), error) {
	imp.in = newSourceReader(rc, imp.req.Checksum, &imp.progress.read)
	raw := newPeekReader(imp.in)
	hdr, err := raw.peek()
	if err != nil {
		return nil, nil, tag(stageSource, fmt.Errorf("reading the header: %w", err))
	}
	imp.compression = diskimage.DetectCompression(hdr)
	closeDisk := func() {}
	disk := raw
	if imp.compression != diskimage.NoCompression {
		var dr io.ReadCloser
		if disk, dr, err = decompress(imp.compression, raw); err != nil {
			return nil, nil, err
		}
		closeDisk = func() { dr.Close() }
		if hdr, err = disk.peek(); err != nil {
			closeDisk()
			return nil, nil, tag(stageDecompress, fmt.Errorf("reading the decompressed header: %w", err))
		}
		if inner := diskimage.DetectCompression(hdr); inner != diskimage.NoCompression {
			closeDisk()
			return nil, nil, fmt.Errorf("%w: %s inside %s", errNestedCompression, inner, imp.compression)
		}
	}
	if len(hdr) == 0 {
		closeDisk()
		return nil, nil, tag(stageValidate, errEmpty)
	}
	imp.format = diskimage.DetectFormat(hdr)
	// The layer's header needs the disk file's size: only an uncompressed
	// source of known size tells it before the end.
	imp.spill = imp.compression != diskimage.NoCompression || imp.req.Source.Size() < 0
	imp.progress.plan(imp.spill)
	klog.FromContext(ctx).V(2).Info("Detected the image", "format", imp.format, "compression", imp.compression, "spill", imp.spill)
	return disk, closeDisk, nil
}

// pushDirect pushes the layer straight from the source, whose size is the
// disk file's. The metadata the engine finds at the end (the virtual size)
// and the checksum's verdict are filled in after the upload, before the
// manifest.
func (imp *importRun) pushDirect(ctx context.Context, size int64) (*Result, error) {
	if limit := storedLimit(imp.format, imp.maxSize); size > limit {
		return nil, fmt.Errorf("%w: the %s file is %d bytes, over the %d-byte limit", errTooLarge, imp.format, size, limit)
	}
	meta := layout.Meta{Format: layoutFormat(imp.format)}
	var virtual int64
	pushed, err := imp.req.Client.Push(ctx, imp.req.Ref, imp.tee, size, meta, client.PushOptions{
		Finalize: func(m *layout.Meta) error {
			res, err := imp.verdict()
			if err != nil {
				return err
			}
			virtual = guestSize(imp.format, res.Info.VirtualSize)
			m.VirtualSize, m.SourceChecksum = virtual, imp.in.checksum()
			return nil
		},
	})
	if err != nil {
		return nil, imp.cause(err)
	}
	return imp.result(pushed, virtual, size), nil
}

// pushSpilled stores the disk file as a temporary blob, then pushes the
// layer from it. Validation happens during the first pass, so an image the
// engine refuses is never copied into a layer.
func (imp *importRun) pushSpilled(ctx context.Context) (*Result, error) {
	log := klog.FromContext(ctx)
	blob, err := imp.req.Client.PushBlob(ctx, imp.repo, imp.tee)
	if err != nil {
		return nil, imp.cause(err)
	}
	defer imp.deleteBlob(ctx, blob.Digest)
	res, err := imp.verdict()
	if err != nil {
		return nil, err
	}
	log.V(2).Info("Spilled the disk file into DVCR; copying it into the layer", "blob", blob.Digest, "bytes", blob.Size)
	virtual := guestSize(imp.format, res.Info.VirtualSize)
	meta := layout.Meta{Format: layoutFormat(imp.format), VirtualSize: virtual, SourceChecksum: imp.in.checksum()}
	rc, err := imp.req.Client.BlobReader(ctx, imp.repo, blob.Digest)
	if err != nil {
		return nil, tag(stageRegistry, fmt.Errorf("reading back the spilled disk file: %w", err))
	}
	defer rc.Close()
	imp.progress.copying(blob.Size)
	pushed, err := imp.req.Client.Push(ctx, imp.req.Ref, rc, blob.Size, meta, client.PushOptions{
		Progress: func(n int64) { imp.progress.copied.Store(n) },
	})
	if err != nil {
		return nil, tag(stageRegistry, err)
	}
	return imp.result(pushed, virtual, blob.Size), nil
}

// deleteBlob removes the spilled blob, best effort: garbage collection
// removes it anyway once its grace period is over. It runs even when ctx is
// done (an import cancelled after the spill), with a bound of its own.
//
// The blob is named by the digest of the disk file, so two imports of the
// same bytes into the same repository at the same time share it, and the
// first to finish unlinks it under the other, whose copy then fails and is
// retried (a transient error). Repositories are per object, so this takes
// an object re-created while its previous import still runs.
func (imp *importRun) deleteBlob(ctx context.Context, d digest.Digest) {
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), blobDeleteTimeout)
	defer cancel()
	if err := imp.req.Client.DeleteBlob(dctx, imp.repo, d); err != nil {
		klog.FromContext(ctx).Info("Could not delete the spilled blob; garbage collection will", "blob", d, "err", err)
	}
}

// blobDeleteTimeout bounds the clean-up of a spilled blob.
const blobDeleteTimeout = 30 * time.Second

// verdict waits for the engine and checks the checksum, once the stream is
// at its end. It is the engine's result, or why the image is refused.
func (imp *importRun) verdict() (*diskimage.Result, error) {
	imp.verdictOnce.Do(func() {
		<-imp.val.done
		switch {
		case imp.tee.sourceErr() != nil:
			imp.verdictErr = imp.tee.sourceErr()
		case imp.val.err != nil:
			imp.verdictErr = tag(stageValidate, imp.val.err)
		case !imp.tee.atEnd():
			// The engine cannot succeed before the stream's end; if it did,
			// the checksum below would cover part of the source.
			imp.verdictErr = errors.New("the engine finished before the end of the stream")
		case imp.val.res.Info.Format != imp.format:
			imp.verdictErr = fmt.Errorf("the engine read a %s image where the header says %s", imp.val.res.Info.Format, imp.format)
		default:
			imp.verdictErr = imp.in.verify()
		}
	})
	return imp.val.res, imp.verdictErr
}

// cause picks, after a failed push, the failure that set things off: the
// source's (the push only saw its consequence), then the engine's refusal
// (which aborts the upload by failing the tee), then DVCR's own.
func (imp *importRun) cause(pushErr error) error {
	if err := imp.tee.sourceErr(); err != nil {
		return err
	}
	engineDone := false
	select {
	case <-imp.val.done:
		engineDone = true
	default:
	}
	if engineDone || imp.tee.refused() {
		if _, err := imp.verdict(); err != nil {
			return err
		}
	}
	return tag(stageRegistry, pushErr)
}

// stopValidation ends the engine's input (no-op when the stream already
// ended) and its context, and waits for it, so that no goroutine outlives
// Import.
func (imp *importRun) stopValidation(cancel context.CancelFunc) {
	imp.tee.abort(errImportStopped)
	cancel()
	<-imp.val.done
}

// errImportStopped is what the engine reads when the import ends early for
// a reason of its own (DVCR failed).
var errImportStopped = errors.New("the import stopped")

func (imp *importRun) result(p client.Pushed, virtual, stored int64) *Result {
	return &Result{
		ManifestDigest: p.Digest.String(),
		LayerDigest:    p.Layer.Digest.String(),
		Format:         imp.format,
		Compression:    imp.compression,
		VirtualSize:    virtual,
		StoredSize:     stored,
		SourceSize:     imp.progress.read.Load(),
		SourceChecksum: imp.in.checksum(),
		CDROM:          imp.format == diskimage.ISO,
	}
}

// layoutFormat names a format the way layout.Meta does.
func layoutFormat(f diskimage.Format) string {
	switch f {
	case diskimage.QCOW2:
		return layout.FormatQcow2
	case diskimage.VMDK:
		return layout.FormatVMDK
	case diskimage.VDI:
		return layout.FormatVDI
	case diskimage.ISO:
		return layout.FormatISO
	}
	return layout.FormatRaw
}

// guestSize is the disk size a guest sees: qemu exposes a raw file (or an
// ISO) rounded up to whole 512-byte sectors, and so does qemu-img info; the
// engine reports the file's length.
func guestSize(f diskimage.Format, virtual int64) int64 {
	if f == diskimage.Raw || f == diskimage.ISO {
		return (virtual + 511) &^ 511
	}
	return virtual
}

// storedLimit bounds the disk file of a format for a virtual size limit:
// raw and ISO files are the disk; a container adds its tables (qcow2 with
// 512-byte clusters, the worst case, adds 1/64 for L2 tables and less for
// refcounts) and headers.
func storedLimit(f diskimage.Format, maxSize int64) int64 {
	if f == diskimage.Raw || f == diskimage.ISO {
		return maxSize
	}
	return maxSize + maxSize/32 + 64<<20
}
