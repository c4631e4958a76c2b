package image

import (
	"context"
	"errors"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"

	dvcrclient "vimg.dev/vimg/dvcr/client"
	v1 "vimg.dev/vimg/pkg/apis/virtualization/v1alpha2"
)

// Reasons of conditions and events that are ours (the API's own are in
// package v1alpha2).
const (
	reasonSecretNotFound    = "SecretNotFound"
	reasonSecretInvalid     = "SecretInvalid"
	reasonNotSupported      = "NotSupported"
	reasonDatasourceMissing = "DatasourceNotFound"
	reasonRetrying          = "Retrying"
	reasonCompleted         = "Completed"

	eventImportStarted   = "ImportStarted"
	eventImportRetrying  = "ImportRetrying"
	eventImportSucceeded = "ImportSucceeded"
	eventImportFailed    = "ImportFailed"
	eventImageCopied     = "ImageCopied"
	eventImageLost       = "ImageLost"
	eventDeleteFailed    = "DeleteFailed"
)

// userError is a problem with the image's spec or what it refers to: shown
// in the status, retried only when something changes.
type userError struct {
	reason, msg string
}

func (e *userError) Error() string { return e.msg }

// Reconciler reconciles one kind of image.
type Reconciler struct {
	client    client.Client
	apiReader client.Reader // uncached: user secrets are read, not watched
	recorder  record.EventRecorder
	cfg       Config
	newObject func() object
	now       func() time.Time
}

// NewVirtualImageReconciler and NewClusterVirtualImageReconciler return the
// reconcilers of the two kinds.
func NewVirtualImageReconciler(c client.Client, apiReader client.Reader, rec record.EventRecorder, cfg Config) *Reconciler {
	cfg.setDefaults()
	return &Reconciler{client: c, apiReader: apiReader, recorder: rec, cfg: cfg, now: time.Now,
		newObject: func() object { return virtualImage{&v1.VirtualImage{}} }}
}

func NewClusterVirtualImageReconciler(c client.Client, apiReader client.Reader, rec record.EventRecorder, cfg Config) *Reconciler {
	cfg.setDefaults()
	return &Reconciler{client: c, apiReader: apiReader, recorder: rec, cfg: cfg, now: time.Now,
		newObject: func() object { return clusterVirtualImage{&v1.ClusterVirtualImage{}} }}
}

// Reconcile implements reconcile.Reconciler.
func (r *Reconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	o := r.newObject()
	log := klog.FromContext(ctx).WithValues(o.kind(), req.NamespacedName)
	ctx = klog.NewContext(ctx, log)
	if err := r.client.Get(ctx, req.NamespacedName, o.obj()); err != nil {
		if apierrors.IsNotFound(err) {
			// Gone without our finalizer (it was never added, or removed by
			// hand): make sure nothing of it keeps running.
			return ctrl.Result{}, r.deleteWorkers(ctx, o.kind(), req.NamespacedName, "")
		}
		return ctrl.Result{}, err
	}
	if !o.GetDeletionTimestamp().IsZero() {
		return r.finalize(ctx, o)
	}
	if controllerutil.AddFinalizer(o.obj(), Finalizer) {
		if err := r.client.Update(ctx, o.obj()); err != nil {
			return ctrl.Result{}, fmt.Errorf("adding finalizer: %w", err)
		}
	}
	st := o.copyObject()
	res, err := r.reconcileSource(ctx, o, st)
	if werr := r.writeStatus(ctx, o, st); werr != nil {
		return ctrl.Result{}, werr
	}
	return res, err
}

func (r *Reconciler) reconcileSource(ctx context.Context, o, st object) (ctrl.Result, error) {
	gen := o.GetGeneration()
	cs := st.common()
	// A spec change before Ready restarts provisioning: forget the old
	// attempt's outcome. (After Ready the API server refuses changes.)
	if cs.ObservedGeneration != gen {
		if st.phase() == v1.ImagePhaseFailed {
			st.setPhase(v1.ImagePhasePending)
			cs.Progress = ""
		}
		cs.ObservedGeneration = gen
	}
	if o.pvcStorage() {
		return r.reconcilePVC(ctx, o, st)
	}
	src := o.source()
	switch src.Type {
	case v1.DataSourceTypeHTTP, v1.DataSourceTypeContainerImage, v1.DataSourceTypeUpload:
		return r.reconcileImport(ctx, o, st)
	case v1.DataSourceTypeObjectRef:
		return r.reconcileObjectRef(ctx, o, st, *src.Ref)
	}
	r.setWaiting(st, reasonNotSupported, fmt.Sprintf("dataSource type %q is not supported", src.Type))
	return ctrl.Result{}, nil
}

