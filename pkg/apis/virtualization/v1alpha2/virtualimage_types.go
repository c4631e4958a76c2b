package v1alpha2

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// VirtualImage is a disk image of one namespace: imported once from HTTP, a
// container registry, an upload or another image, stored in DVCR or in a PVC,
// and then used read-only as the data source of disks and CD-ROMs.
//
// +genclient
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:scope=Namespaced,shortName=vi,categories=virtualization
// +kubebuilder:printcolumn:name="Phase",type=string,JSONPath=`.status.phase`
// +kubebuilder:printcolumn:name="CDROM",type=boolean,JSONPath=`.status.cdrom`
// +kubebuilder:printcolumn:name="Progress",type=string,JSONPath=`.status.progress`
// +kubebuilder:printcolumn:name="StoredSize",type=string,JSONPath=`.status.size.stored`,priority=1
// +kubebuilder:printcolumn:name="UnpackedSize",type=string,JSONPath=`.status.size.unpacked`,priority=1
// +kubebuilder:printcolumn:name="Registry URL",type=string,JSONPath=`.status.target.registryURL`,priority=1
// +kubebuilder:printcolumn:name="TargetPVC",type=string,JSONPath=`.status.target.persistentVolumeClaimName`,priority=1
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
// +kubebuilder:validation:XValidation:rule="self.metadata.name.size() <= 63",message="the name must be at most 63 characters: it becomes part of labels and registry paths"
// +kubebuilder:validation:XValidation:rule="self.spec.storage == 'PersistentVolumeClaim' || !has(self.spec.persistentVolumeClaim) || !has(self.spec.persistentVolumeClaim.storageClassName)",message="spec.persistentVolumeClaim.storageClassName applies only to storage: PersistentVolumeClaim"
// +kubebuilder:validation:XValidation:rule="!has(oldSelf.status) || !has(oldSelf.status.phase) || oldSelf.status.phase != 'Ready' || (self.spec.dataSource == oldSelf.spec.dataSource && self.spec.storage == oldSelf.spec.storage && has(self.spec.persistentVolumeClaim) == has(oldSelf.spec.persistentVolumeClaim) && (!has(self.spec.persistentVolumeClaim) || self.spec.persistentVolumeClaim == oldSelf.spec.persistentVolumeClaim))",message="the image is Ready: its dataSource, storage and storage class can no longer change; create a new image instead"
type VirtualImage struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec VirtualImageSpec `json:"spec"`
	// +optional
	Status VirtualImageStatus `json:"status,omitempty"`
}

// +kubebuilder:object:root=true

// VirtualImageList is a list of VirtualImages.
type VirtualImageList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []VirtualImage `json:"items"`
}

// StorageType says where a VirtualImage keeps its data.
// +kubebuilder:validation:Enum=ContainerRegistry;PersistentVolumeClaim
type StorageType string

const (
	// StorageContainerRegistry keeps the image in DVCR, the in-cluster registry.
	StorageContainerRegistry StorageType = "ContainerRegistry"
	// StoragePersistentVolumeClaim keeps the image in a PVC of its own, which
	// disks of the same StorageClass can clone quickly.
	StoragePersistentVolumeClaim StorageType = "PersistentVolumeClaim"
)

// VirtualImageSpec is what the user asks for.
type VirtualImageSpec struct {
	// Storage of the image: ContainerRegistry (DVCR, the default) or
	// PersistentVolumeClaim.
	// +kubebuilder:default=ContainerRegistry
	// +optional
	Storage StorageType `json:"storage,omitempty"`

	// PersistentVolumeClaim settings for storage: PersistentVolumeClaim.
	// +optional
	PersistentVolumeClaim *VirtualImagePersistentVolumeClaim `json:"persistentVolumeClaim,omitempty"`

	// DataSource is where the image comes from.
	DataSource VirtualImageDataSource `json:"dataSource"`
}

// VirtualImagePersistentVolumeClaim configures the PVC of an image stored in one.
type VirtualImagePersistentVolumeClaim struct {
	// StorageClassName of the image's PVC. Empty: the default class
	// configured for images, else the cluster's default StorageClass.
	// +kubebuilder:validation:MaxLength=253
	// +optional
	StorageClassName *string `json:"storageClassName,omitempty"`
}

