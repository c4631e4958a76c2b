package registry

import (
	"archive/tar"
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"path"
	"strings"
	"sync"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"k8s.io/klog/v2"

	"vimg.dev/vimg/pkg/diskimage/codec"
	"vimg.dev/vimg/pkg/diskimage/source"
)

const (
	diskDir = "disk"
	// whiteoutPrefix marks a file deleted from the layers below; an
	// opaque whiteout hides all of its directory's lower content.
	whiteoutPrefix = ".wh."
	opaqueWhiteout = ".wh..wh..opq"
	// maxWhiteouts bounds the whiteout names remembered for disk/ across
	// layers, so that a hostile layer of millions of them cannot grow the
	// heap; real images have a handful at most.
	maxWhiteouts = 1 << 16
	// maxNamed bounds how many extra files an error lists by name.
	maxNamed = 10
)

// hidden is what the layers above hide of disk/ in the layers below.
type hidden struct {
	all   bool            // disk/ removed or made opaque
	names map[string]bool // disk/<name> whited out
}

func (h *hidden) hides(base string) bool { return h.all || h.names[base] }

// merge adds the whiteouts of the layer just read (which apply to the
// layers below it, not to itself).
func (h *hidden) merge(own *hidden) error {
	h.all = h.all || own.all
	if h.names == nil {
		h.names = map[string]bool{}
	}
	for n := range own.names {
		h.names[n] = true
	}
	if len(h.names) > maxWhiteouts {
		return fmt.Errorf("more than %d whiteouts under /disk/", maxWhiteouts)
	}
	return nil
}

func (h *hidden) add(base string) error {
	if h.names == nil {
		h.names = map[string]bool{}
	}
	h.names[base] = true
	if len(h.names) > maxWhiteouts {
		return fmt.Errorf("more than %d whiteouts under /disk/", maxWhiteouts)
	}
	return nil
}

// layerReader is one layer being read as a tar stream.
type layerReader struct {
	image      string // for messages
	desc       string // "layer 2 of 3 (sha256:…)"
	digest     string
	compressed io.ReadCloser // the blob as served, digest-checked at its end
	decomp     io.ReadCloser // the tar, decompressed
	tr         *tar.Reader
	above      hidden // whiteouts of the layers above this one

	// Set once the disk's header is found: the tar reader is then at its
	// first byte.
	diskPath string // "disk/ubuntu.img"
	size     int64

	mu      sync.Mutex
	closed  bool
	aborted bool
}

// findDisk reads img's layers from the top down and returns the first one
// holding a visible disk entry, positioned at the disk's data.
func findDisk(ctx context.Context, img v1.Image, display string) (*layerReader, error) {
	logger := klog.FromContext(ctx)
	mf, err := img.Manifest()
	if err != nil {
		return nil, fmt.Errorf("reading manifest of image %s: %w", display, classify(err))
	}
	var above hidden
	var hint string
	n := len(mf.Layers)
	for i := n - 1; i >= 0; i-- {
		d := mf.Layers[i]
		desc := fmt.Sprintf("layer %d of %d (%s)", i+1, n, d.Digest)
		// Every layer media type (docker's rootfs.diff.tar.gzip, OCI's
		// tar, tar+gzip, tar+zstd, their foreign and non-distributable
		// forms) names tar; anything else is an artifact, not a filesystem.
		if d.MediaType != "" && !strings.Contains(string(d.MediaType), "tar") {
			return nil, invalidf("image %s: %s has media type %s, not a filesystem layer: is it a container image?", display, desc, d.MediaType)
		}
		logger.V(4).Info("Reading layer", "image", display, "layer", desc, "mediaType", d.MediaType, "size", d.Size)
		l, err := img.LayerByDigest(d.Digest)
		if err != nil {
			return nil, fmt.Errorf("image %s: %s: %w", display, desc, classify(err))
		}
		lr, err := openLayer(l, display, desc, d.Digest.String(), above)
		if err != nil {
			return nil, err
		}
		own, layerHint, err := lr.scan(ctx)
		if err != nil {
			lr.close()
			return nil, err
		}
		if lr.diskPath != "" {
			return lr, nil
		}
		if hint == "" {
			hint = layerHint
		}
		// Read the layer to its end so that its digest is checked too: a
		// layer that seemed to have no disk must really be the one the
		// manifest names.
		err = lr.drain()
		lr.close()
		if err != nil {
			return nil, err
		}
		if err := above.merge(own); err != nil {
			return nil, invalidf("image %s: %s: %w", display, desc, err)
		}
		if above.all {
			// Whatever the lower layers have under disk/ is hidden.
			break
		}
	}
	msg := fmt.Sprintf("image %s has no disk file under /disk/: build it FROM scratch with COPY <file> /disk/", display)
	if hint != "" {
		msg += " (" + hint + ")"
	}
	return nil, invalidf("%s", msg)
}

