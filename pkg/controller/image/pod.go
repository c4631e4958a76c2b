package image

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"vimg.dev/vimg/dvcr/layout"
	v1 "vimg.dev/vimg/pkg/apis/virtualization/v1alpha2"
	"vimg.dev/vimg/pkg/worker/api"
)

// imageLabels identify everything the controller makes for one image.
func imageLabels(o object) map[string]string {
	l := map[string]string{
		LabelImageKind:              repoKind(o),
		LabelImageName:              o.GetName(),
		LabelImageUID:               string(o.GetUID()),
		LabelComponent:              componentImporter,
		"app.kubernetes.io/part-of": "vimg",
	}
	if o.GetNamespace() != "" {
		l[LabelImageNamespace] = o.GetNamespace()
	}
	return l
}

func repoKind(o object) string {
	if o.GetNamespace() == "" {
		return layout.KindClusterVirtualImage
	}
	return layout.KindVirtualImage
}

// ref is the image's DVCR reference: its repository, tagged with its UID.
func ref(o object) string {
	return layout.Ref(o.repository(), layout.Tag(string(o.GetUID())))
}

func secretName(o object) string { return "vimg-import-" + string(o.GetUID()) }

func podName(o object, attempt int) string {
	return "vimg-import-" + string(o.GetUID()) + "-" + strconv.Itoa(attempt)
}

// importPods lists the image's import pods, newest attempt first.
func (r *Reconciler) importPods(ctx context.Context, o object) ([]corev1.Pod, error) {
	var pods corev1.PodList
	if err := r.client.List(ctx, &pods, client.InNamespace(r.cfg.Namespace),
		client.MatchingLabels{LabelImageUID: string(o.GetUID()), LabelComponent: componentImporter}); err != nil {
		return nil, fmt.Errorf("listing import pods: %w", err)
	}
	sort.Slice(pods.Items, func(i, j int) bool { return attemptOf(&pods.Items[i]) > attemptOf(&pods.Items[j]) })
	return pods.Items, nil
}

func attemptOf(p *corev1.Pod) int {
	n, _ := strconv.Atoi(p.Annotations[AnnotationAttempt])
	return n
}

func generationOf(p *corev1.Pod) int64 {
	n, _ := strconv.ParseInt(p.Annotations[AnnotationGeneration], 10, 64)
	return n
}

// buildRequest resolves the image's source into the worker's request,
// reading the referenced Secret. A problem the user must fix comes back as
// a *userError.
func (r *Reconciler) buildRequest(ctx context.Context, o object, token string) (api.Request, error) {
	src := o.source()
	req := api.Request{DVCR: api.DVCRSpec{Address: r.cfg.DVCRAddress, Ref: ref(o), Token: token, CABundle: r.cfg.DVCRCA}}
	var secretData map[string][]byte
	if src.Secret != nil {
		var s corev1.Secret
		err := r.apiReader.Get(ctx, types.NamespacedName{Namespace: src.Secret.Namespace, Name: src.Secret.Name}, &s)
		if apierrors.IsNotFound(err) {
			return req, &userError{reason: reasonSecretNotFound, msg: fmt.Sprintf("Secret %s/%s not found: create it or fix the reference", src.Secret.Namespace, src.Secret.Name)}
		}
		if err != nil {
			return req, fmt.Errorf("reading secret %s/%s: %w", src.Secret.Namespace, src.Secret.Name, err)
		}
		secretData = s.Data
	}
	switch src.Type {
	case v1.DataSourceTypeHTTP:
		h := src.HTTP
		req.Source = api.SourceSpec{Type: api.SourceHTTP, URL: h.URL, CABundle: h.CABundle, InsecureSkipVerify: h.InsecureSkipVerify}
		if len(h.Headers) > 0 {
			req.Source.Headers = map[string]string{}
			for _, hd := range h.Headers {
				req.Source.Headers[hd.Name] = hd.Value
			}
		}
		if secretData != nil {
			u, p := string(secretData["username"]), string(secretData["password"])
			if u == "" && p == "" {
				return req, &userError{reason: reasonSecretInvalid, msg: fmt.Sprintf("Secret %s/%s must have the keys username and password", src.Secret.Namespace, src.Secret.Name)}
			}
			req.Source.Username, req.Source.Password = u, p
		}
		req.Checksums = checksums(h.Checksum)
	case v1.DataSourceTypeContainerImage:
		ci := src.ContainerImage
		req.Source = api.SourceSpec{Type: api.SourceRegistry, URL: ci.Image, CABundle: ci.CABundle}
		if secretData != nil {
			// The worker picks the registry's entry, as the kubelet does.
			cfg := secretData[corev1.DockerConfigJsonKey]
			if len(cfg) == 0 {
				cfg = secretData[corev1.DockerConfigKey]
			}
			if len(cfg) == 0 {
				return req, &userError{reason: reasonSecretInvalid, msg: fmt.Sprintf("Secret %s/%s has no %s: create it with kubectl create secret docker-registry", src.Secret.Namespace, src.Secret.Name, corev1.DockerConfigJsonKey)}
			}
			req.Source.DockerConfig = cfg
		}
	case v1.DataSourceTypeUpload:
		blob, err := r.uploadedBlob(ctx, o)
		if err != nil {
			return req, err
		}
		req.Source = blob
		if src.Upload != nil {
			req.Checksums = checksums(src.Upload.Checksum)
		}
	default:
		return req, fmt.Errorf("no import pod for source type %q", src.Type)
	}
	return req, nil
}