// VirtualImageDataSource selects one source; type names which sub-object
// holds its settings.
//
// +kubebuilder:validation:XValidation:rule="self.type != 'HTTP' || has(self.http)",message="type HTTP requires dataSource.http"
// +kubebuilder:validation:XValidation:rule="self.type != 'ContainerImage' || has(self.containerImage)",message="type ContainerImage requires dataSource.containerImage"
// +kubebuilder:validation:XValidation:rule="self.type != 'ObjectRef' || has(self.objectRef)",message="type ObjectRef requires dataSource.objectRef"
// +kubebuilder:validation:XValidation:rule="!has(self.http) || self.type == 'HTTP'",message="dataSource.http may only be set with type HTTP"
// +kubebuilder:validation:XValidation:rule="!has(self.containerImage) || self.type == 'ContainerImage'",message="dataSource.containerImage may only be set with type ContainerImage"
// +kubebuilder:validation:XValidation:rule="!has(self.objectRef) || self.type == 'ObjectRef'",message="dataSource.objectRef may only be set with type ObjectRef"
// +kubebuilder:validation:XValidation:rule="!has(self.upload) || self.type == 'Upload'",message="dataSource.upload may only be set with type Upload"
type VirtualImageDataSource struct {
	// Type of the source: HTTP, ContainerImage, ObjectRef or Upload.
	Type DataSourceType `json:"type"`
	// +optional
	HTTP *VirtualImageHTTP `json:"http,omitempty"`
	// +optional
	ContainerImage *VirtualImageContainerImage `json:"containerImage,omitempty"`
	// +optional
	ObjectRef *VirtualImageObjectRef `json:"objectRef,omitempty"`
	// +optional
	Upload *DataSourceUpload `json:"upload,omitempty"`
}

// VirtualImageHTTP downloads the image from a URL.
type VirtualImageHTTP struct {
	HTTPSource `json:",inline"`
	// AuthSecretRef names a Secret of the image's namespace with keys
	// "username" and "password" for HTTP basic authentication.
	// +optional
	AuthSecretRef *LocalSecretReference `json:"authSecretRef,omitempty"`
}

// VirtualImageContainerImage takes the image from a container registry.
type VirtualImageContainerImage struct {
	ContainerImageSource `json:",inline"`
	// ImagePullSecret names a kubernetes.io/dockerconfigjson Secret of the
	// image's namespace with the registry credentials.
	// +optional
	ImagePullSecret *LocalSecretReference `json:"imagePullSecret,omitempty"`
}

// VirtualImageObjectRef copies an existing image or disk of the same namespace,
// or a ClusterVirtualImage.
type VirtualImageObjectRef struct {
	// Kind of the source object.
	Kind ObjectRefKind `json:"kind"`
	// Name of the source object.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	Name string `json:"name"`
}

// VirtualImageStatus is what vimg observed and did.
type VirtualImageStatus struct {
	// Phase of the image.
	// +kubebuilder:validation:Enum=Pending;WaitForUserUpload;Provisioning;Ready;Failed;Terminating;ImageLost;PVCLost
	// +optional
	Phase       ImagePhase `json:"phase,omitempty"`
	ImageStatus `json:",inline"`
	// Target is where the image is stored.
	// +optional
	Target VirtualImageTarget `json:"target,omitempty"`
	// StorageClassName of the image's PVC (storage: PersistentVolumeClaim).
	// +optional
	StorageClassName string `json:"storageClassName,omitempty"`
}

// VirtualImageTarget is where a VirtualImage's data lives.
type VirtualImageTarget struct {
	// RegistryURL of the image in DVCR (storage: ContainerRegistry).
	// +optional
	RegistryURL string `json:"registryURL,omitempty"`
	// PersistentVolumeClaimName of the image's PVC (storage: PersistentVolumeClaim).
	// +optional
	PersistentVolumeClaimName string `json:"persistentVolumeClaimName,omitempty"`
}
