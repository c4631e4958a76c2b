package image

// VirtualImages stored in a PersistentVolumeClaim (storage:
// PersistentVolumeClaim). The image gets a claim of its own, in its
// namespace, whose dataSourceRef names the image itself; the volume
// populator fills it straight from the source, converted on the fly, with
// no scratch volume and no copy in DVCR:
//
//  1. the storage class is resolved (spec, else Config.ImageStorageClass,
//     else the cluster default) into condition StorageClassReady;
//  2. the claim's size comes from the image's virtual size: a probe pod
//     (`vimg worker probe`, run like an import pod, with its retries) reads
//     the source's header; an image copied from another takes that image's
//     size;
//  3. the import request goes into a Secret of the populator's namespace
//     (api.SourceSecretName) and the claim is created, with the node picked
//     for a WaitForFirstConsumer class, since no pod will consume it;
//  4. the populator's annotations on the claim (progress, result, error)
//     become the image's status; the claim deleted under a Ready image is
//     PVCLost.
//
// Each step is derived from what exists (claim, probe pod, Secret), so a
// restart at any moment converges without a second probe or copy.

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/klog/v2"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"

	v1 "vimg.dev/vimg/pkg/apis/virtualization/v1alpha2"
	"vimg.dev/vimg/pkg/worker/api"
)

const (
	// ComponentImageClaim labels the claims of images stored in one
	// (LabelComponent): the only claims the controller caches.
	ComponentImageClaim  = "image-claim"
	componentImageSource = "image-source"

	reasonStorageClassFound    = "StorageClassFound"
	reasonStorageClassNotFound = "StorageClassNotFound"
	reasonNoDefaultClass       = "NoDefaultStorageClass"
	reasonNoNode               = "NoSchedulableNode"

	eventClaimCreated = "PersistentVolumeClaimCreated"
	eventPVCLost      = "PVCLost"

	// annotationDefaultClass marks the cluster's default StorageClass.
	annotationDefaultClass = "storageclass.kubernetes.io/is-default-class"
	// annotationSelectedNode is where the scheduler puts the node of a
	// WaitForFirstConsumer claim; the provisioner and the populator read it.
	annotationSelectedNode = "volume.kubernetes.io/selected-node"
)

// reconcilePVC drives a VirtualImage stored in a PersistentVolumeClaim.
func (r *Reconciler) reconcilePVC(ctx context.Context, o, st object) (ctrl.Result, error) {
	claim, err := r.imageClaim(ctx, o)
	if err != nil {
		return ctrl.Result{}, err
	}
	switch st.phase() {
	case v1.ImagePhaseReady, v1.ImagePhasePVCLost:
		if claim == nil || !claim.DeletionTimestamp.IsZero() {
			if st.phase() == v1.ImagePhaseReady {
				r.recorder.Eventf(o.obj(), corev1.EventTypeWarning, eventPVCLost, "The image's PersistentVolumeClaim %s was deleted", claimName(o))
			}
			st.setPhase(v1.ImagePhasePVCLost)
			setCondition(st, v1.ConditionReady, metav1.ConditionFalse, v1.ReasonPVCLost,
				fmt.Sprintf("The image's PersistentVolumeClaim %s was deleted: delete and re-create the image to import it again", claimName(o)))
		}
		return ctrl.Result{}, nil
	case v1.ImagePhaseFailed:
		return ctrl.Result{}, r.deletePVCWork(ctx, o, claim)
	}
	if claim != nil && claim.Annotations[AnnotationGeneration] != strconv.FormatInt(o.GetGeneration(), 10) {
		// Made for an older spec, and not Ready (the API server refuses
		// spec changes then): start over.
		klog.FromContext(ctx).Info("Deleting the claim of an older spec", "pvc", klog.KObj(claim))
		return ctrl.Result{}, r.deletePVCWork(ctx, o, claim)
	}
	if claim != nil {
		// The class did its part when the claim was made: what becomes
		// of it now does not concern the claim.
		return r.followClaim(ctx, o, st, claim)
	}
	class, err := r.storageClass(ctx, o, st)
	if class == nil || err != nil {
		return ctrl.Result{}, err
	}
	if ref := o.source().Ref; ref != nil {
		return r.claimFromImage(ctx, o, st, class, *ref)
	}
	// Probe pods, with the import's retries and upload handling; a probe
	// that succeeds leads to probeSucceeded.
	return r.reconcileImport(ctx, o, st)
}

