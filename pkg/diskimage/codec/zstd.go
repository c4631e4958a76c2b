package codec

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"

	"github.com/klauspost/compress/zstd"

	"vimg.dev/vimg/pkg/diskimage/stream"
)

// zstdBlockMax is the most a single zstd block may decode to (RFC 8878
// Block_Maximum_Size).
const zstdBlockMax = 128 << 10

// zstdDecoder is shared by every Decode call: DecodeAll is safe for
// concurrent use and runs up to GOMAXPROCS calls at once, each on its own
// block decoder. WithDecodeAllCapLimit makes DecodeAll write into the
// caller's buffer and never grow it past its capacity, which Decode sets to
// len(dst).
var zstdDecoder = sync.OnceValues(func() (*zstd.Decoder, error) {
	return zstd.NewReader(nil,
		zstd.WithDecoderConcurrency(0),
		zstd.WithDecodeAllCapLimit(true),
	)
})

// decodeZstd decodes the zstd frames at the start of src into dst, the way
// qemu does for a qcow2 cluster: frames are decoded until dst is full or
// something that is not a frame follows (the sector padding); skippable
// frames are passed over.
//
// Each frame is measured by walking its block headers before it is decoded,
// so that DecodeAll sees exactly one frame and not the padding behind it, and
// so that a frame whose declared content size (or raw and RLE blocks alone)
// overflows dst is refused before anything is decoded.
func decodeZstd(dst, src []byte) (int, error) {
	dec, err := zstdDecoder()
	if err != nil {
		return 0, fmt.Errorf("zstd: creating decoder: %w", err)
	}
	n, frames := 0, 0
	for n < len(dst) || frames == 0 {
		if len(src) >= 4 && binary.LittleEndian.Uint32(src)&^0xf == 0x184d2a50 {
			skip, err := zstdSkippableLen(src)
			if err != nil {
				return n, err
			}
			src = src[skip:]
			continue
		}
		if len(src) < 4 || binary.LittleEndian.Uint32(src) != 0xfd2fb528 {
			if frames == 0 {
				return 0, fmt.Errorf("%w: zstd: payload does not start with a zstd frame", stream.ErrCorrupt)
			}
			return n, nil // padding after the last frame
		}
		flen, err := zstdFrameLen(src, len(dst)-n)
		if err != nil {
			return n, err
		}
		room := dst[n:n:len(dst)]
		out, err := dec.DecodeAll(src[:flen], room)
		switch {
		case errors.Is(err, zstd.ErrDecoderSizeExceeded):
			return n, ErrTooLarge
		case err != nil:
			return n, zstdFailure(dec, src[:flen], len(room[:cap(room)]), err)
		case len(out) > len(room[:cap(room)]):
			return n, ErrTooLarge
		case len(out) > 0 && &out[0] != &dst[n]:
			copy(dst[n:], out) // DecodeAll moved to a new buffer; never expected with the cap limit
		}
		n += len(out)
		frames++
		src = src[flen:]
	}
	return n, nil
}

// zstdSkippableLen is the length of the skippable frame at the start of src.
func zstdSkippableLen(src []byte) (int, error) {
	if len(src) < 8 {
		return 0, fmt.Errorf("%w: zstd: skippable frame header is truncated", stream.ErrCorrupt)
	}
	size := uint64(binary.LittleEndian.Uint32(src[4:]))
	if size > uint64(len(src)-8) {
		return 0, fmt.Errorf("%w: zstd: skippable frame of %d bytes runs past the payload's %d bytes", stream.ErrCorrupt, size, len(src)-8)
	}
	return 8 + int(size), nil
}

// zstdFrameLen returns the length of the zstd frame at the start of src by
// walking its block headers, and refuses a frame that would certainly
// decode to more than room bytes.
func zstdFrameLen(src []byte, room int) (int, error) {
	var h zstd.Header
	if err := h.Decode(src); err != nil {
		return 0, corrupt("zstd: frame header", err)
	}
	if h.HasFCS && h.FrameContentSize > uint64(room) {
		return 0, ErrTooLarge
	}
	pos, least := h.HeaderSize, uint64(0)
	for {
		if len(src)-pos < 3 {
			return 0, fmt.Errorf("%w: zstd: frame is truncated (block header at %d of %d bytes)", stream.ErrCorrupt, pos, len(src))
		}
		bh := uint32(src[pos]) | uint32(src[pos+1])<<8 | uint32(src[pos+2])<<16
		pos += 3
		last, size := bh&1 != 0, int(bh>>3)
		body := size
		switch (bh >> 1) & 3 {
		case 0: // raw: size bytes copied
			least += uint64(size)
		case 1: // RLE: one byte repeated size times
			least += uint64(size)
			body = 1
		case 2: // compressed: size bytes of input, at most zstdBlockMax out
			if size > zstdBlockMax {
				return 0, fmt.Errorf("%w: zstd: compressed block of %d bytes exceeds the %d-byte maximum", stream.ErrCorrupt, size, zstdBlockMax)
			}
		default:
			return 0, fmt.Errorf("%w: zstd: block at offset %d has the reserved type", stream.ErrCorrupt, pos-3)
		}
		if least > uint64(room) {
			return 0, ErrTooLarge
		}
		if body > len(src)-pos {
			return 0, fmt.Errorf("%w: zstd: frame is truncated (block of %d bytes at %d, payload is %d bytes)", stream.ErrCorrupt, body, pos, len(src))
		}
		pos += body
		if last {
			break
		}
	}
	if h.HasCheckSum {
		if len(src)-pos < 4 {
			return 0, fmt.Errorf("%w: zstd: frame is truncated (checksum missing)", stream.ErrCorrupt)
		}
		pos += 4
	}
	return pos, nil
}

// zstdFailure classifies a frame DecodeAll refused. With the cap limit, a
// frame without a content size that outgrows its room fails mid-block with
// the same error as a corrupt block ("output bigger than max block size").
// Decoding it again with one block more of room tells them apart: a bomb's
// next block then completes and shows output past room. This runs only for
// frames already known bad and costs one buffer of room plus a block.
func zstdFailure(dec *zstd.Decoder, frame []byte, room int, err error) error {
	if out, _ := dec.DecodeAll(frame, make([]byte, 0, room+zstdBlockMax)); len(out) > room {
		return ErrTooLarge
	}
	return corrupt("zstd", err)
}
