package diskimage

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"sync/atomic"

	"vimg.dev/vimg/pkg/diskimage/qcow2"
	"vimg.dev/vimg/pkg/diskimage/source"
	"vimg.dev/vimg/pkg/diskimage/vdi"
	"vimg.dev/vimg/pkg/diskimage/vmdk"
)

// Info describes an image.
type Info struct {
	Format      Format      `json:"format"`
	Compression Compression `json:"compression"`
	// VirtualSize is the size of the disk the image holds, in bytes.
	VirtualSize int64 `json:"virtualSize"`
	// FileSize is the size of the source as given (compressed, if it is),
	// or -1 when the source does not tell.
	FileSize int64 `json:"fileSize"`
	// CDROM is true for ISO 9660 images, which VMs see as a CD-ROM.
	CDROM bool `json:"cdrom"`
	// Subformat is the variant: qcow2 "v2"/"v3", VMDK "monolithicSparse" or
	// "streamOptimized", VDI "static" or "dynamic".
	Subformat string `json:"subformat,omitempty"`
	// ClusterSize is the allocation unit: qcow2 cluster, VMDK grain, VDI block.
	ClusterSize int64 `json:"clusterSize,omitempty"`
	// ClusterCompression is "zlib" or "zstd" for qcow2 (the codec of its
	// compressed clusters, if it has any).
	ClusterCompression string `json:"clusterCompression,omitempty"`
}

func (i *Info) setQcow2(h *qcow2.Header) {
	i.Subformat = fmt.Sprintf("v%d", h.Version)
	i.ClusterSize = h.ClusterSize
	i.ClusterCompression = "zlib"
	if h.CompressionZstd {
		i.ClusterCompression = "zstd"
	}
}

func (i *Info) setVMDK(v vmdk.Info) {
	i.Subformat, i.ClusterSize = v.Subformat, v.GrainSize
}

func (i *Info) setVDI(v vdi.Info) {
	i.ClusterSize = v.BlockSize
	i.Subformat = "dynamic"
	if v.Static {
		i.Subformat = "static"
	}
}

// Inspect detects what src holds. A seekable, uncompressed image is fully
// checked (all of its tables are read); a compressed or streamed one is read
// far enough to know its size, which for raw data means to its end.
func Inspect(ctx context.Context, src source.Source) (*Info, error) {
	if ra := src.ReaderAt(); ra != nil {
		hdr := make([]byte, min(ProbeSize, max(src.Size(), 0)))
		n, err := ra.ReadAt(hdr, 0)
		if err != nil && !errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("reading %s: %w", src.Name(), err)
		}
		if DetectCompression(hdr[:n]) == NoCompression {
			img, info, err := openImage(ra, src.Size(), hdr[:n])
			if err != nil {
				return nil, err
			}
			img.Close()
			return info, nil
		}
	}
	rc, err := src.Stream()
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	var read atomic.Int64
	raw := bufio.NewReaderSize(&countingReader{r: rc, n: &read}, 1<<20)
	dec, info, closeDec, err := openStream(raw, src.Size(), 0)
	if err != nil {
		return nil, err
	}
	defer closeDec()
	if info.VirtualSize < 0 {
		// Raw data: its size is its length.
		rd := dec.(*rawDecoder)
		n, err := io.Copy(io.Discard, rd.r)
		if err != nil {
			return nil, fmt.Errorf("reading %s: %w", src.Name(), err)
		}
		info.VirtualSize = n
	}
	if info.FileSize < 0 {
		// A stream tells its size only at its end: count the rest.
		if _, err := io.Copy(io.Discard, raw); err != nil {
			return nil, fmt.Errorf("reading %s: %w", src.Name(), err)
		}
		info.FileSize = read.Load()
	}
	return info, nil
}
