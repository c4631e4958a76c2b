package layout

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"
)

// Keys of the labels (config) and annotations (manifest) carrying Meta.
const (
	KeyFormat         = "vimg.dev/format"
	KeyVirtualSize    = "vimg.dev/virtual-size"
	KeyStoredSize     = "vimg.dev/stored-size"
	KeySourceChecksum = "vimg.dev/source-checksum"
	KeyFileName       = "vimg.dev/file-name"
)

// Media types of the parts of a disk image.
const (
	MediaTypeManifest = v1.MediaTypeImageManifest
	MediaTypeConfig   = v1.MediaTypeImageConfig
	MediaTypeLayer    = v1.MediaTypeImageLayer
)

// Formats of a disk file, as named in vimg.dev/format.
const (
	FormatRaw   = "raw"
	FormatQcow2 = "qcow2"
	FormatVMDK  = "vmdk"
	FormatVDI   = "vdi"
	FormatISO   = "iso"
)

// Created is the fixed creation time written in every config: the image is
// a function of the disk bytes and Meta, never of when it was pushed.
var Created = time.Unix(0, 0).UTC()

// Meta describes a disk image.
type Meta struct {
	// FileName is the base name of the disk file inside disk/. Empty means
	// FileNameFor(Format).
	FileName string
	// Format is one of raw, qcow2, vmdk, vdi, iso.
	Format string
	// VirtualSize is the size of the disk the guest sees, in bytes.
	VirtualSize int64
	// StoredSize is the size of the disk file in the layer, in bytes.
	StoredSize int64
	// SourceChecksum is "<algorithm>:<hex>" of the source as it was
	// imported (empty when unknown).
	SourceChecksum string
	// Architecture of the config; empty means amd64. Registries and
	// runtimes expect one, and KubeVirt pulls containerDisks per node.
	Architecture string
}

// FileNameFor returns the disk file name for a format: disk.img for raw,
// disk.<format> otherwise. An unknown format gives "" (and an error where
// it is used).
func FileNameFor(format string) string {
	switch format {
	case FormatRaw:
		return "disk.img"
	case FormatQcow2, FormatVMDK, FormatVDI, FormatISO:
		return "disk." + format
	}
	return ""
}

// Name returns the disk file name Meta stands for.
func (m Meta) Name() string {
	if m.FileName != "" {
		return m.FileName
	}
	return FileNameFor(m.Format)
}

// Validate checks what a pusher must get right.
func (m Meta) Validate() error {
	if FileNameFor(m.Format) == "" {
		return fmt.Errorf("unknown disk format %q (want raw, qcow2, vmdk, vdi or iso)", m.Format)
	}
	if err := validFileName(m.Name()); err != nil {
		return err
	}
	if m.VirtualSize < 0 || m.StoredSize < 0 {
		return fmt.Errorf("negative size in metadata (virtual %d, stored %d)", m.VirtualSize, m.StoredSize)
	}
	if len(m.SourceChecksum) > 256 {
		return fmt.Errorf("source checksum is %d characters long, over 256", len(m.SourceChecksum))
	}
	return nil
}

// Annotations returns Meta as the key/value map used both as config labels
// and as manifest annotations.
func (m Meta) Annotations() map[string]string {
	a := map[string]string{
		KeyFormat:      m.Format,
		KeyVirtualSize: strconv.FormatInt(m.VirtualSize, 10),
		KeyStoredSize:  strconv.FormatInt(m.StoredSize, 10),
		KeyFileName:    m.Name(),
	}
	if m.SourceChecksum != "" {
		a[KeySourceChecksum] = m.SourceChecksum
	}
	return a
}

// MetaFromAnnotations reads Meta back from labels or annotations. It fails
// when the format or a size is missing or malformed.
func MetaFromAnnotations(a map[string]string) (Meta, error) {
	m := Meta{
		Format:         a[KeyFormat],
		FileName:       a[KeyFileName],
		SourceChecksum: a[KeySourceChecksum],
	}
	if m.Format == "" {
		return Meta{}, fmt.Errorf("no %s annotation: not a vimg disk image", KeyFormat)
	}
	var err error
	if m.VirtualSize, err = parseSize(a, KeyVirtualSize); err != nil {
		return Meta{}, err
	}
	if m.StoredSize, err = parseSize(a, KeyStoredSize); err != nil {
		return Meta{}, err
	}
	if err := m.Validate(); err != nil {
		return Meta{}, err
	}
	return m, nil
}

func parseSize(a map[string]string, key string) (int64, error) {
	s, ok := a[key]
	if !ok {
		return 0, fmt.Errorf("no %s annotation", key)
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("annotation %s=%q is not a size in bytes", key, s)
	}
	return n, nil
}

// Config returns the image config JSON for a disk image whose layer has
// the given digest.
func Config(m Meta, layer digest.Digest) ([]byte, error) {
	arch := m.Architecture
	if arch == "" {
		arch = "amd64"
	}
	created := Created
	img := v1.Image{
		Created:  &created,
		Platform: v1.Platform{Architecture: arch, OS: "linux"},
		Config:   v1.ImageConfig{Labels: m.Annotations()},
		RootFS:   v1.RootFS{Type: "layers", DiffIDs: []digest.Digest{layer}},
	}
	b, err := json.Marshal(img)
	if err != nil {
		return nil, fmt.Errorf("encoding image config: %w", err)
	}
	return b, nil
}

// Manifest returns the OCI image manifest JSON for a config and a layer.
func Manifest(m Meta, config, layer v1.Descriptor) ([]byte, error) {
	man := v1.Manifest{
		Versioned:   specs.Versioned{SchemaVersion: 2},
		MediaType:   MediaTypeManifest,
		Config:      config,
		Layers:      []v1.Descriptor{layer},
		Annotations: m.Annotations(),
	}
	b, err := json.Marshal(man)
	if err != nil {
		return nil, fmt.Errorf("encoding image manifest: %w", err)
	}
	return b, nil
}

// LayerSize returns the size of the layer holding a disk file of size
// bytes under fileName.
func LayerSize(fileName string, size int64) (int64, error) {
	h, err := Header(fileName, size)
	if err != nil {
		return 0, err
	}
	return int64(len(h)) + size + int64(len(Trailer(size))), nil
}

func validFileName(name string) error {
	if name == "" || name == "." || name == ".." || len(name) > 100 {
		return fmt.Errorf("disk file name %q: want 1 to 100 characters, not . or ..", name)
	}
	if strings.ContainsFunc(name, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '-' || r == '_')
	}) {
		return fmt.Errorf("disk file name %q: only letters, digits, '.', '-' and '_' are allowed", name)
	}
	return nil
}
