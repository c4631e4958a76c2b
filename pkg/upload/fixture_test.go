package upload

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/sirupsen/logrus"
	"golang.org/x/crypto/bcrypt"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"vimg.dev/vimg/dvcr/auth"
	"vimg.dev/vimg/dvcr/client"
	"vimg.dev/vimg/dvcr/server"
	"vimg.dev/vimg/pkg/worker/api"
)

func TestMain(m *testing.M) {
	flag.Parse()
	if !testing.Verbose() {
		logrus.SetOutput(io.Discard) // distribution's request logs
	}
	os.Exit(m.Run())
}

const testNamespace = "vimg-uploads"

// clock is real time shifted by an offset tests move forward.
type clock struct{ off atomic.Int64 }

func (c *clock) Now() time.Time               { return time.Now().Add(time.Duration(c.off.Load())) }
func (c *clock) Advance(d time.Duration)      { c.off.Add(int64(d)) }
func (c *clock) At(d time.Duration) time.Time { return c.Now().Add(d) }

// fixture is the gateway over TLS in front of DVCR in-process (TLS, token
// auth), with the upload Secrets in a fake clientset that enforces
// resourceVersion preconditions the way the API server does.
type fixture struct {
	t       *testing.T
	kube    *fake.Clientset
	store   *SecretStore
	clock   *clock
	key     []byte
	dvcr    string // host:port
	dvcrCA  []byte
	reg     Registry
	gw      *Gateway
	srv     *httptest.Server
	caFile  string
	pool    *x509.CertPool
	patches atomic.Int64
}

type fixtureOption func(*Config)

func newFixture(t *testing.T, opts ...fixtureOption) *fixture {
	t.Helper()
	f := &fixture{t: t, clock: &clock{}, key: bytes.Repeat([]byte("g"), 32)}
	hash, err := bcrypt.GenerateFromPassword([]byte("pw"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	users, err := auth.ParseUsers(strings.NewReader("admin:ctl:" + string(hash) + "\n"))
	if err != nil {
		t.Fatal(err)
	}
	dsrv, err := server.New(context.Background(), server.Config{
		Storage: server.Storage{RootDirectory: t.TempDir()}, Users: users, TokenKeys: [][]byte{f.key},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dsrv.Close() })
	dts := httptest.NewTLSServer(dsrv.Handler())
	t.Cleanup(dts.Close)
	f.dvcr = strings.TrimPrefix(dts.URL, "https://")
	f.dvcrCA = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: dts.Certificate().Raw})
	reg, err := NewDVCR(f.dvcr, f.dvcrCA)
	if err != nil {
		t.Fatal(err)
	}
	f.reg = reg

	f.kube = fake.NewSimpleClientset()
	f.enforceResourceVersions()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	f.store = NewSecretStore(f.kube, testNamespace)
	f.store.Start(ctx)
	if !f.store.WaitForSync(ctx) {
		t.Fatal("the store did not sync")
	}
	f.gw = f.newGateway(opts...)
	f.srv = f.serve(f.gw)
	return f
}

func (f *fixture) newGateway(opts ...fixtureOption) *Gateway {
	cfg := Config{Store: f.store, Registry: f.reg, Now: f.clock.Now, ID: "test",
		ProgressInterval: 100 * time.Millisecond, LeaseDuration: 3 * time.Second, BusyWait: 300 * time.Millisecond}
	for _, o := range opts {
		o(&cfg)
	}
	gw, err := New(cfg)
	if err != nil {
		f.t.Fatal(err)
	}
	return gw
}

// serve runs a gateway the way the command does: HTTPS, HTTP/1.1.
func (f *fixture) serve(h http.Handler) *httptest.Server {
	srv := httptest.NewUnstartedServer(h)
	srv.StartTLS()
	f.t.Cleanup(srv.Close)
	if f.caFile == "" {
		f.caFile = filepath.Join(f.t.TempDir(), "ca.pem")
		if err := os.WriteFile(f.caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o600); err != nil {
			f.t.Fatal(err)
		}
		f.pool = x509.NewCertPool()
		f.pool.AddCert(srv.Certificate())
	}
	return srv
}

