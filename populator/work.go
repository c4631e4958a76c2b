package populator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2"

	dvcrclient "vimg.dev/vimg/dvcr/client"
	v1 "vimg.dev/vimg/pkg/apis/virtualization/v1alpha2"
	"vimg.dev/vimg/pkg/importer"
	"vimg.dev/vimg/pkg/worker/api"
)

// worker holds what populating one claim needs; the library (VirtualImage)
// and cluster.go (ClusterVirtualImage) call its three steps.
type worker struct {
	cfg  Config
	kube kubernetes.Interface
	pods corelisters.PodLister // in cfg.Namespace
	// servePods lists serve pods, in the namespaces of the images they
	// serve.
	servePods corelisters.PodLister
	recorder  record.EventRecorder
	// lookup finds an image by kind ("VirtualImage", "ClusterVirtualImage"),
	// namespace and name in the informers' caches.
	lookup func(kind, namespace, name string) (*unstructured.Unstructured, error)

	mu sync.Mutex
	// said is the last event message per claim UID, so that a claim
	// waiting for its image is told once per change, not once per pass.
	said map[types.UID]string
}

func podName(pvc *corev1.PersistentVolumeClaim) string { return "vimg-populate-" + string(pvc.UID) }
func servePodName(pvc *corev1.PersistentVolumeClaim) string {
	return "vimg-serve-" + string(pvc.UID)
}
func copySecretName(pvc *corev1.PersistentVolumeClaim) string { return "vimg-copy-" + string(pvc.UID) }
func secretName(pvc *corev1.PersistentVolumeClaim) string     { return "vimg-populate-" + string(pvc.UID) }
func primeName(pvc *corev1.PersistentVolumeClaim) string      { return primePrefix + string(pvc.UID) }

// say records an event on the claim unless the same was said last.
func (w *worker) say(pvc *corev1.PersistentVolumeClaim, typ, reason, msg string) {
	w.mu.Lock()
	same := w.said[pvc.UID] == reason+msg
	w.said[pvc.UID] = reason + msg
	w.mu.Unlock()
	if !same {
		w.recorder.Event(pvc, typ, reason, msg)
	}
}

func (w *worker) forget(uid types.UID) {
	w.mu.Lock()
	delete(w.said, uid)
	w.mu.Unlock()
}

// populate makes sure a populate pod runs for the claim, once the prime
// claim is bound and the image can be read. It is called on every pass
// and does nothing when there is nothing to do.
func (w *worker) populate(ctx context.Context, pvc, prime *corev1.PersistentVolumeClaim, u *unstructured.Unstructured) error {
	if prime == nil || prime.Annotations[AnnotationFailed] != "" {
		return nil
	}
	if _, err := w.pods.Pods(w.cfg.Namespace).Get(podName(pvc)); err == nil {
		return nil
	} else if !apierrors.IsNotFound(err) {
		return err
	}
	if prime.Annotations[AnnotationServedBy] != "" {
		return nil // cdrom.go: nothing to copy
	}
	im := imageOf(u)
	if src := prime.Annotations[AnnotationCloneSource]; src != "" {
		return w.adoptClone(ctx, pvc, prime, u, src)
	}
	if im.ownsClaim(pvc, u) {
		return w.populateImageClaim(ctx, pvc, prime, im)
	}
	return w.populateFrom(ctx, pvc, prime, im)
}

// adoptClone starts the pod that makes a cloned volume the claim's own
// (clone.go): the clone holds the disk.img of claim src, which the pod
// grows to this volume and gives to qemu.
func (w *worker) adoptClone(ctx context.Context, pvc, prime *corev1.PersistentVolumeClaim, u *unstructured.Unstructured, src string) error {
	im, err := w.dataOf(pvc, u)
	if err != nil {
		return err
	}
	a, ok, err := w.startable(ctx, pvc, prime)
	if !ok || err != nil {
		return err
	}
	req := w.request(a)
	req.Cloned, req.VirtualSize = true, im.virtualSize
	return w.startPod(ctx, pvc, prime, a, req, "", fmt.Sprintf("Adopting the clone of claim %s (%s, %s virtual) on the Filesystem volume",
		src, im, api.BytesIEC(im.virtualSize)))
}

