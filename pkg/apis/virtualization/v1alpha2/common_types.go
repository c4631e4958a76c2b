package v1alpha2

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// DataSourceType names where an image's bytes come from.
// +kubebuilder:validation:Enum=HTTP;ContainerImage;ObjectRef;Upload
type DataSourceType string

const (
	// DataSourceTypeHTTP downloads the image from an http(s) URL.
	DataSourceTypeHTTP DataSourceType = "HTTP"
	// DataSourceTypeContainerImage takes the image from a container registry:
	// the disk file under /disk/ of a container image.
	DataSourceTypeContainerImage DataSourceType = "ContainerImage"
	// DataSourceTypeObjectRef copies another image or a disk.
	DataSourceTypeObjectRef DataSourceType = "ObjectRef"
	// DataSourceTypeUpload waits for the user to upload the bytes.
	DataSourceTypeUpload DataSourceType = "Upload"
)

// HTTPSource is what VirtualImage and ClusterVirtualImage HTTP sources share.
type HTTPSource struct {
	// URL of the image file. The file may be qcow2, vmdk, vdi, iso or raw,
	// optionally compressed with gzip, xz or zstd; format and sizes are
	// detected from the content, never from the name.
	// +kubebuilder:validation:Pattern=`^http[s]?:\/\/(?:[a-zA-Z]|[0-9]|[$-_@.&+]|[!*\(\),]|(?:%[0-9a-fA-F][0-9a-fA-F]))+$`
	// +kubebuilder:validation:MaxLength=4096
	// +kubebuilder:example="https://mirror.example.com/images/slackware-15.qcow.gz"
	URL string `json:"url"`

	// CABundle is a base64-encoded PEM bundle of certificate authorities that
	// verify the server's TLS certificate, instead of the system roots.
	// +kubebuilder:example="YWFhCg=="
	// +optional
	CABundle []byte `json:"caBundle,omitempty"`

	// InsecureSkipVerify turns off TLS certificate verification of an https
	// URL. Checksums, when given, still protect the content.
	// +optional
	InsecureSkipVerify bool `json:"insecureSkipVerify,omitempty"`

	// Checksum the downloaded file (as served, before decompression) must
	// match; every given algorithm is checked.
	// +optional
	Checksum *Checksum `json:"checksum,omitempty"`

	// Headers are sent with every request. Put credentials in authSecretRef,
	// not here: header values are visible to everyone who can read the image.
	// +kubebuilder:validation:MaxItems=32
	// +listType=map
	// +listMapKey=name
	// +optional
	Headers []HTTPHeader `json:"headers,omitempty"`
}

// HTTPHeader is one extra request header.
type HTTPHeader struct {
	// Name of the header, an HTTP token such as X-Api-Version.
	// +kubebuilder:validation:Pattern="^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"
	// +kubebuilder:validation:MaxLength=256
	Name string `json:"name"`
	// Value of the header.
	// +kubebuilder:validation:MaxLength=4096
	Value string `json:"value"`
}

// Checksum holds hex digests of a file; all that are set must match.
type Checksum struct {
	// +kubebuilder:validation:Pattern=`^[0-9a-fA-F]{32}$`
	// +kubebuilder:validation:MinLength=32
	// +kubebuilder:validation:MaxLength=32
	// +kubebuilder:example="f3b59bed9f91e32fac1210184fcff6f5"
	// +optional
	MD5 string `json:"md5,omitempty"`
	// +kubebuilder:validation:Pattern=`^[0-9a-fA-F]{40}$`
	// +kubebuilder:validation:MinLength=40
	// +kubebuilder:validation:MaxLength=40
	// +optional
	SHA1 string `json:"sha1,omitempty"`
	// +kubebuilder:validation:Pattern=`^[0-9a-fA-F]{64}$`
	// +kubebuilder:validation:MinLength=64
	// +kubebuilder:validation:MaxLength=64
	// +kubebuilder:example="78be890d71dde316c412da2ce8332ba47b9ce7a29d573801d2777e01aa20b9b5"
	// +optional
	SHA256 string `json:"sha256,omitempty"`
	// +kubebuilder:validation:Pattern=`^[0-9a-fA-F]{128}$`
	// +kubebuilder:validation:MinLength=128
	// +kubebuilder:validation:MaxLength=128
	// +optional
	SHA512 string `json:"sha512,omitempty"`
}

// ContainerImageSource is what VirtualImage and ClusterVirtualImage
// container-registry sources share.
type ContainerImageSource struct {
	// Image reference of a container image that holds the disk file under
	// /disk/, e.g. built FROM scratch with COPY x.qcow2 /disk/x.qcow2.
	// +kubebuilder:validation:Pattern=`^(?P<name>(?:(?P<domain>(?:(?:localhost|[\w-]+(?:\.[\w-]+)+)(?::\d+)?)|[\w]+:\d+)/)?(?P<image>[a-z0-9_.-]+(?:/[a-z0-9_.-]+)*))(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>[A-Za-z][A-Za-z0-9]*(?:[+.-_][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}))?$`
	// +kubebuilder:validation:MaxLength=1024
	// +kubebuilder:example="registry.example.com/images/slackware:15"
	Image string `json:"image"`

	// CABundle is a base64-encoded PEM bundle of certificate authorities that
	// verify the registry's TLS certificate.
	// +kubebuilder:example="YWFhCg=="
	// +optional
	CABundle []byte `json:"caBundle,omitempty"`
}

// DataSourceUpload configures an image the user uploads.
type DataSourceUpload struct {
	// Checksum the uploaded bytes must match.
	// +optional
	Checksum *Checksum `json:"checksum,omitempty"`
}

// LocalSecretReference names a Secret in the image's own namespace.
type LocalSecretReference struct {
	// Name of the Secret.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	Name string `json:"name"`
}