func claimName(o object) string { return api.ImageClaimName(o.GetName(), string(o.GetUID())) }

// imageClaim returns the image's claim, or nil.
func (r *Reconciler) imageClaim(ctx context.Context, o object) (*corev1.PersistentVolumeClaim, error) {
	var c corev1.PersistentVolumeClaim
	err := r.client.Get(ctx, types.NamespacedName{Namespace: o.GetNamespace(), Name: claimName(o)}, &c)
	if apierrors.IsNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading the image's claim: %w", err)
	}
	if !metav1.IsControlledBy(&c, o) {
		return nil, fmt.Errorf("PersistentVolumeClaim %s/%s exists but is not the image's", c.Namespace, c.Name)
	}
	return &c, nil
}

// storageClass resolves the class of the image's claim into status, or
// returns nil with the image Pending and the condition saying why.
func (r *Reconciler) storageClass(ctx context.Context, o, st object) (*storagev1.StorageClass, error) {
	vi := st.(virtualImage)
	name := r.cfg.ImageStorageClass
	if p := vi.Spec.PersistentVolumeClaim; p != nil && p.StorageClassName != nil && *p.StorageClassName != "" {
		name = *p.StorageClassName
	}
	var classes storagev1.StorageClassList
	if err := r.client.List(ctx, &classes); err != nil {
		return nil, fmt.Errorf("listing storage classes: %w", err)
	}
	var found *storagev1.StorageClass
	if name == "" {
		found = defaultClass(classes.Items)
		if found == nil {
			r.classNotReady(st, reasonNoDefaultClass, "No StorageClass is named in spec.persistentVolumeClaim.storageClassName, none is configured for images and the cluster has no default StorageClass: name one")
			return nil, nil
		}
	}
	for i := range classes.Items {
		if classes.Items[i].Name == name {
			found = &classes.Items[i]
		}
	}
	if found == nil {
		r.classNotReady(st, reasonStorageClassNotFound, fmt.Sprintf("StorageClass %q not found: create it or name another in spec.persistentVolumeClaim.storageClassName", name))
		return nil, nil
	}
	vi.Status.StorageClassName = found.Name
	setCondition(st, v1.ConditionStorageClassReady, metav1.ConditionTrue, reasonStorageClassFound, "")
	return found, nil
}

func (r *Reconciler) classNotReady(st object, reason, msg string) {
	st.(virtualImage).Status.StorageClassName = ""
	if st.phase() == "" || st.phase() == v1.ImagePhaseProvisioning {
		st.setPhase(v1.ImagePhasePending)
	}
	setCondition(st, v1.ConditionStorageClassReady, metav1.ConditionFalse, reason, msg)
	setCondition(st, v1.ConditionReady, metav1.ConditionFalse, v1.ReasonStorageClassNotReady, msg)
}

// defaultClass is the cluster's default StorageClass: of several, the
// newest, as the API server picks it for claims.
func defaultClass(classes []storagev1.StorageClass) *storagev1.StorageClass {
	var best *storagev1.StorageClass
	for i := range classes {
		c := &classes[i]
		if c.Annotations[annotationDefaultClass] != "true" {
			continue
		}
		if best == nil || c.CreationTimestamp.After(best.CreationTimestamp.Time) ||
			(c.CreationTimestamp.Equal(&best.CreationTimestamp) && c.Name < best.Name) {
			best = c
		}
	}
	return best
}

// claimFromImage makes the claim of an image that copies another image:
// the populator fills it from that image in DVCR.
func (r *Reconciler) claimFromImage(ctx context.Context, o, st object, class *storagev1.StorageClass, from objectRef) (ctrl.Result, error) {
	src, err := r.readySource(ctx, st, from, true)
	if src == nil || err != nil {
		return ctrl.Result{}, err
	}
	size, err := strconv.ParseInt(src.common().Size.UnpackedBytes, 10, 64)
	if err != nil || size <= 0 {
		return ctrl.Result{}, fmt.Errorf("%s is Ready without a virtual size (%q)", from, src.common().Size.UnpackedBytes)
	}
	uid := string(src.GetUID())
	st.common().SourceUID = &uid
	cs := st.common()
	cs.Format, cs.CDROM = src.common().Format, src.common().CDROM
	return ctrl.Result{}, r.createClaim(ctx, o, st, class, size)
}