func checksums(c *v1.Checksum) []string {
	if c == nil {
		return nil
	}
	var out []string
	for _, kv := range [][2]string{{"md5", c.MD5}, {"sha1", c.SHA1}, {"sha256", c.SHA256}, {"sha512", c.SHA512}} {
		if kv[1] != "" {
			out = append(out, kv[0]+":"+strings.ToLower(kv[1]))
		}
	}
	return out
}

// workerObjects are the Secret and Pod of one import attempt.
func (r *Reconciler) workerObjects(o object, req api.Request, attempt int) (*corev1.Secret, *corev1.Pod, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return nil, nil, err
	}
	labels := imageLabels(o)
	sec := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: secretName(o), Namespace: r.cfg.Namespace, Labels: labels},
		Type:       corev1.SecretTypeOpaque,
		Data:       map[string][]byte{api.RequestFile: body},
	}
	gen := strconv.FormatInt(o.GetGeneration(), 10)
	// An image stored in a claim only needs its size from the source
	// here: the populator writes the claim.
	sub := "import"
	if o.pvcStorage() {
		sub = "probe"
	}
	c := api.Container("import", r.cfg.WorkerImage, r.cfg.WorkerImagePullPolicy, sub, r.cfg.WorkerResources)
	c.Args = []string{"--request", api.RequestDir + "/" + api.RequestFile}
	// Go reads system roots from the image's bundle and from every file in
	// these directories.
	c.Env = append(c.Env, corev1.EnvVar{Name: "SSL_CERT_DIR", Value: "/etc/ssl/certs:" + api.TrustedCADir})
	c.VolumeMounts = []corev1.VolumeMount{
		{Name: "request", MountPath: api.RequestDir, ReadOnly: true},
		{Name: "trusted-ca", MountPath: api.TrustedCADir, ReadOnly: true},
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name: podName(o, attempt), Namespace: r.cfg.Namespace, Labels: labels,
			Annotations: map[string]string{AnnotationGeneration: gen, AnnotationAttempt: strconv.Itoa(attempt)},
		},
		Spec: corev1.PodSpec{
			RestartPolicy:                 corev1.RestartPolicyNever,
			ServiceAccountName:            r.cfg.WorkerServiceAccount,
			TerminationGracePeriodSeconds: ptr.To[int64](10),
			SecurityContext: &corev1.PodSecurityContext{
				RunAsNonRoot: ptr.To(true),
				RunAsUser:    ptr.To[int64](65532),
				RunAsGroup:   ptr.To[int64](65532),
				// The request Secret is readable by the group only.
				FSGroup:        ptr.To[int64](65532),
				SeccompProfile: &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
			},
			Containers: []corev1.Container{c},
			Volumes: []corev1.Volume{{
				Name:         "request",
				VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: sec.Name, DefaultMode: ptr.To[int32](0o440)}},
			}, {
				// Extra roots for every HTTPS source and registry (a
				// corporate CA), trusted besides the system's; the
				// ConfigMap is optional.
				Name: "trusted-ca",
				VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
					LocalObjectReference: corev1.LocalObjectReference{Name: r.cfg.TrustedCAConfigMap}, Optional: ptr.To(true),
				}},
			}},
		},
	}
	return sec, pod, nil
}
