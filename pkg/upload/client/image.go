package client

import (
	"context"
	"fmt"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"

	v1 "vimg.dev/vimg/pkg/apis/virtualization/v1alpha2"
)

// ImageRef names a VirtualImage (Namespace, Name) or a ClusterVirtualImage
// (Cluster, Name).
type ImageRef struct {
	Namespace, Name string
	Cluster         bool
}

func (r ImageRef) String() string {
	if r.Cluster {
		return "clustervirtualimage " + r.Name
	}
	return "virtualimage " + r.Namespace + "/" + r.Name
}

// Image is what an upload needs to know of an image.
type Image struct {
	UID            string
	DataSourceType v1.DataSourceType
	Phase          v1.ImagePhase
	Status         v1.ImageStatus
	// Generation and Status.ObservedGeneration tell a status written for
	// this spec from one not yet written.
	Generation int64
}

// Ready is the image's Ready condition, or nil.
func (im *Image) Ready() *metav1.Condition {
	return meta.FindStatusCondition(im.Status.Conditions, v1.ConditionReady)
}

// Images reads and creates images.
type Images interface {
	// Get returns the image; a missing one gives an error for which
	// apierrors.IsNotFound is true.
	Get(ctx context.Context, ref ImageRef) (*Image, error)
	// CreateForUpload creates the image with dataSource type Upload (a
	// VirtualImage is stored in DVCR).
	CreateForUpload(ctx context.Context, ref ImageRef) error
}

// Resources of the image kinds.
var (
	VirtualImages        = v1.SchemeGroupVersion.WithResource("virtualimages")
	ClusterVirtualImages = v1.SchemeGroupVersion.WithResource("clustervirtualimages")
)

// NewImages returns Images over a dynamic client.
func NewImages(dyn dynamic.Interface) Images { return dynamicImages{dyn} }

type dynamicImages struct{ dyn dynamic.Interface }

func (d dynamicImages) resource(ref ImageRef) dynamic.ResourceInterface {
	if ref.Cluster {
		return d.dyn.Resource(ClusterVirtualImages)
	}
	return d.dyn.Resource(VirtualImages).Namespace(ref.Namespace)
}

func (d dynamicImages) Get(ctx context.Context, ref ImageRef) (*Image, error) {
	u, err := d.resource(ref).Get(ctx, ref.Name, metav1.GetOptions{})
	if err != nil {
		return nil, err
	}
	if ref.Cluster {
		var cvi v1.ClusterVirtualImage
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &cvi); err != nil {
			return nil, fmt.Errorf("reading %s: %w", ref, err)
		}
		return &Image{UID: string(cvi.UID), DataSourceType: cvi.Spec.DataSource.Type, Phase: cvi.Status.Phase,
			Status: cvi.Status.ImageStatus, Generation: cvi.Generation}, nil
	}
	var vi v1.VirtualImage
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &vi); err != nil {
		return nil, fmt.Errorf("reading %s: %w", ref, err)
	}
	return &Image{UID: string(vi.UID), DataSourceType: vi.Spec.DataSource.Type, Phase: vi.Status.Phase,
		Status: vi.Status.ImageStatus, Generation: vi.Generation}, nil
}

func (d dynamicImages) CreateForUpload(ctx context.Context, ref ImageRef) error {
	var obj runtime.Object
	var gvk schema.GroupVersionKind
	if ref.Cluster {
		obj = &v1.ClusterVirtualImage{
			ObjectMeta: metav1.ObjectMeta{Name: ref.Name},
			Spec:       v1.ClusterVirtualImageSpec{DataSource: v1.ClusterVirtualImageDataSource{Type: v1.DataSourceTypeUpload}},
		}
		gvk = v1.SchemeGroupVersion.WithKind("ClusterVirtualImage")
	} else {
		obj = &v1.VirtualImage{
			ObjectMeta: metav1.ObjectMeta{Name: ref.Name, Namespace: ref.Namespace},
			Spec: v1.VirtualImageSpec{Storage: v1.StorageContainerRegistry,
				DataSource: v1.VirtualImageDataSource{Type: v1.DataSourceTypeUpload}},
		}
		gvk = v1.SchemeGroupVersion.WithKind("VirtualImage")
	}
	m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(obj)
	if err != nil {
		return err
	}
	u := &unstructured.Unstructured{Object: m}
	u.SetGroupVersionKind(gvk)
	// An empty status is not the user's to send.
	unstructured.RemoveNestedField(u.Object, "status")
	if _, err := d.resource(ref).Create(ctx, u, metav1.CreateOptions{FieldManager: "vimg-upload"}); err != nil {
		if apierrors.IsAlreadyExists(err) {
			return nil // created meanwhile: Get tells what it is
		}
		return fmt.Errorf("creating %s: %w", ref, err)
	}
	return nil
}
