package source

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestMain(m *testing.M) {
	retryBaseDelay = time.Millisecond
	os.Exit(m.Run())
}

// testData is deterministic pseudo-random content of n bytes.
func testData(n int, seed uint64) []byte {
	var key [32]byte
	key[0] = byte(seed)
	key[1] = byte(seed >> 8)
	b := make([]byte, n)
	rand.NewChaCha8(key).Read(b)
	return b
}

func writeTemp(t *testing.T, data []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func readStream(t *testing.T, src Source) []byte {
	t.Helper()
	st, err := src.Stream()
	if err != nil {
		t.Fatalf("Stream: %v", err)
	}
	defer st.Close()
	got, err := io.ReadAll(st)
	if err != nil {
		t.Fatalf("reading stream: %v", err)
	}
	return got
}

// checkReaderAt reads at awkward offsets and lengths, including across the
// end, and compares with want.
func checkReaderAt(t *testing.T, ra io.ReaderAt, want []byte) {
	t.Helper()
	size := int64(len(want))
	offs := []int64{0, 1, 511, 4095, size / 3, size/2 + 7, size - 1000, size - 1}
	for _, off := range offs {
		if off < 0 {
			continue
		}
		for _, n := range []int{1, 513, 70000} {
			buf := make([]byte, n)
			got, err := ra.ReadAt(buf, off)
			end := min(off+int64(n), size)
			wantN := int(end - off)
			if got != wantN {
				t.Fatalf("ReadAt(%d bytes at %d) = %d, want %d (err %v)", n, off, got, wantN, err)
			}
			if end == size && off+int64(n) > size {
				if err != io.EOF {
					t.Fatalf("ReadAt(%d bytes at %d) past the end: err %v, want io.EOF", n, off, err)
				}
			} else if err != nil {
				t.Fatalf("ReadAt(%d bytes at %d): %v", n, off, err)
			}
			if !bytes.Equal(buf[:got], want[off:end]) {
				t.Fatalf("ReadAt(%d bytes at %d): wrong bytes", n, off)
			}
		}
	}
	if n, err := ra.ReadAt(make([]byte, 10), size); n != 0 || err != io.EOF {
		t.Fatalf("ReadAt at the size = %d, %v; want 0, io.EOF", n, err)
	}
	if n, err := ra.ReadAt(make([]byte, 10), size+100); n != 0 || err != io.EOF {
		t.Fatalf("ReadAt beyond the size = %d, %v; want 0, io.EOF", n, err)
	}
}

func TestOpenFile(t *testing.T) {
	data := testData(1<<20+333, 1)
	p := writeTemp(t, data)
	src, err := OpenFile(p)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	if src.Size() != int64(len(data)) {
		t.Fatalf("Size = %d, want %d", src.Size(), len(data))
	}
	if src.Name() != p {
		t.Fatalf("Name = %q", src.Name())
	}
	ra := src.ReaderAt()
	if ra == nil {
		t.Fatal("ReaderAt is nil for a regular file")
	}
	checkReaderAt(t, ra, data)
	if got := readStream(t, src); !bytes.Equal(got, data) {
		t.Fatal("stream differs from the file")
	}
	if _, err := src.Stream(); !errors.Is(err, ErrStreamUsed) {
		t.Fatalf("second Stream: %v, want ErrStreamUsed", err)
	}
}

func TestOpenFileErrors(t *testing.T) {
	dir := t.TempDir()
	if _, err := OpenFile(dir); err == nil || !strings.Contains(err.Error(), "is a directory") {
		t.Fatalf("directory: %v", err)
	}
	missing := filepath.Join(dir, "nope.img")
	if _, err := OpenFile(missing); err == nil || !strings.Contains(err.Error(), missing) || !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing file: %v", err)
	}
}

func TestOpenFileFIFO(t *testing.T) {
	p := filepath.Join(t.TempDir(), "fifo")
	if err := syscall.Mkfifo(p, 0o600); err != nil {
		t.Skipf("mkfifo: %v", err)
	}
	data := testData(300000, 2)
	go func() {
		f, err := os.OpenFile(p, os.O_WRONLY, 0)
		if err != nil {
			return
		}
		f.Write(data)
		f.Close()
	}()
	src, err := OpenFile(p)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	if src.Size() != -1 || src.ReaderAt() != nil {
		t.Fatalf("FIFO: Size %d, ReaderAt %v; want -1, nil", src.Size(), src.ReaderAt())
	}
	if got := readStream(t, src); !bytes.Equal(got, data) {
		t.Fatal("FIFO stream differs")
	}
}

