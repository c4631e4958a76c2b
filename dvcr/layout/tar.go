package layout

import (
	"archive/tar"
	"bytes"
	"errors"
	"fmt"
	"io"
	"strings"
)

// Ownership and modes of the layer's entries (see the package comment).
const (
	DiskDir  = "disk"
	OwnerUID = 107
	OwnerGID = 107
	FileMode = 0o440
	DirMode  = 0o555
)

// MaxHeaderSize bounds the tar headers in front of the disk file, PAX
// records included. Ours take 1 KiB (2 KiB with a PAX record); a layer
// whose headers come near this limit is not a disk image and is refused
// before it costs memory.
const MaxHeaderSize = 64 << 10

const blockSize = 512

// Header returns the tar bytes that precede the disk file's data in the
// layer: the disk/ directory entry and the file's header (with a PAX size
// record when size is 8 GiB or more). Its length is a multiple of 512.
func Header(fileName string, size int64) ([]byte, error) {
	if err := validFileName(fileName); err != nil {
		return nil, err
	}
	if size < 0 {
		return nil, fmt.Errorf("disk file size %d is negative", size)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dir := &tar.Header{
		Typeflag: tar.TypeDir,
		Name:     DiskDir + "/",
		Mode:     DirMode,
		Uid:      OwnerUID,
		Gid:      OwnerGID,
		ModTime:  Created,
	}
	file := &tar.Header{
		Typeflag: tar.TypeReg,
		Name:     DiskDir + "/" + fileName,
		Mode:     FileMode,
		Uid:      OwnerUID,
		Gid:      OwnerGID,
		Size:     size,
		ModTime:  Created,
	}
	for _, h := range []*tar.Header{dir, file} {
		// archive/tar picks ustar when the header fits and PAX otherwise.
		if err := tw.WriteHeader(h); err != nil {
			return nil, fmt.Errorf("writing tar header of %s: %w", h.Name, err)
		}
	}
	// No Flush or Close: WriteHeader has written the header blocks, and
	// both would complain about (or pad for) the data the caller streams.
	return buf.Bytes(), nil
}

// Trailer returns the bytes that follow a disk file of size bytes: zero
// padding to a 512-byte block and the two zero blocks that end a tar.
func Trailer(size int64) []byte {
	pad := (blockSize - size%blockSize) % blockSize
	return make([]byte, pad+2*blockSize)
}

// ParseDiskOffset finds the disk file in a layer from the layer's first
// bytes (at least the headers; MaxHeaderSize bytes always suffice for a
// valid layer). It returns where the file's data starts in the layer, its
// size, and its name ("disk/<file>"). It refuses headers beyond
// MaxHeaderSize, entries outside disk/, links and special files, sparse
// files, and paths with ".." or a leading "/".
func ParseDiskOffset(first []byte) (offset, size int64, name string, err error) {
	if len(first) > MaxHeaderSize {
		first = first[:MaxHeaderSize]
	}
	cr := &countingReader{r: bytes.NewReader(first)}
	tr := tar.NewReader(cr)
	for {
		h, err := tr.Next()
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				if len(first) == MaxHeaderSize {
					return 0, 0, "", fmt.Errorf("no disk file within the first %d bytes of the layer", MaxHeaderSize)
				}
				return 0, 0, "", fmt.Errorf("layer ends after %d bytes before a disk file", len(first))
			}
			return 0, 0, "", fmt.Errorf("reading layer tar headers: %w", err)
		}
		clean, err := entryPath(h.Name)
		if err != nil {
			return 0, 0, "", err
		}
		// archive/tar expands sparse files and hides their PAX records, so
		// look at the raw headers: a sparse file's data is not one range.
		if bytes.Contains(first[:cr.n], []byte("GNU.sparse.")) {
			return 0, 0, "", fmt.Errorf("layer entry %q is a sparse file: its bytes are not contiguous", h.Name)
		}
		switch h.Typeflag {
		case tar.TypeXGlobalHeader:
			continue
		case tar.TypeDir:
			if clean != "" && clean != DiskDir {
				return 0, 0, "", fmt.Errorf("layer entry %q is outside %s/", h.Name, DiskDir)
			}
			continue
		case tar.TypeReg:
		case tar.TypeGNUSparse:
			return 0, 0, "", fmt.Errorf("layer entry %q is a sparse file: its bytes are not contiguous", h.Name)
		default:
			return 0, 0, "", fmt.Errorf("layer entry %q has type %q: only the %s/ directory and one regular file are allowed", h.Name, h.Typeflag, DiskDir)
		}
		dir, file, ok := strings.Cut(clean, "/")
		if !ok || dir != DiskDir || file == "" || strings.Contains(file, "/") {
			return 0, 0, "", fmt.Errorf("layer entry %q is not a file directly in %s/", h.Name, DiskDir)
		}
		if h.Size < 0 {
			return 0, 0, "", fmt.Errorf("layer entry %q has negative size %d", h.Name, h.Size)
		}
		return cr.n, h.Size, clean, nil
	}
}

// entryPath returns a tar entry name without "./" and trailing "/", or an
// error for absolute names and names with "..".
func entryPath(name string) (string, error) {
	if strings.HasPrefix(name, "/") {
		return "", fmt.Errorf("layer entry %q has an absolute path", name)
	}
	for _, part := range strings.Split(name, "/") {
		if part == ".." {
			return "", fmt.Errorf("layer entry %q contains ..", name)
		}
	}
	if strings.ContainsRune(name, 0) {
		return "", fmt.Errorf("layer entry %q contains a NUL byte", name)
	}
	name = strings.TrimPrefix(name, "./")
	name = strings.TrimSuffix(name, "/")
	if name == "." {
		name = ""
	}
	return name, nil
}

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}
