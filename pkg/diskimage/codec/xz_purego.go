//go:build !cgo

package codec

import (
	"io"

	"github.com/ulikunitz/xz"
)

const xzImplementation = "go"

// newXZReader decodes the guarded xz stream g with ulikunitz/xz, in the
// calling goroutine. src is the tap under the guard, for telling the
// source's errors from complaints about the data.
func newXZReader(src *tap, g io.Reader) (io.ReadCloser, error) {
	// DictCap is only the least dictionary ulikunitz allocates (the
	// stream's own size wins when larger), so keep it minimal and let
	// the guard refuse large ones.
	xr, err := xz.ReaderConfig{DictCap: 4096}.NewReader(g)
	if err != nil {
		return nil, src.wrap("xz", err)
	}
	return &reader{kind: "xz", r: xr, src: src}, nil
}
