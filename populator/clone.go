package populator

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/klog/v2"
	"k8s.io/utils/ptr"

	v1 "vimg.dev/vimg/pkg/apis/virtualization/v1alpha2"
)

// A copy of an image stored in a claim is a CSI clone of that claim when
// the class can clone (AnnotationCSIClone on it), the copy is of the same
// class, a Filesystem claim, and at least as large as the image's claim:
// what Kubernetes and CSI require of a clone. Otherwise it is streamed
// from a serve pod (populateFromClaim).
//
// A clone's claim must be in the namespace of its source, where
// lib-volume-populator cannot put its prime claim. So the clone is made
// beside the user's claim, as claim vimg-clone-<uid>, and its volume is
// then handed to the prime claim, which was made unable to bind anything
// else (mutatePrime). From there the protocol is the usual one: a populate
// pod adopts the cloned disk.img (grows it to the volume, gives it to qemu)
// and the volume is rebound to the user's claim.
//
// If the clone is not bound within Config.CloneTimeout (the driver cannot
// clone after all, or the volumes live where a clone cannot be made), it is
// given up: AnnotationCloneFailed on the user's claim says why, the clone
// claim and the prime claim are deleted, and the next prime claim is an
// ordinary one, filled by a streamed copy.

// componentClone labels clone claims.
const componentClone = "clone"

func cloneName(pvc *corev1.PersistentVolumeClaim) string { return "vimg-clone-" + string(pvc.UID) }

// cloneSource returns the claim a copy into pvc can be cloned from, or ""
// when the copy is streamed.
func (c *claims) cloneSource(pvc *corev1.PersistentVolumeClaim) string {
	ref := pvc.Spec.DataSourceRef
	if ref == nil || ref.Kind != VirtualImageGK.Kind || isBlock(pvc) || pvc.Spec.StorageClassName == nil ||
		pvc.Annotations[AnnotationCloneFailed] != "" {
		return ""
	}
	u, err := c.image(ref.Kind, pvc.Namespace, ref.Name)
	if err != nil {
		return ""
	}
	if im := imageOf(u); im.ownsClaim(pvc, u) && im.refKind != VirtualImageGK.Kind {
		// The claim of an image filled from its source, or copying an
		// image in DVCR: nothing to clone.
		return ""
	}
	im, err := c.w.dataOf(pvc, u)
	if err != nil {
		return ""
	}
	if im.storage != string(v1.StoragePersistentVolumeClaim) || im.namespace != pvc.Namespace {
		return ""
	}
	if why, _ := im.notUsable(c.w.cfg.DVCRAddress); why != "" {
		return ""
	}
	src, err := c.pvcs.PersistentVolumeClaims(im.namespace).Get(im.claimName)
	if err != nil || src.Status.Phase != corev1.ClaimBound || src.Spec.StorageClassName == nil ||
		*src.Spec.StorageClassName != *pvc.Spec.StorageClassName {
		return ""
	}
	sc, err := c.scs.Get(*pvc.Spec.StorageClassName)
	if err != nil || sc.Annotations[AnnotationCSIClone] != "true" {
		return ""
	}
	have := src.Status.Capacity[corev1.ResourceStorage]
	want := pvc.Spec.Resources.Requests[corev1.ResourceStorage]
	if want.Cmp(have) < 0 {
		return ""
	}
	return src.Name
}

