package image

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime/pkg/reconcile"

	v1 "vimg.dev/vimg/pkg/apis/virtualization/v1alpha2"
	"vimg.dev/vimg/pkg/worker/api"
)

// Uploads: the image waits (WaitForUserUpload) with an upload Secret in
// cfg.UploadNamespace holding its URL token and a push token; the upload
// gateway fills a DVCR blob from the user's bytes and marks the Secret's
// state Done; then an import pod imports the blob like any other source.
// The upload is the first half of the progress, the import the second.
const uploadShare = 0.5

func uploadSecretName(o object) string { return api.UploadSecretPrefix + string(o.GetUID()) }

// uploadSecret returns the image's upload Secret, or nil.
func (r *Reconciler) uploadSecret(ctx context.Context, o object) (*corev1.Secret, error) {
	var s corev1.Secret
	err := r.client.Get(ctx, types.NamespacedName{Namespace: r.cfg.UploadNamespace, Name: uploadSecretName(o)}, &s)
	if apierrors.IsNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading the upload secret: %w", err)
	}
	return &s, nil
}

func uploadStateOf(s *corev1.Secret) api.UploadState {
	u, err := api.DecodeUploadState(s.Annotations[api.AnnotationUploadState])
	if err != nil {
		return api.UploadState{Total: -1}
	}
	return u
}

// reconcileUpload runs while no import pod exists for an Upload image.
func (r *Reconciler) reconcileUpload(ctx context.Context, o, st object) (ctrl.Result, error) {
	sec, err := r.uploadSecret(ctx, o)
	if err != nil {
		return ctrl.Result{}, err
	}
	if sec == nil {
		if sec, err = r.createUploadSecret(ctx, o); err != nil {
			return ctrl.Result{}, err
		}
	}
	u := uploadStateOf(sec)
	if u.Done {
		return r.startImport(ctx, o, st, 1)
	}
	token := string(sec.Data[api.UploadKeyToken])
	path := api.UploadPathPrefix + string(o.GetUID()) + "/" + token
	urls := &v1.ImageUploadURLs{InCluster: r.cfg.UploadInClusterURL + path}
	if r.cfg.UploadExternalURL != "" {
		urls.External = r.cfg.UploadExternalURL + path
	}
	cs := st.common()
	cs.ImageUploadURLs = urls
	if u.Received > 0 {
		st.setPhase(v1.ImagePhaseProvisioning)
		if u.Total > 0 {
			cs.Progress = monotonicPercent(cs.Progress, uploadShare*float64(u.Received)/float64(u.Total))
		}
		if u.Speed > 0 {
			cs.DownloadSpeed = &v1.DownloadSpeed{Current: iecSpeed(u.Speed), CurrentBytes: fmt.Sprint(u.Speed)}
		}
		setCondition(st, v1.ConditionDatasourceReady, metav1.ConditionTrue, v1.ReasonProvisioning, "")
		setCondition(st, v1.ConditionReady, metav1.ConditionFalse, v1.ReasonProvisioning, "Receiving the upload: "+iecSize(u.Received)+" received")
		return ctrl.Result{}, nil
	}
	expires, err := time.Parse(time.RFC3339, string(sec.Data[api.UploadKeyExpires]))
	if err != nil {
		return ctrl.Result{}, fmt.Errorf("upload secret: bad %s: %w", api.UploadKeyExpires, err)
	}
	if left := expires.Sub(r.now()); left <= 0 {
		st.setPhase(v1.ImagePhaseFailed)
		cs.ImageUploadURLs = nil
		msg := fmt.Sprintf("No upload started within %s: delete and re-create the image to get a new upload URL", r.cfg.UploadTimeout)
		setCondition(st, v1.ConditionDatasourceReady, metav1.ConditionFalse, v1.ReasonWaitForUserUploadTimeout, msg)
		setCondition(st, v1.ConditionReady, metav1.ConditionFalse, v1.ReasonWaitForUserUploadTimeout, msg)
		r.recorder.Event(o.obj(), corev1.EventTypeWarning, v1.ReasonWaitForUserUploadTimeout, msg)
		if err := r.writeStatus(ctx, o, st); err != nil {
			return ctrl.Result{}, err
		}
		return ctrl.Result{}, r.deleteUploadSecret(ctx, o)
	} else {
		st.setPhase(v1.ImagePhaseWaitForUserUpload)
		if cs.Progress == "" {
			cs.Progress = "0.0%"
		}
		msg := fmt.Sprintf("Waiting for the upload (curl -T FILE URL, or vimg upload) until %s", expires.UTC().Format(time.RFC3339))
		setCondition(st, v1.ConditionDatasourceReady, metav1.ConditionFalse, v1.ReasonWaitForUserUpload, msg)
		setCondition(st, v1.ConditionReady, metav1.ConditionFalse, v1.ReasonWaitForUserUpload, msg)
		return ctrl.Result{RequeueAfter: left}, nil
	}
}

func (r *Reconciler) createUploadSecret(ctx context.Context, o object) (*corev1.Secret, error) {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return nil, err
	}
	token, err := r.cfg.Tokens.PushToken(ctx, o.repository(), r.cfg.WorkerTokenTTL+r.cfg.UploadTimeout)
	if err != nil {
		return nil, fmt.Errorf("minting a push token for the upload: %w", err)
	}
	labels := imageLabels(o)
	labels[LabelComponent] = componentUpload
	labels[api.LabelUpload] = "true"
	s := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: uploadSecretName(o), Namespace: r.cfg.UploadNamespace, Labels: labels},
		Type:       corev1.SecretTypeOpaque,
		Data: map[string][]byte{
			api.UploadKeyToken:      []byte(hex.EncodeToString(b)),
			api.UploadKeyRepository: []byte(o.repository()),
			api.UploadKeyDVCRToken:  []byte(token),
			api.UploadKeyExpires:    []byte(r.now().Add(r.cfg.UploadTimeout).UTC().Format(time.RFC3339)),
		},
	}
	if err := r.client.Create(ctx, s); err != nil {
		if apierrors.IsAlreadyExists(err) {
			return r.uploadSecret(ctx, o)
		}
		return nil, fmt.Errorf("creating the upload secret: %w", err)
	}
	return s, nil
}

func (r *Reconciler) deleteUploadSecret(ctx context.Context, o object) error {
	s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: r.cfg.UploadNamespace, Name: uploadSecretName(o)}}
	if err := r.client.Delete(ctx, s); err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("deleting the upload secret: %w", err)
	}
	return nil
}

// uploadedBlob is the import source of a finished upload.
func (r *Reconciler) uploadedBlob(ctx context.Context, o object) (api.SourceSpec, error) {
	sec, err := r.uploadSecret(ctx, o)
	if err != nil {
		return api.SourceSpec{}, err
	}
	if sec == nil {
		return api.SourceSpec{}, fmt.Errorf("the upload secret of %s is gone", o.GetName())
	}
	u := uploadStateOf(sec)
	if !u.Done {
		return api.SourceSpec{}, fmt.Errorf("the upload of %s is not finished", o.GetName())
	}
	return api.SourceSpec{Type: api.SourceDVCRBlob, URL: u.Digest, Size: u.Size}, nil
}