// dataOf is the image whose data fills pvc: u, the image pvc names, or,
// when pvc is the claim of an image that copies another, that other image.
func (w *worker) dataOf(pvc *corev1.PersistentVolumeClaim, u *unstructured.Unstructured) (image, error) {
	im := imageOf(u)
	if !im.ownsClaim(pvc, u) || im.refKind == "" {
		return im, nil
	}
	copied, err := w.lookup(im.refKind, im.refNamespace, im.refName)
	if err != nil {
		return image{}, fmt.Errorf("reading %s %s, which %s copies: %w", im.refKind, im.refName, im, err)
	}
	return imageOf(copied), nil
}

// populateFrom fills the claim from a Ready image: from its copy in DVCR,
// pinned by its manifest digest, or from the image's own claim.
func (w *worker) populateFrom(ctx context.Context, pvc, prime *corev1.PersistentVolumeClaim, im image) error {
	if why, wait := im.notUsable(w.cfg.DVCRAddress); why != "" {
		// A serve pod would keep the claim of an image being deleted.
		if err := w.removeServePod(ctx, pvc); err != nil {
			return err
		}
		if wait {
			w.say(pvc, corev1.EventTypeNormal, ReasonWaitingForImage, why)
			return nil
		}
		return w.fail(ctx, pvc, prime, ReasonImageNotUsable, why)
	}
	if im.storage == string(v1.StoragePersistentVolumeClaim) {
		return w.populateFromClaim(ctx, pvc, prime, im)
	}
	ref := im.ref(w.cfg.DVCRAddress)
	meta, digest, err := w.cfg.Registry.Stat(ctx, ref)
	if errors.Is(err, dvcrclient.ErrNotFound) {
		w.say(pvc, corev1.EventTypeNormal, ReasonWaitingForImage, fmt.Sprintf("%s is Ready but %s is not in DVCR: waiting for the image controller to import it again", im, ref))
		return nil
	}
	if err != nil {
		return fmt.Errorf("reading %s from DVCR: %w", ref, err)
	}
	a, ok, err := w.admit(ctx, pvc, prime, meta.VirtualSize)
	if !ok || err != nil {
		return err
	}
	repo, err := importer.Repository(ref)
	if err != nil {
		return w.fail(ctx, pvc, prime, importer.ReasonInternal, err.Error())
	}
	if exists, err := w.podExists(ctx, pvc); exists || err != nil {
		return err
	}
	token, err := w.cfg.Registry.PullToken(ctx, repo, w.cfg.TokenTTL)
	if err != nil {
		return err
	}
	req := w.request(a)
	req.DVCR = api.DVCRSpec{Address: w.cfg.DVCRAddress, Ref: repo + "@" + digest, Token: token, CABundle: w.cfg.DVCRCA}
	return w.startPod(ctx, pvc, prime, a, req, "", fmt.Sprintf("Writing %s (%s, %s virtual, %s) onto the %s volume",
		im, meta.Format, api.BytesIEC(meta.VirtualSize), digest, volumeMode(a.block)))
}

// populateImageClaim fills the claim of an image stored in a
// PersistentVolumeClaim: from the image it copies, when its source is
// another image, otherwise straight from its source, as the image
// controller's Secret describes it.
func (w *worker) populateImageClaim(ctx context.Context, pvc, prime *corev1.PersistentVolumeClaim, im image) error {
	if im.deleting {
		return nil // the claim goes with the image
	}
	if im.refKind != "" {
		src, err := w.lookup(im.refKind, im.refNamespace, im.refName)
		if apierrors.IsNotFound(err) {
			w.say(pvc, corev1.EventTypeNormal, ReasonWaitingForImage, fmt.Sprintf("%s copies %s %s, which does not exist", im, im.refKind, im.refName))
			return nil
		}
		if err != nil {
			return err
		}
		return w.populateFrom(ctx, pvc, prime, imageOf(src))
	}
	sec, err := w.kube.CoreV1().Secrets(w.cfg.Namespace).Get(ctx, api.SourceSecretName(im.uid), metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		w.say(pvc, corev1.EventTypeNormal, ReasonWaitingForImage, fmt.Sprintf("Waiting for the image controller to hand over the source of %s", im))
		return nil
	}
	if err != nil {
		return fmt.Errorf("reading the source of %s: %w", im, err)
	}
	// The image controller sized the claim from the source: the pod
	// checks it against what it reads.
	a, ok, err := w.startable(ctx, pvc, prime)
	if !ok || err != nil {
		return err
	}
	req := w.request(a)
	req.FromSource = true
	return w.startPod(ctx, pvc, prime, a, req, sec.Name, fmt.Sprintf("Writing the source of %s onto the %s volume", im, volumeMode(a.block)))
}