// SecretReference names a Secret in a given namespace.
type SecretReference struct {
	// Name of the Secret.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	Name string `json:"name"`
	// Namespace of the Secret.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=63
	Namespace string `json:"namespace"`
}

// ObjectRefKind is the kind of object an image is copied from.
// +kubebuilder:validation:Enum=ClusterVirtualImage;VirtualImage;VirtualDisk;VirtualDiskSnapshot
type ObjectRefKind string

const (
	ObjectRefKindClusterVirtualImage ObjectRefKind = "ClusterVirtualImage"
	ObjectRefKindVirtualImage        ObjectRefKind = "VirtualImage"
	ObjectRefKindVirtualDisk         ObjectRefKind = "VirtualDisk"
	ObjectRefKindVirtualDiskSnapshot ObjectRefKind = "VirtualDiskSnapshot"
)

// ImagePhase is the lifecycle phase of an image.
type ImagePhase string

const (
	ImagePhasePending           ImagePhase = "Pending"
	ImagePhaseWaitForUserUpload ImagePhase = "WaitForUserUpload"
	ImagePhaseProvisioning      ImagePhase = "Provisioning"
	ImagePhaseReady             ImagePhase = "Ready"
	ImagePhaseFailed            ImagePhase = "Failed"
	ImagePhaseTerminating       ImagePhase = "Terminating"
	ImagePhaseImageLost         ImagePhase = "ImageLost"
	// ImagePhasePVCLost is VirtualImage only: the PVC that stored it is gone.
	ImagePhasePVCLost ImagePhase = "PVCLost"
)

// ImageFormat is the detected on-disk format of an image.
// +kubebuilder:validation:Enum=qcow2;raw;iso;vmdk;vdi
type ImageFormat string

const (
	ImageFormatQCOW2 ImageFormat = "qcow2"
	ImageFormatRaw   ImageFormat = "raw"
	ImageFormatISO   ImageFormat = "iso"
	ImageFormatVMDK  ImageFormat = "vmdk"
	ImageFormatVDI   ImageFormat = "vdi"
)

// DownloadSpeed of an import, human-readable and in bytes per second.
type DownloadSpeed struct {
	// Average speed since the import started, e.g. "1.2Mi".
	// +optional
	Avg string `json:"avg,omitempty"`
	// +optional
	AvgBytes string `json:"avgBytes,omitempty"`
	// Current speed, e.g. "1.2Mi".
	// +optional
	Current string `json:"current,omitempty"`
	// +optional
	CurrentBytes string `json:"currentBytes,omitempty"`
}

// ImageSize is the size of an image as stored and as a raw disk.
type ImageSize struct {
	// Stored size in IEC units, e.g. "285.7Mi".
	// +optional
	Stored string `json:"stored,omitempty"`
	// +optional
	StoredBytes string `json:"storedBytes,omitempty"`
	// Unpacked (virtual) size in IEC units: the size of the raw disk.
	// +optional
	Unpacked string `json:"unpacked,omitempty"`
	// +optional
	UnpackedBytes string `json:"unpackedBytes,omitempty"`
}

// ImageUploadURLs are where an Upload image accepts its bytes.
type ImageUploadURLs struct {
	// External URL, reachable from outside the cluster.
	// +optional
	External string `json:"external,omitempty"`
	// InCluster URL, reachable from pods and nodes.
	// +optional
	InCluster string `json:"inCluster,omitempty"`
}

// Condition types of images.
const (
	ConditionDatasourceReady   = "DatasourceReady"
	ConditionReady             = "Ready"
	ConditionStorageClassReady = "StorageClassReady"
	ConditionInUse             = "InUse"
	ConditionTerminating       = "Terminating"
)

// Reasons of the Ready condition.
const (
	ReasonWaitForUserUpload        = "WaitForUserUpload"
	ReasonWaitForUserUploadTimeout = "WaitForUserUploadTimeout"
	ReasonProvisioning             = "Provisioning"
	ReasonProvisioningFailed       = "ProvisioningFailed"
	ReasonReady                    = "Ready"
	ReasonImageLost                = "ImageLost"
	ReasonPVCLost                  = "PVCLost"
	ReasonStorageClassNotReady     = "StorageClassNotReady"
	ReasonQuotaExceeded            = "QuotaExceeded"
	ReasonImagePullFailed          = "ImagePullFailed"
	ReasonDatasourceNotReady       = "DatasourceNotReady"
)

// ImageStatus is the part of the status VirtualImage and ClusterVirtualImage
// share, so that code handling either kind can work on one type.
type ImageStatus struct {
	// Progress of the import, "0%" to "100%"; below 100% until Ready.
	// +optional
	Progress string `json:"progress,omitempty"`
	// +optional
	DownloadSpeed *DownloadSpeed `json:"downloadSpeed,omitempty"`
	// +optional
	Size ImageSize `json:"size,omitempty"`
	// Format detected from the content.
	// +optional
	Format ImageFormat `json:"format,omitempty"`
	// CDROM is true when the image is an ISO 9660 CD-ROM image. Always
	// serialized, so that the CDROM column reads false rather than blank.
	// +optional
	CDROM bool `json:"cdrom"`
	// ImageUploadURLs for type Upload.
	// +optional
	ImageUploadURLs *ImageUploadURLs `json:"imageUploadURLs,omitempty"`
	// SourceUID is the UID of the object an ObjectRef image was copied from.
	// +optional
	SourceUID *string `json:"sourceUID,omitempty"`
	// +listType=map
	// +listMapKey=type
	// +optional
	Conditions []metav1.Condition `json:"conditions,omitempty"`
	// ObservedGeneration is the spec generation the status describes.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
}
