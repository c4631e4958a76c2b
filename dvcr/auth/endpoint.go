package auth

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"k8s.io/klog/v2"
)

// TokenPath is where the token endpoint is served.
const TokenPath = "/auth/token"

// FailureReason is the bounded label of an authentication failure.
type FailureReason string

const (
	ReasonNoCredentials     FailureReason = "no_credentials"
	ReasonBadCredentials    FailureReason = "bad_credentials"
	ReasonInvalidToken      FailureReason = "invalid_token"
	ReasonExpiredToken      FailureReason = "expired_token"
	ReasonInsufficientScope FailureReason = "insufficient_scope"
	ReasonBadRequest        FailureReason = "bad_request"
)

// Observer is told about issued tokens and failed authentications, for
// metrics. Implementations must be safe for concurrent use.
type Observer interface {
	TokenIssued(role Role)
	AuthFailed(reason FailureReason)
}

type nopObserver struct{}

func (nopObserver) TokenIssued(Role)         {}
func (nopObserver) AuthFailed(FailureReason) {}

// TokenServer is the Docker/OCI token endpoint: GET /auth/token with HTTP
// Basic credentials and query parameters
//
//	service=<name>            optional; if present it must be our service
//	scope=<scope>             repeated, or several scopes separated by spaces
//	expires_in=<seconds>      optional; capped at MaxTTL
//
// answers 200 with {"token","access_token","expires_in","issued_at"} whose
// access list is the requested scopes intersected with the user's role (see
// Grant), or 401 for missing or bad credentials. The OAuth2 form
// (POST grant_type=password with username, password, scope, service) is
// answered the same way, for clients that try it first.
type TokenServer struct {
	Users *Users
	// Keys[0] signs.
	Keys [][]byte
	// Service is the token audience, "dvcr" by default.
	Service string
	// TTL is the default token lifetime; MaxTTL caps expires_in.
	TTL, MaxTTL time.Duration
	Observer    Observer
	// Now is the clock; time.Now when nil.
	Now func() time.Time
}

// TokenResponse is the token endpoint's answer.
type TokenResponse struct {
	Token       string `json:"token"`
	AccessToken string `json:"access_token"`
	ExpiresIn   int64  `json:"expires_in"`
	IssuedAt    string `json:"issued_at"`
}

// maxTokenForm bounds an OAuth2 POST body before it is parsed.
const maxTokenForm = 64 << 10