// populateFromClaim copies an image stored in a claim: a serve pod in the
// image's namespace mounts that claim read-only and serves the disk; the
// populate pod reads it there, with ranges, like an HTTP source.
func (w *worker) populateFromClaim(ctx context.Context, pvc, prime *corev1.PersistentVolumeClaim, im image) error {
	if im.namespace != pvc.Namespace {
		return w.fail(ctx, pvc, prime, ReasonImageNotUsable, fmt.Sprintf("%s is stored in a claim of another namespace", im))
	}
	a, ok, err := w.admit(ctx, pvc, prime, im.virtualSize)
	if !ok || err != nil {
		return err
	}
	serve, err := w.ensureServePod(ctx, pvc, im)
	if err != nil {
		return err
	}
	if !podReady(serve) || serve.Status.PodIP == "" {
		w.say(pvc, corev1.EventTypeNormal, ReasonWaitingForImage, fmt.Sprintf("Waiting for pod %s/%s, which serves the claim %s of %s, to be ready",
			serve.Namespace, serve.Name, im.claimName, im))
		return nil
	}
	if exists, err := w.podExists(ctx, pvc); exists || err != nil {
		return err
	}
	src := api.Request{Source: api.SourceSpec{
		Type:    api.SourceHTTP,
		URL:     "http://" + net.JoinHostPort(serve.Status.PodIP, strconv.Itoa(api.ServePort)) + api.ServePath,
		Headers: map[string]string{"Authorization": "Bearer " + envOf(serve, api.ServeTokenEnv)},
	}}
	body, err := json.Marshal(src)
	if err != nil {
		return err
	}
	// A copy trusts nothing more than the system's roots: its key stays
	// empty (the pod mounts it all the same).
	if err := w.writeSecret(ctx, pvc, prime, copySecretName(pvc), map[string][]byte{api.RequestFile: body, api.SourceTrustedCAKey: nil}); err != nil {
		return err
	}
	req := w.request(a)
	req.FromSource = true
	return w.startPod(ctx, pvc, prime, a, req, copySecretName(pvc), fmt.Sprintf("Copying %s (%s) from its claim %s onto the %s volume",
		im, api.BytesIEC(im.virtualSize), im.claimName, volumeMode(a.block)))
}

// admission is what populating a claim starts from.
type admission struct {
	block    bool
	capacity int64
	attempts int // pods tried so far
}

// admit checks that the claim can hold a disk of virtualSize bytes (and
// fails it for good when it cannot), and that another attempt is due.
func (w *worker) admit(ctx context.Context, pvc, prime *corev1.PersistentVolumeClaim, virtualSize int64) (admission, bool, error) {
	a := admission{block: isBlock(pvc), capacity: claimCapacity(prime)}
	if msg := w.tooSmall(a.block, a.capacity, virtualSize); msg != "" {
		return a, false, w.fail(ctx, pvc, prime, api.ReasonTooSmall, msg)
	}
	var due bool
	a.attempts, due = w.due(prime)
	return a, due, nil
}

// startable is the admission of a claim whose pod checks the size itself;
// ok when another attempt is due and no pod runs.
func (w *worker) startable(ctx context.Context, pvc, prime *corev1.PersistentVolumeClaim) (admission, bool, error) {
	a := admission{block: isBlock(pvc), capacity: claimCapacity(prime)}
	var due bool
	if a.attempts, due = w.due(prime); !due {
		return a, false, nil
	}
	exists, err := w.podExists(ctx, pvc)
	return a, !exists && err == nil, err
}

func isBlock(pvc *corev1.PersistentVolumeClaim) bool {
	return pvc.Spec.VolumeMode != nil && *pvc.Spec.VolumeMode == corev1.PersistentVolumeBlock
}

// due reports how many pods were tried, and whether another may start now
// (the queue comes back within MaxRetryDelay when not).
func (w *worker) due(prime *corev1.PersistentVolumeClaim) (attempts int, ok bool) {
	attempts, _ = strconv.Atoi(prime.Annotations[AnnotationAttempts])
	if at, err := time.Parse(time.RFC3339, prime.Annotations[AnnotationRetryAt]); err == nil && time.Now().Before(at) {
		return attempts, false
	}
	return attempts, true
}

