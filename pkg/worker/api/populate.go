package api

import "fmt"

// The contract between the volume populator and a populate pod: the pod
// gets the volume (a mount or a device) and a request naming one image in
// DVCR, pinned by manifest digest; it writes the raw disk and leaves an
// Outcome whose Populated field says what it wrote.

// Where a populate pod finds its request and its volume.
const (
	PopulateRequestDir = "/etc/vimg/populate"
	// PopulateMountPath is where a Filesystem volume is mounted; the disk
	// is DiskFile at its root, as KubeVirt expects it.
	PopulateMountPath = "/target"
	// PopulateDevicePath is where a Block volume appears.
	PopulateDevicePath = "/dev/vimg-target"
	DiskFile           = "disk.img"
)

// Reasons a populate pod fails with besides the importer's.
const (
	// ReasonTooSmall: the volume cannot hold the image's virtual size.
	ReasonTooSmall = "VolumeTooSmall"
	// ReasonImageChanged: the pinned image is no longer in DVCR (the image
	// was deleted or re-imported); the populator starts over.
	ReasonImageChanged = "ImageChanged"
)

// PopulateRequest is what one populate pod does. Like Request it holds a
// token, so it lives only in a Secret.
type PopulateRequest struct {
	// DVCR names the image by digest ("repo@sha256:...") with a token
	// allowing pull of that repository only.
	DVCR DVCRSpec `json:"dvcr"`
	// Block says the volume is a device at PopulateDevicePath; otherwise
	// it is a file system at PopulateMountPath.
	Block bool `json:"block"`
	// Capacity is the volume's size as its PersistentVolume gives it. A
	// Filesystem volume's disk.img is Capacity less FilesystemOverhead,
	// and never more than the file system can hold.
	Capacity int64 `json:"capacity"`
	// FilesystemOverhead is the fraction of a Filesystem volume kept for
	// the file system's own metadata (0..0.5).
	FilesystemOverhead float64 `json:"filesystemOverhead"`
	// UID and GID own disk.img (107, qemu in KubeVirt's launcher).
	UID int `json:"uid"`
	GID int `json:"gid"`
	// FromSource marks the claim of a VirtualImage stored in a
	// PersistentVolumeClaim: the pod writes the image's source itself onto
	// the volume, converted on the fly, as the import Request at
	// RequestDir/RequestFile (mounted from the image controller's Secret)
	// describes it, checksums included. DVCR is then unused, but for an
	// upload: the upload is a blob of the image's repository, which that
	// Request names.
	FromSource bool `json:"fromSource,omitempty"`
	// Cloned marks a Filesystem volume filled by a CSI clone of the claim of
	// an image stored in a PersistentVolumeClaim: disk.img is already there,
	// as large as on that claim. The pod only grows it to this volume's
	// usable size and gives it to UID:GID. VirtualSize is the image's virtual size.
	Cloned      bool  `json:"cloned,omitempty"`
	VirtualSize int64 `json:"virtualSize,omitempty"`
}

// PopulateResult describes a filled volume.
type PopulateResult struct {
	// VirtualSize is the image's; DiskSize what the guest sees now (the
	// volume's usable size, at least VirtualSize).
	VirtualSize int64 `json:"virtualSize"`
	DiskSize    int64 `json:"diskSize"`
	// Written is the bytes of data written; zero ranges are not written.
	Written int64 `json:"written"`
	// Read is the bytes read from DVCR (or from the source).
	Read int64 `json:"read"`
	// Format, CDROM, SourceSize and SourceChecksum describe the image as
	// read: what the image controller shows in the status of an image
	// whose claim this is.
	Format         string `json:"format,omitempty"`
	CDROM          bool   `json:"cdrom,omitempty"`
	SourceSize     int64  `json:"sourceSize,omitempty"`
	SourceChecksum string `json:"sourceChecksum,omitempty"`
}

// DefaultFilesystemOverhead is the populator's and the image controller's
// default share of a Filesystem volume left to the file system: KubeVirt
// CDI's default.
const DefaultFilesystemOverhead = 0.055

// DiskAlign is the granularity of a Filesystem volume's disk.img: what
// KubeVirt and most guests expect of a disk's size.
const DiskAlign = 1 << 20