func (s *TokenServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	obs := s.Observer
	if obs == nil {
		obs = nopObserver{}
	}
	logger := klog.FromContext(r.Context()).WithValues("remote", r.RemoteAddr)

	var user, password string
	var scopes []string
	var haveCreds bool
	switch r.Method {
	case http.MethodGet:
		user, password, haveCreds = r.BasicAuth()
		scopes = r.URL.Query()["scope"]
	case http.MethodPost:
		r.Body = http.MaxBytesReader(w, r.Body, maxTokenForm)
		if err := r.ParseForm(); err != nil {
			obs.AuthFailed(ReasonBadRequest)
			tokenError(w, http.StatusBadRequest, "invalid_request", "unreadable form")
			return
		}
		if gt := r.PostForm.Get("grant_type"); gt != "password" {
			obs.AuthFailed(ReasonBadRequest)
			tokenError(w, http.StatusBadRequest, "unsupported_grant_type", "only grant_type=password is supported")
			return
		}
		user, password = r.PostForm.Get("username"), r.PostForm.Get("password")
		haveCreds = user != ""
		scopes = r.PostForm["scope"]
	default:
		w.Header().Set("Allow", "GET, POST")
		tokenError(w, http.StatusMethodNotAllowed, "invalid_request", "use GET or POST")
		return
	}

	service := s.Service
	if service == "" {
		service = DefaultService
	}
	if svc := r.FormValue("service"); svc != "" && svc != service {
		obs.AuthFailed(ReasonBadRequest)
		tokenError(w, http.StatusBadRequest, "invalid_request", fmt.Sprintf("this is service %q", service))
		return
	}
	ttl, err := s.ttl(r.FormValue("expires_in"))
	if err != nil {
		obs.AuthFailed(ReasonBadRequest)
		tokenError(w, http.StatusBadRequest, "invalid_request", err.Error())
		return
	}
	requested, err := parseScopes(scopes)
	if err != nil {
		obs.AuthFailed(ReasonBadRequest)
		tokenError(w, http.StatusBadRequest, "invalid_scope", err.Error())
		return
	}

	if !haveCreds {
		obs.AuthFailed(ReasonNoCredentials)
		w.Header().Set("WWW-Authenticate", `Basic realm="`+service+`"`)
		tokenError(w, http.StatusUnauthorized, "invalid_client", "credentials required")
		return
	}
	role, err := s.Users.Authenticate(user, password)
	if err != nil {
		obs.AuthFailed(ReasonBadCredentials)
		logger.V(2).Info("Token request with bad credentials", "user", clip(user))
		w.Header().Set("WWW-Authenticate", `Basic realm="`+service+`"`)
		tokenError(w, http.StatusUnauthorized, "invalid_client", "invalid username or password")
		return
	}

	now := time.Now()
	if s.Now != nil {
		now = s.Now()
	}
	if len(s.Keys) == 0 {
		logger.Error(nil, "Token endpoint has no signing key")
		tokenError(w, http.StatusInternalServerError, "server_error", "cannot issue a token")
		return
	}
	granted := Grant(role, requested)
	tok, err := Mint(s.Keys[0], Claims{
		Subject:   user,
		Audience:  service,
		IssuedAt:  now,
		ExpiresAt: now.Add(ttl),
		Access:    granted,
	})
	if err != nil {
		logger.Error(err, "Minting token")
		tokenError(w, http.StatusInternalServerError, "server_error", "cannot issue a token")
		return
	}
	obs.TokenIssued(role)
	logger.V(4).Info("Issued token", "user", user, "role", role, "access", granted, "ttl", ttl)

	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("Pragma", "no-cache")
	_ = json.NewEncoder(w).Encode(TokenResponse{
		Token:       tok,
		AccessToken: tok,
		ExpiresIn:   int64(ttl / time.Second),
		IssuedAt:    now.UTC().Format(time.RFC3339),
	})
}

// DefaultService is the service name (token audience) when none is configured.
const DefaultService = "dvcr"

// DefaultTTL and DefaultMaxTTL are the token lifetimes when none are configured.
const (
	DefaultTTL    = 5 * time.Minute
	DefaultMaxTTL = time.Hour
)

func (s *TokenServer) ttl(param string) (time.Duration, error) {
	ttl, maxTTL := s.TTL, s.MaxTTL
	if ttl <= 0 {
		ttl = DefaultTTL
	}
	if maxTTL <= 0 {
		maxTTL = DefaultMaxTTL
	}
	if param != "" {
		secs, err := strconv.ParseInt(param, 10, 64)
		if err != nil || secs <= 0 {
			return 0, errors.New("expires_in must be a positive number of seconds")
		}
		if secs > int64(maxTTL/time.Second) {
			return maxTTL, nil
		}
		ttl = time.Duration(secs) * time.Second
	}
	return min(ttl, maxTTL), nil
}

func parseScopes(values []string) ([]ResourceActions, error) {
	var out []ResourceActions
	for _, v := range values {
		for s := range strings.FieldsSeq(v) {
			if len(out) == maxScopes {
				return nil, fmt.Errorf("more than %d scopes", maxScopes)
			}
			ra, err := ParseScope(s)
			if err != nil {
				return nil, err
			}
			out = append(out, ra)
		}
	}
	return out, nil
}

func tokenError(w http.ResponseWriter, status int, code, desc string) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]string{"error": code, "error_description": desc})
}

// clip bounds a client-supplied value before it is logged.
func clip(s string) string {
	const n = 64
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}