// openLayer starts reading l's blob, decompressing it if its first bytes
// say gzip or zstd. The decompressors are the engine's (package codec), so
// a zstd layer asking for an oversized window is refused like a zstd image
// would be, instead of sizing our memory.
func openLayer(l v1.Layer, display, desc, digest string, above hidden) (*layerReader, error) {
	rc, err := l.Compressed()
	if err != nil {
		return nil, fmt.Errorf("fetching %s of image %s: %w", desc, display, classify(err))
	}
	lr := &layerReader{image: display, desc: desc, digest: digest, compressed: rc, above: above}
	br := bufio.NewReaderSize(rc, 64<<10)
	head, err := br.Peek(6)
	if err != nil && !errors.Is(err, io.EOF) {
		rc.Close()
		return nil, fmt.Errorf("reading %s of image %s: %w", desc, display, classify(err))
	}
	switch kind := codec.DetectWrapper(head); kind {
	case "":
		// Uncompressed (or empty; the tar reader then reports its end).
		lr.decomp = io.NopCloser(br)
	case "gzip", "zstd":
		dec, err := codec.NewReader(kind, br)
		if err != nil {
			rc.Close()
			return nil, fmt.Errorf("decompressing %s of image %s: %w", desc, display, err)
		}
		lr.decomp = dec
	default:
		rc.Close()
		return nil, invalidf("image %s: %s is %s-compressed; layers are tar, tar+gzip or tar+zstd", display, desc, kind)
	}
	lr.tr = tar.NewReader(lr.decomp)
	return lr, nil
}

// next is tar.Reader.Next, minus ErrInsecurePath (GODEBUG=tarinsecurepath=0):
// "/disk/x" is a fine name in a layer, and cleanName judges escapes.
func (lr *layerReader) next() (*tar.Header, error) {
	hdr, err := lr.tr.Next()
	if errors.Is(err, tar.ErrInsecurePath) && hdr != nil {
		err = nil
	}
	return hdr, err
}

// cleanName is a tar entry's path relative to the image root, with "./"
// and leading slashes gone, or an error when it climbs out of the root.
func (lr *layerReader) cleanName(hdr *tar.Header) (string, error) {
	p := path.Clean(strings.TrimLeft(hdr.Name, "/"))
	if p == ".." || strings.HasPrefix(p, "../") {
		return "", invalidf("image %s: %s has an entry %q that climbs out of the image root", lr.image, lr.desc, hdr.Name)
	}
	return p, nil
}

// scan reads tar headers until the disk's (lr.diskPath is then set and the
// tar reader is at its data) or the end of the layer. It returns the
// layer's own whiteouts under disk/, and a hint for the no-disk message
// when /disk itself is not a directory.
func (lr *layerReader) scan(ctx context.Context) (own *hidden, hint string, err error) {
	logger := klog.FromContext(ctx)
	own = &hidden{}
	for {
		hdr, err := lr.next()
		if errors.Is(err, io.EOF) {
			return own, hint, nil
		}
		if err != nil {
			return nil, "", lr.readErr(err)
		}
		p, err := lr.cleanName(hdr)
		if err != nil {
			return nil, "", err
		}
		switch {
		case p == ".wh."+diskDir, p == opaqueWhiteout:
			own.all = true
			continue
		case p == diskDir:
			if hdr.Typeflag != tar.TypeDir {
				// COPY disk.img /disk, without the slash: /disk is the file.
				// It also replaces any disk/ directory below.
				own.all = true
				if !lr.above.all {
					hint = fmt.Sprintf("/disk is a %s, not a directory: COPY <file> /disk/ needs the trailing slash", typeName(hdr.Typeflag))
				}
			}
			continue
		case path.Dir(p) != diskDir:
			continue
		}
		base := path.Base(p)
		switch {
		case base == opaqueWhiteout:
			own.all = true
			continue
		case strings.HasPrefix(base, whiteoutPrefix):
			if err := own.add(strings.TrimPrefix(base, whiteoutPrefix)); err != nil {
				return nil, "", invalidf("image %s: %s: %w", lr.image, lr.desc, err)
			}
			continue
		case lr.above.hides(base):
			logger.V(4).Info("Skipping disk entry deleted by an upper layer", "image", lr.image, "layer", lr.desc, "path", "/"+p)
			continue
		case hdr.Typeflag == tar.TypeDir:
			logger.V(2).Info("Ignoring directory under /disk/", "image", lr.image, "layer", lr.desc, "path", "/"+p)
			continue
		case !isRegular(hdr.Typeflag):
			return nil, "", invalidf("image %s: /%s in %s is a %s; the disk must be a regular file (COPY the file itself, not a link to it)",
				lr.image, p, lr.desc, typeName(hdr.Typeflag))
		case hdr.Size < 0 || hdr.Size > MaxDiskSize:
			return nil, "", invalidf("image %s: /%s in %s has size %d, beyond the %d TiB limit", lr.image, p, lr.desc, hdr.Size, MaxDiskSize>>40)
		case hdr.Size == 0:
			return nil, "", invalidf("image %s: disk file /%s in %s is empty", lr.image, p, lr.desc)
		}
		lr.diskPath = p
		lr.size = hdr.Size
		return own, "", nil
	}
}

