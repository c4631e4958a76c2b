package codec

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"vimg.dev/vimg/pkg/diskimage/stream"
)

// xzGuard sits between the compressed source and the xz decoder (liblzma
// or ulikunitz/xz, see XZImplementation) and walks the .xz container
// (stream headers, block headers, LZMA2 chunk headers, index) ahead of it,
// handing on each structure only after checking it. It exists because
// ulikunitz allocates whatever dictionary a block header declares (up to
// 4 GiB, its ReaderConfig.DictCap is a floor, not a limit) and keeps a
// record per block, and liblzma's only bound is its memory limit, so the
// limits must be applied before either sees the bytes, and the refusal
// should say which limit and why, the same in both builds. The walk only
// reads headers: chunk payloads pass through untouched, so it costs next to
// nothing. Checksums and everything else are still verified by the decoder.
type xzGuard struct {
	src     *bufio.Reader
	maxDict int64
	pend    []byte // checked structure bytes not yet handed on
	skip    int64  // payload bytes to hand on without looking at them
	state   xzState
	err     error // sticky; io.EOF after the last stream
	check   int   // size of the block check field in the current stream
	blocks  int   // blocks in the current stream
	total   int   // blocks so far, for messages
	data    int64 // LZMA2 bytes of the current block so far
	records int   // index varints still to read
	idxLen  int64 // index bytes so far
	buf     [1024]byte
}

type xzState uint8

const (
	xzStreamHeader xzState = iota // the first stream header
	xzAfterStream                 // stream padding, another stream, or the end
	xzBlockOrIndex                // a block header, or the index indicator
	xzChunk                       // an LZMA2 chunk header inside a block
	xzIndex                       // index records
)

// xzMaxBlocks bounds the blocks in one stream: the reader keeps a 16-byte
// index record per block, so a stream of tiny blocks would otherwise cost
// memory in proportion to its length. 4 Mi blocks is 64 MiB of records and,
// at xz's smallest multi-threaded block size (1 MiB), a 4 TiB stream.
const xzMaxBlocks = 4 << 20

func newXZGuard(r io.Reader, maxDict int64) *xzGuard {
	return &xzGuard{src: bufio.NewReaderSize(r, 64<<10), maxDict: maxDict}
}

func (g *xzGuard) Read(p []byte) (int, error) {
	for len(g.pend) == 0 && g.skip == 0 {
		if g.err != nil {
			return 0, g.err
		}
		g.err = g.step()
	}
	if len(g.pend) > 0 {
		n := copy(p, g.pend)
		g.pend = g.pend[n:]
		return n, nil
	}
	if int64(len(p)) > g.skip {
		p = p[:g.skip]
	}
	n, err := g.src.Read(p)
	g.skip -= int64(n)
	if err == io.EOF {
		if g.skip > 0 {
			g.err = io.ErrUnexpectedEOF
			return n, g.err
		}
		err = nil // the next structure will find the end
	}
	return n, err
}

// xzErr reports a structural problem.
func xzErr(format string, args ...any) error {
	return fmt.Errorf("%w: xz: %s", stream.ErrCorrupt, fmt.Sprintf(format, args...))
}

// read reads exactly n (≤ len(g.buf)) more bytes after the k already in
// g.buf, returning g.buf[:k+n].
func (g *xzGuard) read(k, n int) ([]byte, error) {
	m, err := io.ReadFull(g.src, g.buf[k:k+n])
	if err == io.EOF && m == 0 && k > 0 {
		err = io.ErrUnexpectedEOF
	}
	return g.buf[:k+m], err
}

// step reads and checks the next structure, leaving its bytes in g.pend
// and the length of the payload that follows it in g.skip.
func (g *xzGuard) step() error {
	switch g.state {
	case xzStreamHeader:
		b, err := g.read(0, 12)
		if err != nil {
			return unexpected(err)
		}
		return g.streamHeader(b)

	case xzAfterStream:
		b, err := g.read(0, 4)
		if err != nil {
			if err == io.EOF {
				return io.EOF // the end, between streams
			}
			return err
		}
		if bytes.Equal(b, []byte{0, 0, 0, 0}) {
			g.pend = b // stream padding
			return nil
		}
		if b, err = g.read(4, 8); err != nil {
			return unexpected(err)
		}
		return g.streamHeader(b)

	case xzBlockOrIndex:
		b, err := g.read(0, 1)
		if err != nil {
			return unexpected(err)
		}
		if b[0] == 0 { // index indicator
			count, b, err := g.varint(b)
			if err != nil {
				return err
			}
			if count != uint64(g.blocks) {
				return xzErr("index lists %d records for a stream of %d blocks", count, g.blocks)
			}
			g.idxLen = int64(len(b))
			g.records = 2 * g.blocks
			g.state = xzIndex
			g.pend = b
			return nil
		}
		b, err = g.read(1, (int(b[0])+1)*4-1)
		if err != nil {
			return unexpected(err)
		}
		if err := g.blockHeader(b); err != nil {
			return err
		}
		g.pend = b
		return nil

	case xzChunk:
		b, err := g.read(0, 1)
		if err != nil {
			return unexpected(err)
		}
		c := b[0]
		switch {
		case c == 0: // end of the block's LZMA2 data
			g.data++
			g.skip = (4-g.data%4)%4 + int64(g.check) // padding and check
			g.state = xzBlockOrIndex
		case c == 1 || c == 2: // uncompressed chunk
			if b, err = g.read(1, 2); err != nil {
				return unexpected(err)
			}
			g.skip = int64(binary.BigEndian.Uint16(b[1:])) + 1
			g.data += 3 + g.skip
		case c >= 0x80: // LZMA chunk, with a properties byte from 0xc0 on
			k := 4
			if c >= 0xc0 {
				k = 5
			}
			if b, err = g.read(1, k); err != nil {
				return unexpected(err)
			}
			g.skip = int64(binary.BigEndian.Uint16(b[3:])) + 1
			g.data += int64(1+k) + g.skip
		default:
			return xzErr("block %d: invalid LZMA2 chunk control byte %#02x", g.total, c)
		}
		g.pend = b
		return nil

	case xzIndex:
		var b []byte
		for g.records > 0 && len(b) < len(g.buf)-16 {
			var err error
			if _, b, err = g.varint(b); err != nil {
				return err
			}
			g.records--
		}
		g.idxLen += int64(len(b))
		if g.records == 0 {
			// Index padding, its CRC32 and the stream footer.
			g.skip = (4-g.idxLen%4)%4 + 4 + 12
			g.state = xzAfterStream
		}
		g.pend = b
		return nil
	}
	return errors.New("xz: guard in an impossible state")
}

