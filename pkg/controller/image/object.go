package image

import (
	"sigs.k8s.io/controller-runtime/pkg/client"

	"vimg.dev/vimg/dvcr/layout"
	v1 "vimg.dev/vimg/pkg/apis/virtualization/v1alpha2"
)

// object is what the reconciler needs of a VirtualImage or a
// ClusterVirtualImage: the two kinds differ only in scope, in where their
// secrets live and in a few status fields, so one reconciler serves both.
type object interface {
	client.Object
	kind() string
	// repository is the image's DVCR repository (layout.Repository).
	repository() string
	source() dataSource
	// pvcStorage is true for a VirtualImage with storage
	// PersistentVolumeClaim.
	pvcStorage() bool
	phase() v1.ImagePhase
	setPhase(v1.ImagePhase)
	common() *v1.ImageStatus
	registryURL() string
	setRegistryURL(string)
	copyObject() object
	// obj is the API object itself, for the client and the recorder.
	obj() client.Object
}

// dataSource is a data source with every reference resolved to a namespace.
type dataSource struct {
	Type           v1.DataSourceType
	HTTP           *v1.HTTPSource
	ContainerImage *v1.ContainerImageSource
	// Secret is the authSecretRef (HTTP) or imagePullSecret (ContainerImage).
	Secret *v1.SecretReference
	Ref    *objectRef
	Upload *v1.DataSourceUpload
}

type objectRef struct {
	Kind      v1.ObjectRefKind
	Namespace string // "" for a ClusterVirtualImage
	Name      string
}

func (r objectRef) String() string {
	if r.Namespace == "" {
		return string(r.Kind) + "/" + r.Name
	}
	return string(r.Kind) + "/" + r.Namespace + "/" + r.Name
}

type virtualImage struct{ *v1.VirtualImage }

func (o virtualImage) kind() string { return "VirtualImage" }
func (o virtualImage) repository() string {
	return layout.Repository(layout.KindVirtualImage, o.Namespace, o.Name)
}
func (o virtualImage) pvcStorage() bool {
	return o.Spec.Storage == v1.StoragePersistentVolumeClaim
}
func (o virtualImage) phase() v1.ImagePhase     { return o.Status.Phase }
func (o virtualImage) setPhase(p v1.ImagePhase) { o.Status.Phase = p }
func (o virtualImage) common() *v1.ImageStatus  { return &o.Status.ImageStatus }
func (o virtualImage) registryURL() string      { return o.Status.Target.RegistryURL }
func (o virtualImage) setRegistryURL(u string)  { o.Status.Target.RegistryURL = u }
func (o virtualImage) copyObject() object       { return virtualImage{o.DeepCopy()} }
func (o virtualImage) obj() client.Object       { return o.VirtualImage }
func (o virtualImage) source() dataSource {
	ds := o.Spec.DataSource
	s := dataSource{Type: ds.Type, Upload: ds.Upload}
	if ds.HTTP != nil {
		s.HTTP = &ds.HTTP.HTTPSource
		if ds.HTTP.AuthSecretRef != nil {
			s.Secret = &v1.SecretReference{Namespace: o.Namespace, Name: ds.HTTP.AuthSecretRef.Name}
		}
	}
	if ds.ContainerImage != nil {
		s.ContainerImage = &ds.ContainerImage.ContainerImageSource
		if ds.ContainerImage.ImagePullSecret != nil {
			s.Secret = &v1.SecretReference{Namespace: o.Namespace, Name: ds.ContainerImage.ImagePullSecret.Name}
		}
	}
	if ds.ObjectRef != nil {
		r := objectRef{Kind: ds.ObjectRef.Kind, Name: ds.ObjectRef.Name}
		if r.Kind != v1.ObjectRefKindClusterVirtualImage {
			r.Namespace = o.Namespace // a VI refers to objects of its own namespace
		}
		s.Ref = &r
	}
	return s
}

type clusterVirtualImage struct{ *v1.ClusterVirtualImage }

func (o clusterVirtualImage) kind() string { return "ClusterVirtualImage" }
func (o clusterVirtualImage) repository() string {
	return layout.Repository(layout.KindClusterVirtualImage, "", o.Name)
}
func (o clusterVirtualImage) pvcStorage() bool         { return false }
func (o clusterVirtualImage) phase() v1.ImagePhase     { return o.Status.Phase }
func (o clusterVirtualImage) setPhase(p v1.ImagePhase) { o.Status.Phase = p }
func (o clusterVirtualImage) common() *v1.ImageStatus  { return &o.Status.ImageStatus }
func (o clusterVirtualImage) registryURL() string      { return o.Status.Target.RegistryURL }
func (o clusterVirtualImage) setRegistryURL(u string)  { o.Status.Target.RegistryURL = u }
func (o clusterVirtualImage) copyObject() object       { return clusterVirtualImage{o.DeepCopy()} }
func (o clusterVirtualImage) obj() client.Object       { return o.ClusterVirtualImage }
func (o clusterVirtualImage) source() dataSource {
	ds := o.Spec.DataSource
	s := dataSource{Type: ds.Type, Upload: ds.Upload}
	if ds.HTTP != nil {
		s.HTTP = &ds.HTTP.HTTPSource
		if ds.HTTP.AuthSecretRef != nil {
			r := *ds.HTTP.AuthSecretRef
			s.Secret = &r
		}
	}
	if ds.ContainerImage != nil {
		s.ContainerImage = &ds.ContainerImage.ContainerImageSource
		if ds.ContainerImage.ImagePullSecret != nil {
			r := *ds.ContainerImage.ImagePullSecret
			s.Secret = &r
		}
	}
	if ds.ObjectRef != nil {
		s.Ref = &objectRef{Kind: ds.ObjectRef.Kind, Namespace: ds.ObjectRef.Namespace, Name: ds.ObjectRef.Name}
	}
	return s
}