// podExists asks the API server: the cache may not have seen a pod made by
// the previous pass yet, and another attempt must not be counted for it.
func (w *worker) podExists(ctx context.Context, pvc *corev1.PersistentVolumeClaim) (bool, error) {
	_, err := w.kube.CoreV1().Pods(w.cfg.Namespace).Get(ctx, podName(pvc), metav1.GetOptions{})
	if err == nil {
		return true, nil
	}
	if !apierrors.IsNotFound(err) {
		return false, fmt.Errorf("looking for populate pod %s: %w", podName(pvc), err)
	}
	return false, nil
}

func (w *worker) request(a admission) api.PopulateRequest {
	return api.PopulateRequest{
		Block:              a.block,
		Capacity:           a.capacity,
		FilesystemOverhead: w.cfg.FilesystemOverhead,
		UID:                qemuID,
		GID:                qemuID,
	}
}

// startPod writes the request and starts attempt a.attempts+1; sourceSecret,
// when set, is mounted as the import request of a FromSource pod.
func (w *worker) startPod(ctx context.Context, pvc, prime *corev1.PersistentVolumeClaim, a admission, req api.PopulateRequest, sourceSecret, what string) error {
	attempts := a.attempts
	if err := w.ensureSecret(ctx, pvc, prime, req); err != nil {
		return err
	}
	if err := w.annotate(ctx, prime, AnnotationAttempts, strconv.Itoa(attempts+1)); err != nil {
		return err
	}
	pod := w.buildPod(pvc, prime, req.Block, attempts+1, sourceSecret)
	if _, err := w.kube.CoreV1().Pods(w.cfg.Namespace).Create(ctx, pod, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("creating populate pod %s: %w", pod.Name, err)
	}
	w.say(pvc, corev1.EventTypeNormal, ReasonPopulating, what)
	klog.FromContext(ctx).Info("Started populate pod", "pvc", klog.KObj(pvc), "pod", pod.Name, "fromSource", req.FromSource, "ref", req.DVCR.Ref, "attempt", attempts+1)
	return nil
}

// retryDelay is the wait before attempt n+1 after n failed ones.
func retryDelay(n int) time.Duration {
	return min(time.Duration(n)*15*time.Second, 2*time.Minute)
}

func volumeMode(block bool) string {
	if block {
		return "Block"
	}
	return "Filesystem"
}

// claimCapacity is the prime claim's bound capacity, else its request.
func claimCapacity(pvc *corev1.PersistentVolumeClaim) int64 {
	if q, ok := pvc.Status.Capacity[corev1.ResourceStorage]; ok {
		return q.Value()
	}
	q := pvc.Spec.Resources.Requests[corev1.ResourceStorage]
	return q.Value()
}

// tooSmall says why a volume of capacity bytes cannot hold the image, or
// "" when it can. The pod checks again against what it really finds.
func (w *worker) tooSmall(block bool, capacity, virtualSize int64) string {
	if block {
		if capacity < virtualSize {
			return api.TooSmallMessage("the claim holds "+api.BytesIEC(capacity), virtualSize, virtualSize)
		}
		return ""
	}
	usable := api.UsableDiskSize(capacity, w.cfg.FilesystemOverhead)
	if usable < virtualSize {
		return api.TooSmallMessage(fmt.Sprintf("the Filesystem claim of %s leaves %s for %s after %.1f%% for the file system",
			api.BytesIEC(capacity), api.BytesIEC(usable), api.DiskFile, w.cfg.FilesystemOverhead*100),
			virtualSize, api.FilesystemClaimSize(virtualSize, w.cfg.FilesystemOverhead))
	}
	return ""
}