func TestOpenCharDevice(t *testing.T) {
	src, err := OpenFile("/dev/null")
	if err != nil {
		t.Skipf("/dev/null: %v", err)
	}
	defer src.Close()
	if src.Size() != -1 || src.ReaderAt() != nil {
		t.Fatalf("/dev/null: Size %d, ReaderAt %v; want -1, nil", src.Size(), src.ReaderAt())
	}
	if got := readStream(t, src); len(got) != 0 {
		t.Fatalf("/dev/null gave %d bytes", len(got))
	}
}

func TestFromReaderPipe(t *testing.T) {
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	data := testData(500000, 3)
	go func() {
		pw.Write(data)
		pw.Close()
	}()
	src := FromReader(pr, "stdin")
	if src.Size() != -1 || src.ReaderAt() != nil || src.Name() != "stdin" {
		t.Fatalf("pipe: Size %d, ReaderAt %v, Name %q", src.Size(), src.ReaderAt(), src.Name())
	}
	if got := readStream(t, src); !bytes.Equal(got, data) {
		t.Fatal("pipe stream differs")
	}
	if _, err := src.Stream(); !errors.Is(err, ErrStreamUsed) {
		t.Fatalf("second Stream: %v", err)
	}
	src.Close()
	// The Source does not own the reader.
	if _, err := pr.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("pipe after Close: %v, want io.EOF (still open)", err)
	}
}

func TestFromReaderRegularFile(t *testing.T) {
	data := testData(200000, 4)
	f, err := os.Open(writeTemp(t, data))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// Stdin redirected from a file is read from the start wherever its
	// offset is, without moving that offset.
	f.Seek(1234, io.SeekStart)
	src := FromReader(f, "stdin")
	if src.Size() != int64(len(data)) || src.ReaderAt() == nil {
		t.Fatalf("file as reader: Size %d, ReaderAt %v", src.Size(), src.ReaderAt())
	}
	checkReaderAt(t, src.ReaderAt(), data)
	if got := readStream(t, src); !bytes.Equal(got, data) {
		t.Fatal("stream differs")
	}
	src.Close()
	if pos, err := f.Seek(0, io.SeekCurrent); err != nil || pos != 1234 {
		t.Fatalf("file after Close: offset %d, %v (want still open at 1234)", pos, err)
	}
}

func TestFromReaderBytes(t *testing.T) {
	data := testData(100000, 5)
	src := FromReader(bytes.NewReader(data), "mem")
	if src.Size() != int64(len(data)) || src.ReaderAt() == nil {
		t.Fatalf("bytes.Reader: Size %d, ReaderAt %v", src.Size(), src.ReaderAt())
	}
	checkReaderAt(t, src.ReaderAt(), data)
	if got := readStream(t, src); !bytes.Equal(got, data) {
		t.Fatal("stream differs")
	}
	src2 := FromReader(strings.NewReader("abc"), "s")
	if src2.Size() != 3 {
		t.Fatalf("strings.Reader size %d", src2.Size())
	}
	src3 := FromReader(io.MultiReader(strings.NewReader("abc")), "m")
	if src3.Size() != -1 || src3.ReaderAt() != nil {
		t.Fatal("a plain reader must be stream-only")
	}
}

func TestOpenDispatch(t *testing.T) {
	data := testData(10000, 6)
	p := writeTemp(t, data)
	ctx := context.Background()

	src, err := Open(ctx, p, HTTPOptions{})
	if err != nil || src.Size() != int64(len(data)) {
		t.Fatalf("Open(path): %v", err)
	}
	src.Close()

	src, err = Open(ctx, "file://"+p, HTTPOptions{})
	if err != nil || src.Size() != int64(len(data)) {
		t.Fatalf("Open(file://): %v", err)
	}
	src.Close()

	pr, pw, _ := os.Pipe()
	old := os.Stdin
	os.Stdin = pr
	src, err = Open(ctx, "-", HTTPOptions{})
	os.Stdin = old
	if err != nil || src.Name() != "stdin" || src.ReaderAt() != nil {
		t.Fatalf("Open(-): %v", err)
	}
	go func() { pw.Write(data); pw.Close() }()
	if got := readStream(t, src); !bytes.Equal(got, data) {
		t.Fatal("stdin stream differs")
	}
	pr.Close()

	srv := newRangeServer(t, data)
	src, err = Open(ctx, srv.URL+"/x.img", HTTPOptions{})
	if err != nil || src.ReaderAt() == nil {
		t.Fatalf("Open(http): %v", err)
	}
	src.Close()
	src, err = Open(ctx, strings.Replace(srv.URL, "http://", "HTTP://", 1)+"/x.img", HTTPOptions{})
	if err != nil {
		t.Fatalf("Open(HTTP://): %v", err)
	}
	src.Close()
}
