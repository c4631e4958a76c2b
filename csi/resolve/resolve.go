// Package resolve implements the CSI driver's Resolver (csi/driver): it
// turns a VirtualImage or ClusterVirtualImage into the Pin of the image
// DVCR holds for it, and follows a PersistentVolumeClaim the populator made
// back to the image its user's claim names.
package resolve

import (
	"context"
	"errors"
	"strings"

	"github.com/distribution/reference"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/klog/v2"

	"vimg.dev/vimg/csi/driver"
	"vimg.dev/vimg/dvcr/client"
	v1 "vimg.dev/vimg/pkg/apis/virtualization/v1alpha2"
)

// The resources a Resolver reads.
var (
	VirtualImageGVR        = v1.SchemeGroupVersion.WithResource("virtualimages")
	ClusterVirtualImageGVR = v1.SchemeGroupVersion.WithResource("clustervirtualimages")
)

// Resolver resolves VirtualImages and ClusterVirtualImages through the
// API server and DVCR, and the populator's prime claims through the
// claims they serve.
type Resolver struct {
	// Dynamic reads VirtualImages and ClusterVirtualImages.
	Dynamic dynamic.Interface
	// Kube reads PersistentVolumeClaims.
	Kube kubernetes.Interface
	// DVCR is a client of DVCR able to pull the images.
	DVCR *client.Client
	// DVCRAddress is DVCR's host:port as images' status.target.registryURL
	// names it.
	DVCRAddress string
	// PopulateNamespace is where the vimg populator makes prime claims;
	// only claims there are resolved (claim).
	PopulateNamespace string
}

var _ driver.Resolver = (*Resolver)(nil)

// Resolve returns the Pin of the image kind namespace/name names. Its
// errors carry gRPC statuses: NotFound for a missing object,
// Unavailable for what waiting may fix, FailedPrecondition for what it
// will not.
func (r *Resolver) Resolve(ctx context.Context, kind, namespace, name string) (driver.Pin, error) {
	switch kind {
	case driver.KindVirtualImage:
		if namespace == "" || name == "" {
			return driver.Pin{}, status.Errorf(codes.InvalidArgument, "a VirtualImage needs a namespace and a name")
		}
		return r.image(ctx, kind, VirtualImageGVR, namespace, name)
	case driver.KindClusterVirtualImage:
		if name == "" {
			return driver.Pin{}, status.Errorf(codes.InvalidArgument, "a ClusterVirtualImage needs a name")
		}
		return r.image(ctx, kind, ClusterVirtualImageGVR, "", name)
	case driver.KindPersistentVolumeClaim:
		if namespace == "" || name == "" {
			return driver.Pin{}, status.Errorf(codes.InvalidArgument, "a PersistentVolumeClaim needs a namespace and a name")
		}
		return r.claim(ctx, namespace, name)
	}
	return driver.Pin{}, status.Errorf(codes.InvalidArgument, "cannot resolve a %q", kind)
}

func objectName(kind, namespace, name string) string {
	if namespace == "" {
		return kind + " " + name
	}
	return kind + " " + namespace + "/" + name
}

// image resolves a VirtualImage or ClusterVirtualImage.
func (r *Resolver) image(ctx context.Context, kind string, gvr schema.GroupVersionResource, namespace, name string) (driver.Pin, error) {
	what := objectName(kind, namespace, name)
	var (
		u   *unstructured.Unstructured
		err error
	)
	if namespace == "" {
		u, err = r.Dynamic.Resource(gvr).Get(ctx, name, metav1.GetOptions{})
	} else {
		u, err = r.Dynamic.Resource(gvr).Namespace(namespace).Get(ctx, name, metav1.GetOptions{})
	}
	switch {
	case apierrors.IsNotFound(err):
		return driver.Pin{}, status.Errorf(codes.NotFound, "%s not found", what)
	case err != nil:
		return driver.Pin{}, status.Errorf(codes.Unavailable, "reading %s: %v", what, err)
	}
	str := func(fields ...string) string {
		s, _, _ := unstructured.NestedString(u.Object, fields...)
		return s
	}
	phase := str("status", "phase")
	if u.GetDeletionTimestamp() != nil {
		phase = string(v1.ImagePhaseTerminating)
	}
	if phase == "" {
		phase = string(v1.ImagePhasePending)
	}
	if phase != string(v1.ImagePhaseReady) {
		return driver.Pin{}, status.Errorf(codes.Unavailable, "%s is %s; the volume is published once it is Ready", what, phase)
	}
	if str("spec", "storage") == string(v1.StoragePersistentVolumeClaim) {
		return driver.Pin{}, status.Errorf(codes.FailedPrecondition, "%s is stored in a PersistentVolumeClaim: only images in DVCR can be CD-ROM volumes", what)
	}
	url := str("status", "target", "registryURL")
	ref, ok := strings.CutPrefix(url, r.DVCRAddress+"/")
	if !ok || r.DVCRAddress == "" || ref == "" {
		return driver.Pin{}, status.Errorf(codes.FailedPrecondition, "%s is Ready but its registryURL %q is not in DVCR at %s", what, url, r.DVCRAddress)
	}
	parsed, err := reference.Parse(ref)
	named, ok := parsed.(reference.Named)
	if err != nil || !ok {
		return driver.Pin{}, status.Errorf(codes.FailedPrecondition, "%s: registryURL %q is not a reference to a repository in DVCR", what, url)
	}
	im, err := r.DVCR.Open(ctx, ref)
	switch {
	case errors.Is(err, client.ErrNotFound):
		return driver.Pin{}, status.Errorf(codes.Unavailable, "%s is Ready but DVCR has no image %s yet: %v", what, ref, err)
	case err != nil:
		return driver.Pin{}, status.Errorf(codes.Unavailable, "%s: %v", what, err)
	}
	pin := driver.Pin{
		Ref:   named.Name() + "@" + im.Digest.String(),
		Layer: im.Layer.Digest.String(),
		File:  im.Meta.Name(),
		Size:  im.Size(),
	}
	if err := pin.Validate(); err != nil {
		return driver.Pin{}, status.Errorf(codes.FailedPrecondition, "%s: the image in DVCR cannot be served: %v", what, err)
	}
	klog.FromContext(ctx).V(2).Info("Resolved image", "kind", kind, "namespace", namespace, "name", name, "ref", pin.Ref)
	return pin, nil
}