// complete reports whether the claim's volume holds the image. It copies
// the pod's progress onto the claim, retries transient failures with a new
// pod and gives up on permanent ones.
func (w *worker) complete(ctx context.Context, pvc, prime *corev1.PersistentVolumeClaim) (bool, error) {
	if prime == nil || prime.Annotations[AnnotationFailed] != "" {
		return false, nil
	}
	if prime.Annotations[AnnotationServedBy] != "" && prime.Spec.VolumeName != "" {
		return w.served(ctx, pvc, prime)
	}
	pod, err := w.pods.Pods(w.cfg.Namespace).Get(podName(pvc))
	if apierrors.IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	switch pod.Status.Phase {
	case corev1.PodSucceeded:
		out, _ := outcomeOf(pod)
		if out.Populated == nil {
			return false, w.fail(ctx, pvc, prime, importer.ReasonInternal, "the populate pod succeeded without a result")
		}
		if err := w.removeServePod(ctx, pvc); err != nil {
			return false, err
		}
		res, _ := json.Marshal(out.Populated)
		if err := w.setAnnotation(ctx, pvc, api.ClaimAnnotationResult, string(res)); err != nil {
			return false, err
		}
		if err := w.setProgress(ctx, pvc, "100%"); err != nil {
			return false, err
		}
		w.say(pvc, corev1.EventTypeNormal, ReasonPopulated, fmt.Sprintf("The volume holds the image: %s disk (%s virtual, %s), %s written, %s read",
			api.BytesIEC(out.Populated.DiskSize), api.BytesIEC(out.Populated.VirtualSize), out.Populated.Format, api.BytesIEC(out.Populated.Written), api.BytesIEC(out.Populated.Read)))
		return true, nil
	case corev1.PodFailed:
		out, ok := outcomeOf(pod)
		if !ok {
			out = api.Outcome{Reason: importer.ReasonTransient, Message: "the populate pod failed without an outcome: " + podFailure(pod)}
		}
		attempts, _ := strconv.Atoi(prime.Annotations[AnnotationAttempts])
		if out.Permanent || attempts >= w.cfg.MaxAttempts {
			msg := out.Message
			if !out.Permanent {
				msg = fmt.Sprintf("%s (gave up after %d attempts)", msg, attempts)
			}
			return false, w.fail(ctx, pvc, prime, out.Reason, msg)
		}
		delay := retryDelay(attempts)
		w.say(pvc, corev1.EventTypeWarning, ReasonRetrying, fmt.Sprintf("Attempt %d of %d failed (%s: %s); trying again in %v",
			attempts, w.cfg.MaxAttempts, out.Reason, out.Message, delay))
		if err := w.annotate(ctx, prime, AnnotationRetryAt, time.Now().Add(delay).UTC().Format(time.RFC3339)); err != nil {
			return false, err
		}
		return false, w.removePod(ctx, pvc)
	}
	if p, err := api.DecodeProgress(pod.Annotations[api.AnnotationProgress]); err == nil && p.Fraction >= 0 {
		if err := w.setProgress(ctx, pvc, api.Percent(min(p.Fraction, 0.999))); err != nil {
			return false, err
		}
	}
	return false, nil
}

// fail records a permanent failure on the prime claim (where every later
// pass finds it) and tells the user on their claim.
func (w *worker) fail(ctx context.Context, pvc, prime *corev1.PersistentVolumeClaim, reason, msg string) error {
	w.say(pvc, corev1.EventTypeWarning, ReasonFailed, reason+": "+msg)
	if err := w.annotate(ctx, prime, AnnotationFailed, reason+": "+msg); err != nil {
		return err
	}
	if err := w.setAnnotation(ctx, pvc, api.ClaimAnnotationError, reason+": "+msg); err != nil {
		return err
	}
	if err := w.setProgress(ctx, pvc, "Failed"); err != nil {
		return err
	}
	return w.removePod(ctx, pvc)
}

// cleanup removes the pods and Secrets of a claim whose population ended.
func (w *worker) cleanup(ctx context.Context, pvc *corev1.PersistentVolumeClaim) error {
	w.forget(pvc.UID)
	if err := w.removeServePod(ctx, pvc); err != nil {
		return err
	}
	return w.removePod(ctx, pvc)
}

func (w *worker) removePod(ctx context.Context, pvc *corev1.PersistentVolumeClaim) error {
	err := w.kube.CoreV1().Pods(w.cfg.Namespace).Delete(ctx, podName(pvc), metav1.DeleteOptions{})
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("deleting populate pod: %w", err)
	}
	for _, name := range []string{secretName(pvc), copySecretName(pvc)} {
		err = w.kube.CoreV1().Secrets(w.cfg.Namespace).Delete(ctx, name, metav1.DeleteOptions{})
		if err != nil && !apierrors.IsNotFound(err) {
			return fmt.Errorf("deleting the populate request: %w", err)
		}
	}
	return nil
}

func (w *worker) annotate(ctx context.Context, pvc *corev1.PersistentVolumeClaim, key, value string) error {
	if pvc.Annotations[key] == value {
		return nil
	}
	patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": map[string]string{key: value}}})
	if _, err := w.kube.CoreV1().PersistentVolumeClaims(pvc.Namespace).Patch(ctx, pvc.Name, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		return fmt.Errorf("annotating claim %s/%s: %w", pvc.Namespace, pvc.Name, err)
	}
	return nil
}

