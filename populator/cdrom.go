package populator

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	v1 "vimg.dev/vimg/pkg/apis/virtualization/v1alpha2"
)

// Claims of a class whose provisioner is the vimg CSI driver (the
// vimg-cdrom class) are not copied: their volume serves the image
// read-only, straight from each node's cache (csi/driver). The populator
// still runs the protocol, because only it may act on a claim whose
// dataSourceRef names an image: its prime claim is provisioned by the
// external-provisioner, whose CreateVolume (csi/resolve) follows the prime
// claim's labels back to the user's claim and pins the image its
// dataSourceRef names; no pod runs; the volume is then rebound to the
// user's claim.

// CSIDriver is the name of the vimg CSI driver.
const CSIDriver = "images.vimg.dev"

// AnnotationServedBy on a prime claim names the CSI driver that serves the
// image itself: nothing is copied onto its volume.
const AnnotationServedBy = Prefix + "/served-by"

// ReasonServing: the claim's volume serves the image read-only.
const ReasonServing = "Serving"

// servedByDriver tells whether pvc's class is provisioned by the vimg CSI
// driver.
func (c *claims) servedByDriver(pvc *corev1.PersistentVolumeClaim) bool {
	if pvc.Spec.StorageClassName == nil || *pvc.Spec.StorageClassName == "" {
		return false
	}
	sc, err := c.scs.Get(*pvc.Spec.StorageClassName)
	return err == nil && sc.Provisioner == CSIDriver
}

// servable says why a claim of the driver's class cannot have its prime
// claim yet, and tells the user; "" means it can. The prime claim waits
// for a Ready image, so that the external-provisioner's CreateVolume
// finds one at once rather than backing off.
func (c *claims) servable(pvc *corev1.PersistentVolumeClaim, u *unstructured.Unstructured) string {
	im := imageOf(u)
	if im.storage == string(v1.StoragePersistentVolumeClaim) {
		why := fmt.Sprintf("%s is stored in a PersistentVolumeClaim; a claim of class %s is served from DVCR, so it needs an image stored in ContainerRegistry",
			im, *pvc.Spec.StorageClassName)
		c.w.say(pvc, corev1.EventTypeWarning, ReasonImageNotUsable, why)
		return why
	}
	if why, _ := im.notUsable(c.w.cfg.DVCRAddress); why != "" {
		c.w.say(pvc, corev1.EventTypeNormal, ReasonWaitingForImage, why)
		return why
	}
	return ""
}

// served reports that the rebound volume will serve the image: there is
// nothing to wait for once the prime claim is bound.
func (w *worker) served(ctx context.Context, pvc, prime *corev1.PersistentVolumeClaim) (bool, error) {
	if err := w.setProgress(ctx, pvc, "100%"); err != nil {
		return false, err
	}
	w.say(pvc, corev1.EventTypeNormal, ReasonServing, fmt.Sprintf("Volume %s serves the image read-only from the nodes' caches (CSI driver %s)",
		prime.Spec.VolumeName, prime.Annotations[AnnotationServedBy]))
	return true, nil
}
