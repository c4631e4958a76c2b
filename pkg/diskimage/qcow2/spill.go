package qcow2

import (
	"fmt"
	"sort"
)

// spill holds bytes read before the decoder knew what they were, up to a
// limit. The decoder only moves forward, so segments arrive in file order.
type spill struct {
	limit int64
	used  int64
	segs  []segment
}

type segment struct {
	start int64 // file offset of buf[0]
	buf   []byte
}

func (s segment) end() int64 { return s.start + int64(len(s.buf)) }

func newSpill(limit int64) *spill { return &spill{limit: limit} }

// put keeps a copy of data, read at file offset off. Offsets only grow, but
// a put may overlap the end of the previous one (a shared sector).
func (s *spill) put(off int64, data []byte) error {
	if k := len(s.segs); k > 0 && s.segs[k-1].end() > off {
		skip := s.segs[k-1].end() - off
		if skip >= int64(len(data)) {
			return nil
		}
		off, data = off+skip, data[skip:]
	}
	n := int64(len(data))
	if s.used+n > s.limit {
		return fmt.Errorf("%w: the image stores data before the tables that map it, and holding it would take more than %d MiB; give vimg a seekable source (a local file, or an HTTP server that supports Range requests)",
			errSpill, s.limit>>20)
	}
	s.used += n
	if k := len(s.segs); k > 0 && s.segs[k-1].end() == off && len(s.segs[k-1].buf) < 4<<20 {
		s.segs[k-1].buf = append(s.segs[k-1].buf, data...)
		return nil
	}
	s.segs = append(s.segs, segment{start: off, buf: append([]byte(nil), data...)})
	return nil
}

// take copies [off, off+n) out of the spill.
func (s *spill) take(off, n int64) ([]byte, bool) {
	out := make([]byte, n)
	i := sort.Search(len(s.segs), func(i int) bool { return s.segs[i].end() > off })
	for done := int64(0); done < n; i++ {
		cur := off + done
		if i >= len(s.segs) || s.segs[i].start > cur {
			return nil, false
		}
		done += int64(copy(out[done:], s.segs[i].buf[cur-s.segs[i].start:]))
	}
	return out, true
}

func (s *spill) drop() {
	s.segs = nil
	s.used = 0
}

// dropUnneeded frees every segment no pending target reads from.
func (s *spill) dropUnneeded(wanted targetHeap) {
	kept := s.segs[:0]
	s.used = 0
	for _, sg := range s.segs {
		for _, t := range wanted {
			if t.host < sg.end() && t.host+t.n > sg.start {
				kept = append(kept, sg)
				s.used += int64(len(sg.buf))
				break
			}
		}
	}
	clear(s.segs[len(kept):])
	s.segs = kept
}