// reconcileImport drives the import pods of an HTTP or ContainerImage
// image.
func (r *Reconciler) reconcileImport(ctx context.Context, o, st object) (ctrl.Result, error) {
	log := klog.FromContext(ctx)
	pods, err := r.importPods(ctx, o)
	if err != nil {
		return ctrl.Result{}, err
	}
	// Pods of an older generation import a spec that no longer is.
	var current []corev1.Pod
	for i := range pods {
		if generationOf(&pods[i]) != o.GetGeneration() {
			log.Info("Deleting the import pod of an older spec", "pod", klog.KObj(&pods[i]))
			if err := r.deletePod(ctx, &pods[i]); err != nil {
				return ctrl.Result{}, err
			}
			continue
		}
		current = append(current, pods[i])
	}
	switch st.phase() {
	case v1.ImagePhaseReady, v1.ImagePhaseImageLost:
		if len(current) == 0 {
			return r.checkStored(ctx, o, st)
		}
	case v1.ImagePhaseFailed:
		return ctrl.Result{}, r.deleteWorkerObjects(ctx, o, current)
	}
	if len(current) == 0 {
		if o.source().Type == v1.DataSourceTypeUpload {
			return r.reconcileUpload(ctx, o, st)
		}
		return r.startImport(ctx, o, st, 1)
	}
	pod := &current[0]
	switch pod.Status.Phase {
	case corev1.PodSucceeded:
		return r.importSucceeded(ctx, o, st, pod, current)
	case corev1.PodFailed:
		return r.importFailed(ctx, o, st, pod, current)
	}
	r.importRunning(st, pod)
	return ctrl.Result{}, nil
}

func (r *Reconciler) startImport(ctx context.Context, o, st object, attempt int) (ctrl.Result, error) {
	log := klog.FromContext(ctx)
	token, err := r.cfg.Tokens.PushToken(ctx, o.repository(), r.cfg.WorkerTokenTTL)
	if err != nil {
		r.setProvisioningMessage(st, v1.ReasonProvisioning, "Waiting for DVCR: "+err.Error())
		return ctrl.Result{}, fmt.Errorf("minting a push token: %w", err)
	}
	req, err := r.buildRequest(ctx, o, token)
	var ue *userError
	if errors.As(err, &ue) {
		r.setWaiting(st, ue.reason, ue.msg)
		// Secrets are not watched: look again in a while.
		return ctrl.Result{RequeueAfter: 15 * time.Second}, nil
	}
	if err != nil {
		return ctrl.Result{}, err
	}
	sec, pod, err := r.workerObjects(o, req, attempt)
	if err != nil {
		return ctrl.Result{}, err
	}
	if err := r.applySecret(ctx, sec); err != nil {
		return ctrl.Result{}, err
	}
	if err := r.client.Create(ctx, pod); err != nil && !apierrors.IsAlreadyExists(err) {
		return ctrl.Result{}, fmt.Errorf("creating import pod: %w", err)
	}
	log.Info("Started import pod", "pod", klog.KObj(pod), "attempt", attempt)
	if attempt == 1 {
		what := "Import"
		if o.pvcStorage() {
			what = "Probing the source for its size"
		}
		r.recorder.Eventf(o.obj(), corev1.EventTypeNormal, eventImportStarted, "%s started in pod %s/%s", what, pod.Namespace, pod.Name)
	}
	st.setPhase(v1.ImagePhaseProvisioning)
	cs := st.common()
	if cs.Progress == "" {
		cs.Progress = "0.0%"
	}
	setCondition(st, v1.ConditionDatasourceReady, metav1.ConditionTrue, v1.ReasonProvisioning, "")
	if attempt == 1 {
		setCondition(st, v1.ConditionReady, metav1.ConditionFalse, v1.ReasonProvisioning, "Import started")
	}
	return ctrl.Result{}, nil
}

