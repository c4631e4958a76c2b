package server_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"golang.org/x/crypto/bcrypt"
	"k8s.io/klog/v2"

	"vimg.dev/vimg/dvcr/auth"
	"vimg.dev/vimg/dvcr/server"
)

const (
	adminUser, adminPass = "controller", "s3cret-admin"
	pullUser, pullPass   = "node", "s3cret-node"
)

var testKey = bytes.Repeat([]byte("k"), 32)

func testUsers(t testing.TB) *auth.Users {
	t.Helper()
	h := func(p string) string {
		b, err := bcrypt.GenerateFromPassword([]byte(p), bcrypt.MinCost)
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	u, err := auth.ParseUsers(strings.NewReader("admin:" + adminUser + ":" + h(adminPass) + "\npull:" + pullUser + ":" + h(pullPass) + "\n"))
	if err != nil {
		t.Fatal(err)
	}
	return u
}

type fixture struct {
	ts   *httptest.Server
	host string
}

func newFixture(t *testing.T, edit func(*server.Config)) *fixture {
	t.Helper()
	cfg := server.Config{
		Storage:   server.Storage{RootDirectory: t.TempDir()},
		Users:     testUsers(t),
		TokenKeys: [][]byte{testKey},
	}
	if edit != nil {
		edit(&cfg)
	}
	s, err := server.New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	ts := httptest.NewTLSServer(s.Handler())
	t.Cleanup(ts.Close)
	return &fixture{ts: ts, host: strings.TrimPrefix(ts.URL, "https://")}
}

func (f *fixture) ref(t *testing.T, repo string) name.Reference {
	t.Helper()
	r, err := name.ParseReference(f.host + "/" + repo)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func (f *fixture) opts(user, pass string) []remote.Option {
	a := authn.Anonymous
	if user != "" {
		a = &authn.Basic{Username: user, Password: pass}
	}
	return []remote.Option{remote.WithTransport(f.ts.Client().Transport), remote.WithAuth(a)}
}

func (f *fixture) push(t *testing.T, repo, user, pass string) v1.Image {
	t.Helper()
	img, err := random.Image(4096, 2)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(f.ref(t, repo), img, f.opts(user, pass)...); err != nil {
		t.Fatalf("pushing %s as %s: %v", repo, user, err)
	}
	return img
}

// token asks the token endpoint as user for scopes.
func (f *fixture) token(t *testing.T, user, pass string, scopes ...string) string {
	t.Helper()
	it, err := auth.RequestToken(context.Background(), f.ts.Client(), f.ts.URL+auth.TokenPath+"?service=dvcr", user, pass, scopes, 0)
	if err != nil {
		t.Fatal(err)
	}
	return it.Token
}

// do sends a raw request with the given Authorization header value.
func (f *fixture) do(t *testing.T, method, path, authz string) *http.Response {
	t.Helper()
	req, err := http.NewRequest(method, f.ts.URL+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if authz != "" {
		req.Header.Set("Authorization", authz)
	}
	resp, err := f.ts.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp
}

func statusOf(err error) int {
	var te *transport.Error
	if errors.As(err, &te) {
		return te.StatusCode
	}
	return 0
}

func sameDigest(t *testing.T, a, b v1.Image) {
	t.Helper()
	da, err := a.Digest()
	if err != nil {
		t.Fatal(err)
	}
	db, err := b.Digest()
	if err != nil {
		t.Fatal(err)
	}
	if da != db {
		t.Errorf("pulled %s, pushed %s", db, da)
	}
}

func TestServer_AdminPushesAndPullsThroughTheTokenFlow(t *testing.T) {
	f := newFixture(t, nil)
	pushed := f.push(t, "vi/ns/disk:uid-1", adminUser, adminPass)

	pulled, err := remote.Image(f.ref(t, "vi/ns/disk:uid-1"), f.opts(adminUser, adminPass)...)
	if err != nil {
		t.Fatal(err)
	}
	sameDigest(t, pushed, pulled)
	layers, err := pulled.Layers()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range layers {
		rc, err := l.Compressed()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.Copy(io.Discard, rc); err != nil {
			t.Fatalf("reading a layer: %v", err) // the digest is verified at EOF
		}
		rc.Close()
	}

	// Manifests are deleted by digest.
	d, _ := pushed.Digest()
	if err := remote.Delete(f.ref(t, "vi/ns/disk@"+d.String()), f.opts(adminUser, adminPass)...); err != nil {
		t.Fatalf("deleting the manifest: %v", err)
	}
	if _, err := remote.Image(f.ref(t, "vi/ns/disk:uid-1"), f.opts(adminUser, adminPass)...); statusOf(err) != http.StatusNotFound {
		t.Errorf("after delete: err = %v, want 404", err)
	}
}

func TestServer_PullUserPullsButCannotPushOrDelete(t *testing.T) {
	f := newFixture(t, nil)
	pushed := f.push(t, "cvi/ubuntu:uid-2", adminUser, adminPass)

	pulled, err := remote.Image(f.ref(t, "cvi/ubuntu:uid-2"), f.opts(pullUser, pullPass)...)
	if err != nil {
		t.Fatalf("pull user pulling: %v", err)
	}
	sameDigest(t, pushed, pulled)

	img, err := random.Image(1024, 1)
	if err != nil {
		t.Fatal(err)
	}
	err = remote.Write(f.ref(t, "cvi/ubuntu:evil"), img, f.opts(pullUser, pullPass)...)
	if s := statusOf(err); s != http.StatusUnauthorized && s != http.StatusForbidden {
		t.Errorf("pull user pushing: err = %v, want 401/403", err)
	}
	d, _ := pushed.Digest()
	err = remote.Delete(f.ref(t, "cvi/ubuntu@"+d.String()), f.opts(pullUser, pullPass)...)
	if s := statusOf(err); s != http.StatusUnauthorized && s != http.StatusForbidden {
		t.Errorf("pull user deleting: err = %v, want 401/403", err)
	}
	if _, err := remote.Image(f.ref(t, "cvi/ubuntu:uid-2"), f.opts(adminUser, adminPass)...); err != nil {
		t.Errorf("the image is gone after the pull user's attempts: %v", err)
	}
}

func TestServer_AnonymousGetsAChallenge(t *testing.T) {
	f := newFixture(t, nil)
	f.push(t, "vi/ns/disk:t", adminUser, adminPass)

	resp := f.do(t, http.MethodGet, "/v2/vi/ns/disk/manifests/t", "")
	want := fmt.Sprintf(`Bearer realm="%s/auth/token",service="dvcr",scope="repository:vi/ns/disk:pull"`, f.ts.URL)
	if resp.StatusCode != http.StatusUnauthorized || resp.Header.Get("WWW-Authenticate") != want {
		t.Errorf("status %s, challenge %q; want 401 and %q", resp.Status, resp.Header.Get("WWW-Authenticate"), want)
	}
	if resp := f.do(t, http.MethodGet, "/v2/", ""); resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("/v2/ anonymously: %s, want 401", resp.Status)
	}
	if _, err := remote.Image(f.ref(t, "vi/ns/disk:t"), f.opts("", "")...); statusOf(err) != http.StatusUnauthorized {
		t.Errorf("anonymous pull: err = %v, want 401", err)
	}
}

func TestServer_TokenForOneRepositoryCannotReadAnother(t *testing.T) {
	f := newFixture(t, nil)
	f.push(t, "vi/ns/a:t", adminUser, adminPass)
	f.push(t, "vi/ns/b:t", adminUser, adminPass)
	tok := f.token(t, adminUser, adminPass, "repository:vi/ns/a:pull")

	if resp := f.do(t, http.MethodGet, "/v2/vi/ns/a/manifests/t", "Bearer "+tok); resp.StatusCode != http.StatusOK {
		t.Fatalf("repository a with its token: %s", resp.Status)
	}
	resp := f.do(t, http.MethodGet, "/v2/vi/ns/b/manifests/t", "Bearer "+tok)
	if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(resp.Header.Get("WWW-Authenticate"), `error="insufficient_scope"`) {
		t.Errorf("repository b with a's token: %s, challenge %q", resp.Status, resp.Header.Get("WWW-Authenticate"))
	}
}

func TestServer_ExpiredTokenIsRefused(t *testing.T) {
	f := newFixture(t, nil)
	f.push(t, "vi/ns/a:t", adminUser, adminPass)
	now := time.Now()
	tok, err := auth.Mint(testKey, auth.Claims{Subject: adminUser, Audience: "dvcr", IssuedAt: now.Add(-10 * time.Minute),
		ExpiresAt: now.Add(-5 * time.Minute), Access: []auth.ResourceActions{{Type: "repository", Name: "vi/ns/a", Actions: []string{"pull"}}}})
	if err != nil {
		t.Fatal(err)
	}
	resp := f.do(t, http.MethodGet, "/v2/vi/ns/a/manifests/t", "Bearer "+tok)
	if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(resp.Header.Get("WWW-Authenticate"), `error="invalid_token"`) {
		t.Errorf("expired token: %s, challenge %q", resp.Status, resp.Header.Get("WWW-Authenticate"))
	}
	// The same claims, still valid, are accepted: the refusal is the expiry.
	tok, err = auth.Mint(testKey, auth.Claims{Subject: adminUser, Audience: "dvcr", IssuedAt: now,
		ExpiresAt: now.Add(time.Minute), Access: []auth.ResourceActions{{Type: "repository", Name: "vi/ns/a", Actions: []string{"pull"}}}})
	if err != nil {
		t.Fatal(err)
	}
	if resp := f.do(t, http.MethodGet, "/v2/vi/ns/a/manifests/t", "Bearer "+tok); resp.StatusCode != http.StatusOK {
		t.Errorf("valid token: %s", resp.Status)
	}
}

func TestServer_PullTokenCannotPush(t *testing.T) {
	f := newFixture(t, nil)
	for _, c := range []struct{ who, user, pass, scope string }{
		{"pull user asking for push", pullUser, pullPass, "repository:vi/ns/a:pull,push"},
		{"admin asking for pull only", adminUser, adminPass, "repository:vi/ns/a:pull"},
	} {
		tok := f.token(t, c.user, c.pass, c.scope)
		resp := f.do(t, http.MethodPost, "/v2/vi/ns/a/blobs/uploads/", "Bearer "+tok)
		if resp.StatusCode != http.StatusUnauthorized && resp.StatusCode != http.StatusForbidden {
			t.Errorf("%s: starting an upload answered %s, want 401/403", c.who, resp.Status)
		}
		if !strings.Contains(resp.Header.Get("WWW-Authenticate"), `error="insufficient_scope"`) {
			t.Errorf("%s: challenge %q", c.who, resp.Header.Get("WWW-Authenticate"))
		}
	}
	tok := f.token(t, adminUser, adminPass, "repository:vi/ns/a:pull,push")
	if resp := f.do(t, http.MethodPost, "/v2/vi/ns/a/blobs/uploads/", "Bearer "+tok); resp.StatusCode != http.StatusAccepted {
		t.Errorf("push token: starting an upload answered %s, want 202", resp.Status)
	}
}

func TestServer_BasicCredentialsOnTheRegistry(t *testing.T) {
	f := newFixture(t, nil)
	f.push(t, "vi/ns/a:t", adminUser, adminPass)
	basic := func(u, p string) string {
		r, _ := http.NewRequest(http.MethodGet, "/", nil)
		r.SetBasicAuth(u, p)
		return r.Header.Get("Authorization")
	}
	if resp := f.do(t, http.MethodGet, "/v2/vi/ns/a/manifests/t", basic(pullUser, pullPass)); resp.StatusCode != http.StatusOK {
		t.Errorf("pull user with Basic: %s", resp.Status)
	}
	if resp := f.do(t, http.MethodPost, "/v2/vi/ns/a/blobs/uploads/", basic(pullUser, pullPass)); resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("pull user pushing with Basic: %s, want 401", resp.Status)
	}
	if resp := f.do(t, http.MethodGet, "/v2/vi/ns/a/manifests/t", basic(pullUser, "guess")); resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("wrong password with Basic: %s, want 401", resp.Status)
	}
}

