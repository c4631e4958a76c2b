package populator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic/dynamiclister"
	corelisters "k8s.io/client-go/listers/core/v1"
	storagelisters "k8s.io/client-go/listers/storage/v1"
	"k8s.io/klog/v2"

	v1 "vimg.dev/vimg/pkg/apis/virtualization/v1alpha2"
)

const annSelectedNode = "volume.kubernetes.io/selected-node"

// errNotDone makes the queue come back to a claim after a backoff.
var errNotDone = errors.New("population not finished")

// claims drives the claims lib-volume-populator cannot: ClusterVirtualImage
// claims through the whole populator protocol, and the claims of every kind
// whose image is gone, whose temporary objects it removes (the library
// leaves them, and its finalizer on a claim being deleted).
type claims struct {
	w    *worker
	pvcs corelisters.PersistentVolumeClaimLister
	scs  storagelisters.StorageClassLister
	vis  dynamiclister.Lister
	cvis dynamiclister.Lister
	// byUID finds claims by UID in the informer's cache.
	byUID func(uid string) ([]*corev1.PersistentVolumeClaim, error)
}

// sync handles the claim ns/name.
func (c *claims) sync(ctx context.Context, ns, name string) error {
	if ns == c.w.cfg.Namespace {
		return nil
	}
	pvc, err := c.pvcs.PersistentVolumeClaims(ns).Get(name)
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return err
	}
	ref := pvc.Spec.DataSourceRef
	if ref == nil || ref.APIGroup == nil || *ref.APIGroup != v1.GroupName {
		return nil
	}
	if ref.Kind != VirtualImageGK.Kind && ref.Kind != ClusterVirtualImageGK.Kind {
		return nil
	}
	u, err := c.image(ref.Kind, pvc.Namespace, ref.Name)
	if err == nil && ref.Kind == VirtualImageGK.Kind {
		// The library's, but for the clone its prime claim may wait for.
		prime, err := c.prime(pvc)
		if err != nil {
			return err
		}
		if prime != nil && prime.Annotations[AnnotationCloneSource] != "" {
			return c.clone(ctx, pvc, prime)
		}
		if prime != nil || pvc.Spec.VolumeName != "" || pvc.DeletionTimestamp != nil {
			// No clone is under way: one left from a clone given up goes.
			return c.removeClone(ctx, pvc)
		}
		return nil
	}
	if apierrors.IsNotFound(err) {
		return c.orphan(ctx, pvc)
	}
	if err != nil {
		return err
	}
	return c.populate(ctx, pvc, u)
}

// image finds an image in the informers' caches.
func (c *claims) image(kind, namespace, name string) (*unstructured.Unstructured, error) {
	switch kind {
	case VirtualImageGK.Kind:
		return c.vis.Namespace(namespace).Get(name)
	case ClusterVirtualImageGK.Kind:
		return c.cvis.Get(name)
	}
	return nil, apierrors.NewNotFound(VirtualImageGVR.GroupResource(), name)
}

func (c *claims) prime(pvc *corev1.PersistentVolumeClaim) (*corev1.PersistentVolumeClaim, error) {
	p, err := c.pvcs.PersistentVolumeClaims(c.w.cfg.Namespace).Get(primeName(pvc))
	if apierrors.IsNotFound(err) {
		return nil, nil
	}
	return p, err
}

