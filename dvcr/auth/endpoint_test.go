package auth

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	dauth "github.com/distribution/distribution/v3/registry/auth"
)

type countingObserver struct {
	mu       sync.Mutex
	issued   map[Role]int
	failures map[FailureReason]int
}

func (o *countingObserver) TokenIssued(r Role) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.issued == nil {
		o.issued = map[Role]int{}
	}
	o.issued[r]++
}

func (o *countingObserver) AuthFailed(r FailureReason) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.failures == nil {
		o.failures = map[FailureReason]int{}
	}
	o.failures[r]++
}

func newTokenServer(t *testing.T) (*httptest.Server, *TokenServer, *countingObserver) {
	obs := &countingObserver{}
	ts := &TokenServer{Users: testUsers(t), Keys: [][]byte{testKey(1)}, TTL: 5 * time.Minute, MaxTTL: 20 * time.Minute, Observer: obs,
		Now: func() time.Time { return t0 }}
	srv := httptest.NewServer(ts)
	t.Cleanup(srv.Close)
	return srv, ts, obs
}

func getToken(t *testing.T, srv *httptest.Server, user, pass, query string) (*http.Response, TokenResponse) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, srv.URL+TokenPath+"?"+query, nil)
	if user != "" {
		req.SetBasicAuth(user, pass)
	}
	resp, err := srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var tr TokenResponse
	if resp.StatusCode == http.StatusOK {
		if err := json.NewDecoder(resp.Body).Decode(&tr); err != nil {
			t.Fatal(err)
		}
	}
	return resp, tr
}

func TestTokenServer_GrantsTheRoleIntersection(t *testing.T) {
	srv, _, obs := newTokenServer(t)
	q := "service=dvcr&scope=repository:vi/ns/a:pull,push&scope=registry:catalog:*"

	resp, tr := getToken(t, srv, "node", "n0de", q)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %s", resp.Status)
	}
	if tr.Token == "" || tr.Token != tr.AccessToken || tr.ExpiresIn != 300 || tr.IssuedAt != "2026-01-02T03:04:05Z" {
		t.Errorf("response = %+v", tr)
	}
	c, err := Verify([][]byte{testKey(1)}, tr.Token, t0)
	if err != nil {
		t.Fatal(err)
	}
	if c.Subject != "node" || len(c.Access) != 1 || c.Access[0].String() != "repository:vi/ns/a:pull" {
		t.Errorf("pull user's token = %+v", c)
	}

	_, tr = getToken(t, srv, "controller", "s3cret", q)
	c, err = Verify([][]byte{testKey(1)}, tr.Token, t0)
	if err != nil {
		t.Fatal(err)
	}
	if !c.Allows(TypeRepository, "vi/ns/a", ActionPush) || !c.Allows(TypeRegistry, CatalogName, ActionAll) {
		t.Errorf("admin's token = %+v", c.Access)
	}
	if obs.issued[RoleAdmin] != 1 || obs.issued[RolePull] != 1 {
		t.Errorf("observed issues = %v", obs.issued)
	}
}

func TestTokenServer_ExpiresInIsCapped(t *testing.T) {
	srv, _, _ := newTokenServer(t)
	for q, want := range map[string]int64{"": 300, "expires_in=60": 60, "expires_in=3600": 1200} {
		_, tr := getToken(t, srv, "controller", "s3cret", q)
		c, err := Verify([][]byte{testKey(1)}, tr.Token, t0)
		if err != nil {
			t.Fatal(err)
		}
		if tr.ExpiresIn != want || c.ExpiresAt.Sub(t0) != time.Duration(want)*time.Second {
			t.Errorf("%q: expires_in %d, token lives %s; want %ds", q, tr.ExpiresIn, c.ExpiresAt.Sub(t0), want)
		}
	}
	for _, q := range []string{"expires_in=0", "expires_in=-5", "expires_in=soon"} {
		if resp, _ := getToken(t, srv, "controller", "s3cret", q); resp.StatusCode != http.StatusBadRequest {
			t.Errorf("%q: status %s, want 400", q, resp.Status)
		}
	}
}