func TestServer_WrongPasswordAtTheTokenEndpoint(t *testing.T) {
	f := newFixture(t, nil)
	req, _ := http.NewRequest(http.MethodGet, f.ts.URL+"/auth/token?service=dvcr&scope=repository:vi/ns/a:pull", nil)
	req.SetBasicAuth(adminUser, "not-the-password")
	resp, err := f.ts.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized || bytes.Contains(body, []byte("token\"")) {
		t.Errorf("status %s, body %s", resp.Status, body)
	}
	if _, err := remote.Image(f.ref(t, "vi/ns/a:t"), f.opts(adminUser, "not-the-password")...); statusOf(err) != http.StatusUnauthorized {
		t.Errorf("go-containerregistry with a wrong password: err = %v, want 401", err)
	}
}

func TestServer_CatalogOnlyForAdmin(t *testing.T) {
	f := newFixture(t, nil)
	f.push(t, "vi/ns/a:t", adminUser, adminPass)
	f.push(t, "cvi/b:t", adminUser, adminPass)
	reg, err := name.NewRegistry(f.host)
	if err != nil {
		t.Fatal(err)
	}
	repos, err := remote.Catalog(context.Background(), reg, f.opts(adminUser, adminPass)...)
	if err != nil {
		t.Fatalf("admin listing: %v", err)
	}
	if strings.Join(repos, ",") != "cvi/b,vi/ns/a" {
		t.Errorf("catalog = %v", repos)
	}
	_, err = remote.Catalog(context.Background(), reg, f.opts(pullUser, pullPass)...)
	if s := statusOf(err); s != http.StatusUnauthorized && s != http.StatusForbidden {
		t.Errorf("pull user listing: err = %v, want 401/403", err)
	}
}

