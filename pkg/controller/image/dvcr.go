package image

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"time"

	"vimg.dev/vimg/dvcr/auth"
	dvcrclient "vimg.dev/vimg/dvcr/client"
	"vimg.dev/vimg/dvcr/layout"
	"vimg.dev/vimg/pkg/version"
)

// DVCR is the registry as the controller uses it, with the admin
// credentials: it reads manifests, copies and deletes images, and mints
// narrowly scoped tokens for import pods, which never see the credentials.
type DVCR struct {
	client   *dvcrclient.Client
	http     *http.Client
	realm    string
	user     string
	password string
}

// NewDVCR connects to DVCR at address (host:port) over TLS trusting ca.
func NewDVCR(address, user, password string, ca []byte) (*DVCR, error) {
	c, err := dvcrclient.New(address, dvcrclient.Options{
		Username: user, Password: password, CABundle: ca,
		UserAgent: "vimg-controller/" + version.Version,
	})
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return nil, errors.New("the DVCR CA bundle holds no certificate")
	}
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	return &DVCR{
		client: c, http: &http.Client{Transport: t, Timeout: 30 * time.Second},
		realm: "https://" + address + "/auth/token", user: user, password: password,
	}, nil
}

// Stat implements Registry.
func (d *DVCR) Stat(ctx context.Context, ref string) (layout.Meta, string, error) {
	im, err := d.client.Open(ctx, ref)
	if err != nil {
		return layout.Meta{}, "", err
	}
	return im.Meta, im.Digest.String(), nil
}

// Copy implements Registry.
func (d *DVCR) Copy(ctx context.Context, src, dst string) (string, error) {
	p, err := d.client.Copy(ctx, src, dst)
	if err != nil {
		return "", err
	}
	return p.Digest.String(), nil
}

// Delete implements Registry.
func (d *DVCR) Delete(ctx context.Context, ref string) error {
	err := d.client.Delete(ctx, ref)
	if errors.Is(err, dvcrclient.ErrNotFound) {
		return nil
	}
	return err
}

// PushToken implements TokenSource.
func (d *DVCR) PushToken(ctx context.Context, repo string, ttl time.Duration) (string, error) {
	return d.token(ctx, repo, "pull,push", ttl)
}

// PullToken returns a token allowing only pull on repo, for pods that read
// one image (populate pods). The credentials behind d only need the pull
// role.
func (d *DVCR) PullToken(ctx context.Context, repo string, ttl time.Duration) (string, error) {
	return d.token(ctx, repo, "pull", ttl)
}

func (d *DVCR) token(ctx context.Context, repo, actions string, ttl time.Duration) (string, error) {
	t, err := auth.RequestToken(ctx, d.http, d.realm, d.user, d.password, []string{"repository:" + repo + ":" + actions}, ttl)
	if err != nil {
		return "", fmt.Errorf("requesting a %s token for %s: %w", actions, repo, err)
	}
	return t.Token, nil
}
