// Package codec decodes the compressed payloads found inside disk images
// (qcow2 clusters, VMDK grains) in one call per payload, into a buffer of
// known size, so that the engine can run many of them in parallel.
//
// Deflate and zlib payloads go through libdeflate when the package is built
// with cgo (about twice as fast as Go's inflate, which is what lets a
// conversion beat qemu-img) and through klauspost/compress otherwise; zstd
// always uses klauspost/compress. Implementation says which one runs.
//
// The package also opens the compressed wrappers an image may come in
// (.gz, .xz, .zst): see NewReader and DetectWrapper.
package codec

import (
	"errors"
	"fmt"
	"io"
	"strings"

	"vimg.dev/vimg/pkg/diskimage/stream"
)

// ErrTooLarge is returned when a payload decodes to more bytes than the
// format allows: a compressed cluster that inflates past its size.
var ErrTooLarge = fmt.Errorf("%w: compressed payload inflates past its size", stream.ErrCorrupt)

// Implementation names the deflate/zlib decoder compiled in: "libdeflate"
// (cgo builds) or "go" (klauspost/compress).
func Implementation() string { return implementation }

// Decode decodes src, encoded with c, into dst. dst has the size the format
// promises for the payload; Decode returns how many bytes were produced.
//
//   - Producing more than len(dst) fails with ErrTooLarge, decoding no
//     further than dst's end (to tell a zstd bomb from a corrupt block, a
//     zstd frame that fails is decoded once more into len(dst) plus 128 KiB).
//     Which of ErrTooLarge and another ErrCorrupt error a broken stream gets
//     may differ between implementations; that one fails does not.
//   - Producing fewer is not an error: n < len(dst) and the caller pads with
//     zeros, as qemu does for a short final cluster.
//   - Bytes after the end of the compressed stream are ignored (qcow2 rounds
//     compressed clusters up to a sector, and the rest of that sector is
//     whatever follows in the file).
//   - A stream that ends before its final block (truncated) or breaks the
//     format fails with an error wrapping stream.ErrCorrupt.
//
// Decode is safe for concurrent use.
func Decode(c stream.Codec, dst, src []byte) (int, error) {
	switch c {
	case stream.Raw:
		if len(src) > len(dst) {
			return 0, ErrTooLarge
		}
		return copy(dst, src), nil
	case stream.Deflate:
		return inflate(false, dst, src)
	case stream.Zlib:
		return inflate(true, dst, src)
	case stream.Zstd:
		return decodeZstd(dst, src)
	}
	return 0, fmt.Errorf("%w: unknown codec %v", stream.ErrCorrupt, c)
}

// corrupt wraps a decoder's complaint about its input.
func corrupt(what string, err error) error {
	if errors.Is(err, stream.ErrCorrupt) || errors.Is(err, stream.ErrUnsupported) {
		return err
	}
	if errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("%w: %s: stream is truncated", stream.ErrCorrupt, what)
	}
	// Decoders prefix their own name ("zlib: invalid checksum"); say it once.
	msg := strings.TrimPrefix(err.Error(), what+": ")
	return fmt.Errorf("%w: %s: %s", stream.ErrCorrupt, what, msg)
}
