package diskimage

import (
	"fmt"
	"io"

	"github.com/lima-vm/go-qcow2reader/image"
)

// rawImage is a raw disk or ISO read in place. It knows nothing of holes; the
// engine finds zeros in what it reads.
type rawImage struct {
	ra   io.ReaderAt
	size int64
	typ  image.Type
}

func (r *rawImage) ReadAt(p []byte, off int64) (int, error) {
	if off >= r.size {
		return 0, io.EOF
	}
	if max := r.size - off; int64(len(p)) > max {
		n, err := r.ra.ReadAt(p[:max], off)
		if err == nil {
			err = io.EOF
		}
		return n, err
	}
	return r.ra.ReadAt(p, off)
}

func (r *rawImage) Extent(start, length int64) (image.Extent, error) {
	if start < 0 || length < 0 || start+length > r.size {
		return image.Extent{}, fmt.Errorf("extent %d+%d out of bounds (size %d)", start, length, r.size)
	}
	return image.Extent{Start: start, Length: length, Allocated: true}, nil
}

func (r *rawImage) Close() error     { return nil }
func (r *rawImage) Type() image.Type { return r.typ }
func (r *rawImage) Size() int64      { return r.size }
func (r *rawImage) Readable() error  { return nil }
