package populator

import (
	"fmt"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"

	v1 "vimg.dev/vimg/pkg/apis/virtualization/v1alpha2"
	"vimg.dev/vimg/pkg/worker/api"
)

// The data source kinds the populator serves.
var (
	VirtualImageGK         = schema.GroupKind{Group: v1.GroupName, Kind: "VirtualImage"}
	ClusterVirtualImageGK  = schema.GroupKind{Group: v1.GroupName, Kind: "ClusterVirtualImage"}
	VirtualImageGVR        = v1.SchemeGroupVersion.WithResource("virtualimages")
	ClusterVirtualImageGVR = v1.SchemeGroupVersion.WithResource("clustervirtualimages")
)

// image is what the populator reads of a VirtualImage or
// ClusterVirtualImage: the informers hold them unstructured.
type image struct {
	kind, namespace, name string
	uid                   string
	phase                 v1.ImagePhase
	storage               string
	registryURL           string
	progress              string
	deleting              bool
	// refKind, refNamespace and refName name the image an image copies
	// (dataSource type ObjectRef).
	refKind, refNamespace, refName string
	// claimName and virtualSize of an image stored in a claim.
	claimName   string
	virtualSize int64
}

func imageOf(u *unstructured.Unstructured) image {
	str := func(fields ...string) string {
		s, _, _ := unstructured.NestedString(u.Object, fields...)
		return s
	}
	im := image{
		kind:        u.GetKind(),
		namespace:   u.GetNamespace(),
		name:        u.GetName(),
		uid:         string(u.GetUID()),
		phase:       v1.ImagePhase(str("status", "phase")),
		storage:     str("spec", "storage"),
		registryURL: str("status", "target", "registryURL"),
		progress:    str("status", "progress"),
		deleting:    u.GetDeletionTimestamp() != nil,
		claimName:   str("status", "target", "persistentVolumeClaimName"),
	}
	im.virtualSize, _ = strconv.ParseInt(str("status", "size", "unpackedBytes"), 10, 64)
	if str("spec", "dataSource", "type") == string(v1.DataSourceTypeObjectRef) {
		im.refKind, im.refName = str("spec", "dataSource", "objectRef", "kind"), str("spec", "dataSource", "objectRef", "name")
		switch im.refKind {
		case ClusterVirtualImageGK.Kind:
		case VirtualImageGK.Kind:
			im.refNamespace = u.GetNamespace() // a VirtualImage copies images of its namespace
		default:
			im.refNamespace = str("spec", "dataSource", "objectRef", "namespace")
		}
	}
	return im
}

// ownsClaim tells whether pvc is the image's own claim (storage:
// PersistentVolumeClaim): made by the image controller under the name it
// gives, and controlled by this very image.
func (im image) ownsClaim(pvc *corev1.PersistentVolumeClaim, u *unstructured.Unstructured) bool {
	return im.storage == string(v1.StoragePersistentVolumeClaim) &&
		pvc.Namespace == im.namespace && pvc.Name == api.ImageClaimName(im.name, im.uid) &&
		metav1.IsControlledBy(pvc, u)
}

func (im image) String() string {
	if im.namespace == "" {
		return im.kind + " " + im.name
	}
	return im.kind + " " + im.namespace + "/" + im.name
}

// notUsable says why a claim cannot be filled from the image now, and
// whether waiting can help; "" means it can be filled.
func (im image) notUsable(dvcrAddress string) (why string, wait bool) {
	switch {
	case im.deleting:
		return im.String() + " is being deleted", true
	case im.phase != v1.ImagePhaseReady:
		phase := string(im.phase)
		if phase == "" {
			phase = "Pending"
		}
		if im.progress != "" && im.phase == v1.ImagePhaseProvisioning {
			phase += " " + im.progress
		}
		return fmt.Sprintf("%s is %s; the claim is filled once it is Ready", im, phase), true
	case im.storage == string(v1.StoragePersistentVolumeClaim):
		if im.claimName == "" || im.virtualSize <= 0 {
			return fmt.Sprintf("%s is Ready but its status names no claim or size", im), true
		}
	case !strings.HasPrefix(im.registryURL, dvcrAddress+"/"):
		return fmt.Sprintf("%s is Ready but its registryURL %q is not in DVCR at %s", im, im.registryURL, dvcrAddress), true
	}
	return "", false
}

// ref is the image's DVCR reference without the registry address.
func (im image) ref(dvcrAddress string) string {
	return strings.TrimPrefix(im.registryURL, dvcrAddress+"/")
}
