package pipe

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"io"
	"math/rand/v2"
	"testing"
	"testing/iotest"
)

func data(n int) []byte {
	b := make([]byte, n)
	rand.NewChaCha8([32]byte{7}).Read(b)
	return b
}

func TestReader_DeliversEveryByteInOrderAndHashesThem(t *testing.T) {
	for _, n := range []int{0, 1, 4095, 4096, 4097, 3*4096 + 17, 100000} {
		want := data(n)
		for name, consume := range map[string]func(*Reader) ([]byte, error){
			"Read": func(p *Reader) ([]byte, error) {
				return io.ReadAll(iotest.OneByteReader(p)) // the smallest reads
			},
			"WriteTo": func(p *Reader) ([]byte, error) {
				var out bytes.Buffer
				_, err := io.Copy(&out, p)
				return out.Bytes(), err
			},
		} {
			h := sha256.New()
			// A source that returns short reads, as sockets do.
			p := New(iotest.HalfReader(bytes.NewReader(want)), h, 4096, 3)
			got, err := consume(p)
			if err != nil {
				t.Fatalf("%d bytes, %s: %v", n, name, err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("%d bytes, %s: got %d different bytes", n, name, len(got))
			}
			if sum := sha256.Sum256(want); !bytes.Equal(h.Sum(nil), sum[:]) {
				t.Fatalf("%d bytes, %s: the tap hashed something else", n, name)
			}
			p.Close()
		}
	}
}

func TestReader_PassesOnTheSourceErrorAfterItsBytes(t *testing.T) {
	boom := errors.New("connection reset")
	src := io.MultiReader(bytes.NewReader(data(10000)), iotest.ErrReader(boom))
	p := New(src, nil, 4096, 2)
	defer p.Close()
	got, err := io.ReadAll(p)
	if !errors.Is(err, boom) || len(got) != 10000 {
		t.Fatalf("got %d bytes and %v, want 10000 bytes then %v", len(got), err, boom)
	}
	var out bytes.Buffer
	p2 := New(io.MultiReader(bytes.NewReader(data(10000)), iotest.ErrReader(boom)), nil, 4096, 2)
	defer p2.Close()
	if n, err := io.Copy(&out, p2); !errors.Is(err, boom) || n != 10000 {
		t.Fatalf("WriteTo: %d bytes and %v, want 10000 then %v", n, err, boom)
	}
}

// A consumer that stops early closes the pipe: the goroutine ends and the
// source is not read any more.
func TestReader_CloseStopsReadingTheSource(t *testing.T) {
	src := &countingReader{r: bytes.NewReader(data(1 << 20))}
	p := New(src, nil, 4096, 2)
	buf := make([]byte, 100)
	if _, err := io.ReadFull(p, buf); err != nil {
		t.Fatal(err)
	}
	p.Close()
	after := src.n
	if after >= 1<<20 {
		t.Fatalf("the whole source was read (%d bytes) by a pipe two buffers deep", after)
	}
	if _, err := p.Read(buf); !errors.Is(err, errClosed) && err != nil {
		// buffered bytes may still be handed out; then the close shows
		for err == nil {
			_, err = p.Read(buf)
		}
		if !errors.Is(err, errClosed) {
			t.Fatalf("read after Close: %v", err)
		}
	}
	if src.n != after {
		t.Fatalf("the source was read after Close: %d -> %d bytes", after, src.n)
	}
}

type countingReader struct {
	r io.Reader
	n int
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}
