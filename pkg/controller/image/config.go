// Package image reconciles VirtualImages and ClusterVirtualImages stored in
// DVCR: it starts an import pod per image (HTTP and container image
// sources), copies images inside DVCR (ObjectRef), keeps status in step
// with what exists (pods, registry manifests) and removes an image's data
// when the image is deleted.
//
// The reconciler is level-based: every pass derives the next step from the
// object, its import pods and the registry, so a controller restart at any
// moment converges without a second import and without leaking pods.
package image

import (
	"context"
	"time"

	corev1 "k8s.io/api/core/v1"

	"vimg.dev/vimg/dvcr/layout"
	"vimg.dev/vimg/pkg/worker/api"
)

// Names the controller gives its objects and labels.
const (
	Finalizer = "vimg.dev/image-cleanup"

	LabelImageKind      = "vimg.dev/image-kind" // "vi" or "cvi"
	LabelImageNamespace = "vimg.dev/image-namespace"
	LabelImageName      = "vimg.dev/image-name"
	LabelImageUID       = "vimg.dev/image-uid"
	LabelComponent      = "app.kubernetes.io/component"
	componentImporter   = "importer"
	componentUpload     = "upload"

	AnnotationGeneration = "vimg.dev/generation"
	AnnotationAttempt    = "vimg.dev/attempt"

	FieldManager = "vimg-controller"
)

// Config is what the image reconciler is given.
type Config struct {
	// Namespace is where import pods and their secrets run (vimg-system).
	Namespace string
	// DVCRAddress is host[:port] of DVCR as pods reach it; it is also what
	// status.target.registryURL names.
	DVCRAddress string
	// DVCRCA is the PEM bundle import pods trust for DVCR.
	DVCRCA []byte
	// Registry is DVCR as the controller uses it (admin credentials).
	Registry Registry
	// Tokens mints push tokens scoped to one repository for import pods.
	Tokens TokenSource

	WorkerImage           string
	WorkerImagePullPolicy corev1.PullPolicy
	WorkerServiceAccount  string
	WorkerResources       corev1.ResourceRequirements
	// TrustedCAConfigMap names an optional ConfigMap in Namespace whose
	// PEM files import pods trust for sources, besides the system roots.
	TrustedCAConfigMap string
	// WorkerTokenTTL bounds how long an import may push with its token.
	WorkerTokenTTL time.Duration
	// UploadNamespace holds the upload Secrets (and nothing else: the
	// upload gateway may read every Secret there).
	UploadNamespace string
	// UploadInClusterURL and UploadExternalURL are the bases of the upload
	// URLs in status.imageUploadURLs ("https://host[:port]"); no external
	// URL is shown when it is empty.
	UploadInClusterURL, UploadExternalURL string
	// UploadTimeout is how long an image waits for an upload to start.
	UploadTimeout time.Duration
	// MaxAttempts is how many import pods are tried after transient
	// failures before the image is Failed.
	MaxAttempts int
	// RetryBackoff is the wait before the second attempt, doubled for each
	// further one (capped at 5 min).
	RetryBackoff time.Duration

	// PopulateNamespace is the volume populator's namespace, where the
	// source Secrets of images stored in claims go.
	PopulateNamespace string
	// ImageStorageClass is the class of image claims that name none;
	// empty means the cluster's default class.
	ImageStorageClass string
	// FilesystemOverhead is the fraction of a Filesystem claim left to the
	// file system (the populator's setting, same default): image claims
	// are sized so that disk.img holds the image.
	FilesystemOverhead float64
}

// Registry is what the reconciler needs of DVCR.
type Registry interface {
	// Stat returns the metadata and manifest digest of ref, or an error
	// matching client.ErrNotFound.
	Stat(ctx context.Context, ref string) (layout.Meta, string, error)
	// Copy makes dst the same image as src without moving data.
	Copy(ctx context.Context, src, dst string) (string, error)
	// Delete removes ref; a missing image is not an error.
	Delete(ctx context.Context, ref string) error
}

// TokenSource mints registry tokens.
type TokenSource interface {
	// PushToken returns a token allowing pull and push on repo only.
	PushToken(ctx context.Context, repo string, ttl time.Duration) (string, error)
}

func (c *Config) setDefaults() {
	if c.MaxAttempts <= 0 {
		c.MaxAttempts = 5
	}
	if c.RetryBackoff <= 0 {
		c.RetryBackoff = 10 * time.Second
	}
	if c.WorkerTokenTTL <= 0 {
		c.WorkerTokenTTL = 12 * time.Hour
	}
	if c.WorkerServiceAccount == "" {
		c.WorkerServiceAccount = "vimg-worker"
	}
	if c.UploadNamespace == "" {
		c.UploadNamespace = "vimg-uploads"
	}
	if c.UploadTimeout <= 0 {
		c.UploadTimeout = time.Hour
	}
	if c.TrustedCAConfigMap == "" {
		c.TrustedCAConfigMap = "vimg-trusted-ca"
	}
	if c.PopulateNamespace == "" {
		c.PopulateNamespace = "vimg-populate"
	}
	if c.FilesystemOverhead <= 0 {
		c.FilesystemOverhead = api.DefaultFilesystemOverhead
	}
	if c.WorkerImagePullPolicy == "" {
		c.WorkerImagePullPolicy = corev1.PullIfNotPresent
	}
}