func (w *worker) setProgress(ctx context.Context, pvc *corev1.PersistentVolumeClaim, v string) error {
	return w.setAnnotation(ctx, pvc, AnnotationProgress, v)
}

// setAnnotation annotates the user's claim, which may be gone.
func (w *worker) setAnnotation(ctx context.Context, pvc *corev1.PersistentVolumeClaim, key, v string) error {
	err := w.annotate(ctx, pvc, key, v)
	if apierrors.IsNotFound(err) {
		return nil
	}
	return err
}

func (w *worker) ensureSecret(ctx context.Context, pvc, prime *corev1.PersistentVolumeClaim, req api.PopulateRequest) error {
	body, err := json.Marshal(req)
	if err != nil {
		return err
	}
	return w.writeSecret(ctx, pvc, prime, secretName(pvc), map[string][]byte{api.RequestFile: body})
}

// writeSecret writes a Secret of the claim's, owned by its prime claim;
// an existing one is replaced.
func (w *worker) writeSecret(ctx context.Context, pvc, prime *corev1.PersistentVolumeClaim, name string, data map[string][]byte) error {
	s := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{
			Name: name, Namespace: w.cfg.Namespace,
			Labels:          w.labels(pvc),
			Annotations:     annotations(pvc),
			OwnerReferences: []metav1.OwnerReference{ownerRef(prime)},
		},
		Data: data,
	}
	_, err := w.kube.CoreV1().Secrets(w.cfg.Namespace).Create(ctx, s, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		// A request left by an earlier pass may hold an expired token.
		_, err = w.kube.CoreV1().Secrets(w.cfg.Namespace).Update(ctx, s, metav1.UpdateOptions{})
	}
	if err != nil {
		return fmt.Errorf("writing Secret %s: %w", name, err)
	}
	return nil
}

func (w *worker) labels(pvc *corev1.PersistentVolumeClaim) map[string]string {
	l := map[string]string{
		LabelClaimUID:               string(pvc.UID),
		LabelClaimNamespace:         pvc.Namespace,
		LabelComponent:              componentPopulate,
		"app.kubernetes.io/part-of": "vimg",
	}
	if len(validation.IsValidLabelValue(pvc.Name)) == 0 {
		l[LabelClaimName] = pvc.Name
	}
	return l
}

// annotations name the claim that the populator's objects serve, with
// extra annotations (key, value, ...) besides.
func annotations(pvc *corev1.PersistentVolumeClaim, kv ...string) map[string]string {
	a := map[string]string{AnnotationClaimName: pvc.Name}
	for i := 0; i+1 < len(kv); i += 2 {
		a[kv[i]] = kv[i+1]
	}
	return a
}

// claimOf is the namespace and name of the claim that one of the
// populator's objects serves, or "" for another object.
func claimOf(o metav1.Object) (namespace, name string) {
	name = o.GetAnnotations()[AnnotationClaimName]
	if name == "" {
		name = o.GetLabels()[LabelClaimName]
	}
	if name == "" {
		return "", ""
	}
	return o.GetLabels()[LabelClaimNamespace], name
}

// ownerRef makes the prime claim own the pod and Secret, so that they go
// with it whoever deletes it.
func ownerRef(prime *corev1.PersistentVolumeClaim) metav1.OwnerReference {
	return metav1.OwnerReference{APIVersion: "v1", Kind: "PersistentVolumeClaim", Name: prime.Name, UID: prime.UID}
}

func outcomeOf(pod *corev1.Pod) (api.Outcome, bool) {
	for _, s := range pod.Status.ContainerStatuses {
		if t := s.State.Terminated; t != nil && t.Message != "" {
			o, err := api.DecodeOutcome(t.Message)
			return o, err == nil
		}
	}
	return api.Outcome{}, false
}

func podFailure(pod *corev1.Pod) string {
	for _, s := range pod.Status.ContainerStatuses {
		if t := s.State.Terminated; t != nil {
			return fmt.Sprintf("exit code %d (%s)", t.ExitCode, t.Reason)
		}
	}
	if pod.Status.Message != "" {
		return pod.Status.Message
	}
	return string(pod.Status.Phase)
}
