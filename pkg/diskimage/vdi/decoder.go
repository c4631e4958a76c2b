package vdi

import (
	"errors"
	"fmt"
	"io"
	"slices"

	"vimg.dev/vimg/pkg/diskimage/stream"
)

// decoder streams a VDI whose header and block map have been read.
type decoder struct {
	r   io.Reader
	h   *header
	pos int64 // bytes of r consumed so far
	// placed lists every stored virtual block as dataBlock<<32 | virtualBlock,
	// sorted: the order in which the blocks come in the data area. Two
	// virtual blocks may share a data block (qemu reads such images without
	// complaint, so vimg does too): they are adjacent here.
	placed []uint64
	ran    bool
}

// NewDecoder reads the header and block map from r (a sequential stream at
// byte 0) and returns a stream.Decoder that, on Run, reads the data area once
// and Puts each stored block as a stream.Raw Chunk. Blocks that are all zeros
// are not Put; blocks come in file order, not disk order.
func NewDecoder(r io.Reader) (stream.Decoder, Info, error) {
	d := &decoder{r: r}
	hb := make([]byte, headerSize)
	if err := d.readFull(hb, "the header"); err != nil {
		return nil, Info{}, err
	}
	h, err := parseHeader(hb)
	if err != nil {
		return nil, Info{}, err
	}
	d.h = h
	if err := d.skipTo(h.offsetBmap, "the block map"); err != nil {
		return nil, Info{}, err
	}
	err = readBlockMap(d.r, h, func(v int64, e uint32) {
		if e < entryDiscarded {
			d.placed = append(d.placed, uint64(e)<<32|uint64(v))
		}
	})
	if err != nil {
		return nil, Info{}, err
	}
	d.pos = h.bmapEnd
	// Images qemu and VirtualBox write are nearly always in order already.
	if !slices.IsSorted(d.placed) {
		slices.Sort(d.placed)
	}
	// The rest of the map and any padding up to the data area carry nothing
	// the disk needs; they are read and dropped in Run, so that a caller
	// that only wants Info has read no more than the map.
	return d, h.info, nil
}

func (d *decoder) Size() int64 { return d.h.info.VirtualSize }

// Run reads the data area in file order and Puts the stored blocks, then
// reads r to its end so that the whole input has been consumed.
func (d *decoder) Run(sink stream.Sink) error {
	if d.ran {
		return errors.New("vdi: Run called twice")
	}
	d.ran = true
	h := d.h
	if err := d.skipTo(h.offsetData, "the data area"); err != nil {
		return err
	}
	var buf []byte
	for i := 0; i < len(d.placed); {
		e := int64(d.placed[i] >> 32)
		// All virtual blocks stored in data block e, and how much of the
		// block they need (only the disk's last block is partial).
		j, need := i, int64(0)
		for ; j < len(d.placed) && int64(d.placed[j]>>32) == e; j++ {
			need = max(need, h.blockLen(int64(uint32(d.placed[j]))))
		}
		start := h.offsetData + e*blockSize
		what := fmt.Sprintf("data block %d (disk offset %d)", e, int64(uint32(d.placed[i]))*blockSize)
		if err := d.skipTo(start, what); err != nil {
			return err
		}
		if buf == nil {
			buf = make([]byte, blockSize)
		}
		if err := d.readFull(buf[:need], what); err != nil {
			return err
		}
		if !allZero(buf[:need]) {
			for k := i; k < j; k++ {
				v := int64(uint32(d.placed[k]))
				n := h.blockLen(v)
				payload := buf[:n]
				if k < j-1 { // the last one takes buf itself
					payload = slices.Clone(payload)
				}
				if err := sink.Put(stream.Chunk{Off: v * blockSize, Len: int(n), Codec: stream.Raw, Payload: payload}); err != nil {
					return err
				}
			}
			buf = nil // handed to the sink
		}
		i = j
	}
	// Whatever follows (padding of the last block, blocks nothing points
	// to) is read and dropped: the input must still be whole.
	if _, err := io.Copy(io.Discard, d.r); err != nil {
		return fmt.Errorf("vdi: reading past the last data block at offset %d: %w", d.pos, err)
	}
	return nil
}

// readFull reads len(b) bytes, reporting a stream that ends early as corrupt.
func (d *decoder) readFull(b []byte, what string) error {
	n, err := io.ReadFull(d.r, b)
	d.pos += int64(n)
	if err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return fmt.Errorf("vdi: %w: the stream ended at byte %d, inside %s (bytes %d to %d): %w",
				stream.ErrCorrupt, d.pos, what, d.pos-int64(n), d.pos-int64(n)+int64(len(b)), io.ErrUnexpectedEOF)
		}
		return fmt.Errorf("vdi: reading %s at offset %d: %w", what, d.pos, err)
	}
	return nil
}

// skipTo reads and drops bytes up to offset off, where what begins. The
// header checks and the sorted block order make off >= d.pos.
func (d *decoder) skipTo(off int64, what string) error {
	if off < d.pos {
		return corrupt("%s at offset %d lies before the current position %d", what, off, d.pos)
	}
	n, err := io.CopyN(io.Discard, d.r, off-d.pos)
	d.pos += n
	if err != nil {
		if errors.Is(err, io.EOF) {
			return fmt.Errorf("vdi: %w: the stream ended at byte %d, before %s at offset %d: %w",
				stream.ErrCorrupt, d.pos, what, off, io.ErrUnexpectedEOF)
		}
		return fmt.Errorf("vdi: reading up to %s at offset %d: %w", what, off, err)
	}
	return nil
}
