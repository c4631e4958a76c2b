package diskimage

import (
	"sort"
	"sync"
)

// ranges is a set of half-open byte ranges of the target that hold written
// data. What is left over at the end must read as zeros, which a fresh sparse
// file does by itself and a block device does only once told (BLKZEROOUT).
type ranges struct {
	mu   sync.Mutex
	list []span // sorted, disjoint, not adjacent
}

type span struct{ start, end int64 }

func (r *ranges) add(start, end int64) {
	if start >= end {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	// Writes come mostly in ascending order: try the tail first.
	if n := len(r.list); n == 0 || r.list[n-1].end < start {
		r.list = append(r.list, span{start, end})
		return
	} else if r.list[n-1].start <= start {
		if end > r.list[n-1].end {
			r.list[n-1].end = end
		}
		return
	}
	// First span that ends at or after start, last that starts at or before end.
	i := sort.Search(len(r.list), func(i int) bool { return r.list[i].end >= start })
	j := sort.Search(len(r.list), func(i int) bool { return r.list[i].start > end })
	if i == j {
		r.list = append(r.list, span{})
		copy(r.list[i+1:], r.list[i:])
		r.list[i] = span{start, end}
		return
	}
	merged := span{min(start, r.list[i].start), max(end, r.list[j-1].end)}
	r.list = append(r.list[:i+1], r.list[j:]...)
	r.list[i] = merged
}

// gaps returns the ranges of [0, size) not covered.
func (r *ranges) gaps(size int64) []span {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []span
	pos := int64(0)
	for _, s := range r.list {
		if s.start >= size {
			break
		}
		if s.start > pos {
			out = append(out, span{pos, s.start})
		}
		pos = max(pos, s.end)
	}
	if pos < size {
		out = append(out, span{pos, size})
	}
	return out
}
