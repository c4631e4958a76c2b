package upload

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/flowcontrol"
	"k8s.io/klog/v2"

	"vimg.dev/vimg/pkg/worker/api"
)

// ErrNotFound matches (with errors.Is) an upload the store does not have:
// no Secret, or one that is not a complete upload Secret.
var ErrNotFound = errors.New("no such upload")

// Upload is one image's upload as the gateway sees it: what the controller
// wrote (token, repository, DVCR token, deadline) and what the gateway
// keeps (the state, and who is receiving it).
type Upload struct {
	UID        string
	Token      string
	Repository string
	DVCRToken  string
	// Expires is when an upload may no longer start; zero means never.
	Expires time.Time
	State   api.UploadState
	Holder  Holder
}

// Holder is the request receiving an upload: a lease, renewed with every
// progress write, so that two gateway replicas never receive the same
// upload at once, and a crashed replica's lease runs out by itself.
type Holder struct {
	ID    string    `json:"id"`
	Until time.Time `json:"until"`
}

// Active says whether the lease holds at now.
func (h Holder) Active(now time.Time) bool { return h.ID != "" && now.Before(h.Until) }

// AnnotationHolder holds the Holder of an upload Secret (the gateway's own
// bookkeeping; the controller reads only api.AnnotationUploadState).
const AnnotationHolder = "vimg.dev/upload-holder"

// Store keeps the uploads the gateway serves.
type Store interface {
	// Get returns the upload of uid, possibly slightly stale (a cache),
	// or an error matching ErrNotFound.
	Get(ctx context.Context, uid string) (*Upload, error)
	// Update reads the latest upload of uid, lets f change its State and
	// Holder, and stores them if they changed, without overwriting a
	// concurrent write: on a conflict it reads again and runs f again, so
	// f must decide from what it is given. An error from f is returned as
	// it is and nothing is written. Update with an f that changes nothing
	// is a fresh read.
	Update(ctx context.Context, uid string, f func(*Upload) error) (*Upload, error)
}

// SecretStore is the Store of the upload Secrets of one namespace
// (api.UploadSecretPrefix + uid, labelled api.LabelUpload=true). Reads go
// through an informer's cache; updates read the Secret from the API server
// and patch its annotations with the resourceVersion read as a
// precondition.
type SecretStore struct {
	client    kubernetes.Interface
	namespace string
	factory   informers.SharedInformerFactory
	lister    corelisters.SecretNamespaceLister
	synced    cache.InformerSynced
	// misses bounds the API reads for uploads missing from the cache (one
	// created a moment ago): requests with made-up IDs cost the API server
	// nothing beyond it.
	misses flowcontrol.RateLimiter
}

// NewSecretStore watches the upload Secrets of namespace. Start it before
// use.
func NewSecretStore(cs kubernetes.Interface, namespace string) *SecretStore {
	f := informers.NewSharedInformerFactoryWithOptions(cs, 0,
		informers.WithNamespace(namespace),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = api.LabelUpload + "=true" }))
	inf := f.Core().V1().Secrets()
	_ = inf.Informer().SetTransform(func(obj any) (any, error) {
		if s, ok := obj.(*corev1.Secret); ok {
			s.ManagedFields = nil // only memory, never read
		}
		return obj, nil
	})
	return &SecretStore{
		client:    cs,
		namespace: namespace,
		factory:   f,
		lister:    inf.Lister().Secrets(namespace),
		synced:    inf.Informer().HasSynced,
		misses:    flowcontrol.NewTokenBucketRateLimiter(5, 20),
	}
}

// Start runs the informer until ctx ends.
func (s *SecretStore) Start(ctx context.Context) { s.factory.Start(ctx.Done()) }

// WaitForSync waits until the cache holds every upload Secret, or ctx ends.
func (s *SecretStore) WaitForSync(ctx context.Context) bool {
	return cache.WaitForCacheSync(ctx.Done(), s.synced)
}

// Synced says whether the cache is filled (readiness).
func (s *SecretStore) Synced() bool { return s.synced() }

func secretName(uid string) string { return api.UploadSecretPrefix + uid }