// mutatePrime is lib-volume-populator's hook on a prime claim about to be
// made. For a copy that will be cloned, the prime claim gets no class and a
// selector nothing matches: no provisioner serves it and no volume binds
// to it, but for the cloned volume handed to it (a pre-bound volume
// skips both checks).
//
// The library has its own informers and names the claim only by the UID in
// the prime claim's name: the claim may not be in this process's cache yet,
// so it is waited for a little.
func (c *claims) mutatePrime(prime *corev1.PersistentVolumeClaim) (*corev1.PersistentVolumeClaim, error) {
	uid := strings.TrimPrefix(prime.Name, primePrefix)
	var pvc *corev1.PersistentVolumeClaim
	err := wait.PollUntilContextTimeout(context.Background(), 20*time.Millisecond, 5*time.Second, true, func(context.Context) (bool, error) {
		objs, err := c.byUID(uid)
		if err != nil || len(objs) != 1 {
			return false, err
		}
		pvc = objs[0]
		return true, nil
	})
	if err != nil {
		return nil, fmt.Errorf("finding the claim of prime claim %s: %w", prime.Name, err)
	}
	// Read afresh: a clone just given up says so on the claim, and the
	// cache may not show it yet.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	live, err := c.w.kube.CoreV1().PersistentVolumeClaims(pvc.Namespace).Get(ctx, pvc.Name, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("reading claim %s/%s of prime claim %s: %w", pvc.Namespace, pvc.Name, prime.Name, err)
	}
	pvc = live
	// Every prime claim names its claim: the CSI driver's CreateVolume
	// follows it back (cdrom.go).
	prime.Labels = c.w.labels(pvc)
	if prime.Annotations == nil {
		prime.Annotations = map[string]string{}
	}
	prime.Annotations[AnnotationClaimName] = pvc.Name
	if c.servedByDriver(pvc) {
		ref := pvc.Spec.DataSourceRef
		u, err := c.image(ref.Kind, pvc.Namespace, ref.Name)
		if err != nil {
			return nil, fmt.Errorf("reading %s %s/%s of claim %s/%s: %w", ref.Kind, pvc.Namespace, ref.Name, pvc.Namespace, pvc.Name, err)
		}
		if why := c.servable(pvc, u); why != "" {
			return nil, fmt.Errorf("claim %s/%s: %s", pvc.Namespace, pvc.Name, why)
		}
		prime.Annotations[AnnotationServedBy] = CSIDriver
		return prime, nil
	}
	src := c.cloneSource(pvc)
	if src == "" {
		return prime, nil
	}
	prime.Annotations[AnnotationCloneSource] = src
	delete(prime.Annotations, annSelectedNode) // the clone claim carries it
	prime.Spec.StorageClassName = ptr.To("")
	prime.Spec.Selector = &metav1.LabelSelector{MatchLabels: map[string]string{LabelCloneOf: uid}}
	klog.Background().Info("Copy will be a CSI clone", "pvc", klog.KObj(pvc), "source", src)
	return prime, nil
}

// clone drives the clone of a copy whose prime claim waits for it. It is
// level-based: every pass looks at the clone claim and its volume and does
// the next step.
func (c *claims) clone(ctx context.Context, pvc, prime *corev1.PersistentVolumeClaim) error {
	src := prime.Annotations[AnnotationCloneSource]
	if pvc.DeletionTimestamp != nil || pvc.Spec.VolumeName != "" || prime.Spec.VolumeName != "" {
		// Handed over (or no longer wanted): the clone claim is Lost or
		// unneeded.
		return c.removeClone(ctx, pvc)
	}
	cl, err := c.pvcs.PersistentVolumeClaims(pvc.Namespace).Get(cloneName(pvc))
	if apierrors.IsNotFound(err) {
		// The cache may still hold a prime claim that a clone given up
		// has deleted: only a live one gets a clone.
		live, err := c.w.kube.CoreV1().PersistentVolumeClaims(prime.Namespace).Get(ctx, prime.Name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) || (err == nil && (live.UID != prime.UID || live.DeletionTimestamp != nil)) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("reading prime claim %s: %w", prime.Name, err)
		}
		if cl, err = c.createClone(ctx, pvc, src); err != nil {
			return err
		}
		c.w.say(pvc, corev1.EventTypeNormal, ReasonPopulating, fmt.Sprintf("Cloning claim %s with the CSI driver of class %s (claim %s)",
			src, ptr.Deref(pvc.Spec.StorageClassName, ""), cl.Name))
	} else if err != nil {
		return err
	}
	if cl.Spec.VolumeName == "" || cl.Status.Phase != corev1.ClaimBound {
		if waited := time.Since(cl.CreationTimestamp.Time); waited >= c.w.cfg.CloneTimeout {
			return c.giveUpClone(ctx, pvc, prime, fmt.Sprintf("claim %s, a clone of %s, was not bound within %v (its events say why)",
				cl.Name, src, c.w.cfg.CloneTimeout))
		}
		return errNotDone
	}
	return c.handOver(ctx, cl, prime)
}