// applySecret creates the import Secret, or replaces its data (a new
// attempt carries a fresh token).
func (r *Reconciler) applySecret(ctx context.Context, sec *corev1.Secret) error {
	err := r.client.Create(ctx, sec)
	if apierrors.IsAlreadyExists(err) {
		var cur corev1.Secret
		if err := r.client.Get(ctx, client.ObjectKeyFromObject(sec), &cur); err != nil {
			return fmt.Errorf("reading import secret: %w", err)
		}
		cur.Data, cur.Labels = sec.Data, sec.Labels
		err = r.client.Update(ctx, &cur)
	}
	if err != nil {
		return fmt.Errorf("writing import secret: %w", err)
	}
	return nil
}

func (r *Reconciler) importRunning(st object, pod *corev1.Pod) {
	st.setPhase(v1.ImagePhaseProvisioning)
	cs := st.common()
	if waiting := podWaitingReason(pod); waiting != "" {
		setCondition(st, v1.ConditionReady, metav1.ConditionFalse, v1.ReasonProvisioning, "Import pod "+pod.Name+" is not running: "+waiting)
		return
	}
	p, ok := progressOf(pod)
	if !ok {
		return
	}
	if p.Fraction >= 0 {
		base := 0.0
		if st.source().Type == v1.DataSourceTypeUpload {
			base = uploadShare // the upload was the first part
		}
		cs.Progress = monotonicPercent(cs.Progress, base+(1-base)*p.Fraction)
	}
	if p.AvgSpeed > 0 || p.CurrentSpeed > 0 {
		cs.DownloadSpeed = &v1.DownloadSpeed{
			Avg: iecSpeed(p.AvgSpeed), AvgBytes: fmt.Sprint(p.AvgSpeed),
			Current: iecSpeed(p.CurrentSpeed), CurrentBytes: fmt.Sprint(p.CurrentSpeed),
		}
	}
	msg := fmt.Sprintf("Importing: %s of the source received", iecSize(p.SourceRead))
	if p.SourceTotal > 0 {
		msg = fmt.Sprintf("Importing: %s of %s received", iecSize(p.SourceRead), iecSize(p.SourceTotal))
	}
	setCondition(st, v1.ConditionReady, metav1.ConditionFalse, v1.ReasonProvisioning, msg)
}

func (r *Reconciler) importSucceeded(ctx context.Context, o, st object, pod *corev1.Pod, pods []corev1.Pod) (ctrl.Result, error) {
	if o.pvcStorage() {
		return r.probeSucceeded(ctx, o, st, pod, pods)
	}
	// The registry, not the pod's word, decides: the manifest is there.
	res, err := r.checkStored(ctx, o, st)
	if err != nil || st.phase() != v1.ImagePhaseReady {
		return res, err
	}
	if out, ok := outcomeOf(pod); ok && out.Result != nil {
		st.common().Size.Stored, st.common().Size.StoredBytes = iecSize(out.Result.StoredSize), fmt.Sprint(out.Result.StoredSize)
	}
	r.recorder.Eventf(o.obj(), corev1.EventTypeNormal, eventImportSucceeded, "Image imported into DVCR (%s, %s)", st.common().Format, st.common().Size.Unpacked)
	st.common().ImageUploadURLs = nil
	// Status first, then the pods: a crash in between leaves a Succeeded
	// pod, which leads here again, never to a second import.
	if err := r.writeStatus(ctx, o, st); err != nil {
		return ctrl.Result{}, err
	}
	if err := r.deleteWorkerObjects(ctx, o, pods); err != nil {
		return ctrl.Result{}, err
	}
	if o.source().Type == v1.DataSourceTypeUpload {
		// The uploaded bytes are in the image's layer now; the garbage
		// collector frees the upload blob.
		return ctrl.Result{}, r.deleteUploadSecret(ctx, o)
	}
	return ctrl.Result{}, nil
}

