package qcow2

import (
	"errors"
	"fmt"
	"io"
	"sort"
	"sync"

	"github.com/lima-vm/go-qcow2reader/image"
	lib "github.com/lima-vm/go-qcow2reader/image/qcow2"
	liblog "github.com/lima-vm/go-qcow2reader/log"

	"vimg.dev/vimg/pkg/diskimage/codec"
	"vimg.dev/vimg/pkg/diskimage/stream"
)

func init() {
	// The library logs through the standard logger; our callers report
	// problems as errors instead.
	liblog.SetWarnFunc(nil)
	lib.SetDecompressor(lib.CompressionTypeZlib, decompressor(stream.Deflate))
	lib.SetDecompressor(lib.CompressionTypeZstd, decompressor(stream.Zstd))
}

// Image is a qcow2 image opened for random access. ReadAt and Extent are safe
// for concurrent use.
type Image struct {
	image.Image
	header *Header
	ra     io.ReaderAt // the file, zero-padded past its end
	runs   []dataRun   // plain data clusters, coalesced; nil: every read goes to the library
}

// dataRun is a stretch of the guest disk stored uncompressed at consecutive
// host offsets. qemu-img lays data out this way, so a plain image has a few
// long runs.
type dataRun struct{ guest, host, n int64 }

// maxDataRuns bounds the memory of the run list (24 bytes a run). A more
// fragmented image is read cluster by cluster through the library instead.
const maxDataRuns = 1 << 20

// ReadAt reads guest bytes. Plain data clusters are read straight from the
// file, one read per run of consecutive clusters (the library reads one
// cluster at a time, 16 reads per MiB at the default cluster size); every
// other cluster (compressed, zero, unallocated, subclusters) goes through the
// library.
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	if img.runs == nil {
		return img.Image.ReadAt(p, off)
	}
	size := img.header.Size
	if off < 0 {
		return 0, fmt.Errorf("qcow2: negative offset %d", off)
	}
	if off >= size {
		return 0, io.EOF
	}
	var eof error
	if int64(len(p)) > size-off {
		p, eof = p[:size-off], io.EOF
	}
	for n := 0; n < len(p); {
		cur := off + int64(n)
		i := sort.Search(len(img.runs), func(i int) bool { return img.runs[i].guest+img.runs[i].n > cur })
		if i < len(img.runs) && img.runs[i].guest <= cur {
			r := img.runs[i]
			k := int(min(int64(len(p)-n), r.guest+r.n-cur))
			if m, err := img.ra.ReadAt(p[n:n+k], r.host+cur-r.guest); err != nil && !(errors.Is(err, io.EOF) && m == k) {
				return n + m, fmt.Errorf("qcow2: reading data at host offset %d: %w", r.host+cur-r.guest, err)
			}
			n += k
			continue
		}
		end := off + int64(len(p))
		if i < len(img.runs) {
			end = min(end, img.runs[i].guest)
		}
		k := int(end - cur)
		m, err := img.Image.ReadAt(p[n:n+k], cur)
		if err != nil && !(errors.Is(err, io.EOF) && m == k) {
			return n + m, err
		}
		n += k
	}
	return len(p), eof
}

// Header returns the checked header.
func (img *Image) Header() *Header { return img.header }

// Open checks a qcow2 file end to end (header, tables, where every cluster
// points) and opens it with go-qcow2reader. size is the file size.
//
// The library trusts its input: it would open a backing file named by the
// image, allocate an L1 table as large as the header says, and read clusters
// from wherever L2 entries point. Everything it would trust is checked here
// first, reading only metadata (a few MiB for a large image).
func Open(ra io.ReaderAt, size int64) (*Image, error) {
	hdr := make([]byte, min(size, 1<<maxClusterBits))
	if _, err := ra.ReadAt(hdr, 0); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("qcow2: reading header: %w", err)
	}
	h, err := ParseHeader(hdr, size)
	if err != nil {
		return nil, err
	}
	runs, err := h.checkTables(ra, size)
	if err != nil {
		return nil, err
	}
	if h.L1Size == 0 {
		// Only a zero-length disk has no L1 table (ParseHeader checked);
		// the library refuses such an image, qemu reads it as empty.
		return &Image{Image: emptyImage{}, header: h}, nil
	}
	cra := &clusterReaderAt{ReaderAt: ra, clusterSize: h.ClusterSize, fileSize: size}
	li, err := lib.Open(cra, nil)
	if err != nil {
		return nil, fmt.Errorf("qcow2: %w", err)
	}
	if err := li.Readable(); err != nil {
		return nil, fmt.Errorf("qcow2: %w", err)
	}
	return &Image{Image: li, header: h, ra: cra, runs: runs}, nil
}