// enforceResourceVersions makes the fake clientset bump resourceVersion on
// every write and refuse a patch or update whose resourceVersion is stale,
// as the API server does; the gateway's conflict safety depends on it.
func (f *fixture) enforceResourceVersions() {
	var mu sync.Mutex
	gvr := corev1.SchemeGroupVersion.WithResource("secrets")
	bump := func(s *corev1.Secret) {
		n, _ := strconv.Atoi(s.ResourceVersion)
		s.ResourceVersion = strconv.Itoa(n + 1)
	}
	f.kube.PrependReactor("patch", "secrets", func(a k8stesting.Action) (bool, runtime.Object, error) {
		pa := a.(k8stesting.PatchAction)
		mu.Lock()
		defer mu.Unlock()
		f.patches.Add(1)
		obj, err := f.kube.Tracker().Get(gvr, pa.GetNamespace(), pa.GetName())
		if err != nil {
			return true, nil, err
		}
		sec := obj.(*corev1.Secret).DeepCopy()
		var p struct {
			Metadata struct {
				ResourceVersion string             `json:"resourceVersion"`
				Annotations     map[string]*string `json:"annotations"`
			} `json:"metadata"`
		}
		if err := json.Unmarshal(pa.GetPatch(), &p); err != nil {
			return true, nil, err
		}
		if rv := p.Metadata.ResourceVersion; rv != "" && rv != sec.ResourceVersion {
			return true, nil, apierrors.NewConflict(gvr.GroupResource(), sec.Name, fmt.Errorf("resourceVersion %s is stale (now %s)", rv, sec.ResourceVersion))
		}
		for k, v := range p.Metadata.Annotations {
			if v == nil {
				delete(sec.Annotations, k)
				continue
			}
			if sec.Annotations == nil {
				sec.Annotations = map[string]string{}
			}
			sec.Annotations[k] = *v
		}
		bump(sec)
		if err := f.kube.Tracker().Update(gvr, sec, sec.Namespace); err != nil {
			return true, nil, err
		}
		return true, sec.DeepCopy(), nil
	})
	f.kube.PrependReactor("update", "secrets", func(a k8stesting.Action) (bool, runtime.Object, error) {
		sec := a.(k8stesting.UpdateAction).GetObject().(*corev1.Secret).DeepCopy()
		mu.Lock()
		defer mu.Unlock()
		obj, err := f.kube.Tracker().Get(gvr, sec.Namespace, sec.Name)
		if err != nil {
			return true, nil, err
		}
		if cur := obj.(*corev1.Secret).ResourceVersion; sec.ResourceVersion != "" && sec.ResourceVersion != cur {
			return true, nil, apierrors.NewConflict(gvr.GroupResource(), sec.Name, fmt.Errorf("stale"))
		}
		sec.ResourceVersion = obj.(*corev1.Secret).ResourceVersion
		bump(sec)
		if err := f.kube.Tracker().Update(gvr, sec, sec.Namespace); err != nil {
			return true, nil, err
		}
		return true, sec.DeepCopy(), nil
	})
}

// upload is one image waiting for an upload.
type upload struct {
	uid, token, repo, dvcrToken string
	url                         string // full URL with the token
}

var uidSeq atomic.Int64

// addUpload writes the Secret the controller would for an image whose
// upload may start until expires (zero: no deadline).
func (f *fixture) addUpload(expires time.Time) upload {
	f.t.Helper()
	n := uidSeq.Add(1)
	u := upload{
		uid:   fmt.Sprintf("6f1c2d9e-0000-4000-8000-%012d", n),
		token: fmt.Sprintf("%064x", rand.Uint64()),
		repo:  fmt.Sprintf("vi/ns/img%d", n),
	}
	now := time.Now()
	tok, err := auth.Mint(f.key, auth.Claims{Subject: "upload", Audience: auth.DefaultService, IssuedAt: now, ExpiresAt: now.Add(time.Hour),
		Access: []auth.ResourceActions{{Type: "repository", Name: u.repo, Actions: []string{"pull", "push"}}}})
	if err != nil {
		f.t.Fatal(err)
	}
	u.dvcrToken = tok
	data := map[string][]byte{
		api.UploadKeyToken:      []byte(u.token),
		api.UploadKeyRepository: []byte(u.repo),
		api.UploadKeyDVCRToken:  []byte(tok),
	}
	if !expires.IsZero() {
		data[api.UploadKeyExpires] = []byte(expires.UTC().Format(time.RFC3339))
	}
	sec := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: api.UploadSecretPrefix + u.uid, Namespace: testNamespace, ResourceVersion: "1",
			Labels: map[string]string{api.LabelUpload: "true"}},
		Data: data,
	}
	if _, err := f.kube.CoreV1().Secrets(testNamespace).Create(context.Background(), sec, metav1.CreateOptions{}); err != nil {
		f.t.Fatal(err)
	}
	u.url = f.srv.URL + api.UploadPathPrefix + u.uid + "/" + u.token
	return u
}

// state reads the upload's state and holder from the Secret.
func (f *fixture) state(u upload) (api.UploadState, Holder) {
	f.t.Helper()
	sec, err := f.kube.CoreV1().Secrets(testNamespace).Get(context.Background(), api.UploadSecretPrefix+u.uid, metav1.GetOptions{})
	if err != nil {
		f.t.Fatal(err)
	}
	st := api.UploadState{Total: -1}
	if s, ok := sec.Annotations[api.AnnotationUploadState]; ok {
		if st, err = api.DecodeUploadState(s); err != nil {
			f.t.Fatal(err)
		}
	}
	var h Holder
	if s, ok := sec.Annotations[AnnotationHolder]; ok {
		if err := json.Unmarshal([]byte(s), &h); err != nil {
			f.t.Fatal(err)
		}
	}
	return st, h
}