func (r *Reconciler) importFailed(ctx context.Context, o, st object, pod *corev1.Pod, pods []corev1.Pod) (ctrl.Result, error) {
	out, ok := outcomeOf(pod)
	if !ok {
		out.Reason, out.Message = "WorkerFailed", podFailureMessage(pod)
	}
	attempt := attemptOf(pod)
	if out.Permanent || attempt >= r.cfg.MaxAttempts {
		msg := out.Message
		if !out.Permanent {
			msg = fmt.Sprintf("gave up after %d attempts: %s", attempt, msg)
		}
		st.setPhase(v1.ImagePhaseFailed)
		setCondition(st, v1.ConditionReady, metav1.ConditionFalse, v1.ReasonProvisioningFailed, out.Reason+": "+msg)
		r.recorder.Eventf(o.obj(), corev1.EventTypeWarning, eventImportFailed, "%s: %s", out.Reason, msg)
		st.common().ImageUploadURLs = nil
		if err := r.writeStatus(ctx, o, st); err != nil {
			return ctrl.Result{}, err
		}
		if err := r.deleteUploadSecret(ctx, o); err != nil {
			return ctrl.Result{}, err
		}
		return ctrl.Result{}, r.deleteWorkerObjects(ctx, o, pods)
	}
	wait := r.backoff(attempt) - r.now().Sub(finishedAt(pod))
	setCondition(st, v1.ConditionReady, metav1.ConditionFalse, v1.ReasonProvisioning,
		fmt.Sprintf("%s: attempt %d of %d failed (%s); retrying", reasonRetrying, attempt, r.cfg.MaxAttempts, out.Message))
	if wait > 0 {
		return ctrl.Result{RequeueAfter: wait}, nil
	}
	r.recorder.Eventf(o.obj(), corev1.EventTypeWarning, eventImportRetrying, "Attempt %d failed, retrying: %s: %s", attempt, out.Reason, out.Message)
	res, err := r.startImport(ctx, o, st, attempt+1)
	if err != nil {
		return res, err
	}
	for i := range pods {
		if err := r.deletePod(ctx, &pods[i]); err != nil {
			return ctrl.Result{}, err
		}
	}
	return res, nil
}

func (r *Reconciler) backoff(attempt int) time.Duration {
	d := r.cfg.RetryBackoff << (attempt - 1)
	return min(d, 5*time.Minute)
}

// checkStored sets Ready (with sizes and format from the manifest) when the
// image is in DVCR, and ImageLost when a Ready image's data is gone.
func (r *Reconciler) checkStored(ctx context.Context, o, st object) (ctrl.Result, error) {
	meta, _, err := r.cfg.Registry.Stat(ctx, ref(o))
	if errors.Is(err, dvcrclient.ErrNotFound) {
		if st.phase() == v1.ImagePhaseReady || st.phase() == v1.ImagePhaseImageLost {
			if st.phase() == v1.ImagePhaseReady {
				r.recorder.Event(o.obj(), corev1.EventTypeWarning, eventImageLost, "The image's data is missing from DVCR")
			}
			st.setPhase(v1.ImagePhaseImageLost)
			setCondition(st, v1.ConditionReady, metav1.ConditionFalse, v1.ReasonImageLost,
				"The image's data is missing from DVCR: delete and re-create the image to import it again")
			return ctrl.Result{}, nil
		}
		return ctrl.Result{}, fmt.Errorf("import finished but %s is not in DVCR", ref(o))
	}
	if err != nil {
		return ctrl.Result{}, fmt.Errorf("checking %s in DVCR: %w", ref(o), err)
	}
	r.setReady(st, meta.Format, meta.VirtualSize, meta.StoredSize)
	return ctrl.Result{}, nil
}

func (r *Reconciler) setReady(st object, format string, virtual, stored int64) {
	cs := st.common()
	st.setPhase(v1.ImagePhaseReady)
	cs.Progress = "100%"
	cs.Format = v1.ImageFormat(format)
	cs.CDROM = format == "iso"
	cs.Size = v1.ImageSize{
		Stored: iecSize(stored), StoredBytes: fmt.Sprint(stored),
		Unpacked: iecSize(virtual), UnpackedBytes: fmt.Sprint(virtual),
	}
	st.setRegistryURL(r.cfg.DVCRAddress + "/" + ref(st))
	setCondition(st, v1.ConditionDatasourceReady, metav1.ConditionTrue, reasonCompleted, "")
	setCondition(st, v1.ConditionReady, metav1.ConditionTrue, v1.ReasonReady, "")
}