// checkTables reads the L1 table, the refcount table and every L2 table and
// checks each mapping against the file size and the metadata. It returns the
// plain data clusters as coalesced runs (nil when there are too many).
func (h *Header) checkTables(ra io.ReaderAt, size int64) ([]dataRun, error) {
	m := h.fixedMetadata()
	if h.RefcountBytes > 0 {
		// ParseHeader checked that the table lies inside the file.
		rt := make([]byte, h.RefcountBytes)
		if _, err := ra.ReadAt(rt, h.RefcountOffset); err != nil {
			return nil, fmt.Errorf("qcow2: reading refcount table: %w", err)
		}
		if err := h.refcountBlocks(rt, size, m); err != nil {
			return nil, err
		}
	}
	l1 := make([]byte, h.L1Size*8)
	if _, err := ra.ReadAt(l1, h.L1Offset); err != nil {
		return nil, fmt.Errorf("qcow2: reading L1 table: %w", err)
	}
	l2s, err := h.l1Entries(l1, size, m)
	if err != nil {
		return nil, err
	}
	runs := make([]dataRun, 0, 16)
	table := make([]byte, h.ClusterSize)
	for i, off := range l2s {
		if off == 0 {
			continue
		}
		if _, err := ra.ReadAt(table, off); err != nil {
			return nil, fmt.Errorf("qcow2: reading L2 table %d at %d: %w", i, off, err)
		}
		err := h.mapL2(int64(i), table, size, m, func(guest int64, mp mapping) error {
			if mp.kind != kindData || runs == nil {
				return nil
			}
			n := min(h.ClusterSize, h.Size-guest)
			if k := len(runs); k > 0 && runs[k-1].guest+runs[k-1].n == guest && runs[k-1].host+runs[k-1].n == mp.host {
				runs[k-1].n += n
			} else if k < maxDataRuns {
				runs = append(runs, dataRun{guest: guest, host: mp.host, n: n})
			} else {
				runs = nil // too fragmented to be worth the memory
			}
			return nil
		})
		if err != nil {
			return nil, err
		}
	}
	return runs, nil
}

// clusterReaderAt carries the cluster size to the decompressor, which the
// library calls with only a section of the file.
type clusterReaderAt struct {
	io.ReaderAt
	clusterSize int64
	fileSize    int64
}

// ReadAt pads a short read at the end of the file with zeros. Every mapping
// was checked to lie inside the file, but the library reads a compressed
// cluster as "cluster size + extra sectors", which can run past EOF for the
// last one; qemu's block layer reads zeros there too.
func (c *clusterReaderAt) ReadAt(p []byte, off int64) (int, error) {
	n, err := c.ReaderAt.ReadAt(p, off)
	if errors.Is(err, io.EOF) && off < c.fileSize {
		clear(p[n:])
		return len(p), nil
	}
	return n, err
}

// errSpill marks a stream that would need more spill space than allowed.
var errSpill = fmt.Errorf("qcow2: %w", stream.ErrUnsupported)

var bufPool = sync.Pool{New: func() any { b := make([]byte, 0, 64<<10); return &b }}

func getBuf(n int) *[]byte {
	b := bufPool.Get().(*[]byte)
	if cap(*b) < n {
		*b = make([]byte, n)
	}
	*b = (*b)[:n]
	return b
}

// decompressor returns the library hook for one codec: it reads the whole
// compressed extent in one call and decodes it with vimg's codec (libdeflate
// when built with cgo), refusing output larger than one cluster.
func decompressor(c stream.Codec) lib.Decompressor {
	return func(r io.Reader) (io.ReadCloser, error) {
		sr, ok := r.(*io.SectionReader)
		if !ok {
			return nil, fmt.Errorf("qcow2: decompressor called with %T", r)
		}
		outer, off, size := sr.Outer()
		cra, ok := outer.(*clusterReaderAt)
		if !ok {
			return nil, fmt.Errorf("qcow2: decompressor called on an unchecked image")
		}
		// The library passes cluster_size + 512*extra_sectors bytes; the
		// compressed data is (extra_sectors+1)*512 - host%512 of them
		// (qcow2 spec), which is all qemu and the stream decoder decode.
		// Reading on would accept data qemu refuses.
		csize := size - cra.clusterSize + sectorSize - off%sectorSize
		if csize <= 0 || csize > size {
			return nil, fmt.Errorf("qcow2: decompressor called with %d bytes at %d", size, off)
		}
		in := getBuf(int(csize))
		defer bufPool.Put(in)
		if _, err := io.ReadFull(sr, *in); err != nil {
			return nil, fmt.Errorf("reading compressed cluster: %w", err)
		}
		out := getBuf(int(cra.clusterSize))
		n, err := codec.Decode(c, *out, *in)
		if err != nil {
			bufPool.Put(out)
			return nil, err
		}
		clear((*out)[n:]) // a short cluster reads as zeros past its end
		return &clusterReader{buf: out}, nil
	}
}

type clusterReader struct {
	buf *[]byte
	off int
}

func (r *clusterReader) Read(p []byte) (int, error) {
	if r.off >= len(*r.buf) {
		return 0, io.EOF
	}
	n := copy(p, (*r.buf)[r.off:])
	r.off += n
	return n, nil
}

func (r *clusterReader) Close() error {
	if r.buf != nil {
		bufPool.Put(r.buf)
		r.buf = nil
	}
	return nil
}

// emptyImage is a disk of zero bytes.
type emptyImage struct{}

func (emptyImage) ReadAt(p []byte, off int64) (int, error) { return 0, io.EOF }
func (emptyImage) Close() error                            { return nil }
func (emptyImage) Type() image.Type                        { return Type }
func (emptyImage) Size() int64                             { return 0 }
func (emptyImage) Readable() error                         { return nil }

func (emptyImage) Extent(start, length int64) (image.Extent, error) {
	if start != 0 || length != 0 {
		return image.Extent{}, errors.New("qcow2: extent out of bounds of an empty disk")
	}
	return image.Extent{}, nil
}
