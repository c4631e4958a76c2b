package auth

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"time"
)

// IssuedToken is a token from the token endpoint.
type IssuedToken struct {
	Token     string
	ExpiresAt time.Time
}

// maxTokenResponse bounds the token endpoint's answer before decoding.
const maxTokenResponse = 1 << 20

// RequestToken asks the token endpoint at realmURL (e.g.
// "https://dvcr.example/auth/token", query parameters such as service are
// kept) for a token with scopes (e.g. "repository:vi/ns/x:pull,push") and
// lifetime ttl (0: the server's default; the server caps it), authenticating
// as user. The token may grant less than asked for; the caller decides
// whether that is enough by what the registry then allows.
func RequestToken(ctx context.Context, client *http.Client, realmURL, user, password string, scopes []string, ttl time.Duration) (IssuedToken, error) {
	if client == nil {
		client = http.DefaultClient
	}
	u, err := url.Parse(realmURL)
	if err != nil {
		return IssuedToken{}, fmt.Errorf("parsing token realm URL: %w", err)
	}
	q := u.Query()
	for _, s := range scopes {
		q.Add("scope", s)
	}
	if ttl > 0 {
		q.Set("expires_in", strconv.FormatInt(int64((ttl+time.Second-1)/time.Second), 10))
	}
	u.RawQuery = q.Encode()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return IssuedToken{}, fmt.Errorf("building token request: %w", err)
	}
	req.SetBasicAuth(user, password)
	start := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		return IssuedToken{}, fmt.Errorf("requesting token from %s: %w", u.Redacted(), err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxTokenResponse+1))
	if err != nil {
		return IssuedToken{}, fmt.Errorf("reading token response from %s: %w", u.Redacted(), err)
	}
	if len(body) > maxTokenResponse {
		return IssuedToken{}, fmt.Errorf("token response from %s is larger than %d bytes", u.Redacted(), maxTokenResponse)
	}
	if resp.StatusCode != http.StatusOK {
		var e struct {
			Error       string `json:"error"`
			Description string `json:"error_description"`
		}
		_ = json.Unmarshal(body, &e)
		return IssuedToken{}, fmt.Errorf("token request to %s: %s: %s %s", u.Redacted(), resp.Status, e.Error, clip(e.Description))
	}
	var tr TokenResponse
	if err := json.Unmarshal(body, &tr); err != nil {
		return IssuedToken{}, fmt.Errorf("decoding token response from %s: %w", u.Redacted(), err)
	}
	tok := tr.Token
	if tok == "" {
		tok = tr.AccessToken
	}
	if tok == "" {
		return IssuedToken{}, errors.New("token response has no token")
	}
	// The lifetime counts from when we asked, not from the server's
	// issued_at, so that clock skew between us and the server cannot make
	// the token look fresher than it is.
	expires := start.Add(time.Duration(tr.ExpiresIn) * time.Second)
	if tr.ExpiresIn <= 0 {
		expires = start.Add(60 * time.Second) // the token specification's default
	}
	return IssuedToken{Token: tok, ExpiresAt: expires}, nil
}
