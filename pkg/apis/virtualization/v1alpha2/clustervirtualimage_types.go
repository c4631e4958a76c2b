package v1alpha2

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// ClusterVirtualImage is a disk image every namespace may use: imported once
// into DVCR from HTTP, a container registry, an upload or another image, then
// used read-only as the data source of disks and CD-ROMs.
//
// +genclient
// +genclient:nonNamespaced
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:scope=Cluster,shortName=cvi,categories=virtualization-cluster
// +kubebuilder:printcolumn:name="Phase",type=string,JSONPath=`.status.phase`
// +kubebuilder:printcolumn:name="CDROM",type=boolean,JSONPath=`.status.cdrom`
// +kubebuilder:printcolumn:name="Progress",type=string,JSONPath=`.status.progress`
// +kubebuilder:printcolumn:name="StoredSize",type=string,JSONPath=`.status.size.stored`,priority=1
// +kubebuilder:printcolumn:name="UnpackedSize",type=string,JSONPath=`.status.size.unpacked`,priority=1
// +kubebuilder:printcolumn:name="Registry URL",type=string,JSONPath=`.status.target.registryURL`,priority=1
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
// +kubebuilder:validation:XValidation:rule="self.metadata.name.size() <= 63",message="the name must be at most 63 characters: it becomes part of labels and registry paths"
// +kubebuilder:validation:XValidation:rule="!has(oldSelf.status) || !has(oldSelf.status.phase) || oldSelf.status.phase != 'Ready' || self.spec == oldSelf.spec",message="the image is Ready: its spec can no longer change; create a new image instead"
type ClusterVirtualImage struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec ClusterVirtualImageSpec `json:"spec"`
	// +optional
	Status ClusterVirtualImageStatus `json:"status,omitempty"`
}

// +kubebuilder:object:root=true

// ClusterVirtualImageList is a list of ClusterVirtualImages.
type ClusterVirtualImageList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []ClusterVirtualImage `json:"items"`
}

// ClusterVirtualImageSpec is what the user asks for. A ClusterVirtualImage is
// always stored in DVCR.
type ClusterVirtualImageSpec struct {
	// DataSource is where the image comes from.
	DataSource ClusterVirtualImageDataSource `json:"dataSource"`
}

// ClusterVirtualImageDataSource selects one source; type names which
// sub-object holds its settings.
//
// +kubebuilder:validation:XValidation:rule="self.type != 'HTTP' || has(self.http)",message="type HTTP requires dataSource.http"
// +kubebuilder:validation:XValidation:rule="self.type != 'ContainerImage' || has(self.containerImage)",message="type ContainerImage requires dataSource.containerImage"
// +kubebuilder:validation:XValidation:rule="self.type != 'ObjectRef' || has(self.objectRef)",message="type ObjectRef requires dataSource.objectRef"
// +kubebuilder:validation:XValidation:rule="!has(self.http) || self.type == 'HTTP'",message="dataSource.http may only be set with type HTTP"
// +kubebuilder:validation:XValidation:rule="!has(self.containerImage) || self.type == 'ContainerImage'",message="dataSource.containerImage may only be set with type ContainerImage"
// +kubebuilder:validation:XValidation:rule="!has(self.objectRef) || self.type == 'ObjectRef'",message="dataSource.objectRef may only be set with type ObjectRef"
// +kubebuilder:validation:XValidation:rule="!has(self.upload) || self.type == 'Upload'",message="dataSource.upload may only be set with type Upload"
type ClusterVirtualImageDataSource struct {
	// Type of the source: HTTP, ContainerImage, ObjectRef or Upload.
	Type DataSourceType `json:"type"`
	// +optional
	HTTP *ClusterVirtualImageHTTP `json:"http,omitempty"`
	// +optional
	ContainerImage *ClusterVirtualImageContainerImage `json:"containerImage,omitempty"`
	// +optional
	ObjectRef *ClusterVirtualImageObjectRef `json:"objectRef,omitempty"`
	// +optional
	Upload *DataSourceUpload `json:"upload,omitempty"`
}

// ClusterVirtualImageHTTP downloads the image from a URL.
type ClusterVirtualImageHTTP struct {
	HTTPSource `json:",inline"`
	// AuthSecretRef names a Secret with keys "username" and "password" for
	// HTTP basic authentication.
	// +optional
	AuthSecretRef *SecretReference `json:"authSecretRef,omitempty"`
}

// ClusterVirtualImageContainerImage takes the image from a container registry.
type ClusterVirtualImageContainerImage struct {
	ContainerImageSource `json:",inline"`
	// ImagePullSecret names a kubernetes.io/dockerconfigjson Secret with the
	// registry credentials. A ClusterVirtualImage has no namespace of its own,
	// so the Secret's namespace is required.
	// +optional
	ImagePullSecret *SecretReference `json:"imagePullSecret,omitempty"`
}

// ClusterVirtualImageObjectRef copies an existing image or disk.
//
// +kubebuilder:validation:XValidation:rule="self.kind == 'ClusterVirtualImage' || has(self.__namespace__)",message="objectRef.namespace is required for the namespaced kinds VirtualImage, VirtualDisk and VirtualDiskSnapshot"
// +kubebuilder:validation:XValidation:rule="self.kind != 'ClusterVirtualImage' || !has(self.__namespace__)",message="objectRef.namespace must not be set for a ClusterVirtualImage, which has no namespace"
type ClusterVirtualImageObjectRef struct {
	// Kind of the source object.
	Kind ObjectRefKind `json:"kind"`
	// Name of the source object.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	Name string `json:"name"`
	// Namespace of the source object; required for the namespaced kinds.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=63
	// +optional
	Namespace string `json:"namespace,omitempty"`
}

// ClusterVirtualImageStatus is what vimg observed and did.
type ClusterVirtualImageStatus struct {
	// Phase of the image.
	// +kubebuilder:validation:Enum=Pending;WaitForUserUpload;Provisioning;Ready;Failed;Terminating;ImageLost
	// +optional
	Phase       ImagePhase `json:"phase,omitempty"`
	ImageStatus `json:",inline"`
	// Target is where the image is stored.
	// +optional
	Target ClusterVirtualImageTarget `json:"target,omitempty"`
	// UsedInNamespaces lists the namespaces whose objects use the image.
	// +listType=set
	// +optional
	UsedInNamespaces []string `json:"usedInNamespaces,omitempty"`
}

// ClusterVirtualImageTarget is where a ClusterVirtualImage's data lives.
type ClusterVirtualImageTarget struct {
	// RegistryURL of the image in DVCR.
	// +optional
	RegistryURL string `json:"registryURL,omitempty"`
}
