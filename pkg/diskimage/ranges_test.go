package diskimage

import (
	"math/rand/v2"
	"testing"
)

func TestRangesGapsMatchABitmap(t *testing.T) {
	const size = 4096
	for seed := uint64(0); seed < 50; seed++ {
		r := rand.New(rand.NewPCG(seed, 1))
		var set ranges
		bits := make([]bool, size)
		for k := 0; k < 40; k++ {
			s := r.Int64N(size)
			e := min(size, s+r.Int64N(200))
			set.add(s, e)
			for i := s; i < e; i++ {
				bits[i] = true
			}
		}
		got := make([]bool, size)
		for i := range got {
			got[i] = true
		}
		for _, g := range set.gaps(size) {
			for i := g.start; i < g.end; i++ {
				got[i] = false
			}
		}
		for i := range bits {
			if bits[i] != got[i] {
				t.Fatalf("seed %d: byte %d covered=%v, gaps say %v", seed, i, bits[i], got[i])
			}
		}
	}
}
