// Package stream is the contract between the format readers and the
// conversion engine for sources that cannot seek (a pipe, a decompressor, an
// upload body, an HTTP server without Range).
//
// A format's stream decoder reads its input once, front to back, and hands the
// engine Chunks: pieces of the virtual disk at known offsets, either as plain
// bytes or still compressed. Decompression is left to the engine so that it can
// run on every core while the decoder keeps reading; the decoder itself only
// parses metadata and frames payloads.
package stream

import (
	"errors"
	"fmt"
)

// Codec says how a Chunk's payload is encoded.
type Codec uint8

const (
	// Raw payloads are the disk bytes themselves.
	Raw Codec = iota
	// Deflate is a raw RFC 1951 stream (qcow2 "zlib" clusters).
	Deflate
	// Zlib is an RFC 1950 stream with header and Adler-32 (VMDK grains).
	Zlib
	// Zstd is a zstd frame (qcow2 compression_type=1).
	Zstd
)

func (c Codec) String() string {
	switch c {
	case Raw:
		return "raw"
	case Deflate:
		return "deflate"
	case Zlib:
		return "zlib"
	case Zstd:
		return "zstd"
	}
	return fmt.Sprintf("codec(%d)", uint8(c))
}

// Chunk is a piece of the virtual disk.
type Chunk struct {
	// Off is the offset in the virtual disk where the decoded bytes go.
	Off int64
	// Len is the number of decoded bytes. For Raw it equals len(Payload).
	// A chunk may run past the end of the disk (formats store the last
	// cluster or grain whole); the receiver clips it. It may not start
	// past the end.
	// A compressed payload must decode to exactly Len bytes (a shorter result
	// is padded with zeros, as qemu does for a short final cluster; a longer
	// one is an error: it is how a decompression bomb shows).
	Len int
	// Codec is how Payload is encoded.
	Codec Codec
	// Payload is owned by the receiver once Put is called: the decoder must
	// not touch it again.
	Payload []byte
	// Recycle, when set, is called by the receiver with Payload once it is
	// done with it, so that a decoder can reuse its buffers instead of
	// leaving one per chunk to the garbage collector (at a GiB/s that is
	// most of the CPU a raw stream costs). A receiver may also not call it.
	Recycle func([]byte)
}

// End is the virtual offset just past the chunk.
func (c Chunk) End() int64 { return c.Off + int64(c.Len) }

// Sink receives chunks in any order. Ranges never written read as zeros.
// Put may block to apply back-pressure; an error from Put must make the
// decoder stop and return it.
type Sink interface {
	Put(Chunk) error
}

// Decoder is a format's sequential reader, created once the header is parsed.
type Decoder interface {
	// Size is the virtual disk size in bytes, known from the header.
	Size() int64
	// Run reads the rest of the input and hands every non-zero piece of the
	// disk to sink. It returns nil only when the whole input was consumed and
	// was consistent.
	Run(sink Sink) error
}

// ErrCorrupt marks input that breaks the format's rules. Errors from
// decoders and readers wrap it (or a more specific sentinel) so that callers
// can tell bad input from I/O trouble.
var ErrCorrupt = errors.New("corrupt image")

// ErrUnsupported marks valid input that uses a feature vimg refuses on
// purpose (backing files, external data, encryption, ...).
var ErrUnsupported = errors.New("unsupported image feature")