// finish runs after the disk's last byte: it reads the rest of the layer,
// refusing a second file under disk/, and drains the blob so that its
// digest is checked.
func (lr *layerReader) finish() error {
	var extra []string
	count := 0
	for {
		hdr, err := lr.next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return lr.readErr(err)
		}
		p, err := lr.cleanName(hdr)
		if err != nil {
			return err
		}
		if path.Dir(p) != diskDir || hdr.Typeflag == tar.TypeDir {
			continue
		}
		base := path.Base(p)
		if strings.HasPrefix(base, whiteoutPrefix) || lr.above.hides(base) {
			continue
		}
		count++
		if len(extra) < maxNamed {
			s := "/" + p
			if !isRegular(hdr.Typeflag) {
				s += " (" + typeName(hdr.Typeflag) + ")"
			}
			extra = append(extra, s)
		}
	}
	if count > 0 {
		names := append([]string{"/" + lr.diskPath}, extra...)
		list := strings.Join(names, ", ")
		if count > len(extra) {
			list += fmt.Sprintf(" and %d more", count-len(extra))
		}
		return invalidf("image %s has more than one file under /disk/ in %s: %s; a disk image container holds exactly one", lr.image, lr.desc, list)
	}
	return lr.drain()
}

// drain reads what follows the tar's end (padding) and the rest of the
// blob, which is when the blob's size and digest are checked.
func (lr *layerReader) drain() error {
	if _, err := io.Copy(io.Discard, lr.decomp); err != nil {
		return lr.readErr(err)
	}
	if _, err := io.Copy(io.Discard, lr.compressed); err != nil {
		return lr.readErr(err)
	}
	return nil
}

func (lr *layerReader) readErr(err error) error {
	if lr.isAborted() {
		return source.ErrClosed
	}
	if errors.Is(err, tar.ErrHeader) {
		return invalidf("reading %s of image %s: %w", lr.desc, lr.image, err)
	}
	return fmt.Errorf("reading %s of image %s: %w", lr.desc, lr.image, classify(err))
}

func (lr *layerReader) isAborted() bool {
	lr.mu.Lock()
	defer lr.mu.Unlock()
	return lr.aborted
}

// abort closes the blob's response body, which a Read in another
// goroutine may be blocked on; the decompressor is left to close.
func (lr *layerReader) abort() error {
	lr.mu.Lock()
	defer lr.mu.Unlock()
	if lr.closed || lr.aborted {
		return nil
	}
	lr.aborted = true
	return lr.compressed.Close()
}

// close releases the decompressor and the blob's response body.
func (lr *layerReader) close() error {
	lr.mu.Lock()
	defer lr.mu.Unlock()
	if lr.closed {
		return nil
	}
	lr.closed = true
	lr.decomp.Close()
	if lr.aborted {
		return nil
	}
	return lr.compressed.Close()
}

// diskReader is the stream of the disk's bytes, from its layer's tar.
type diskReader struct {
	layer     *layerReader
	remaining int64
	err       error
}

func (r *diskReader) Read(p []byte) (int, error) {
	if r.err != nil {
		return 0, r.err
	}
	if r.layer.isAborted() {
		r.err = source.ErrClosed
		return 0, r.err
	}
	n, err := r.layer.tr.Read(p)
	r.remaining -= int64(n)
	switch {
	case err == nil:
		return n, nil
	case errors.Is(err, io.EOF) && r.remaining == 0:
		// The disk is whole; the stream ends cleanly only if the rest of
		// the layer is sound too.
		if ferr := r.layer.finish(); ferr != nil {
			err = ferr
		}
	case errors.Is(err, io.EOF):
		err = fmt.Errorf("reading /%s from %s of image %s: %w", r.layer.diskPath, r.layer.desc, r.layer.image, io.ErrUnexpectedEOF)
	default:
		err = r.layer.readErr(err)
	}
	r.err = err
	return n, err
}

func (r *diskReader) Close() error {
	if r.err == nil {
		r.err = source.ErrClosed
	}
	return r.layer.close()
}

func isRegular(t byte) bool {
	// TypeRegA is reported as TypeReg by archive/tar; GNU sparse files
	// read back expanded, at their logical size.
	return t == tar.TypeReg || t == tar.TypeGNUSparse
}

func typeName(t byte) string {
	switch t {
	case tar.TypeReg:
		return "regular file"
	case tar.TypeDir:
		return "directory"
	case tar.TypeSymlink:
		return "symlink"
	case tar.TypeLink:
		return "hard link"
	case tar.TypeChar:
		return "character device"
	case tar.TypeBlock:
		return "block device"
	case tar.TypeFifo:
		return "FIFO"
	}
	return fmt.Sprintf("tar entry of type %q", t)
}
