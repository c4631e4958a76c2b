package vdi

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// readBlockMap reads the h.entries block map entries that cover the disk from
// r, positioned at the start of the map, checks each one and hands it to
// visit. It reads in pieces so that memory only grows with bytes that really
// arrived: a header claiming a huge map costs nothing until the map is there.
func readBlockMap(r io.Reader, h *header, visit func(v int64, e uint32)) error {
	buf := make([]byte, 4*min(h.entries, entriesPerReadMax))
	for v := int64(0); v < h.entries; {
		n := min(h.entries-v, entriesPerReadMax)
		b := buf[:4*n]
		if _, err := io.ReadFull(r, b); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return corrupt("block map (%d entries at offset %d) is cut short after entry %d: %v",
					h.entries, h.offsetBmap, v, io.ErrUnexpectedEOF)
			}
			return fmt.Errorf("vdi: reading the block map: %w", err)
		}
		for i := int64(0); i < n; i++ {
			e := binary.LittleEndian.Uint32(b[4*i:])
			if err := h.checkEntry(v+i, e); err != nil {
				return err
			}
			visit(v+i, e)
		}
		v += n
	}
	return nil
}