// probeSucceeded turns a probe pod's outcome into the image's claim.
func (r *Reconciler) probeSucceeded(ctx context.Context, o, st object, pod *corev1.Pod, pods []corev1.Pod) (ctrl.Result, error) {
	out, ok := outcomeOf(pod)
	if !ok || out.Result == nil || out.Result.VirtualSize <= 0 {
		st.setPhase(v1.ImagePhaseFailed)
		msg := "the probe pod " + pod.Name + " succeeded without telling the image's size"
		setCondition(st, v1.ConditionReady, metav1.ConditionFalse, v1.ReasonProvisioningFailed, msg)
		r.recorder.Event(o.obj(), corev1.EventTypeWarning, eventImportFailed, msg)
		return ctrl.Result{}, r.deleteWorkerObjects(ctx, o, pods)
	}
	class, err := r.storageClass(ctx, o, st)
	if class == nil || err != nil {
		return ctrl.Result{}, err
	}
	token, err := r.cfg.Tokens.PushToken(ctx, o.repository(), r.cfg.WorkerTokenTTL)
	if err != nil {
		return ctrl.Result{}, fmt.Errorf("minting a token for the upload blob: %w", err)
	}
	req, err := r.buildRequest(ctx, o, token)
	if err != nil {
		// The Secret read by the probe is gone or changed: the user fixes
		// it, and the probe runs again.
		return ctrl.Result{}, r.deleteWorkerObjects(ctx, o, pods)
	}
	if err := r.writeSourceSecret(ctx, o, req); err != nil {
		return ctrl.Result{}, err
	}
	cs := st.common()
	cs.Format, cs.CDROM = v1.ImageFormat(out.Result.Format), out.Result.CDROM
	if err := r.createClaim(ctx, o, st, class, out.Result.VirtualSize); err != nil {
		return ctrl.Result{}, err
	}
	// The claim is the record now: the probe's objects can go.
	return ctrl.Result{}, r.deleteWorkerObjects(ctx, o, pods)
}

// writeSourceSecret hands the import request, and the CAs the installation
// trusts for sources, to the populator.
func (r *Reconciler) writeSourceSecret(ctx context.Context, o object, req api.Request) error {
	body, err := json.Marshal(req)
	if err != nil {
		return err
	}
	var trusted []byte
	var cm corev1.ConfigMap
	err = r.apiReader.Get(ctx, types.NamespacedName{Namespace: r.cfg.Namespace, Name: r.cfg.TrustedCAConfigMap}, &cm)
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("reading ConfigMap %s: %w", r.cfg.TrustedCAConfigMap, err)
	}
	keys := make([]string, 0, len(cm.Data))
	for k := range cm.Data {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		trusted = append(trusted, strings.TrimSpace(cm.Data[k])+"\n"...)
	}
	labels := imageLabels(o)
	labels[LabelComponent] = componentImageSource
	sec := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: api.SourceSecretName(string(o.GetUID())), Namespace: r.cfg.PopulateNamespace, Labels: labels},
		Type:       corev1.SecretTypeOpaque,
		Data:       map[string][]byte{api.RequestFile: body, api.SourceTrustedCAKey: trusted},
	}
	return r.applySecret(ctx, sec)
}

