package populator

import (
	"strconv"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"vimg.dev/vimg/pkg/worker/api"
)

// qemuID is the user and group of qemu in KubeVirt's virt-launcher:
// disk.img belongs to it, and Filesystem populate pods run as it.
const qemuID = 107

// buildPod is the populate pod of a claim. A Filesystem volume is written
// by qemu's user, so the file system's fsGroup handling makes the volume
// writable and disk.img comes out owned right. A Block volume's device
// node belongs to root (the runtime copies the host's owner unless it
// is configured to follow the security context), so that pod runs as root
// — with every capability dropped: owning the node is all it needs.
//
// sourceSecret, when set, holds the import request of an image's own claim
// (api.PopulateRequest.FromSource), mounted where an import pod has it.
func (w *worker) buildPod(pvc, prime *corev1.PersistentVolumeClaim, block bool, attempt int, sourceSecret string) *corev1.Pod {
	c := api.Container("populate", w.cfg.WorkerImage, w.cfg.WorkerImagePullPolicy, "populate", w.cfg.WorkerResources)
	c.VolumeMounts = []corev1.VolumeMount{{Name: "request", MountPath: api.PopulateRequestDir, ReadOnly: true}}
	volumes := []corev1.Volume{
		{Name: "request", VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{
			SecretName: secretName(pvc), DefaultMode: ptr.To[int32](0o440),
		}}},
		{Name: "target", VolumeSource: corev1.VolumeSource{PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{
			ClaimName: prime.Name,
		}}},
	}
	if sourceSecret != "" {
		// The request, and the CAs the installation trusts for sources
		// (which import pods read from a ConfigMap of the controller's
		// namespace), each where an import pod has it.
		c.VolumeMounts = append(c.VolumeMounts,
			corev1.VolumeMount{Name: "source", MountPath: api.RequestDir, ReadOnly: true},
			corev1.VolumeMount{Name: "source-ca", MountPath: api.TrustedCADir, ReadOnly: true})
		c.Env = append(c.Env, corev1.EnvVar{Name: "SSL_CERT_DIR", Value: "/etc/ssl/certs:" + api.TrustedCADir})
		secretVolume := func(name, key string) corev1.Volume {
			return corev1.Volume{Name: name, VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{
				SecretName: sourceSecret, DefaultMode: ptr.To[int32](0o440), Items: []corev1.KeyToPath{{Key: key, Path: key}},
			}}}
		}
		volumes = append(volumes, secretVolume("source", api.RequestFile), secretVolume("source-ca", api.SourceTrustedCAKey))
	}
	psc := &corev1.PodSecurityContext{SeccompProfile: &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault}}
	if block {
		c.VolumeDevices = []corev1.VolumeDevice{{Name: "target", DevicePath: api.PopulateDevicePath}}
		psc.RunAsUser = ptr.To[int64](0)
		psc.RunAsGroup = ptr.To[int64](0)
		psc.RunAsNonRoot = ptr.To(false)
	} else {
		c.VolumeMounts = append(c.VolumeMounts, corev1.VolumeMount{Name: "target", MountPath: api.PopulateMountPath})
		psc.RunAsUser = ptr.To[int64](qemuID)
		psc.RunAsGroup = ptr.To[int64](qemuID)
		psc.FSGroup = ptr.To[int64](qemuID)
		psc.RunAsNonRoot = ptr.To(true)
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name:            podName(pvc),
			Namespace:       w.cfg.Namespace,
			Labels:          w.labels(pvc),
			Annotations:     map[string]string{AnnotationAttempts: strconv.Itoa(attempt)},
			OwnerReferences: []metav1.OwnerReference{ownerRef(prime)},
		},
		Spec: corev1.PodSpec{
			RestartPolicy:                corev1.RestartPolicyNever,
			ServiceAccountName:           w.cfg.WorkerServiceAccount,
			AutomountServiceAccountToken: ptr.To(true), // progress goes on the pod
			SecurityContext:              psc,
			Containers:                   []corev1.Container{c},
			Volumes:                      volumes,
		},
	}
}