// The labels and annotation by which the populator's prime claims name the
// user's claim they serve (package populator; not imported, to keep the
// node plugin's dependencies small).
const (
	labelClaimUID       = "vimg.dev/pvc-uid"
	labelClaimNamespace = "vimg.dev/pvc-namespace"
	annotationClaimName = "vimg.dev/pvc-name"
)

// claim resolves the claim being provisioned: a prime claim of the
// populator's, which names the user's claim, whose dataSourceRef names the
// image. Only claims in PopulateNamespace are followed: there only the
// populator makes claims, so their labels can be trusted to name the
// claim they serve, whose own dataSourceRef then decides (an image of the
// user's claim's namespace, or a cluster image). Any other claim of the
// driver's class is refused.
func (r *Resolver) claim(ctx context.Context, namespace, name string) (driver.Pin, error) {
	what := objectName(driver.KindPersistentVolumeClaim, namespace, name)
	if r.PopulateNamespace == "" || namespace != r.PopulateNamespace {
		return driver.Pin{}, status.Errorf(codes.InvalidArgument, "%s: a claim of this driver's class needs a dataSourceRef naming a VirtualImage or ClusterVirtualImage (apiGroup %s), which the vimg populator serves",
			what, v1.GroupName)
	}
	prime, err := r.Kube.CoreV1().PersistentVolumeClaims(namespace).Get(ctx, name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return driver.Pin{}, status.Errorf(codes.NotFound, "%s not found", what)
	case err != nil:
		return driver.Pin{}, status.Errorf(codes.Unavailable, "reading %s: %v", what, err)
	}
	userNS, userName, uid := prime.Labels[labelClaimNamespace], prime.Annotations[annotationClaimName], prime.Labels[labelClaimUID]
	if userNS == "" || userName == "" || uid == "" {
		return driver.Pin{}, status.Errorf(codes.FailedPrecondition, "%s names no claim it serves (%s, %s, %s)", what, labelClaimNamespace, annotationClaimName, labelClaimUID)
	}
	userWhat := objectName(driver.KindPersistentVolumeClaim, userNS, userName)
	pvc, err := r.Kube.CoreV1().PersistentVolumeClaims(userNS).Get(ctx, userName, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return driver.Pin{}, status.Errorf(codes.NotFound, "%s, which %s serves, not found", userWhat, what)
	case err != nil:
		return driver.Pin{}, status.Errorf(codes.Unavailable, "reading %s: %v", userWhat, err)
	}
	if string(pvc.UID) != uid {
		return driver.Pin{}, status.Errorf(codes.NotFound, "%s has UID %s; %s serves the claim of UID %s, since deleted", userWhat, pvc.UID, what, uid)
	}
	ref := pvc.Spec.DataSourceRef
	if ref == nil || ref.APIGroup == nil || *ref.APIGroup != v1.GroupName {
		return driver.Pin{}, status.Errorf(codes.FailedPrecondition, "%s names no image of %s in its dataSourceRef", userWhat, v1.GroupName)
	}
	switch ref.Kind {
	case driver.KindVirtualImage:
		if ref.Namespace != nil && *ref.Namespace != "" && *ref.Namespace != userNS {
			return driver.Pin{}, status.Errorf(codes.FailedPrecondition, "%s: a VirtualImage of another namespace (%s) cannot be served", userWhat, *ref.Namespace)
		}
		return r.Resolve(ctx, driver.KindVirtualImage, userNS, ref.Name)
	case driver.KindClusterVirtualImage:
		return r.Resolve(ctx, driver.KindClusterVirtualImage, "", ref.Name)
	}
	return driver.Pin{}, status.Errorf(codes.FailedPrecondition, "%s: dataSourceRef kind %q is not VirtualImage or ClusterVirtualImage", userWhat, ref.Kind)
}