// createClaim makes the image's claim for a disk of virtualSize bytes.
func (r *Reconciler) createClaim(ctx context.Context, o, st object, class *storagev1.StorageClass, virtualSize int64) error {
	size := api.FilesystemClaimSize(virtualSize, r.cfg.FilesystemOverhead)
	labels := imageLabels(o)
	labels[LabelComponent] = ComponentImageClaim
	claim := &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{
			Name: claimName(o), Namespace: o.GetNamespace(), Labels: labels,
			Annotations: map[string]string{AnnotationGeneration: strconv.FormatInt(o.GetGeneration(), 10)},
		},
		Spec: corev1.PersistentVolumeClaimSpec{
			AccessModes:      []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			VolumeMode:       ptr.To(corev1.PersistentVolumeFilesystem),
			StorageClassName: ptr.To(class.Name),
			Resources: corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{
				corev1.ResourceStorage: *resource.NewQuantity(size, resource.BinarySI),
			}},
			DataSourceRef: &corev1.TypedObjectReference{APIGroup: ptr.To(v1.GroupName), Kind: o.kind(), Name: o.GetName()},
		},
	}
	if err := controllerutil.SetControllerReference(o.obj(), claim, r.client.Scheme()); err != nil {
		return err
	}
	if class.VolumeBindingMode != nil && *class.VolumeBindingMode == storagev1.VolumeBindingWaitForFirstConsumer {
		// No pod consumes the claim: choose its node as the scheduler
		// would for one.
		node, err := r.pickNode(ctx)
		if err != nil {
			return err
		}
		if node == "" {
			r.setProvisioningMessage(st, reasonNoNode, "No Ready, schedulable node for the image's WaitForFirstConsumer claim")
			return fmt.Errorf("no schedulable node for %s", claim.Name)
		}
		claim.Annotations[annotationSelectedNode] = node
	}
	if err := r.client.Create(ctx, claim); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("creating the image's claim: %w", err)
	}
	r.recorder.Eventf(o.obj(), corev1.EventTypeNormal, eventClaimCreated, "Created PersistentVolumeClaim %s (%s, class %s); the populator fills it from the source",
		claim.Name, api.BytesIEC(size), class.Name)
	st.(virtualImage).Status.Target.PersistentVolumeClaimName = claim.Name
	st.setPhase(v1.ImagePhaseProvisioning)
	setCondition(st, v1.ConditionDatasourceReady, metav1.ConditionTrue, v1.ReasonProvisioning, "")
	setCondition(st, v1.ConditionReady, metav1.ConditionFalse, v1.ReasonProvisioning, "Waiting for PersistentVolumeClaim "+claim.Name+" to be filled")
	return nil
}

// pickNode is the Ready, schedulable node without NoSchedule taints that
// comes first by name: deterministic, so a retry picks the same.
func (r *Reconciler) pickNode(ctx context.Context) (string, error) {
	var nodes corev1.NodeList
	if err := r.client.List(ctx, &nodes); err != nil {
		return "", fmt.Errorf("listing nodes: %w", err)
	}
	var names []string
	for _, n := range nodes.Items {
		if n.Spec.Unschedulable || !nodeReady(&n) || hasNoSchedule(&n) {
			continue
		}
		names = append(names, n.Name)
	}
	sort.Strings(names)
	if len(names) == 0 {
		return "", nil
	}
	return names[0], nil
}