func TestServer_HealthReadinessAndMetrics(t *testing.T) {
	f := newFixture(t, nil)
	f.push(t, "vi/ns/a:t", adminUser, adminPass)
	f.token(t, pullUser, pullPass, "repository:vi/ns/a:pull")
	f.do(t, http.MethodGet, "/auth/token", "") // no credentials
	f.do(t, http.MethodGet, "/v2/vi/ns/a/manifests/t", "Bearer not-a-token")

	for _, p := range []string{"/healthz", "/readyz"} {
		if resp := f.do(t, http.MethodGet, p, ""); resp.StatusCode != http.StatusOK {
			t.Errorf("%s: %s", p, resp.Status)
		}
	}
	resp, err := f.ts.Client().Get(f.ts.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/metrics: %s", resp.Status)
	}
	value := func(series string) float64 {
		m := regexp.MustCompile("(?m)^" + regexp.QuoteMeta(series) + ` (\S+)$`).FindSubmatch(body)
		if m == nil {
			t.Errorf("no series %s in /metrics", series)
			return 0
		}
		v, _ := strconv.ParseFloat(string(m[1]), 64)
		return v
	}
	if value(`dvcr_auth_tokens_issued_total{role="admin"}`) < 1 || value(`dvcr_auth_tokens_issued_total{role="pull"}`) != 1 {
		t.Error("tokens issued are not counted by role")
	}
	if value(`dvcr_auth_failures_total{reason="no_credentials"}`) < 1 || value(`dvcr_auth_failures_total{reason="invalid_token"}`) != 1 {
		t.Error("auth failures are not counted by reason")
	}
	if value(`dvcr_http_requests_total{code="201",handler="registry",method="PUT"}`) < 1 {
		t.Error("registry requests are not counted")
	}
	if !bytes.Contains(body, []byte("registry_storage_action_seconds")) {
		t.Error("distribution's storage metrics are not served")
	}
	if bytes.Contains(body, []byte("vi/ns")) {
		t.Error("/metrics carries a repository name")
	}
}

