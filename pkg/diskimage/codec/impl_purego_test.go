//go:build !cgo

package codec

const wantImplementation = "go"
