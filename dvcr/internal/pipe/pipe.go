// Package pipe reads a stream ahead in a goroutine of its own, so that
// reading it (a socket, a file) and hashing it overlap with whatever the
// consumer does with the bytes (encrypting and sending them, writing them to
// disk). A disk image moves through DVCR as one long stream; done in a single
// goroutine, the read, the SHA-256 and the write take turns on one core while
// the other idles.
package pipe

import (
	"errors"
	"hash"
	"io"
	"sync"
)

// Reader reads its source ahead into a few large buffers. It implements
// io.WriterTo, so that io.Copy hands whole buffers to the destination (one
// system call per buffer, not per 32 KiB). It is not safe for concurrent use;
// Close may be called from any goroutine.
type Reader struct {
	full chan chunk
	free chan []byte
	stop chan struct{}
	once sync.Once
	wg   sync.WaitGroup
	cur  []byte // the buffer being consumed
	rest []byte // cur's unread part
	err  error  // sticky, from the source, after the last chunk
}

type chunk struct {
	b   []byte
	err error
}

// New starts reading r ahead in buffers of size bytes, at most count of
// them filled ahead of the consumer. Every byte read is written to tap (a
// hash; nil for none) in the reading goroutine, in order, before the
// consumer sees it.
func New(r io.Reader, tap hash.Hash, size, count int) *Reader {
	p := &Reader{
		full: make(chan chunk, count),
		free: make(chan []byte, count+1),
		stop: make(chan struct{}),
	}
	for i := 0; i < count+1; i++ {
		p.free <- make([]byte, size)
	}
	p.wg.Add(1)
	go p.fill(r, tap)
	return p
}

func (p *Reader) fill(r io.Reader, tap hash.Hash) {
	defer p.wg.Done()
	defer close(p.full)
	for {
		var b []byte
		select {
		case b = <-p.free:
		case <-p.stop:
			return
		}
		n, err := io.ReadFull(r, b)
		if errors.Is(err, io.ErrUnexpectedEOF) {
			err = io.EOF // a short last buffer
		}
		if n > 0 && tap != nil {
			// Before the send: the consumer that sees the end has seen
			// every byte hashed (the channel orders the two).
			tap.Write(b[:n])
		}
		select {
		case p.full <- chunk{b: b[:n], err: err}:
		case <-p.stop:
			return
		}
		if err != nil {
			return
		}
	}
}

// errClosed is what reads return after Close.
var errClosed = errors.New("pipe: reader closed")

// next makes the next filled buffer current; false once the source's error
// (io.EOF at the end) is the only thing left.
func (p *Reader) next() bool {
	if p.cur != nil {
		p.free <- p.cur[:cap(p.cur)] // never blocks: free holds every buffer
		p.cur, p.rest = nil, nil
	}
	if p.err != nil {
		return false
	}
	c, ok := <-p.full
	if !ok {
		p.err = errClosed
		return false
	}
	p.cur, p.rest, p.err = c.b, c.b, c.err
	return true
}

// Read implements io.Reader.
func (p *Reader) Read(b []byte) (int, error) {
	for len(p.rest) == 0 {
		if !p.next() {
			return 0, p.err
		}
	}
	n := copy(b, p.rest)
	p.rest = p.rest[n:]
	return n, nil
}

// WriteTo implements io.WriterTo: whole buffers go to w as they come.
func (p *Reader) WriteTo(w io.Writer) (int64, error) {
	var total int64
	for {
		for len(p.rest) > 0 {
			n, err := w.Write(p.rest)
			total += int64(n)
			p.rest = p.rest[n:]
			if err != nil {
				return total, err
			}
		}
		if !p.next() {
			if p.err == io.EOF {
				return total, nil
			}
			return total, p.err
		}
	}
}

// Close stops the reading goroutine and waits for it, so that the source
// is no longer read once Close returns and belongs to the caller again.
// A read of the source in progress is waited for: close a source that may
// block (a network stream) first. Bytes read ahead are dropped.
func (p *Reader) Close() error {
	p.once.Do(func() { close(p.stop) })
	p.wg.Wait()
	return nil
}