// idle waits until no request holds the upload.
func (f *fixture) idle(u upload) api.UploadState {
	f.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, h := f.state(u)
		if h.ID == "" && f.gw.transferOf(u.uid) == nil {
			return st
		}
		if time.Now().After(deadline) {
			f.t.Fatalf("the upload is still held by %+v: %+v", h, st)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// drop closes the connection of a PUT that sent n bytes, and waits until
// the gateway has recorded them.
func (p *rawPut) drop(u upload, n int64) api.UploadState {
	p.f.t.Helper()
	p.conn.Close()
	var st api.UploadState
	waitFor(p.f.t, fmt.Sprintf("%d bytes to be recorded", n), func() bool {
		var h Holder
		st, h = p.f.state(u)
		return st.Received == n && h.ID == "" && p.f.gw.transferOf(u.uid) == nil
	})
	return st
}

// dvcrClient reads what the gateway wrote.
func (f *fixture) dvcrClient(u upload) *client.Client {
	c, err := client.New(f.dvcr, client.Options{Token: u.dvcrToken, CABundle: f.dvcrCA})
	if err != nil {
		f.t.Fatal(err)
	}
	return c
}

// blob reads a committed blob whole.
func (f *fixture) blob(u upload, d string) []byte {
	f.t.Helper()
	rc, err := f.dvcrClient(u).BlobReader(context.Background(), u.repo, digest.Digest(d))
	if err != nil {
		f.t.Fatal(err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		f.t.Fatal(err)
	}
	return b
}

// httpClient talks to the gateway.
func (f *fixture) httpClient() *http.Client {
	return &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: f.pool}}}
}

func (f *fixture) do(method, url string, body io.Reader, header map[string]string) (*http.Response, string) {
	f.t.Helper()
	req, err := http.NewRequest(method, url, body)
	if err != nil {
		f.t.Fatal(err)
	}
	if br, ok := body.(*bytes.Reader); ok {
		req.ContentLength = int64(br.Len())
	}
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := f.httpClient().Do(req)
	if err != nil {
		f.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

func (f *fixture) head(url string) *http.Response {
	f.t.Helper()
	resp, _ := f.do(http.MethodHead, url, nil, nil)
	return resp
}

// curl runs curl with args and returns the HTTP status and the body.
func (f *fixture) curl(stdin io.Reader, args ...string) (int, string) {
	f.t.Helper()
	status, body, _ := f.curlH(stdin, args...)
	return status, body
}

// curlH is curl, also returning the answer's header.
func (f *fixture) curlH(stdin io.Reader, args ...string) (int, string, string) {
	f.t.Helper()
	if _, err := exec.LookPath("curl"); err != nil {
		f.t.Skip("curl is not installed")
	}
	dir := f.t.TempDir()
	out, hdr := filepath.Join(dir, "body"), filepath.Join(dir, "header")
	cmd := exec.Command("curl", append([]string{"-sS", "--cacert", f.caFile, "-o", out, "-D", hdr, "-w", "%{http_code}"}, args...)...)
	cmd.Stdin = stdin
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	code, err := cmd.Output()
	if err != nil {
		f.t.Fatalf("curl %v: %v: %s", args, err, stderr.String())
	}
	body, _ := os.ReadFile(out)
	header, _ := os.ReadFile(hdr)
	status, err := strconv.Atoi(strings.TrimSpace(string(code)))
	if err != nil {
		f.t.Fatalf("curl printed status %q", code)
	}
	return status, string(body), string(header)
}

// rawPut starts a PUT by hand, to send the body as slowly or as partially
// as a test needs.
type rawPut struct {
	f    *fixture
	conn *tls.Conn
}

func (f *fixture) startPut(url string, header ...string) *rawPut {
	f.t.Helper()
	addr := strings.TrimPrefix(f.srv.URL, "https://")
	conn, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: f.pool, ServerName: "example.com"})
	if err != nil {
		f.t.Fatal(err)
	}
	path := strings.TrimPrefix(url, f.srv.URL)
	fmt.Fprintf(conn, "PUT %s HTTP/1.1\r\nHost: %s\r\n", path, addr)
	for _, h := range header {
		fmt.Fprintf(conn, "%s\r\n", h)
	}
	fmt.Fprintf(conn, "\r\n")
	return &rawPut{f: f, conn: conn}
}

func (p *rawPut) write(b []byte) {
	if _, err := p.conn.Write(b); err != nil {
		p.f.t.Fatal(err)
	}
}

// response reads the gateway's answer.
func (p *rawPut) response() (*http.Response, string) {
	p.f.t.Helper()
	p.conn.SetReadDeadline(time.Now().Add(20 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(p.conn), nil)
	if err != nil {
		p.f.t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp, string(b)
}

// testFile writes n bytes of random data.
func testFile(t *testing.T, n int) (string, []byte) {
	t.Helper()
	data := make([]byte, n)
	rnd := rand.New(rand.NewPCG(uint64(n), 9))
	for i := range data {
		data[i] = byte(rnd.Uint32())
	}
	p := filepath.Join(t.TempDir(), "disk.qcow2")
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p, data
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

// waitFor polls cond.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