// reconcileObjectRef copies another image inside DVCR.
func (r *Reconciler) reconcileObjectRef(ctx context.Context, o, st object, from objectRef) (ctrl.Result, error) {
	if st.phase() == v1.ImagePhaseReady || st.phase() == v1.ImagePhaseImageLost {
		return r.checkStored(ctx, o, st)
	}
	src, err := r.readySource(ctx, st, from, false)
	if src == nil || err != nil {
		return ctrl.Result{}, err
	}
	uid := string(src.GetUID())
	st.common().SourceUID = &uid
	if _, err := r.cfg.Registry.Copy(ctx, ref(src), ref(o)); err != nil {
		r.setProvisioningMessage(st, v1.ReasonProvisioning, "Copying "+from.String()+" in DVCR failed, retrying: "+err.Error())
		return ctrl.Result{}, fmt.Errorf("copying %s: %w", from.String(), err)
	}
	r.recorder.Eventf(o.obj(), corev1.EventTypeNormal, eventImageCopied, "Copied from %s inside DVCR", from.String())
	return r.checkStored(ctx, o, st)
}

// readySource returns the Ready image that from names, or nil with st
// Pending and the reason in its conditions. Only an image stored in a claim
// (inClaim) can copy an image stored in a claim: the populator reads it
// there; DVCR cannot.
func (r *Reconciler) readySource(ctx context.Context, st object, from objectRef, inClaim bool) (object, error) {
	var src object
	switch from.Kind {
	case v1.ObjectRefKindVirtualImage:
		src = virtualImage{&v1.VirtualImage{}}
	case v1.ObjectRefKindClusterVirtualImage:
		src = clusterVirtualImage{&v1.ClusterVirtualImage{}}
	default:
		r.setWaiting(st, reasonNotSupported, fmt.Sprintf("objectRef kind %s is not supported yet: use an image (VirtualImage or ClusterVirtualImage) or another source", from.Kind))
		return nil, nil
	}
	err := r.client.Get(ctx, types.NamespacedName{Namespace: from.Namespace, Name: from.Name}, src.obj())
	if apierrors.IsNotFound(err) {
		r.setWaiting(st, reasonDatasourceMissing, from.String()+" not found: create it or fix objectRef")
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	if src.pvcStorage() && !inClaim {
		r.setWaiting(st, reasonNotSupported, from.String()+" is stored on a PersistentVolumeClaim; only an image with storage PersistentVolumeClaim can copy it yet")
		return nil, nil
	}
	if src.phase() != v1.ImagePhaseReady {
		r.setWaiting(st, v1.ReasonDatasourceNotReady, fmt.Sprintf("Waiting for %s to be Ready (it is %s)", from.String(), phaseOrPending(src.phase())))
		return nil, nil
	}
	return src, nil
}

func phaseOrPending(p v1.ImagePhase) v1.ImagePhase {
	if p == "" {
		return v1.ImagePhasePending
	}
	return p
}

// setWaiting puts the image in Pending because its data source is not
// usable yet; msg says what the user can do.
func (r *Reconciler) setWaiting(st object, reason, msg string) {
	st.setPhase(v1.ImagePhasePending)
	setCondition(st, v1.ConditionDatasourceReady, metav1.ConditionFalse, reason, msg)
	setCondition(st, v1.ConditionReady, metav1.ConditionFalse, v1.ReasonDatasourceNotReady, msg)
}

func (r *Reconciler) setProvisioningMessage(st object, reason, msg string) {
	if st.phase() == "" {
		st.setPhase(v1.ImagePhasePending)
	}
	setCondition(st, v1.ConditionReady, metav1.ConditionFalse, reason, msg)
}

func setCondition(st object, typ string, status metav1.ConditionStatus, reason, msg string) {
	meta.SetStatusCondition(&st.common().Conditions, metav1.Condition{
		Type: typ, Status: status, Reason: reason, Message: msg, ObservedGeneration: st.GetGeneration(),
	})
}

// finalize deletes the image's pods and its data in DVCR, then lets the
// object go.
func (r *Reconciler) finalize(ctx context.Context, o object) (ctrl.Result, error) {
	if !controllerutil.ContainsFinalizer(o.obj(), Finalizer) {
		return ctrl.Result{}, nil
	}
	st := o.copyObject()
	st.setPhase(v1.ImagePhaseTerminating)
	setCondition(st, v1.ConditionReady, metav1.ConditionFalse, string(v1.ImagePhaseTerminating), "The image is being deleted")
	if err := r.writeStatus(ctx, o, st); err != nil {
		return ctrl.Result{}, err
	}
	if err := r.deleteWorkers(ctx, o.kind(), client.ObjectKeyFromObject(o), string(o.GetUID())); err != nil {
		return ctrl.Result{}, err
	}
	if err := r.deleteUploadSecret(ctx, o); err != nil {
		return ctrl.Result{}, err
	}
	if o.pvcStorage() {
		claim, err := r.imageClaim(ctx, o)
		if err != nil {
			return ctrl.Result{}, err
		}
		if err := r.deletePVCWork(ctx, o, claim); err != nil {
			return ctrl.Result{}, err
		}
	}
	// Even an image stored in a claim may have an upload blob in DVCR.
	if err := r.cfg.Registry.Delete(ctx, ref(o)); err != nil {
		r.recorder.Eventf(o.obj(), corev1.EventTypeWarning, eventDeleteFailed, "Deleting the image from DVCR failed, retrying: %v", err)
		return ctrl.Result{}, fmt.Errorf("deleting %s from DVCR: %w", ref(o), err)
	}
	controllerutil.RemoveFinalizer(o.obj(), Finalizer)
	if err := r.client.Update(ctx, o.obj()); err != nil && !apierrors.IsNotFound(err) {
		return ctrl.Result{}, fmt.Errorf("removing finalizer: %w", err)
	}
	klog.FromContext(ctx).Info("Image deleted with its DVCR data")
	return ctrl.Result{}, nil
}

// deleteWorkers removes every import pod and secret of the image with this
// key (and UID, when known).
func (r *Reconciler) deleteWorkers(ctx context.Context, kind string, key types.NamespacedName, uid string) error {
	sel := client.MatchingLabels{LabelImageName: key.Name, LabelComponent: componentImporter}
	if kind == "VirtualImage" {
		sel[LabelImageKind], sel[LabelImageNamespace] = "vi", key.Namespace
	} else {
		sel[LabelImageKind] = "cvi"
	}
	if uid != "" {
		sel[LabelImageUID] = uid
	}
	opts := []client.DeleteAllOfOption{client.InNamespace(r.cfg.Namespace), sel, client.PropagationPolicy(metav1.DeletePropagationBackground)}
	if err := r.client.DeleteAllOf(ctx, &corev1.Pod{}, opts...); err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("deleting import pods: %w", err)
	}
	if err := r.client.DeleteAllOf(ctx, &corev1.Secret{}, opts...); err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("deleting import secrets: %w", err)
	}
	return nil
}

