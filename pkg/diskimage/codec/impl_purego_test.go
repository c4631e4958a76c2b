//go:build !cgo

package codec

const (
	wantImplementation   = "go"
	wantXZImplementation = "go"
)