func TestServer_ReadinessFailsWhenStorageIsUnreachable(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := ln.Addr().String()
	ln.Close() // nothing listens there any more
	f := newFixture(t, func(c *server.Config) {
		c.Storage = server.Storage{Type: server.StorageS3, Parameters: map[string]any{
			"bucket": "dvcr", "region": "us-east-1", "regionendpoint": "http://" + closed, "forcepathstyle": true,
			"accesskey": "a", "secretkey": "s",
		}}
	})
	if resp := f.do(t, http.MethodGet, "/readyz", ""); resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("/readyz with unreachable S3: %s, want 503", resp.Status)
	}
	if resp := f.do(t, http.MethodGet, "/healthz", ""); resp.StatusCode != http.StatusOK {
		t.Errorf("/healthz: %s, want 200 (the process is up)", resp.Status)
	}
}

func TestServer_WrapSeesOnlyRegistryRequests(t *testing.T) {
	var mu sync.Mutex
	var seen []string
	f := newFixture(t, func(c *server.Config) {
		c.Wrap = func(h http.Handler) http.Handler {
			return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				mu.Lock()
				seen = append(seen, r.URL.Path)
				mu.Unlock()
				if r.Method == http.MethodDelete {
					http.Error(w, "garbage collection in progress", http.StatusServiceUnavailable)
					return
				}
				h.ServeHTTP(w, r)
			})
		}
	})
	img := f.push(t, "vi/ns/a:t", adminUser, adminPass)
	d, _ := img.Digest()
	err := remote.Delete(f.ref(t, "vi/ns/a@"+d.String()), f.opts(adminUser, adminPass)...)
	if statusOf(err) != http.StatusServiceUnavailable {
		t.Errorf("delete through the wrapper: err = %v, want 503", err)
	}
	// Anonymous and badly authenticated requests are refused without
	// reaching the wrapper (where the GC would record a lease).
	anon := "/v2/vi/ns/a/blobs/sha256:" + strings.Repeat("0", 64)
	for _, authz := range []string{"", "Bearer not-a-token", "Basic " + base64.StdEncoding.EncodeToString([]byte(adminUser+":wrong"))} {
		req, _ := http.NewRequest(http.MethodHead, f.ts.URL+anon, nil)
		if authz != "" {
			req.Header.Set("Authorization", authz)
		}
		resp, err := f.ts.Client().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("HEAD with %q: status %d, want 401", authz, resp.StatusCode)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(seen) == 0 {
		t.Fatal("the wrapper saw nothing")
	}
	for _, p := range seen {
		if !strings.HasPrefix(p, "/v2/") {
			t.Errorf("the wrapper saw %s", p)
		}
		if p == anon {
			t.Errorf("the wrapper saw an unauthenticated request for %s", p)
		}
	}
}

