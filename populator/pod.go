package populator

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"strconv"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/klog/v2"
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
			Annotations:     annotations(pvc, AnnotationAttempts, strconv.Itoa(attempt)),
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

// componentServe labels serve pods.
const componentServe = "serve"

// ensureServePod returns the claim's serve pod, made if missing: in the
// image's namespace (a claim can be mounted only there), mounting the
// image's claim read-only, with a token of its own. It runs as qemu's user,
// which owns disk.img, with no service account token and no privilege: it
// passes the restricted Pod Security level of any namespace, and
// deploy/populator.yaml's admission policy refuses the populator any other
// pod outside its namespace.
func (w *worker) ensureServePod(ctx context.Context, pvc *corev1.PersistentVolumeClaim, im image) (*corev1.Pod, error) {
	if p, err := w.servePods.Pods(pvc.Namespace).Get(servePodName(pvc)); err == nil {
		return p, nil
	} else if !apierrors.IsNotFound(err) {
		return nil, err
	}
	token := make([]byte, 32)
	if _, err := rand.Read(token); err != nil {
		return nil, err
	}
	p := w.buildServePod(pvc, im, hex.EncodeToString(token))
	created, err := w.kube.CoreV1().Pods(pvc.Namespace).Create(ctx, p, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		return w.kube.CoreV1().Pods(pvc.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
	}
	if err != nil {
		return nil, fmt.Errorf("creating serve pod %s/%s: %w", p.Namespace, p.Name, err)
	}
	klog.FromContext(ctx).Info("Started serve pod", "pvc", klog.KObj(pvc), "pod", klog.KObj(created), "source", im.claimName)
	return created, nil
}

func (w *worker) buildServePod(pvc *corev1.PersistentVolumeClaim, im image, token string) *corev1.Pod {
	c := api.Container("serve", w.cfg.WorkerImage, w.cfg.WorkerImagePullPolicy, "serve", w.cfg.WorkerResources)
	c.Env = append(c.Env,
		corev1.EnvVar{Name: api.ServeTokenEnv, Value: token},
		corev1.EnvVar{Name: api.ServeSizeEnv, Value: strconv.FormatInt(im.virtualSize, 10)})
	c.Ports = []corev1.ContainerPort{{Name: "disk", ContainerPort: api.ServePort}}
	c.ReadinessProbe = &corev1.Probe{
		ProbeHandler:  corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/healthz", Port: intstr.FromInt(api.ServePort)}},
		PeriodSeconds: 2,
	}
	c.VolumeMounts = []corev1.VolumeMount{{Name: "source", MountPath: api.ServeSourceDir, ReadOnly: true}}
	labels := w.labels(pvc)
	labels[LabelComponent] = componentServe
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name: servePodName(pvc), Namespace: pvc.Namespace, Labels: labels, Annotations: annotations(pvc),
			// The claim being filled owns it: it goes with the claim.
			OwnerReferences: []metav1.OwnerReference{{APIVersion: "v1", Kind: "PersistentVolumeClaim", Name: pvc.Name, UID: pvc.UID}},
		},
		Spec: corev1.PodSpec{
			RestartPolicy:                 corev1.RestartPolicyAlways,
			AutomountServiceAccountToken:  ptr.To(false),
			TerminationGracePeriodSeconds: ptr.To[int64](5),
			SecurityContext: &corev1.PodSecurityContext{
				RunAsUser:      ptr.To[int64](qemuID),
				RunAsGroup:     ptr.To[int64](qemuID),
				RunAsNonRoot:   ptr.To(true),
				SeccompProfile: &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
			},
			Containers: []corev1.Container{c},
			Volumes: []corev1.Volume{{Name: "source", VolumeSource: corev1.VolumeSource{PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{
				ClaimName: im.claimName, ReadOnly: true,
			}}}},
		},
	}
}

// removeServePod deletes the claim's serve pod, if the cache knows one.
func (w *worker) removeServePod(ctx context.Context, pvc *corev1.PersistentVolumeClaim) error {
	if _, err := w.servePods.Pods(pvc.Namespace).Get(servePodName(pvc)); apierrors.IsNotFound(err) {
		return nil
	}
	err := w.kube.CoreV1().Pods(pvc.Namespace).Delete(ctx, servePodName(pvc), metav1.DeleteOptions{})
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("deleting serve pod: %w", err)
	}
	return nil
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

func envOf(p *corev1.Pod, name string) string {
	for _, c := range p.Spec.Containers {
		for _, e := range c.Env {
			if e.Name == name {
				return e.Value
			}
		}
	}
	return ""
}
