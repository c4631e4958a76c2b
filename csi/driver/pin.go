package driver

import (
	"context"
	"fmt"
	"regexp"
	"strconv"
	"strings"

	"github.com/distribution/reference"

	"vimg.dev/vimg/csi/cache"
	"vimg.dev/vimg/dvcr/layout"
)

// Keys of a Pin in a volume context (and in CreateVolume parameters).
const (
	KeyImageRef    = "vimg.dev/image-ref"
	KeyLayerDigest = "vimg.dev/layer-digest"
	KeyDiskFile    = "vimg.dev/disk-file"
	KeyDiskSize    = "vimg.dev/disk-size"
)

// MaxDiskSize bounds the size a Pin may claim: a read-only image (an ISO, a
// CD-ROM) of more than 1 TiB is a mistake or an attack on the node's disk.
const MaxDiskSize = 1 << 40

// Pin names the exact bytes a volume serves: a manifest by digest, its
// one layer, and the disk file in it. Everything the node needs to fill its
// cache is in the Pin, so a node never resolves a tag.
type Pin struct {
	// Ref is "<repository>@sha256:<manifest digest>" in DVCR.
	Ref string
	// Layer is "sha256:<layer digest>": the cache key.
	Layer string
	// File is the disk file's name in the layer (disk.iso, disk.img, ...).
	File string
	// Size is the disk file's size in bytes.
	Size int64
}

// Key is the cache key of the pinned disk.
func (p Pin) Key() cache.Key { return cache.Key{Digest: p.Layer, Name: p.File} }

var (
	digestRE = regexp.MustCompile(`^sha256:[0-9a-f]{64}$`)
	// repositoryRE is distribution's path grammar without a host: DVCR
	// refs name a repository of the one registry the node talks to.
	repositoryRE = regexp.MustCompile(`^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$`)
)

// Validate checks a Pin strictly: it comes from a StorageClass, a PV or a
// resolver, and its fields end up in file names and registry URLs.
func (p Pin) Validate() error {
	repo, dgst, ok := strings.Cut(p.Ref, "@")
	if !ok || !digestRE.MatchString(dgst) || len(repo) > layout.MaxRepositoryLength || !repositoryRE.MatchString(repo) {
		return fmt.Errorf("%s %q: want <repository>@sha256:<64 lowercase hex digits>", KeyImageRef, p.Ref)
	}
	if _, err := reference.Parse(p.Ref); err != nil {
		return fmt.Errorf("%s %q: %w", KeyImageRef, p.Ref, err)
	}
	if !digestRE.MatchString(p.Layer) {
		return fmt.Errorf("%s %q: want sha256:<64 lowercase hex digits>", KeyLayerDigest, p.Layer)
	}
	f := p.File
	if f == "" || f == "." || f == ".." || len(f) > 100 || strings.ContainsAny(f, "/\x00") {
		return fmt.Errorf("%s %q: want a plain file name of 1 to 100 bytes", KeyDiskFile, f)
	}
	// The layer format allows fewer names still; a name it refuses could
	// never be in a layer.
	if _, err := layout.Header(f, 0); err != nil {
		return fmt.Errorf("%s %q: %w", KeyDiskFile, f, err)
	}
	if p.Size <= 0 || p.Size > MaxDiskSize {
		return fmt.Errorf("%s %d: want 1 to %d bytes", KeyDiskSize, p.Size, int64(MaxDiskSize))
	}
	return nil
}

// Context returns the Pin as volume context entries.
func (p Pin) Context() map[string]string {
	return map[string]string{
		KeyImageRef:    p.Ref,
		KeyLayerDigest: p.Layer,
		KeyDiskFile:    p.File,
		KeyDiskSize:    strconv.FormatInt(p.Size, 10),
	}
}

// HasPin tells whether m carries any of the Pin's keys.
func HasPin(m map[string]string) bool {
	for _, k := range []string{KeyImageRef, KeyLayerDigest, KeyDiskFile, KeyDiskSize} {
		if _, ok := m[k]; ok {
			return true
		}
	}
	return false
}