// unexpected turns an end of input inside a structure into ErrUnexpectedEOF.
func unexpected(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// varint reads a multibyte integer (at most 9 bytes) and appends its bytes
// to b, which must lie at the start of g.buf.
func (g *xzGuard) varint(b []byte) (uint64, []byte, error) {
	start := len(b)
	for i := 0; i < 9; i++ {
		var err error
		if b, err = g.read(len(b), 1); err != nil {
			return 0, b, unexpected(err)
		}
		if b[len(b)-1]&0x80 == 0 {
			v, n := binary.Uvarint(b[start:])
			if n <= 0 {
				return 0, b, xzErr("invalid integer")
			}
			return v, b, nil
		}
	}
	return 0, b, xzErr("integer longer than 9 bytes")
}

func (g *xzGuard) streamHeader(b []byte) error {
	if !bytes.Equal(b[:6], []byte{0xfd, '7', 'z', 'X', 'Z', 0}) {
		return xzErr("expected a stream header, found % x", b[:6])
	}
	if b[6] != 0 || b[7]&0xf0 != 0 {
		return fmt.Errorf("%w: xz: stream flags %#02x %#02x are not supported", stream.ErrUnsupported, b[6], b[7])
	}
	// Check sizes by check ID, from the .xz specification.
	g.check = [16]int{0, 4, 4, 4, 8, 8, 8, 16, 16, 16, 32, 32, 32, 64, 64, 64}[b[7]&0xf]
	g.blocks = 0
	g.state = xzBlockOrIndex
	g.pend = b
	return nil
}

// blockHeader checks a whole block header: one LZMA2 filter whose
// dictionary is within the limit.
func (g *xzGuard) blockHeader(h []byte) error {
	g.total++
	if g.blocks++; g.blocks > xzMaxBlocks {
		return fmt.Errorf("%w: xz: stream has more than %d blocks", stream.ErrUnsupported, xzMaxBlocks)
	}
	flags := h[1]
	if flags&0x3c != 0 {
		return xzErr("block %d: reserved header flags %#02x are set", g.total, flags)
	}
	p, end := 2, len(h)-4 // the last 4 bytes are the header's CRC32
	field := func() (uint64, error) {
		if p >= end {
			return 0, xzErr("block %d: header is too short for its fields", g.total)
		}
		v, n := binary.Uvarint(h[p:end])
		if n <= 0 {
			return 0, xzErr("block %d: invalid integer in header", g.total)
		}
		p += n
		return v, nil
	}
	if flags&0x40 != 0 { // compressed size
		if _, err := field(); err != nil {
			return err
		}
	}
	if flags&0x80 != 0 { // uncompressed size
		if _, err := field(); err != nil {
			return err
		}
	}
	for i := 0; i <= int(flags&3); i++ {
		id, err := field()
		if err != nil {
			return err
		}
		size, err := field()
		if err != nil {
			return err
		}
		if size > uint64(end-p) {
			return xzErr("block %d: filter properties run past the header", g.total)
		}
		props := h[p : p+int(size)]
		p += int(size)
		if id != 0x21 {
			return fmt.Errorf("%w: xz: block %d uses filter %#x; only LZMA2 (0x21) is supported", stream.ErrUnsupported, g.total, id)
		}
		if len(props) != 1 || props[0] > 40 {
			return xzErr("block %d: invalid LZMA2 properties % x", g.total, props)
		}
		dict := int64(1)<<32 - 1
		if c := props[0]; c < 40 {
			dict = int64(2|c&1) << (c/2 + 11)
		}
		if dict > g.maxDict {
			return fmt.Errorf("%w: xz: block %d declares a %d MiB LZMA2 dictionary, more than the %d MiB limit (made with xz --lzma2=dict=...?)",
				stream.ErrUnsupported, g.total, dict>>20, g.maxDict>>20)
		}
	}
	g.data = 0
	g.state = xzChunk
	return nil
}
