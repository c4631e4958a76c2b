package importer

import (
	"sync/atomic"
	"time"
)

// progress gathers the counters of an import; the reporting goroutine turns
// them into Progress.
type progress struct {
	total  int64 // the source's size, -1 unknown
	read   atomic.Int64
	stored atomic.Int64
	copied atomic.Int64
	// planned is planUnknown until the header is read.
	planned  atomic.Int32
	copySize atomic.Int64 // > 0 once the blob is copied into the layer

	// The reporter's own state.
	began    time.Time
	lastRead int64
	lastAt   time.Time
	last     float64
}

const (
	planUnknown int32 = iota
	planDirect
	planSpill
)

// maxRunning is the highest Fraction reported before the import is done:
// reading the last source byte is not the end (the manifest is).
const maxRunning = 0.99

// defaultInterval is how often Progress is reported.
const defaultInterval = time.Second

func newProgress(total int64) *progress {
	return &progress{total: total, last: -1}
}

// plan records whether the import spills, which decides the scale.
func (p *progress) plan(spill bool) {
	if spill {
		p.planned.Store(planSpill)
	} else {
		p.planned.Store(planDirect)
	}
}

// copying records the start of the copy of a spilled blob of size bytes.
func (p *progress) copying(size int64) { p.copySize.Store(max(size, 1)) }

// start reports to cb every interval until the returned stop is called,
// which reports once more (Fraction 1 when ok) after the last tick.
func (p *progress) start(cb func(Progress), interval time.Duration) (stop func(ok bool)) {
	if cb == nil {
		return func(bool) {}
	}
	if interval <= 0 {
		interval = defaultInterval
	}
	p.began, p.lastAt = time.Now(), time.Now()
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				cb(p.snapshot(false))
			case <-done:
				return
			}
		}
	}()
	return func(ok bool) {
		close(done)
		<-finished
		cb(p.snapshot(ok))
	}
}

// snapshot is the report of now. It is called from one goroutine at a time.
func (p *progress) snapshot(finished bool) Progress {
	now := time.Now()
	read := p.read.Load()
	s := Progress{
		SourceRead:  read,
		SourceTotal: p.total,
		Stored:      p.stored.Load(),
		Copied:      p.copied.Load(),
		Fraction:    p.fraction(finished),
	}
	if d := now.Sub(p.began).Seconds(); d > 0 {
		s.AvgBytesPerSecond = int64(float64(read) / d)
	}
	if d := now.Sub(p.lastAt).Seconds(); d > 0 {
		s.CurrentBytesPerSecond = int64(float64(read-p.lastRead) / d)
	}
	p.lastRead, p.lastAt = read, now
	return s
}

// fraction computes Fraction and keeps it from going down.
func (p *progress) fraction(finished bool) float64 {
	if finished {
		p.last = 1
		return 1
	}
	f := -1.0
	switch size := p.copySize.Load(); {
	case size > 0:
		f = firstPassShare + (1-firstPassShare)*float64(p.copied.Load())/float64(size)
	case p.total > 0:
		f = float64(p.read.Load()) / float64(p.total)
		if p.planned.Load() != planDirect {
			// Until the header says otherwise, assume the smaller scale:
			// a later jump up is fine, a step back is not.
			f *= firstPassShare
		}
	}
	if f < 0 {
		return p.last
	}
	f = min(f, maxRunning)
	if f < p.last {
		f = p.last
	}
	p.last = f
	return f
}
