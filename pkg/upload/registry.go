package upload

import (
	"context"
	"fmt"
	"io"
	"net/http"

	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"vimg.dev/vimg/dvcr/client"
	"vimg.dev/vimg/pkg/version"
)

// Registry opens blob upload sessions in DVCR, each with the push token of
// the image's repository. Errors of Resume match client.ErrUploadLost when
// the session cannot be continued.
type Registry interface {
	Start(ctx context.Context, token, repo string) (BlobSession, error)
	Resume(ctx context.Context, token, repo, location string, offset int64, hashState []byte) (BlobSession, error)
}

// BlobSession is an open blob upload: *client.BlobUpload.
type BlobSession interface {
	Append(ctx context.Context, r io.Reader) (int64, error)
	State() (location string, offset int64, hashState []byte)
	Commit(ctx context.Context) (v1.Descriptor, error)
	Cancel(ctx context.Context) error
}

// DVCR is the Registry of the DVCR at one address. Clients of every token
// share one transport, so connections are reused across uploads.
type DVCR struct {
	address   string
	transport http.RoundTripper
}

// NewDVCR returns the Registry of the DVCR at address (host:port, over
// TLS), trusting caBundle (PEM) besides the system's CAs.
func NewDVCR(address string, caBundle []byte) (*DVCR, error) {
	t, err := client.NewTransport(caBundle, false)
	if err != nil {
		return nil, fmt.Errorf("DVCR: %w", err)
	}
	return &DVCR{address: address, transport: t}, nil
}

func (d *DVCR) client(token string) (*client.Client, error) {
	c, err := client.New(d.address, client.Options{Token: token, Transport: d.transport, UserAgent: "vimg-upload-gateway/" + version.Version})
	if err != nil {
		return nil, fmt.Errorf("DVCR client: %w", err)
	}
	return c, nil
}

// Start implements Registry.
func (d *DVCR) Start(ctx context.Context, token, repo string) (BlobSession, error) {
	c, err := d.client(token)
	if err != nil {
		return nil, err
	}
	b, err := c.StartBlobUpload(ctx, repo)
	if err != nil {
		return nil, err // not a typed nil in an interface
	}
	return b, nil
}

// Resume implements Registry.
func (d *DVCR) Resume(ctx context.Context, token, repo, location string, offset int64, hashState []byte) (BlobSession, error) {
	c, err := d.client(token)
	if err != nil {
		return nil, err
	}
	b, err := c.ResumeBlobUpload(ctx, repo, location, offset, hashState)
	if err != nil {
		return nil, err
	}
	return b, nil
}
