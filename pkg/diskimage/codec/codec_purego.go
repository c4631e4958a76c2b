//go:build !cgo

package codec

const implementation = "go"

// Without cgo, deflate and zlib payloads go through klauspost/compress
// (goinflate.go), about half the speed of libdeflate.
func inflate(zlibWrapped bool, dst, src []byte) (int, error) {
	return goInflate(zlibWrapped, dst, src)
}