func TestTokenServer_RefusesBadRequests(t *testing.T) {
	srv, _, obs := newTokenServer(t)
	cases := []struct {
		name, user, pass, query string
		want                    int
	}{
		{"wrong password", "controller", "guess", "scope=repository:a:pull", http.StatusUnauthorized},
		{"unknown user", "mallory", "s3cret", "", http.StatusUnauthorized},
		{"anonymous", "", "", "scope=repository:a:pull", http.StatusUnauthorized},
		{"other service", "controller", "s3cret", "service=harbor", http.StatusBadRequest},
		{"malformed scope", "controller", "s3cret", "scope=repository:a", http.StatusBadRequest},
		{"too many scopes", "controller", "s3cret", strings.Repeat("scope=repository:a:pull&", maxScopes+1), http.StatusBadRequest},
	}
	for _, c := range cases {
		resp, _ := getToken(t, srv, c.user, c.pass, c.query)
		if resp.StatusCode != c.want {
			t.Errorf("%s: status %s, want %d", c.name, resp.Status, c.want)
		}
		if c.want == http.StatusUnauthorized && !strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), "Basic ") {
			t.Errorf("%s: challenge %q", c.name, resp.Header.Get("WWW-Authenticate"))
		}
	}
	if obs.failures[ReasonBadCredentials] != 2 || obs.failures[ReasonNoCredentials] != 1 || len(obs.issued) != 0 {
		t.Errorf("observed failures %v, issued %v", obs.failures, obs.issued)
	}
}

func TestTokenServer_OAuth2PasswordGrant(t *testing.T) {
	srv, _, _ := newTokenServer(t)
	form := url.Values{"grant_type": {"password"}, "username": {"controller"}, "password": {"s3cret"},
		"service": {"dvcr"}, "scope": {"repository:vi/a:pull repository:vi/b:push"}, "client_id": {"containerd"}}
	resp, err := srv.Client().PostForm(srv.URL+TokenPath, form)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var tr TokenResponse
	if err := json.NewDecoder(resp.Body).Decode(&tr); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("status %s, decode %v", resp.Status, err)
	}
	c, err := Verify([][]byte{testKey(1)}, tr.AccessToken, t0)
	if err != nil {
		t.Fatal(err)
	}
	if !c.Allows(TypeRepository, "vi/a", ActionPull) || !c.Allows(TypeRepository, "vi/b", ActionPush) {
		t.Errorf("access = %v", c.Access)
	}
	form.Set("grant_type", "refresh_token")
	resp, err = srv.Client().PostForm(srv.URL+TokenPath, form)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Errorf("refresh_token grant: status %s, want 400", resp.Status)
	}
}