func TestNew_RejectsBadConfiguration(t *testing.T) {
	root := t.TempDir()
	good := func() server.Config {
		return server.Config{Storage: server.Storage{RootDirectory: root}, Users: testUsers(t), TokenKeys: [][]byte{testKey}}
	}
	cases := map[string]struct {
		edit func(*server.Config)
		want string
	}{
		"no users":        {func(c *server.Config) { c.Users = nil }, "no users"},
		"no keys":         {func(c *server.Config) { c.TokenKeys = nil }, "signing key"},
		"short key":       {func(c *server.Config) { c.TokenKeys = [][]byte{[]byte("short")} }, "at least 32"},
		"relative root":   {func(c *server.Config) { c.Storage.RootDirectory = "data" }, "absolute root"},
		"unknown storage": {func(c *server.Config) { c.Storage.Type = "nfs" }, "unknown storage type"},
		"s3 without bucket": {func(c *server.Config) {
			c.Storage = server.Storage{Type: server.StorageS3, Parameters: map[string]any{"region": "x"}}
		}, `"bucket"`},
		"ttl over max":         {func(c *server.Config) { c.TokenTTL, c.MaxTokenTTL = time.Hour, time.Minute }, "longer than the maximum"},
		"relative realm":       {func(c *server.Config) { c.Realm = "/auth/token" }, "absolute http(s) URL"},
		"filesystem redirects": {func(c *server.Config) { c.Storage.Redirect = true }, "only available with s3"},
	}
	for n, c := range cases {
		cfg := good()
		c.edit(&cfg)
		_, err := server.New(context.Background(), cfg)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: err = %v, want one mentioning %q", n, err, c.want)
		}
	}
	s, err := server.New(context.Background(), good())
	if err != nil {
		t.Fatalf("the good configuration: %v", err)
	}
	s.Close()
}

// syncBuffer collects klog output written from many goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestServer_LogsCarryNoCredentials(t *testing.T) {
	fs := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(fs)
	var logs syncBuffer
	_ = fs.Set("logtostderr", "false")
	_ = fs.Set("v", "5")
	klog.SetOutput(&logs)
	t.Cleanup(func() {
		klog.Flush()
		_ = fs.Set("v", "0")
		_ = fs.Set("logtostderr", "true")
	})

	f := newFixture(t, nil)
	f.push(t, "vi/ns/a:t", adminUser, adminPass)
	tok := f.token(t, pullUser, pullPass, "repository:vi/ns/a:pull")
	f.do(t, http.MethodGet, "/v2/vi/ns/a/manifests/t", "Bearer "+tok)
	f.do(t, http.MethodGet, "/v2/vi/ns/a/manifests/t", "Bearer "+tok+"tampered")
	f.do(t, http.MethodPost, "/v2/vi/ns/a/blobs/uploads/", "Bearer "+tok)
	f.do(t, http.MethodGet, "/v2/vi/ns/a/manifests/t", "Basic bm9kZTpndWVzcw==") // node:guess
	klog.Flush()

	out := logs.String()
	// The registry's own logs must arrive, or this test proves nothing.
	for _, want := range []string{"response completed", "authorized request", "error authorizing context"} {
		if !strings.Contains(out, want) {
			t.Errorf("the logs lack %q; got:\n%s", want, out)
		}
	}
	for _, secret := range []string{tok[len(tok)-20:], adminPass, pullPass, "bm9kZTpndWVzcw", "guess"} {
		if strings.Contains(out, secret) {
			t.Errorf("the logs contain a credential (%q)", secret)
		}
	}
}
