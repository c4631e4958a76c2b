package client

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"

	v1 "vimg.dev/vimg/pkg/apis/virtualization/v1alpha2"
)

// Source is what to upload: a file (File and Size) or a stream, which
// cannot be resumed.
type Source struct {
	Name   string
	File   io.ReaderAt
	Size   int64
	Stream io.Reader
}

// Options of Upload.
type Options struct {
	Images Images
	Sender *Sender
	Image  ImageRef
	// Create creates the image when it is missing.
	Create bool
	// InCluster uploads to the in-cluster URL instead of the external one.
	InCluster bool
	// PollInterval is how often the image is read while waiting (default
	// 2 s).
	PollInterval time.Duration
	// Log, when set, receives what happens, for the user.
	Log func(msg string)
	// Importing, when set, is called while the uploaded image is imported,
	// with its status.progress.
	Importing func(progress string)
}

// Outcome is what Upload did.
type Outcome struct {
	// Uploaded is nil when the image held a complete upload already.
	Uploaded *Result
	Image    *Image
}

func (o *Options) log(format string, args ...any) {
	if o.Log != nil {
		o.Log(fmt.Sprintf(format, args...))
	}
}

// Upload makes sure the image exists and waits for an upload (Create),
// waits for its upload URL, sends src and waits for the image to be Ready.
// A Failed image is an error with the image's own message.
func Upload(ctx context.Context, o Options, src Source) (*Outcome, error) {
	if o.PollInterval <= 0 {
		o.PollInterval = 2 * time.Second
	}
	ref := o.Image
	im, err := o.Images.Get(ctx, ref)
	if apierrors.IsNotFound(err) {
		if !o.Create {
			return nil, fmt.Errorf("%s not found: create it with dataSource type Upload, or pass --create", ref)
		}
		o.log("Creating %s", ref)
		if err := o.Images.CreateForUpload(ctx, ref); err != nil {
			return nil, err
		}
		im, err = o.Images.Get(ctx, ref)
	}
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", ref, err)
	}
	if im.DataSourceType != v1.DataSourceTypeUpload {
		return nil, fmt.Errorf("%s has dataSource type %s, not Upload: nothing can be uploaded to it", ref, im.DataSourceType)
	}
	url, err := waitForURL(ctx, &o, im, src.Name)
	out := &Outcome{}
	switch {
	case errors.Is(err, errUploaded):
		o.log("%s already holds a complete upload; waiting for its import", ref)
	case err != nil:
		return nil, err
	default:
		o.log("Uploading %s to %s", src.Name, ref)
		var res Result
		if src.File != nil {
			res, err = o.Sender.SendFile(ctx, url, src.File, src.Size)
		} else {
			res, err = o.Sender.SendStream(ctx, url, src.Stream)
		}
		if err != nil {
			return nil, fmt.Errorf("uploading %s: %w", src.Name, err)
		}
		out.Uploaded = &res
		o.log("Uploaded %d bytes (%s); waiting for the import", res.Size, res.Digest)
	}
	if out.Image, err = waitForReady(ctx, &o, im.UID); err != nil {
		return nil, err
	}
	return out, nil
}

var errUploaded = errors.New("the image holds a complete upload")

// get reads the image again and checks that it is still the same object.
func get(ctx context.Context, o *Options, uid string) (*Image, error) {
	im, err := o.Images.Get(ctx, o.Image)
	if apierrors.IsNotFound(err) {
		return nil, fmt.Errorf("%s was deleted", o.Image)
	}
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", o.Image, err)
	}
	if im.UID != uid {
		return nil, fmt.Errorf("%s was deleted and created again meanwhile", o.Image)
	}
	return im, nil
}

func sleep(ctx context.Context, d time.Duration, waitingFor string) error {
	select {
	case <-ctx.Done():
		return fmt.Errorf("waiting for %s: %w", waitingFor, ctx.Err())
	case <-time.After(d):
		return nil
	}
}

func failed(ref ImageRef, im *Image) error {
	if c := im.Ready(); c != nil && c.Message != "" {
		return fmt.Errorf("%s failed: %s: %s", ref, c.Reason, c.Message)
	}
	return fmt.Errorf("%s failed", ref)
}

// waitForURL waits until the image waits for an upload and shows the URL
// to use.
func waitForURL(ctx context.Context, o *Options, im *Image, file string) (string, error) {
	ref, uid := o.Image, im.UID
	said := false
	for {
		switch im.Phase {
		case v1.ImagePhaseReady:
			return "", fmt.Errorf("%s is Ready with an earlier upload: to upload %s, delete the image and create it again", ref, file)
		case v1.ImagePhaseProvisioning:
			return "", errUploaded
		case v1.ImagePhaseFailed:
			return "", failed(ref, im)
		case v1.ImagePhaseTerminating:
			return "", fmt.Errorf("%s is being deleted", ref)
		case v1.ImagePhaseWaitForUserUpload:
			if u := im.Status.ImageUploadURLs; u != nil {
				switch {
				case o.InCluster && u.InCluster != "":
					return u.InCluster, nil
				case !o.InCluster && u.External != "":
					return u.External, nil
				case !o.InCluster && u.InCluster != "":
					return "", fmt.Errorf("%s has no external upload URL (the cluster publishes none: see the controller's --upload-external-url); "+
						"from inside the cluster, use --in-cluster-url", ref)
				}
			}
		}
		if !said {
			o.log("Waiting for %s to accept an upload (phase %q)", ref, im.Phase)
			said = true
		}
		if err := sleep(ctx, o.PollInterval, "the upload URL of "+ref.String()); err != nil {
			return "", err
		}
		var err error
		if im, err = get(ctx, o, uid); err != nil {
			return "", err
		}
	}
}

// waitForReady waits for the import of the upload.
func waitForReady(ctx context.Context, o *Options, uid string) (*Image, error) {
	for {
		im, err := get(ctx, o, uid)
		if err != nil {
			return nil, err
		}
		switch im.Phase {
		case v1.ImagePhaseReady:
			return im, nil
		case v1.ImagePhaseFailed:
			return nil, failed(o.Image, im)
		case v1.ImagePhaseTerminating:
			return nil, fmt.Errorf("%s is being deleted", o.Image)
		case v1.ImagePhaseProvisioning:
			if o.Importing != nil {
				o.Importing(im.Status.Progress)
			}
		}
		if err := sleep(ctx, o.PollInterval, o.Image.String()+" to be Ready"); err != nil {
			return nil, err
		}
	}
}