// UsableDiskSize is the size disk.img gets on a Filesystem volume of
// capacity bytes: the capacity less the file system's overhead, in whole
// MiB. The populator checks claims against it before starting a pod; the
// pod also bounds it by the free space it finds.
func UsableDiskSize(capacity int64, overhead float64) int64 {
	return int64(float64(capacity)*(1-overhead)) / DiskAlign * DiskAlign
}

// FilesystemClaimSize is the smallest Filesystem claim whose disk.img holds
// virtualSize bytes.
func FilesystemClaimSize(virtualSize int64, overhead float64) int64 {
	need := int64(float64(virtualSize)/(1-overhead)) + DiskAlign
	return need / DiskAlign * DiskAlign
}

// TooSmallMessage says that a volume (have: "the block volume holds 1Gi")
// cannot hold an image of size bytes, and what claim would.
func TooSmallMessage(have string, size, need int64) string {
	return fmt.Sprintf("%s but the image's virtual size is %s (%d bytes): create the PersistentVolumeClaim again with at least %s (%d bytes) of storage",
		have, BytesIEC(size), size, BytesIEC(need), need)
}

// BytesIEC renders a size the way kubectl shows quantities, in as few
// digits as it needs: "1.5Gi", "64Mi"; "512 bytes" below 1Ki.
func BytesIEC(n int64) string {
	v, unit := IEC(n)
	if unit == "" {
		return fmt.Sprintf("%d bytes", n)
	}
	return fmt.Sprintf("%.4g%s", v, unit)
}

// IEC scales n bytes to the largest binary unit it reaches: 1536 is 1.5
// "Ki"; below 1024 the unit is "".
func IEC(n int64) (float64, string) {
	units := []string{"", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"}
	v, i := float64(n), 0
	for v >= 1024 && i < len(units)-1 {
		v /= 1024
		i++
	}
	return v, units[i]
}

// The claim of a VirtualImage stored in a PersistentVolumeClaim: the image
// controller makes it (named ImageClaimName, in the image's namespace,
// controlled by the image, dataSourceRef naming the image itself) and puts
// the image's import Request into a Secret named SourceSecretName in the
// populator's namespace; the populator fills the claim from that source
// and tells the outcome in the claim's annotations.
const (
	// ClaimAnnotationProgress on a claim being filled: "45.2%", then
	// "100%", or "Failed".
	ClaimAnnotationProgress = "vimg.dev/populate-progress"
	// ClaimAnnotationResult on a filled claim: a PopulateResult in JSON.
	ClaimAnnotationResult = "vimg.dev/populate-result"
	// ClaimAnnotationError on a claim given up: "Reason: message".
	ClaimAnnotationError = "vimg.dev/populate-error"
)

// SourceTrustedCAKey is the key of the source Secret holding the CAs the
// installation trusts for sources (PEM, possibly empty), and TrustedCADir
// where worker pods see such CAs.
const (
	SourceTrustedCAKey = "trusted-ca.pem"
	TrustedCADir       = "/etc/vimg/trusted-ca"
)

// ImageClaimName is the name of the claim of the VirtualImage name with UID
// uid: the UID keeps a re-created image from meeting its predecessor's
// claim.
func ImageClaimName(name, uid string) string { return "vi-" + name + "-" + uid }

// SourceSecretName is the name of the Secret, in the populator's
// namespace, holding the import Request of the image with UID uid.
func SourceSecretName(uid string) string { return "vimg-source-" + uid }

// Copies of an image stored in a claim: the populator runs a serve pod in
// the image's namespace that mounts the image's claim read-only and serves
// its disk over HTTP (ranges, a bearer token per copy); the copy's populate
// pod reads it there like any HTTP source.
const (
	// ServePort is the serve pod's port; ServePath the disk's URL path.
	ServePort = 8080
	ServePath = "/disk"
	// ServeSourceDir is where the serve pod mounts the image's claim.
	ServeSourceDir = "/source"
	// ServeTokenEnv and ServeSizeEnv are the serve pod's environment: the
	// bearer token a reader must show, and how many bytes of disk.img
	// are the image (the rest is the claim's padding).
	ServeTokenEnv = "VIMG_SERVE_TOKEN"
	ServeSizeEnv  = "VIMG_SERVE_SIZE"
)
