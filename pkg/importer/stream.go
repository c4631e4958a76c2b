package importer

import (
	"bufio"
	"crypto/md5"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"sync/atomic"

	"vimg.dev/vimg/pkg/diskimage"
	"vimg.dev/vimg/pkg/diskimage/codec"
)

// The reader chain of an import, all of it read by the goroutine that feeds
// the upload:
//
//	source stream -> sourceReader (counts, hashes) -> peekReader
//	   [-> decompressor -> stagedReader -> peekReader]
//	   -> tee (counts, bounds, copies into the engine's pipe) -> upload

// sourceReader counts and hashes the source's bytes as received.
type sourceReader struct {
	r    io.Reader
	read *atomic.Int64
	want *diskimage.Checksum // nil: sha256, for the record only
	algo string
	h    hash.Hash
}

// newHash returns the hash of a checksum algorithm diskimage accepts.
var newHash = map[string]func() hash.Hash{
	"md5":    md5.New,
	"sha1":   sha1.New,
	"sha256": sha256.New,
	"sha512": sha512.New,
}

func newSourceReader(r io.Reader, want *diskimage.Checksum, read *atomic.Int64) *sourceReader {
	algo := "sha256"
	if want != nil {
		algo = want.Algorithm
	}
	return &sourceReader{r: r, read: read, want: want, algo: algo, h: newHash[algo]()}
}

func (s *sourceReader) Read(p []byte) (int, error) {
	n, err := s.r.Read(p)
	if n > 0 {
		s.h.Write(p[:n])
		s.read.Add(int64(n))
	}
	if err != nil && err != io.EOF {
		err = tag(stageSource, err)
	}
	return n, err
}

// checksum is "<algorithm>:<hex>" of what was read; call it at the end.
func (s *sourceReader) checksum() string {
	return s.algo + ":" + hex.EncodeToString(s.h.Sum(nil))
}

// verify compares the checksum with the one asked for, if any.
func (s *sourceReader) verify() error {
	if s.want == nil {
		return nil
	}
	got := hex.EncodeToString(s.h.Sum(nil))
	if got != s.want.Hex {
		return &ChecksumError{Algorithm: s.algo, Expected: s.want.Hex, Actual: got}
	}
	return nil
}

// peekReader buffers a stream so that its first bytes can be looked at
// before they are consumed.
type peekReader struct{ *bufio.Reader }

// peekBuffer is large enough for diskimage.ProbeSize and makes reads of
// the source 1 MiB at a time.
const peekBuffer = 1 << 20

func newPeekReader(r io.Reader) *peekReader {
	return &peekReader{bufio.NewReaderSize(r, peekBuffer)}
}

// peek returns the first diskimage.ProbeSize bytes, or fewer when the
// stream is shorter.
func (p *peekReader) peek() ([]byte, error) {
	hdr, err := p.Peek(diskimage.ProbeSize)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	return hdr, nil
}

// decompress opens kind's decompressor on raw.
func decompress(kind diskimage.Compression, raw io.Reader) (*peekReader, io.ReadCloser, error) {
	dr, err := codec.NewReader(string(kind), raw)
	if err != nil {
		return nil, nil, tag(stageDecompress, fmt.Errorf("opening the %s stream: %w", kind, err))
	}
	return newPeekReader(&stagedReader{r: dr, stage: stageDecompress}), dr, nil
}

// stagedReader tags r's errors with a stage.
type stagedReader struct {
	r     io.Reader
	stage stage
}

func (s *stagedReader) Read(p []byte) (int, error) {
	n, err := s.r.Read(p)
	if err != nil && err != io.EOF {
		err = tag(s.stage, err)
	}
	return n, err
}

// tee passes the disk file on to the upload and copies it into the
// engine's pipe. It bounds the disk file's size, and at the stream's end
// reads the raw source to its end too (so that the checksum covers every
// byte received), then closes the pipe. Only one goroutine reads it; the
// state the import looks at afterwards is atomic.
type tee struct {
	r io.Reader
	// raw is the raw source, drained at the end of a compressed stream;
	// nil when r is the raw source. It is read under the buffer the
	// decompressor reads from: what that buffer holds was hashed when it
	// was filled.
	raw     io.Reader
	w       *io.PipeWriter
	limit   int64
	n       *atomic.Int64
	srcErr  atomic.Pointer[error] // the source failed, or the file is too large
	stopped atomic.Bool           // the engine stopped taking bytes
	end     atomic.Bool           // the stream ended and the pipe is closed
}

func newTee(disk io.Reader, w *io.PipeWriter, limit int64, raw io.Reader, compressed bool, n *atomic.Int64) *tee {
	t := &tee{r: disk, w: w, limit: limit, n: n}
	if compressed {
		t.raw = raw
	}
	return t
}

func (t *tee) Read(p []byte) (int, error) {
	if err := t.sourceErr(); err != nil {
		return 0, err
	}
	if t.end.Load() {
		return 0, io.EOF
	}
	n, err := t.r.Read(p)
	if n > 0 {
		if total := t.n.Add(int64(n)); total > t.limit {
			return 0, t.fail(fmt.Errorf("%w: the disk file grows past the %d-byte limit", errTooLarge, t.limit))
		}
		if _, werr := t.w.Write(p[:n]); werr != nil {
			t.stopped.Store(true)
			return 0, fmt.Errorf("the image check stopped: %w", werr)
		}
	}
	switch {
	case err == io.EOF:
		if derr := t.drain(); derr != nil {
			return n, t.fail(derr)
		}
		t.end.Store(true)
		t.w.Close()
	case err != nil:
		return n, t.fail(err)
	}
	return n, err
}

// drain reads the raw source to its end after the decompressed stream's.
func (t *tee) drain() error {
	if t.raw == nil {
		return nil
	}
	if _, err := io.Copy(io.Discard, t.raw); err != nil {
		return fmt.Errorf("reading the source after the end of its compressed stream: %w", err)
	}
	return nil
}

// fail records the source's failure and passes it on to the engine.
func (t *tee) fail(err error) error {
	t.srcErr.Store(&err)
	t.w.CloseWithError(err)
	return err
}

// sourceErr is the source's failure (or the size limit's), if any.
func (t *tee) sourceErr() error {
	if p := t.srcErr.Load(); p != nil {
		return *p
	}
	return nil
}

// refused tells whether the engine stopped taking bytes before the end.
func (t *tee) refused() bool { return t.stopped.Load() }

// atEnd tells whether the whole stream went through.
func (t *tee) atEnd() bool { return t.end.Load() }

// abort ends the engine's input with err, unless it has ended already.
func (t *tee) abort(err error) { t.w.CloseWithError(err) }