// Get implements Store.
func (s *SecretStore) Get(ctx context.Context, uid string) (*Upload, error) {
	sec, err := s.lister.Get(secretName(uid))
	if apierrors.IsNotFound(err) && s.misses.TryAccept() {
		sec, err = s.client.CoreV1().Secrets(s.namespace).Get(ctx, secretName(uid), metav1.GetOptions{})
	}
	if apierrors.IsNotFound(err) {
		return nil, fmt.Errorf("upload %s: %w", uid, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("reading upload %s: %w", uid, err)
	}
	return decodeSecret(ctx, sec)
}

// maxConflicts bounds Update's retries: writers of one upload Secret are
// few (the controller, one gateway request, a HEAD), so a run of conflicts
// means something is wrong.
const maxConflicts = 10

// Update implements Store.
func (s *SecretStore) Update(ctx context.Context, uid string, f func(*Upload) error) (*Upload, error) {
	secrets := s.client.CoreV1().Secrets(s.namespace)
	for attempt := 0; ; attempt++ {
		sec, err := secrets.Get(ctx, secretName(uid), metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return nil, fmt.Errorf("upload %s: %w", uid, ErrNotFound)
		}
		if err != nil {
			return nil, fmt.Errorf("reading upload %s: %w", uid, err)
		}
		u, err := decodeSecret(ctx, sec)
		if err != nil {
			return nil, err
		}
		before := annotations(u)
		if err := f(u); err != nil {
			return nil, err
		}
		after := annotations(u)
		if maps.EqualFunc(before, after, func(a, b *string) bool { return (a == nil) == (b == nil) && (a == nil || *a == *b) }) {
			return u, nil
		}
		// resourceVersion in a merge patch is a precondition: the API
		// server refuses the patch with a conflict if the Secret changed
		// since it was read.
		patch, err := json.Marshal(map[string]any{"metadata": map[string]any{
			"resourceVersion": sec.ResourceVersion,
			"annotations":     after,
		}})
		if err != nil {
			return nil, err
		}
		out, err := secrets.Patch(ctx, sec.Name, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: "vimg-upload-gateway"})
		switch {
		case err == nil:
			return decodeSecret(ctx, out)
		case apierrors.IsNotFound(err):
			return nil, fmt.Errorf("upload %s: %w", uid, ErrNotFound)
		case apierrors.IsConflict(err) && attempt < maxConflicts:
			continue
		}
		return nil, fmt.Errorf("writing the state of upload %s: %w", uid, err)
	}
}

// annotations renders what the gateway keeps on the Secret; nil removes an
// annotation.
func annotations(u *Upload) map[string]*string {
	state := u.State.Encode()
	out := map[string]*string{api.AnnotationUploadState: &state, AnnotationHolder: nil}
	if u.Holder.ID != "" {
		b, _ := json.Marshal(u.Holder)
		h := string(b)
		out[AnnotationHolder] = &h
	}
	return out
}

// decodeSecret reads an upload Secret. One that is not a complete upload
// Secret is reported as not found (to the user it is not an upload) and
// logged (to the operator it is a bug).
func decodeSecret(ctx context.Context, sec *corev1.Secret) (*Upload, error) {
	uid := strings.TrimPrefix(sec.Name, api.UploadSecretPrefix)
	u := &Upload{
		UID:        uid,
		Token:      string(sec.Data[api.UploadKeyToken]),
		Repository: string(sec.Data[api.UploadKeyRepository]),
		DVCRToken:  string(sec.Data[api.UploadKeyDVCRToken]),
		State:      api.UploadState{Total: -1},
	}
	log := klog.FromContext(ctx).WithValues("secret", klog.KObj(sec))
	if sec.Labels[api.LabelUpload] != "true" || u.Token == "" || u.Repository == "" || u.DVCRToken == "" {
		log.Info("Ignoring an incomplete upload Secret: it needs the label and the keys token, repository and dvcrToken",
			"label", sec.Labels[api.LabelUpload])
		return nil, fmt.Errorf("upload %s: incomplete Secret: %w", uid, ErrNotFound)
	}
	if e := strings.TrimSpace(string(sec.Data[api.UploadKeyExpires])); e != "" {
		t, err := time.Parse(time.RFC3339, e)
		if err != nil {
			log.Info("Ignoring an upload Secret with an unreadable deadline", "err", err)
			return nil, fmt.Errorf("upload %s: unreadable %s: %w", uid, api.UploadKeyExpires, ErrNotFound)
		}
		u.Expires = t
	}
	if s, ok := sec.Annotations[api.AnnotationUploadState]; ok {
		st, err := api.DecodeUploadState(s)
		if err != nil {
			// A state that cannot be read cannot be resumed either: the
			// upload starts over, which is what a user can do about it.
			log.Info("Upload state unreadable; the upload starts over", "err", err)
			st = api.UploadState{Total: -1}
		}
		u.State = st
	}
	if s, ok := sec.Annotations[AnnotationHolder]; ok {
		if err := json.Unmarshal([]byte(s), &u.Holder); err != nil {
			log.V(2).Info("Upload holder unreadable; ignored", "err", err)
			u.Holder = Holder{}
		}
	}
	return u, nil
}
