// Package populator fills PersistentVolumeClaims whose dataSourceRef names a
// VirtualImage or a ClusterVirtualImage with the image's disk.
//
// It follows the volume populator protocol: a "prime" claim of the same
// class, size and mode is made in the populator's namespace, a populate pod
// writes the disk onto it straight from DVCR (ranged reads, qcow2/vmdk/vdi
// converted on the fly, zero ranges skipped; no scratch volume), and its
// PersistentVolume is then rebound to the user's claim. VirtualImage claims
// run through lib-volume-populator; ClusterVirtualImage claims through
// cluster.go, because the library looks data sources up in the claim's
// namespace and so cannot find a cluster-scoped one.
//
// Everything the populator decides is derived from objects (the claim, the
// prime claim and its annotations, the pod), so a restart at any moment
// converges without a second copy.
package populator

import (
	"context"
	"time"

	corev1 "k8s.io/api/core/v1"

	"vimg.dev/vimg/dvcr/layout"
	"vimg.dev/vimg/pkg/worker/api"
)

// Names the populator gives its objects, annotations and events.
const (
	// Prefix is lib-volume-populator's prefix: its finalizer on user claims
	// is Prefix+"/populate-target-protection".
	Prefix = "vimg.dev"
	// Finalizer is the library's finalizer, which cluster.go uses too.
	Finalizer = Prefix + "/populate-target-protection"
	// AnnotationPopulatedFrom is set on a rebound PersistentVolume.
	AnnotationPopulatedFrom = Prefix + "/populated-from"

	// AnnotationProgress on the user's claim: "45.2%" while populating.
	AnnotationProgress = api.ClaimAnnotationProgress
	// AnnotationAttempts on the prime claim counts populate pods started.
	AnnotationAttempts = "vimg.dev/populate-attempts"
	// AnnotationRetryAt on the prime claim: no new pod before this time
	// (RFC 3339) after a transient failure.
	AnnotationRetryAt = "vimg.dev/populate-retry-at"
	// AnnotationFailed on the prime claim records a permanent failure
	// ("Reason: message"); nothing more is tried for that claim.
	AnnotationFailed = "vimg.dev/populate-failed"

	LabelClaimUID       = "vimg.dev/pvc-uid"
	LabelClaimNamespace = "vimg.dev/pvc-namespace"
	// LabelClaimName is set only when the claim's name fits a label value
	// (63 characters; a claim's name may have 253): it is for selecting by
	// hand. AnnotationClaimName always holds it, for the populator.
	LabelClaimName      = "vimg.dev/pvc-name"
	AnnotationClaimName = "vimg.dev/pvc-name"
	LabelComponent      = "app.kubernetes.io/component"
	componentPopulate   = "populate"

	// primePrefix is the library's name of prime claims: prime-<uid>.
	primePrefix = "prime-"

	// AnnotationCSIClone set to "true" on a StorageClass says its CSI
	// driver clones volumes: copies of an image stored in a claim of that
	// class are then clones of that claim (clone.go).
	AnnotationCSIClone = "vimg.dev/csi-clone"
	// AnnotationCloneSource on a prime claim and on its clone claim names
	// the claim cloned.
	AnnotationCloneSource = "vimg.dev/clone-source"
	// LabelCloneOf is the key of a clone's prime claim's selector, which
	// no volume matches.
	LabelCloneOf = "vimg.dev/clone-of"
	// AnnotationCloneFailed on a user's claim says why its clone was given
	// up for a streamed copy.
	AnnotationCloneFailed = "vimg.dev/clone-failed"
	// AnnotationClonedFrom is set on a cloned PersistentVolume:
	// "<namespace>/<claim>".
	AnnotationClonedFrom = "vimg.dev/cloned-from"
)

// Event reasons on user claims.
const (
	ReasonWaitingForImage = "WaitingForImage"
	// ReasonWaitingForStorageClass: a ClusterVirtualImage claim names a
	// class that does not exist (the library says nothing in that case).
	ReasonWaitingForStorageClass = "WaitingForStorageClass"
	ReasonImageNotUsable         = "ImageNotUsable"
	ReasonPopulating             = "Populating"
	ReasonPopulated              = "Populated"
	ReasonRetrying               = "PopulateRetrying"
	ReasonFailed                 = "PopulateFailed"
	ReasonCloneFailed            = "CloneFailed"
)

// Config is what the populator is given.
type Config struct {
	// Namespace holds prime claims, populate pods and their request
	// Secrets. Pods there run as root for Block volumes, so the namespace
	// admits the baseline Pod Security level and nothing else lives there.
	Namespace string
	// DVCRAddress is host:port of DVCR as pods reach it; image status
	// registryURLs start with it.
	DVCRAddress string
	DVCRCA      []byte
	Registry    Registry

	WorkerImage           string
	WorkerImagePullPolicy corev1.PullPolicy
	WorkerServiceAccount  string
	WorkerResources       corev1.ResourceRequirements
	// TokenTTL bounds how long a populate pod may read its image.
	TokenTTL time.Duration
	// FilesystemOverhead is the fraction of a Filesystem volume left to the
	// file system; disk.img gets the rest (KubeVirt's default is 0.055).
	FilesystemOverhead float64
	// MaxAttempts is how many populate pods are tried after transient
	// failures before the claim is given up.
	MaxAttempts int
	// MaxRetryDelay caps the backoff of claims waiting for something
	// (lib-volume-populator's default queue backs off to 1000 s).
	MaxRetryDelay time.Duration
	// CloneTimeout is how long a clone claim may stay unbound before the
	// copy is streamed instead.
	CloneTimeout time.Duration
}

// Registry is what the populator needs of DVCR.
type Registry interface {
	// Stat returns the metadata and manifest digest of ref.
	Stat(ctx context.Context, ref string) (layout.Meta, string, error)
	// PullToken returns a token allowing pull on repo only.
	PullToken(ctx context.Context, repo string, ttl time.Duration) (string, error)
}

func (c *Config) setDefaults() {
	if c.Namespace == "" {
		c.Namespace = "vimg-populate"
	}
	if c.WorkerServiceAccount == "" {
		c.WorkerServiceAccount = "vimg-worker"
	}
	if c.WorkerImagePullPolicy == "" {
		c.WorkerImagePullPolicy = corev1.PullIfNotPresent
	}
	if c.TokenTTL <= 0 {
		c.TokenTTL = 12 * time.Hour
	}
	if c.FilesystemOverhead <= 0 {
		c.FilesystemOverhead = api.DefaultFilesystemOverhead
	}
	if c.MaxAttempts <= 0 {
		c.MaxAttempts = 5
	}
	if c.MaxRetryDelay <= 0 {
		c.MaxRetryDelay = 30 * time.Second
	}
	if c.CloneTimeout <= 0 {
		c.CloneTimeout = 3 * time.Minute
	}
}
