//go:build !linux

package sink

import (
	"fmt"
	"os"
)

func openBlock(path string, size int64) (Target, error) {
	return nil, fmt.Errorf("sink: %s: block devices are supported on Linux only", path)
}

func punchHole(f *os.File, off, n int64) error { return errUnsupported }

func zeroOut(f *os.File, off, n int64) error { return errUnsupported }
