package worker

import (
	"context"
	"fmt"

	"vimg.dev/vimg/pkg/diskimage"
	"vimg.dev/vimg/pkg/diskimage/stream"
	"vimg.dev/vimg/pkg/worker/api"
)

// errEmpty refuses a source without a byte, as the importer does: a disk of
// no size is no disk.
var errEmpty = fmt.Errorf("%w: the source is empty", stream.ErrCorrupt)

// Probe reads the source an import request names just far enough to tell
// its format and virtual size (to its end for raw data or a stream of
// unknown length), and records them in the termination message as a Result
// without Digest and StoredSize: the image controller sizes the claim of an
// image stored in a PersistentVolumeClaim with it. A source that is no
// usable image fails permanently, as its import would. Like Run, the
// returned error is the failure already recorded.
func Probe(ctx context.Context, cfg Config) error {
	return conclude(ctx, cfg, probe(ctx, cfg), "Probe done", "Probe failed")
}

func probe(ctx context.Context, cfg Config) api.Outcome {
	o, err := openRequest(ctx, cfg.RequestPath, "vimg-worker/", false)
	if err != nil {
		return failure(err)
	}
	defer o.src.Close()
	info, err := diskimage.Inspect(ctx, o.src)
	if err == nil && info.VirtualSize == 0 {
		err = errEmpty
	}
	if err != nil {
		return failure(err)
	}
	return api.Outcome{Result: &api.Result{
		Format:      string(info.Format),
		VirtualSize: info.VirtualSize,
		SourceSize:  sourceSize(info.FileSize, o.src.Size()),
		CDROM:       info.CDROM,
	}}
}

// sourceSize is the size of the source as read: known if the source or the
// image told it, else what was counted, else 0.
func sourceSize(known, counted int64) int64 {
	if known >= 0 {
		return known
	}
	return max(counted, 0)
}
