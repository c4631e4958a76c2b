package importer

import (
	"context"
	"fmt"
	"io"

	"vimg.dev/vimg/pkg/diskimage"
	"vimg.dev/vimg/pkg/diskimage/source"
)

// validation is the engine reading the disk file as it goes by, in the
// goroutine validate starts. done is closed when it has finished; res and
// err are set before.
type validation struct {
	done chan struct{}
	res  *diskimage.Result
	err  error
}

// validate runs the engine's one-pass path over what arrives in pr, with a
// target that discards: the point is the engine's checks of every table and
// payload, and the virtual size it finds, not the raw disk. It refuses a
// disk over maxSize as soon as the header tells the size. When it fails it
// closes pr with its error, so that the tee's next write fails and the
// upload stops.
func validate(ctx context.Context, pr *io.PipeReader, name string, maxSize int64) *validation {
	v := &validation{done: make(chan struct{})}
	go func() {
		defer close(v.done)
		res, err := diskimage.Convert(ctx, source.FromReader(pr, name), diskimage.Options{
			Sequential: true,
			// The limit is checked in OpenTarget, where it can say so; the
			// engine's own check would call it an unsupported feature.
			MaxSize: max(maxSize, diskimage.DefaultMaxSize),
			OpenTarget: func(size int64) (diskimage.Target, error) {
				if size > maxSize {
					return nil, fmt.Errorf("%w: the disk is %d bytes, over the %d-byte limit", errTooLarge, size, maxSize)
				}
				return &discardTarget{size: size}, nil
			},
		})
		if err != nil {
			pr.CloseWithError(err)
		} else {
			pr.Close()
		}
		v.res, v.err = res, err
	}()
	return v
}

// discardTarget is a diskimage.Target that keeps nothing. Truncate makes it
// usable for a raw stream of unknown size (size -1).
type discardTarget struct{ size int64 }

func (t *discardTarget) WriteAt(p []byte, _ int64) (int, error) { return len(p), nil }
func (t *discardTarget) Zero(_, _ int64) error                  { return nil }
func (t *discardTarget) Size() int64                            { return t.size }
func (t *discardTarget) Sync() error                            { return nil }
func (t *discardTarget) Truncate(size int64) error              { t.size = size; return nil }