// orphan cleans up after a claim whose image does not exist (any more): an
// unbound claim keeps waiting for an image of that name, with nothing of
// the populator left running for it.
func (c *claims) orphan(ctx context.Context, pvc *corev1.PersistentVolumeClaim) error {
	prime, err := c.prime(pvc)
	if err != nil {
		return err
	}
	if err := c.removeClone(ctx, pvc); err != nil {
		return err
	}
	// The pod and its Secret belong to the prime claim: with neither the
	// prime claim nor the pod in sight, the garbage collector has them,
	// and a claim that only waits costs no API calls.
	_, podErr := c.w.pods.Pods(c.w.cfg.Namespace).Get(podName(pvc))
	if (pvc.Spec.VolumeName == "" || pvc.DeletionTimestamp != nil) && (prime != nil || podErr == nil) {
		if err := c.w.removePod(ctx, pvc); err != nil {
			return err
		}
		if prime != nil {
			if err := c.deletePrime(ctx, prime); err != nil {
				return err
			}
		}
	}
	if pvc.DeletionTimestamp != nil || pvc.Spec.VolumeName != "" {
		c.w.forget(pvc.UID)
		return c.setFinalizer(ctx, pvc, false)
	}
	ref := pvc.Spec.DataSourceRef
	what := ref.Kind + " " + ref.Name
	if ref.Kind == VirtualImageGK.Kind {
		what = ref.Kind + " " + pvc.Namespace + "/" + ref.Name
	}
	c.w.say(pvc, corev1.EventTypeNormal, ReasonWaitingForImage, what+" does not exist; the claim is filled once it does")
	return nil
}

// populate runs the populator protocol for a ClusterVirtualImage claim:
// prime claim, populate pod, then the prime's volume rebound to the claim.
func (c *claims) populate(ctx context.Context, pvc *corev1.PersistentVolumeClaim, u *unstructured.Unstructured) error {
	prime, err := c.prime(pvc)
	if err != nil {
		return err
	}
	if pvc.Spec.VolumeName != "" && prime == nil && !hasFinalizer(pvc) {
		return nil // populated and cleaned up long ago
	}
	if pvc.DeletionTimestamp == nil && pvc.Spec.VolumeName == "" {
		node := ""
		if name := pvc.Spec.StorageClassName; name != nil {
			sc, err := c.scs.Get(*name)
			if apierrors.IsNotFound(err) {
				c.w.say(pvc, corev1.EventTypeWarning, ReasonWaitingForStorageClass, "StorageClass "+*name+" does not exist; the claim is filled once it does")
				return errNotDone
			}
			if err != nil {
				return err
			}
			if sc.VolumeBindingMode != nil && *sc.VolumeBindingMode == storagev1.VolumeBindingWaitForFirstConsumer {
				if node = pvc.Annotations[annSelectedNode]; node == "" {
					return nil // the scheduler picks a node for the first consumer
				}
			}
		}
		if prime == nil {
			served := c.servedByDriver(pvc)
			if served && c.servable(pvc, u) != "" {
				return nil // the image's events bring us back
			}
			if prime, err = c.createPrime(ctx, pvc, node, served); err != nil {
				return err
			}
		}
		if err := c.setFinalizer(ctx, pvc, true); err != nil {
			return err
		}
		if prime.Spec.VolumeName == "" {
			return nil // the prime claim's events bring us back
		}
		if err := c.w.populate(ctx, pvc, prime, u); err != nil {
			return err
		}
		done, err := c.w.complete(ctx, pvc, prime)
		if err != nil {
			return err
		}
		if !done {
			return errNotDone
		}
		return c.rebind(ctx, pvc, prime, u.GetName())
	}
	if pvc.DeletionTimestamp == nil && prime != nil && prime.Status.Phase != corev1.ClaimLost {
		return nil // the bind controller has yet to see the rebound volume
	}
	if pvc.DeletionTimestamp == nil && prime != nil {
		c.w.recorder.Event(pvc, corev1.EventTypeNormal, "PopulatorFinished", "Populator finished")
	}
	if err := c.w.cleanup(ctx, pvc); err != nil {
		return err
	}
	if prime != nil {
		if err := c.deletePrime(ctx, prime); err != nil {
			return err
		}
	}
	return c.setFinalizer(ctx, pvc, false)
}

