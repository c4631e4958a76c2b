package auth

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	dauth "github.com/distribution/distribution/v3/registry/auth"
	"k8s.io/klog/v2"
)

// ControllerName is the name the access controller is registered under in
// distribution's auth registry. Its options carry the controller itself
// (see Options), because DVCR builds distribution's configuration in Go.
const ControllerName = "vimg"

const optionController = "controller"

func init() {
	if err := dauth.Register(ControllerName, fromOptions); err != nil {
		panic(err)
	}
}

func fromOptions(options map[string]any) (dauth.AccessController, error) {
	c, ok := options[optionController].(*AccessController)
	if !ok || c == nil {
		return nil, fmt.Errorf("auth %q: options must carry the *AccessController under %q", ControllerName, optionController)
	}
	if c.Users == nil || len(c.Keys) == 0 {
		return nil, fmt.Errorf("auth %q: the access controller needs users and token keys", ControllerName)
	}
	return c, nil
}

// Options returns the distribution auth parameters that select c:
// configuration.Auth{ControllerName: Options(c)}.
func Options(c *AccessController) map[string]any {
	return map[string]any{optionController: c}
}

// AccessController decides every registry request. A request must carry
// either "Authorization: Bearer <token>" with a token from the token endpoint
// whose access list covers what the request does, or "Authorization: Basic"
// with a configured user whose role covers it (so a pull-only node
// credential works without the token round trip).
//
// Otherwise distribution answers 401 with a challenge
//
//	WWW-Authenticate: Bearer realm="<realm>",service="<service>",scope="repository:vi/ns/x:pull"
//
// plus error="invalid_token" for a bad or expired token and
// error="insufficient_scope" for a valid credential that lacks the access.
// Both are 401 because distribution turns any error that is not a challenge
// into a bare 400.
type AccessController struct {
	Users *Users
	// Keys verify tokens (all of them, for rotation).
	Keys [][]byte
	// Service is the expected token audience, "dvcr" by default.
	Service string
	// Realm is the token endpoint's external URL. When empty it is derived
	// from each request's scheme and Host.
	Realm    string
	Observer Observer
	Now      func() time.Time
}

var _ dauth.AccessController = (*AccessController)(nil)

// Authorized implements distribution's auth.AccessController.
func (c *AccessController) Authorized(r *http.Request, access ...dauth.Access) (*dauth.Grant, error) {
	obs := c.Observer
	if obs == nil {
		obs = nopObserver{}
	}
	ch := &Challenge{Realm: c.Realm, Service: c.service(), Scope: challengeScope(access)}

	authz := r.Header.Get("Authorization")
	scheme, cred, _ := strings.Cut(authz, " ")
	switch {
	case authz == "":
		obs.AuthFailed(ReasonNoCredentials)
		ch.err = errors.New("no credentials")
		return nil, ch

	case strings.EqualFold(scheme, "Bearer"):
		now := time.Now()
		if c.Now != nil {
			now = c.Now()
		}
		claims, err := Verify(c.Keys, strings.TrimSpace(cred), now)
		if err == nil && claims.Audience != c.service() {
			err = fmt.Errorf("%w: audience %q is not this service", ErrTokenInvalid, clip(claims.Audience))
		}
		if err != nil {
			reason := ReasonInvalidToken
			if errors.Is(err, ErrTokenExpired) {
				reason = ReasonExpiredToken
			}
			obs.AuthFailed(reason)
			ch.Code, ch.err = "invalid_token", err
			return nil, ch
		}
		for _, a := range access {
			if !claims.Allows(a.Type, a.Name, a.Action) {
				obs.AuthFailed(ReasonInsufficientScope)
				ch.Code = "insufficient_scope"
				ch.err = fmt.Errorf("token of %q does not grant %s on %s %s", clip(claims.Subject), a.Action, a.Type, a.Name)
				return nil, ch
			}
		}
		return grant(claims.Subject, access), nil

	case strings.EqualFold(scheme, "Basic"):
		user, password, ok := r.BasicAuth()
		if !ok {
			obs.AuthFailed(ReasonBadCredentials)
			ch.err = errors.New("malformed basic credentials")
			return nil, ch
		}
		role, err := c.Users.Authenticate(user, password)
		if err != nil {
			obs.AuthFailed(ReasonBadCredentials)
			klog.FromContext(r.Context()).V(2).Info("Registry request with bad credentials", "user", clip(user), "remote", r.RemoteAddr)
			ch.err = err
			return nil, ch
		}
		for _, a := range access {
			if !role.Permits(a.Type, a.Name, a.Action) {
				obs.AuthFailed(ReasonInsufficientScope)
				ch.Code = "insufficient_scope"
				ch.err = fmt.Errorf("user %q (role %s) may not %s on %s %s", clip(user), role, a.Action, a.Type, a.Name)
				return nil, ch
			}
		}
		return grant(user, access), nil

	default:
		obs.AuthFailed(ReasonBadCredentials)
		ch.err = errors.New("unsupported authorization scheme")
		return nil, ch
	}
}

func (c *AccessController) service() string {
	if c.Service == "" {
		return DefaultService
	}
	return c.Service
}

func grant(subject string, access []dauth.Access) *dauth.Grant {
	g := &dauth.Grant{User: dauth.UserInfo{Name: subject}}
	for _, a := range access {
		g.Resources = append(g.Resources, a.Resource)
	}
	return g
}

// challengeScope renders what the request needs in scope syntax, merging
// actions on the same resource ("repository:a:pull,push").
func challengeScope(access []dauth.Access) string {
	var scopes []ResourceActions
	for _, a := range access {
		found := false
		for i := range scopes {
			if scopes[i].Type == a.Type && scopes[i].Name == a.Name {
				scopes[i].Actions = append(scopes[i].Actions, a.Action)
				found = true
			}
		}
		if !found {
			scopes = append(scopes, ResourceActions{Type: a.Type, Name: a.Name, Actions: []string{a.Action}})
		}
	}
	parts := make([]string, len(scopes))
	for i, s := range scopes {
		parts[i] = s.String()
	}
	return strings.Join(parts, " ")
}

// Challenge is the error the access controller returns; distribution writes
// its header and a 401.
type Challenge struct {
	Realm, Service, Scope string
	// Code is "", "invalid_token" or "insufficient_scope".
	Code string
	err  error
}

var _ dauth.Challenge = (*Challenge)(nil)

// Error says why access was refused. It never contains a credential.
func (c *Challenge) Error() string {
	if c.err == nil {
		return "authentication required"
	}
	return c.err.Error()
}

// Unwrap gives the underlying reason (ErrTokenExpired, ErrBadCredentials, ...).
func (c *Challenge) Unwrap() error { return c.err }

// SetHeaders implements distribution's auth.Challenge.
func (c *Challenge) SetHeaders(r *http.Request, w http.ResponseWriter) {
	realm := c.Realm
	if realm == "" {
		realm = RealmFromRequest(r)
	}
	h := fmt.Sprintf("Bearer realm=%q,service=%q", realm, c.Service)
	if c.Scope != "" {
		h += fmt.Sprintf(",scope=%q", c.Scope)
	}
	if c.Code != "" {
		h += fmt.Sprintf(",error=%q", c.Code)
	}
	w.Header().Add("WWW-Authenticate", h)
}

// RealmFromRequest is the token endpoint URL on the host and scheme the
// request came in on.
func RealmFromRequest(r *http.Request) string {
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	return scheme + "://" + r.Host + TokenPath
}
