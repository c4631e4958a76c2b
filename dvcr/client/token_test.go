package client

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"fmt"
)

// tokenServer is a docker token service (the protocol of distribution's
// "token" auth; the in-process distribution v3 cannot be used for this test
// because its token package needs go-jose, which go.mod does not carry): Basic credentials in, a signed JWT listing the
// granted actions out. "writer" gets what it asks for; "reader" gets pull.
type tokenServer struct {
	url      string
	certFile string // the token signing certificate
	tlsPEM   []byte // the CA of the token server's TLS certificate
	requests atomic.Int64
}

const tokenIssuer, tokenService = "vimg-test-issuer", "vimg-test-registry"

func newTokenServer(t *testing.T) *tokenServer {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, BasicConstraintsValid: true, IsCA: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	ts := &tokenServer{certFile: filepath.Join(t.TempDir(), "token.pem")}
	if err := os.WriteFile(ts.certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ts.requests.Add(1)
		user, pass, ok := r.BasicAuth()
		if !ok || pass != "pw-"+user || (user != "writer" && user != "reader") {
			http.Error(w, `{"details":"bad credentials"}`, http.StatusUnauthorized)
			return
		}
		type access struct {
			Type    string   `json:"type"`
			Name    string   `json:"name"`
			Actions []string `json:"actions"`
		}
		var granted []access
		for _, s := range r.URL.Query()["scope"] {
			parts := strings.Split(s, ":")
			if len(parts) != 3 {
				continue
			}
			actions := strings.Split(parts[2], ",")
			if user == "reader" {
				actions = []string{"pull"}
			}
			granted = append(granted, access{Type: parts[0], Name: parts[1], Actions: actions})
		}
		now := time.Now().Unix()
		claims, _ := json.Marshal(map[string]any{
			"iss": tokenIssuer, "sub": user, "aud": r.URL.Query().Get("service"),
			"exp": now + 300, "nbf": now - 10, "iat": now, "jti": base64.RawURLEncoding.EncodeToString(der[:8]),
			"access": granted,
		})
		header, _ := json.Marshal(map[string]any{"alg": "ES256", "typ": "JWT", "x5c": []string{base64.StdEncoding.EncodeToString(der)}})
		signing := base64.RawURLEncoding.EncodeToString(header) + "." + base64.RawURLEncoding.EncodeToString(claims)
		sum := sha256.Sum256([]byte(signing))
		rr, ss, err := ecdsa.Sign(rand.Reader, key, sum[:])
		if err != nil {
			http.Error(w, err.Error(), 500)
			return
		}
		sig := make([]byte, 64)
		rr.FillBytes(sig[:32])
		ss.FillBytes(sig[32:])
		json.NewEncoder(w).Encode(map[string]any{"token": signing + "." + base64.RawURLEncoding.EncodeToString(sig), "expires_in": 300})
	}))
	t.Cleanup(srv.Close)
	ts.url = srv.URL + "/token"
	ts.tlsPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
	return ts
}

// TestBearerTokenFlow_PushOpenCopyDelete runs Debian's docker-registry with
// token auth trusting tokenServer.
func TestBearerTokenFlow_PushOpenCopyDelete(t *testing.T) {
	ts := newTokenServer(t)
	reg := startPeerRegistry(t, fmt.Sprintf("auth:\n  token:\n    realm: %s\n    issuer: %s\n    service: %s\n    rootcertbundle: %s\n",
		ts.url, tokenIssuer, tokenService, ts.certFile))
	ctx := context.Background()
	opts := func(user, pass string) Options {
		return Options{Username: user, Password: pass, CABundle: append(append([]byte{}, reg.caPEM...), ts.tlsPEM...)}
	}
	writer, err := New(reg.host, opts("writer", "pw-writer"))
	if err != nil {
		t.Fatal(err)
	}
	data := diskBytes(t, 1<<20+99)
	ref := "vi/ns/tok:u1"
	pushed, err := writer.Push(ctx, ref, bytes.NewReader(data), int64(len(data)), rawMeta, PushOptions{})
	if err != nil {
		t.Fatal(err)
	}
	im, err := writer.Open(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	fetched := ts.requests.Load()
	checkReaderAt(t, im.ReaderAt(), data)
	if got := ts.requests.Load(); got != fetched {
		t.Errorf("ranged reads fetched %d more tokens; the pull token should be cached", got-fetched)
	}
	if cp, err := writer.Copy(ctx, ref, "cvi/tok:u2"); err != nil {
		t.Fatal(err)
	} else if cp.LayerUploaded {
		t.Error("Copy streamed blobs: the token did not carry the mount's pull scope on the source")
	}
	if err := writer.Delete(ctx, "cvi/tok:u2"); err != nil {
		t.Fatal(err)
	}

	reader, err := New(reg.host, opts("reader", "pw-reader"))
	if err != nil {
		t.Fatal(err)
	}
	if d, err := reader.Head(ctx, ref); err != nil || d.Digest != pushed.Digest {
		t.Errorf("reader Head = %+v, %v", d, err)
	}
	_, err = reader.Push(ctx, "vi/ns/tok:u3", bytes.NewReader(data), int64(len(data)), rawMeta, PushOptions{})
	if ErrorCode(err) != "UNAUTHORIZED" || !strings.Contains(err.Error(), "opening layer upload") {
		t.Errorf("push with a pull-only token: %v, want UNAUTHORIZED when opening the upload", err)
	}
	nobody, _ := New(reg.host, opts("writer", "wrong"))
	if _, err := nobody.Head(ctx, ref); err == nil || !strings.Contains(err.Error(), "fetching a bearer token") || ErrorCode(err) != "UNAUTHORIZED" {
		t.Errorf("Head with a wrong password: %v, want the token fetch refused", err)
	}
	static, _ := New(reg.host, Options{Token: "not-a-jwt", CABundle: reg.caPEM})
	if _, err := static.Head(ctx, ref); ErrorCode(err) != "UNAUTHORIZED" {
		t.Errorf("Head with a bad static token: %v, want UNAUTHORIZED", err)
	}
}

func TestFetchToken_RefusesPlainHTTPRealmForATLSRegistry(t *testing.T) {
	c, err := New("registry.example:5000", Options{Username: "u", Password: "p"})
	if err != nil {
		t.Fatal(err)
	}
	ch, ok := parseChallenge([]string{`Bearer realm="http://auth.example/token",service="reg",scope="repository:vi/a/b:pull,push"`})
	if !ok || ch.params["realm"] != "http://auth.example/token" || ch.params["scope"] != "repository:vi/a/b:pull,push" {
		t.Fatalf("parsed challenge %+v", ch)
	}
	err = c.fetchToken(context.Background(), ch, scope{repo: "vi/a/b"})
	if err == nil || !strings.Contains(err.Error(), "refusing to send credentials") {
		t.Errorf("fetchToken with an http realm: %v", err)
	}
}