// PinFromContext decodes and validates the Pin in m; every key is required.
func PinFromContext(m map[string]string) (Pin, error) {
	for _, k := range []string{KeyImageRef, KeyLayerDigest, KeyDiskFile, KeyDiskSize} {
		if _, ok := m[k]; !ok {
			return Pin{}, fmt.Errorf("no %s", k)
		}
	}
	s := m[KeyDiskSize]
	size, err := strconv.ParseInt(s, 10, 64)
	if err != nil || strings.HasPrefix(s, "+") {
		return Pin{}, fmt.Errorf("%s %q: not a decimal size in bytes", KeyDiskSize, s)
	}
	p := Pin{Ref: m[KeyImageRef], Layer: m[KeyLayerDigest], File: m[KeyDiskFile], Size: size}
	if err := p.Validate(); err != nil {
		return Pin{}, err
	}
	return p, nil
}

// Kinds a Resolver is asked about.
const (
	KindVirtualImage          = "VirtualImage"
	KindClusterVirtualImage   = "ClusterVirtualImage"
	KindPersistentVolumeClaim = "PersistentVolumeClaim"
)

// Resolver turns a Kubernetes object into the Pin of its image: a
// VirtualImage or ClusterVirtualImage (ephemeral inline volumes), or a
// PersistentVolumeClaim the populator annotated (CreateVolume without a
// Pin). namespace is empty for cluster-scoped kinds. An error carrying a
// gRPC status (NotFound, FailedPrecondition, ...) is returned to the CO
// as it is; any other error becomes Unavailable, which the CO retries.
type Resolver interface {
	Resolve(ctx context.Context, kind, namespace, name string) (Pin, error)
}

// Volume context keys set by kubelet and the external-provisioner.
const (
	keyEphemeral    = "csi.storage.k8s.io/ephemeral"
	keyPodNamespace = "csi.storage.k8s.io/pod.namespace"
	keyPVCName      = "csi.storage.k8s.io/pvc/name"
	keyPVCNamespace = "csi.storage.k8s.io/pvc/namespace"
	// Attributes of an inline volume naming the image to serve.
	keyVirtualImage        = "virtualImage"
	keyClusterVirtualImage = "clusterVirtualImage"
)

// inlineTarget returns what an ephemeral inline volume's attributes name:
// a VirtualImage in the pod's namespace or a ClusterVirtualImage. A Pin
// in the attributes is refused: a pod's author could otherwise read any
// image in DVCR by digest, whatever its namespace.
func inlineTarget(vc map[string]string) (kind, namespace, name string, err error) {
	if HasPin(vc) {
		return "", "", "", fmt.Errorf("an inline volume names a %s or %s, not a pinned image (%s...)", keyVirtualImage, keyClusterVirtualImage, KeyImageRef)
	}
	vi, hasVI := vc[keyVirtualImage]
	cvi, hasCVI := vc[keyClusterVirtualImage]
	switch {
	case hasVI && hasCVI:
		return "", "", "", fmt.Errorf("an inline volume names either a %s or a %s, not both", keyVirtualImage, keyClusterVirtualImage)
	case hasVI:
		ns := vc[keyPodNamespace]
		if vi == "" || ns == "" {
			return "", "", "", fmt.Errorf("%s needs a name and the pod's namespace (%s; set podInfoOnMount in the CSIDriver)", keyVirtualImage, keyPodNamespace)
		}
		return KindVirtualImage, ns, vi, nil
	case hasCVI:
		if cvi == "" {
			return "", "", "", fmt.Errorf("%s is empty", keyClusterVirtualImage)
		}
		return KindClusterVirtualImage, "", cvi, nil
	}
	return "", "", "", fmt.Errorf("an inline volume needs %s or %s", keyVirtualImage, keyClusterVirtualImage)
}