func nodeReady(n *corev1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

func hasNoSchedule(n *corev1.Node) bool {
	for _, t := range n.Spec.Taints {
		if t.Effect == corev1.TaintEffectNoSchedule || t.Effect == corev1.TaintEffectNoExecute {
			return true
		}
	}
	return false
}

// followClaim turns the populator's word on the claim into the status.
func (r *Reconciler) followClaim(ctx context.Context, o, st object, claim *corev1.PersistentVolumeClaim) (ctrl.Result, error) {
	// A probe pod left by a restart between the claim and its cleanup.
	pods, err := r.importPods(ctx, o)
	if err != nil {
		return ctrl.Result{}, err
	}
	if len(pods) > 0 {
		if err := r.deleteWorkerObjects(ctx, o, pods); err != nil {
			return ctrl.Result{}, err
		}
	}
	vi := st.(virtualImage)
	vi.Status.Target.PersistentVolumeClaimName = claim.Name
	cs := st.common()
	if e := claim.Annotations[api.ClaimAnnotationError]; e != "" {
		st.setPhase(v1.ImagePhaseFailed)
		setCondition(st, v1.ConditionReady, metav1.ConditionFalse, v1.ReasonProvisioningFailed, e)
		r.recorder.Eventf(o.obj(), corev1.EventTypeWarning, eventImportFailed, "Filling PersistentVolumeClaim %s failed: %s", claim.Name, e)
		cs.ImageUploadURLs = nil
		if err := r.writeStatus(ctx, o, st); err != nil {
			return ctrl.Result{}, err
		}
		return ctrl.Result{}, r.deletePVCWork(ctx, o, claim)
	}
	res := claim.Annotations[api.ClaimAnnotationResult]
	if claim.Status.Phase != corev1.ClaimBound || res == "" {
		st.setPhase(v1.ImagePhaseProvisioning)
		msg := "Waiting for PersistentVolumeClaim " + claim.Name + " to be filled (its events tell more)"
		if p, ok := parsePercent(claim.Annotations[api.ClaimAnnotationProgress]); ok {
			base := 0.0
			if st.source().Type == v1.DataSourceTypeUpload {
				base = uploadShare
			}
			cs.Progress = monotonicPercent(cs.Progress, base+(1-base)*p)
			msg = "Writing the image onto PersistentVolumeClaim " + claim.Name + ": " + claim.Annotations[api.ClaimAnnotationProgress]
		}
		setCondition(st, v1.ConditionReady, metav1.ConditionFalse, v1.ReasonProvisioning, msg)
		return ctrl.Result{}, nil
	}
	var out api.PopulateResult
	if err := json.Unmarshal([]byte(res), &out); err != nil {
		return ctrl.Result{}, fmt.Errorf("parsing %s of claim %s: %w", api.ClaimAnnotationResult, claim.Name, err)
	}
	st.setPhase(v1.ImagePhaseReady)
	cs.Progress = "100%"
	if cs.Format == "" {
		// Set when the claim was made, from the probe or the copied
		// image: the format the image came in, where the claim holds
		// the raw disk.
		cs.Format, cs.CDROM = v1.ImageFormat(out.Format), out.CDROM
	}
	capacity := claim.Status.Capacity[corev1.ResourceStorage]
	cs.Size = v1.ImageSize{
		Stored: iecSize(capacity.Value()), StoredBytes: fmt.Sprint(capacity.Value()),
		Unpacked: iecSize(out.VirtualSize), UnpackedBytes: fmt.Sprint(out.VirtualSize),
	}
	cs.ImageUploadURLs = nil
	cs.DownloadSpeed = nil
	setCondition(st, v1.ConditionDatasourceReady, metav1.ConditionTrue, reasonCompleted, "")
	setCondition(st, v1.ConditionReady, metav1.ConditionTrue, v1.ReasonReady, "")
	r.recorder.Eventf(o.obj(), corev1.EventTypeNormal, eventImportSucceeded, "Image written onto PersistentVolumeClaim %s (%s, %s)", claim.Name, out.Format, cs.Size.Unpacked)
	if err := r.writeStatus(ctx, o, st); err != nil {
		return ctrl.Result{}, err
	}
	if err := r.deleteSourceSecret(ctx, o); err != nil {
		return ctrl.Result{}, err
	}
	return ctrl.Result{}, r.deleteUploadSecret(ctx, o)
}

// deletePVCWork removes what an unfinished image made: probe pods, the
// source Secret and the claim.
func (r *Reconciler) deletePVCWork(ctx context.Context, o object, claim *corev1.PersistentVolumeClaim) error {
	if err := r.deleteWorkers(ctx, o.kind(), client.ObjectKeyFromObject(o), string(o.GetUID())); err != nil {
		return err
	}
	if err := r.deleteSourceSecret(ctx, o); err != nil {
		return err
	}
	if claim != nil {
		if err := r.client.Delete(ctx, claim); err != nil && !apierrors.IsNotFound(err) {
			return fmt.Errorf("deleting the image's claim: %w", err)
		}
	}
	return nil
}

func (r *Reconciler) deleteSourceSecret(ctx context.Context, o object) error {
	sec := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: r.cfg.PopulateNamespace, Name: api.SourceSecretName(string(o.GetUID()))}}
	if err := r.client.Delete(ctx, sec); err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("deleting the image's source secret: %w", err)
	}
	return nil
}