func (c *claims) createPrime(ctx context.Context, pvc *corev1.PersistentVolumeClaim, node string, served bool) (*corev1.PersistentVolumeClaim, error) {
	p := &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{
			Name: primeName(pvc), Namespace: c.w.cfg.Namespace,
			Labels: c.w.labels(pvc), Annotations: annotations(pvc),
		},
		Spec: corev1.PersistentVolumeClaimSpec{
			AccessModes:      pvc.Spec.AccessModes,
			Resources:        pvc.Spec.Resources,
			StorageClassName: pvc.Spec.StorageClassName,
			VolumeMode:       pvc.Spec.VolumeMode,
		},
	}
	if node != "" {
		p.Annotations[annSelectedNode] = node
	}
	if served {
		p.Annotations[AnnotationServedBy] = CSIDriver
	}
	created, err := c.w.kube.CoreV1().PersistentVolumeClaims(p.Namespace).Create(ctx, p, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		return c.w.kube.CoreV1().PersistentVolumeClaims(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
	}
	if err != nil {
		return nil, fmt.Errorf("creating prime claim %s: %w", p.Name, err)
	}
	return created, nil
}

func (c *claims) deletePrime(ctx context.Context, prime *corev1.PersistentVolumeClaim) error {
	err := c.w.kube.CoreV1().PersistentVolumeClaims(prime.Namespace).Delete(ctx, prime.Name, metav1.DeleteOptions{})
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("deleting prime claim %s: %w", prime.Name, err)
	}
	return nil
}

// rebind points the prime claim's volume at the user's claim; the bind
// controller then binds them and marks the prime claim Lost.
func (c *claims) rebind(ctx context.Context, pvc, prime *corev1.PersistentVolumeClaim, image string) error {
	pv, err := c.w.kube.CoreV1().PersistentVolumes().Get(ctx, prime.Spec.VolumeName, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("reading the prime claim's volume %s: %w", prime.Spec.VolumeName, err)
	}
	if cr := pv.Spec.ClaimRef; cr != nil && cr.UID == pvc.UID {
		return nil
	}
	patch, _ := json.Marshal(map[string]any{
		"metadata": map[string]any{"annotations": map[string]string{AnnotationPopulatedFrom: image}},
		"spec": map[string]any{"claimRef": map[string]any{
			"namespace": pvc.Namespace, "name": pvc.Name, "uid": pvc.UID, "resourceVersion": pvc.ResourceVersion,
		}},
	})
	if _, err := c.w.kube.CoreV1().PersistentVolumes().Patch(ctx, pv.Name, types.StrategicMergePatchType, patch, metav1.PatchOptions{}); err != nil {
		return fmt.Errorf("rebinding volume %s to claim %s/%s: %w", pv.Name, pvc.Namespace, pvc.Name, err)
	}
	klog.FromContext(ctx).Info("Rebound populated volume", "pv", pv.Name, "pvc", klog.KObj(pvc))
	return nil
}

// setFinalizer adds or removes the populator's finalizer, which keeps a
// claim from going while its prime claim and pod exist.
func (c *claims) setFinalizer(ctx context.Context, pvc *corev1.PersistentVolumeClaim, want bool) error {
	has := false
	var rest []string
	for _, f := range pvc.Finalizers {
		if f == Finalizer {
			has = true
		} else {
			rest = append(rest, f)
		}
	}
	if has == want {
		return nil
	}
	fins := rest
	if want {
		fins = append(rest, Finalizer)
	}
	patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{
		"finalizers": fins, "resourceVersion": pvc.ResourceVersion,
	}})
	_, err := c.w.kube.CoreV1().PersistentVolumeClaims(pvc.Namespace).Patch(ctx, pvc.Name, types.MergePatchType, patch, metav1.PatchOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("%s finalizer %s on claim %s/%s: %w", map[bool]string{true: "adding", false: "removing"}[want], Finalizer, pvc.Namespace, pvc.Name, err)
	}
	return nil
}

func hasFinalizer(pvc *corev1.PersistentVolumeClaim) bool {
	for _, f := range pvc.Finalizers {
		if f == Finalizer {
			return true
		}
	}
	return false
}

// claimKey splits a lib-volume-populator queue key, "pvc/<ns>/<name>".
func claimKey(key string) (ns, name string, ok bool) {
	parts := strings.Split(key, "/")
	if len(parts) != 3 || parts[0] != "pvc" {
		return "", "", false
	}
	return parts[1], parts[2], true
}