func (c *claims) createClone(ctx context.Context, pvc *corev1.PersistentVolumeClaim, src string) (*corev1.PersistentVolumeClaim, error) {
	labels := c.w.labels(pvc)
	labels[LabelComponent] = componentClone
	cl := &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{
			Name: cloneName(pvc), Namespace: pvc.Namespace,
			Labels: labels, Annotations: annotations(pvc, AnnotationCloneSource, src),
			// It goes with the user's claim, volume and all, until its
			// volume is handed over.
			OwnerReferences: []metav1.OwnerReference{{APIVersion: "v1", Kind: "PersistentVolumeClaim", Name: pvc.Name, UID: pvc.UID}},
		},
		Spec: corev1.PersistentVolumeClaimSpec{
			AccessModes:      pvc.Spec.AccessModes,
			Resources:        corev1.VolumeResourceRequirements{Requests: pvc.Spec.Resources.Requests},
			StorageClassName: pvc.Spec.StorageClassName,
			VolumeMode:       ptr.To(corev1.PersistentVolumeFilesystem),
			DataSource:       &corev1.TypedLocalObjectReference{Kind: "PersistentVolumeClaim", Name: src},
		},
	}
	if node := pvc.Annotations[annSelectedNode]; node != "" {
		// A WaitForFirstConsumer class provisions once a node is chosen:
		// the one chosen for the user's claim.
		cl.Annotations[annSelectedNode] = node
	}
	created, err := c.w.kube.CoreV1().PersistentVolumeClaims(cl.Namespace).Create(ctx, cl, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		return c.w.kube.CoreV1().PersistentVolumeClaims(cl.Namespace).Get(ctx, cl.Name, metav1.GetOptions{})
	}
	if err != nil {
		return nil, fmt.Errorf("creating clone claim %s/%s: %w", cl.Namespace, cl.Name, err)
	}
	klog.FromContext(ctx).Info("Cloning", "pvc", klog.KObj(pvc), "source", src, "clone", cl.Name)
	return created, nil
}

// handOver points the cloned volume at the prime claim; the bind controller
// then binds them, and the clone claim is Lost.
func (c *claims) handOver(ctx context.Context, cl, prime *corev1.PersistentVolumeClaim) error {
	pv, err := c.w.kube.CoreV1().PersistentVolumes().Get(ctx, cl.Spec.VolumeName, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("reading the cloned volume %s: %w", cl.Spec.VolumeName, err)
	}
	if cr := pv.Spec.ClaimRef; cr != nil && cr.UID == prime.UID {
		return errNotDone // the bind controller has yet to bind them
	}
	if cr := pv.Spec.ClaimRef; cr == nil || cr.UID != cl.UID {
		return fmt.Errorf("cloned volume %s is bound to another claim", pv.Name)
	}
	patch, _ := json.Marshal(map[string]any{
		"metadata": map[string]any{"annotations": map[string]string{AnnotationClonedFrom: cl.Namespace + "/" + cl.Annotations[AnnotationCloneSource]}},
		"spec": map[string]any{"claimRef": map[string]any{
			"namespace": prime.Namespace, "name": prime.Name, "uid": prime.UID, "resourceVersion": prime.ResourceVersion,
		}},
	})
	if _, err := c.w.kube.CoreV1().PersistentVolumes().Patch(ctx, pv.Name, types.StrategicMergePatchType, patch, metav1.PatchOptions{}); err != nil {
		return fmt.Errorf("handing cloned volume %s to prime claim %s: %w", pv.Name, prime.Name, err)
	}
	klog.FromContext(ctx).Info("Handed the cloned volume to the prime claim", "pv", pv.Name, "prime", klog.KObj(prime))
	return errNotDone
}

// giveUpClone falls back to a streamed copy: the next prime claim the
// library makes is an ordinary one, since the claim now says the clone
// failed.
func (c *claims) giveUpClone(ctx context.Context, pvc, prime *corev1.PersistentVolumeClaim, why string) error {
	c.w.say(pvc, corev1.EventTypeWarning, ReasonCloneFailed, "Copying instead of cloning: "+why)
	if err := c.w.setAnnotation(ctx, pvc, AnnotationCloneFailed, why); err != nil {
		return err
	}
	if err := c.removeClone(ctx, pvc); err != nil {
		return err
	}
	return c.deletePrime(ctx, prime)
}

func (c *claims) removeClone(ctx context.Context, pvc *corev1.PersistentVolumeClaim) error {
	if _, err := c.pvcs.PersistentVolumeClaims(pvc.Namespace).Get(cloneName(pvc)); apierrors.IsNotFound(err) {
		return nil
	}
	err := c.w.kube.CoreV1().PersistentVolumeClaims(pvc.Namespace).Delete(ctx, cloneName(pvc), metav1.DeleteOptions{})
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("deleting clone claim %s/%s: %w", pvc.Namespace, cloneName(pvc), err)
	}
	return nil
}