func TestRequestToken(t *testing.T) {
	srv, ts, _ := newTokenServer(t)
	ts.Now = nil // RequestToken computes expiry from the real clock
	before := time.Now()
	it, err := RequestToken(context.Background(), srv.Client(), srv.URL+TokenPath+"?service=dvcr", "node", "n0de",
		[]string{"repository:vi/ns/a:pull,push"}, 90*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c, err := Verify([][]byte{testKey(1)}, it.Token, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Access) != 1 || c.Access[0].String() != "repository:vi/ns/a:pull" {
		t.Errorf("access = %v", c.Access)
	}
	if it.ExpiresAt.Before(before.Add(89*time.Second)) || it.ExpiresAt.After(time.Now().Add(91*time.Second)) {
		t.Errorf("ExpiresAt = %s, want about 90s from now", it.ExpiresAt)
	}

	_, err = RequestToken(context.Background(), srv.Client(), srv.URL+TokenPath, "node", "wrong", nil, 0)
	if err == nil || !strings.Contains(err.Error(), "401") {
		t.Errorf("wrong password: err = %v, want a 401", err)
	}
	if err != nil && strings.Contains(err.Error(), "wrong") {
		t.Errorf("the error repeats the password: %v", err)
	}
}

func TestAccessController_Challenges(t *testing.T) {
	ac := &AccessController{Users: testUsers(t), Keys: [][]byte{testKey(1)}, Service: "dvcr", Now: func() time.Time { return t0 }}
	pullA := []dauth.Access{{Resource: dauth.Resource{Type: TypeRepository, Name: "vi/ns/a"}, Action: ActionPull}}
	pushA := []dauth.Access{pullA[0], {Resource: pullA[0].Resource, Action: ActionPush}}
	token := func(c Claims) string { return "Bearer " + mustMint(t, testKey(1), c) }
	basic := func(u, p string) string {
		r := httptest.NewRequest(http.MethodGet, "/", nil)
		r.SetBasicAuth(u, p)
		return r.Header.Get("Authorization")
	}
	expired := testClaims()
	expired.IssuedAt, expired.ExpiresAt = t0.Add(-time.Hour), t0.Add(-time.Minute)
	otherAudience := testClaims()
	otherAudience.Audience = "harbor"
	pullOnly := testClaims()
	pullOnly.Access = []ResourceActions{{Type: TypeRepository, Name: "vi/ns/a", Actions: []string{ActionPull}}}

	cases := []struct {
		name, authz string
		access      []dauth.Access
		wantErr     bool
		wantHeader  string
	}{
		{"token covers push", token(testClaims()), []dauth.Access{{Resource: dauth.Resource{Type: TypeRepository, Name: "vi/ns/disk"}, Action: ActionPush}}, false, ""},
		{"no credentials", "", pullA, true,
			`Bearer realm="http://dvcr.example/auth/token",service="dvcr",scope="repository:vi/ns/a:pull"`},
		{"token for another repository", token(testClaims()), pullA, true,
			`Bearer realm="http://dvcr.example/auth/token",service="dvcr",scope="repository:vi/ns/a:pull",error="insufficient_scope"`},
		{"pull token used to push", token(pullOnly), pushA, true,
			`Bearer realm="http://dvcr.example/auth/token",service="dvcr",scope="repository:vi/ns/a:pull,push",error="insufficient_scope"`},
		{"expired token", token(expired), pullA, true,
			`Bearer realm="http://dvcr.example/auth/token",service="dvcr",scope="repository:vi/ns/a:pull",error="invalid_token"`},
		{"garbage token", "Bearer xyz", pullA, true,
			`Bearer realm="http://dvcr.example/auth/token",service="dvcr",scope="repository:vi/ns/a:pull",error="invalid_token"`},
		{"token of another service", token(otherAudience), nil, true,
			`Bearer realm="http://dvcr.example/auth/token",service="dvcr",error="invalid_token"`},
		{"basic pull user pulls", basic("node", "n0de"), pullA, false, ""},
		{"basic pull user pushes", basic("node", "n0de"), pushA, true,
			`Bearer realm="http://dvcr.example/auth/token",service="dvcr",scope="repository:vi/ns/a:pull,push",error="insufficient_scope"`},
		{"basic wrong password", basic("node", "x"), pullA, true,
			`Bearer realm="http://dvcr.example/auth/token",service="dvcr",scope="repository:vi/ns/a:pull"`},
		{"basic admin catalog", basic("controller", "s3cret"),
			[]dauth.Access{{Resource: dauth.Resource{Type: TypeRegistry, Name: CatalogName}, Action: ActionAll}}, false, ""},
		{"unknown scheme", "Digest abc", pullA, true,
			`Bearer realm="http://dvcr.example/auth/token",service="dvcr",scope="repository:vi/ns/a:pull"`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := httptest.NewRequest(http.MethodGet, "http://dvcr.example/v2/", nil)
			if c.authz != "" {
				r.Header.Set("Authorization", c.authz)
			}
			g, err := ac.Authorized(r, c.access...)
			if !c.wantErr {
				if err != nil || g == nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			var ch dauth.Challenge
			if !errors.As(err, &ch) {
				t.Fatalf("err = %v (%T), want a challenge: distribution answers other errors with 400", err, err)
			}
			w := httptest.NewRecorder()
			ch.SetHeaders(r, w)
			if got := w.Header().Get("WWW-Authenticate"); got != c.wantHeader {
				t.Errorf("challenge\n got %s\nwant %s", got, c.wantHeader)
			}
			if c.authz != "" && strings.Contains(err.Error(), strings.TrimPrefix(c.authz, "Bearer ")) {
				t.Errorf("error message carries the credential: %v", err)
			}
		})
	}
}

func TestAccessController_ConfiguredRealm(t *testing.T) {
	ac, err := dauth.GetAccessController(ControllerName, Options(&AccessController{
		Users: testUsers(t), Keys: [][]byte{testKey(1)}, Realm: "https://dvcr.kube-system.svc/auth/token"}))
	if err != nil {
		t.Fatal(err)
	}
	r := httptest.NewRequest(http.MethodGet, "http://10.0.0.1:5000/v2/", nil)
	_, err = ac.Authorized(r)
	var ch dauth.Challenge
	if !errors.As(err, &ch) {
		t.Fatalf("err = %v", err)
	}
	w := httptest.NewRecorder()
	ch.SetHeaders(r, w)
	if got, want := w.Header().Get("WWW-Authenticate"), `Bearer realm="https://dvcr.kube-system.svc/auth/token",service="dvcr"`; got != want {
		t.Errorf("challenge %s, want %s", got, want)
	}
	if _, err := dauth.GetAccessController(ControllerName, map[string]any{}); err == nil {
		t.Error("options without a controller were accepted")
	}
}
