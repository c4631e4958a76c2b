// Package resolve implements the CSI driver's Resolver (csi/driver): it
// turns a VirtualImage or ClusterVirtualImage into the Pin of the image
// DVCR holds for it, and reads the Pin the populator wrote on a
// PersistentVolumeClaim.
package resolve

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
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

// AnnotationImagePin is the claim annotation holding the Pin of the image
// a claim was filled from, as JSON (MarshalPin). The vimg populator sets it.
const AnnotationImagePin = "vimg.dev/image-pin"

// The resources a Resolver reads.
var (
	VirtualImageGVR        = v1.SchemeGroupVersion.WithResource("virtualimages")
	ClusterVirtualImageGVR = v1.SchemeGroupVersion.WithResource("clustervirtualimages")
)

// Resolver resolves VirtualImages and ClusterVirtualImages through the
// API server and DVCR, and claims through their AnnotationImagePin.
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

// claim reads the Pin the populator wrote on a claim.
func (r *Resolver) claim(ctx context.Context, namespace, name string) (driver.Pin, error) {
	what := objectName(driver.KindPersistentVolumeClaim, namespace, name)
	pvc, err := r.Kube.CoreV1().PersistentVolumeClaims(namespace).Get(ctx, name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return driver.Pin{}, status.Errorf(codes.NotFound, "%s not found", what)
	case err != nil:
		return driver.Pin{}, status.Errorf(codes.Unavailable, "reading %s: %v", what, err)
	}
	s, ok := pvc.Annotations[AnnotationImagePin]
	if !ok {
		return driver.Pin{}, status.Errorf(codes.FailedPrecondition, "%s: claim has no %s: it is filled by the vimg populator", what, AnnotationImagePin)
	}
	pin, err := UnmarshalPin(s)
	if err != nil {
		return driver.Pin{}, status.Errorf(codes.InvalidArgument, "%s: %v", what, err)
	}
	return pin, nil
}

// pinJSON is the Pin as AnnotationImagePin holds it.
type pinJSON struct {
	Ref   string `json:"ref"`
	Layer string `json:"layer"`
	File  string `json:"file"`
	Size  int64  `json:"size"`
}

// MarshalPin returns p as the value of AnnotationImagePin.
func MarshalPin(p driver.Pin) (string, error) {
	if err := p.Validate(); err != nil {
		return "", err
	}
	b, err := json.Marshal(pinJSON{Ref: p.Ref, Layer: p.Layer, File: p.File, Size: p.Size})
	if err != nil {
		return "", err
	}
	return string(b), nil
}

// maxPinJSON bounds an annotation's value; a real one is under 400 bytes.
const maxPinJSON = 4 << 10

// UnmarshalPin decodes and validates the value of AnnotationImagePin.
// Unknown fields are refused.
func UnmarshalPin(s string) (driver.Pin, error) {
	if len(s) > maxPinJSON {
		return driver.Pin{}, fmt.Errorf("%s: %d bytes, want at most %d", AnnotationImagePin, len(s), maxPinJSON)
	}
	dec := json.NewDecoder(strings.NewReader(s))
	dec.DisallowUnknownFields()
	var j pinJSON
	if err := dec.Decode(&j); err != nil {
		return driver.Pin{}, fmt.Errorf("%s: %w", AnnotationImagePin, err)
	}
	if dec.More() {
		return driver.Pin{}, fmt.Errorf("%s: trailing data after the JSON object", AnnotationImagePin)
	}
	p := driver.Pin{Ref: j.Ref, Layer: j.Layer, File: j.File, Size: j.Size}
	if err := p.Validate(); err != nil {
		return driver.Pin{}, fmt.Errorf("%s: %w", AnnotationImagePin, err)
	}
	return p, nil
}