func (r *Reconciler) deleteWorkerObjects(ctx context.Context, o object, pods []corev1.Pod) error {
	for i := range pods {
		if err := r.deletePod(ctx, &pods[i]); err != nil {
			return err
		}
	}
	sec := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: r.cfg.Namespace, Name: secretName(o)}}
	if err := r.client.Delete(ctx, sec); err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("deleting import secret: %w", err)
	}
	return nil
}

func (r *Reconciler) deletePod(ctx context.Context, p *corev1.Pod) error {
	if err := r.client.Delete(ctx, p); err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("deleting pod %s: %w", p.Name, err)
	}
	return nil
}

// writeStatus writes st's status when it differs from o's.
func (r *Reconciler) writeStatus(ctx context.Context, o, st object) error {
	if equality.Semantic.DeepEqual(statusOf(o), statusOf(st)) {
		return nil
	}
	if err := r.client.Status().Update(ctx, st.obj()); err != nil {
		return fmt.Errorf("updating status: %w", err)
	}
	// What is written is now the base for later comparisons in this pass.
	o.SetResourceVersion(st.GetResourceVersion())
	copyStatus(o, st)
	return nil
}

func statusOf(o object) any {
	switch t := o.(type) {
	case virtualImage:
		return t.Status
	case clusterVirtualImage:
		return t.Status
	}
	return nil
}

func copyStatus(dst, src object) {
	switch t := dst.(type) {
	case virtualImage:
		t.Status = *src.(virtualImage).Status.DeepCopy()
	case clusterVirtualImage:
		t.Status = *src.(clusterVirtualImage).Status.DeepCopy()
	}
}
