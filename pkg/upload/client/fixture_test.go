package client

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/crypto/bcrypt"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"vimg.dev/vimg/dvcr/auth"
	"vimg.dev/vimg/dvcr/server"
	"vimg.dev/vimg/pkg/upload"
	"vimg.dev/vimg/pkg/worker/api"
)

func TestMain(m *testing.M) {
	flag.Parse()
	if !testing.Verbose() {
		logrus.SetOutput(io.Discard)
	}
	os.Exit(m.Run())
}

const uploadNamespace = "vimg-uploads"

// gateway is the real upload gateway over TLS, in front of DVCR
// in-process, with its Secrets in a fake clientset.
type gateway struct {
	t     *testing.T
	kube  *fake.Clientset
	key   []byte
	gw    *upload.Gateway
	srv   *httptest.Server
	pool  *x509.CertPool
	seq   atomic.Int64
	store *upload.SecretStore
}

func newGateway(t *testing.T, cfg func(*upload.Config)) *gateway {
	t.Helper()
	g := &gateway{t: t, key: bytes.Repeat([]byte("c"), 32)}
	hash, err := bcrypt.GenerateFromPassword([]byte("pw"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	users, err := auth.ParseUsers(strings.NewReader("admin:ctl:" + string(hash) + "\n"))
	if err != nil {
		t.Fatal(err)
	}
	dsrv, err := server.New(context.Background(), server.Config{
		Storage: server.Storage{RootDirectory: t.TempDir()}, Users: users, TokenKeys: [][]byte{g.key},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dsrv.Close() })
	dts := httptest.NewTLSServer(dsrv.Handler())
	t.Cleanup(dts.Close)
	reg, err := upload.NewDVCR(strings.TrimPrefix(dts.URL, "https://"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: dts.Certificate().Raw}))
	if err != nil {
		t.Fatal(err)
	}
	g.kube = fake.NewSimpleClientset()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	g.store = upload.NewSecretStore(g.kube, uploadNamespace)
	g.store.Start(ctx)
	g.store.WaitForSync(ctx)
	c := upload.Config{Store: g.store, Registry: reg, ProgressInterval: 100 * time.Millisecond, LeaseDuration: 3 * time.Second}
	if cfg != nil {
		cfg(&c)
	}
	if g.gw, err = upload.New(c); err != nil {
		t.Fatal(err)
	}
	g.srv = httptest.NewTLSServer(g.gw)
	t.Cleanup(g.srv.Close)
	g.pool = x509.NewCertPool()
	g.pool.AddCert(g.srv.Certificate())
	return g
}

// addUpload writes the Secret the controller would for an image and
// returns its upload URL.
func (g *gateway) addUpload(uid string, expires time.Time) string {
	g.t.Helper()
	n := g.seq.Add(1)
	if uid == "" {
		uid = fmt.Sprintf("0a0b0c0d-0000-4000-8000-%012d", n)
	}
	repo := fmt.Sprintf("vi/ns/up%d", n)
	token := fmt.Sprintf("%032x", rand.Uint64())
	now := time.Now()
	dvcrToken, err := auth.Mint(g.key, auth.Claims{Subject: "upload", Audience: auth.DefaultService, IssuedAt: now, ExpiresAt: now.Add(time.Hour),
		Access: []auth.ResourceActions{{Type: "repository", Name: repo, Actions: []string{"pull", "push"}}}})
	if err != nil {
		g.t.Fatal(err)
	}
	data := map[string][]byte{api.UploadKeyToken: []byte(token), api.UploadKeyRepository: []byte(repo), api.UploadKeyDVCRToken: []byte(dvcrToken)}
	if !expires.IsZero() {
		data[api.UploadKeyExpires] = []byte(expires.UTC().Format(time.RFC3339))
	}
	_, err = g.kube.CoreV1().Secrets(uploadNamespace).Create(context.Background(), &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: api.UploadSecretPrefix + uid, Namespace: uploadNamespace, Labels: map[string]string{api.LabelUpload: "true"}},
		Data:       data,
	}, metav1.CreateOptions{})
	if err != nil {
		g.t.Fatal(err)
	}
	return g.srv.URL + api.UploadPathPrefix + uid + "/" + token
}

// state is the upload state of uid as the gateway recorded it.
func (g *gateway) state(uid string) api.UploadState {
	sec, err := g.kube.CoreV1().Secrets(uploadNamespace).Get(context.Background(), api.UploadSecretPrefix+uid, metav1.GetOptions{})
	if err != nil {
		return api.UploadState{}
	}
	st, _ := api.DecodeUploadState(sec.Annotations[api.AnnotationUploadState])
	return st
}

// settled waits until no request holds the upload of uid and returns its
// state.
func (g *gateway) settled(uid string) api.UploadState {
	g.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		sec, err := g.kube.CoreV1().Secrets(uploadNamespace).Get(context.Background(), api.UploadSecretPrefix+uid, metav1.GetOptions{})
		if err == nil && sec.Annotations[upload.AnnotationHolder] == "" {
			st, _ := api.DecodeUploadState(sec.Annotations[api.AnnotationUploadState])
			return st
		}
		if time.Now().After(deadline) {
			g.t.Fatalf("upload %s is still held", uid)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func uidOf(url string) string {
	rest := strings.TrimPrefix(url[strings.Index(url, api.UploadPathPrefix):], api.UploadPathPrefix)
	return rest[:strings.IndexByte(rest, '/')]
}

// sender is a Sender trusting the gateway, with short waits, that records
// its notices.
func (g *gateway) sender(notices *[]string) *Sender {
	var mu sync.Mutex
	return &Sender{
		HTTP:         &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: g.pool}, ExpectContinueTimeout: 5 * time.Second}},
		Backoff:      50 * time.Millisecond,
		StallTimeout: 2 * time.Second,
		Notice: func(m string) {
			mu.Lock()
			defer mu.Unlock()
			if notices != nil {
				*notices = append(*notices, m)
			}
		},
	}
}

// cutter is a TCP proxy to the gateway that drops the first cuts
// connections after limit bytes from the client, or, with stall, stops
// forwarding them instead (a connection that died without a word).
type cutter struct {
	addr  string
	cuts  atomic.Int64
	limit int64
	stall bool
	conns atomic.Int64
}

func (g *gateway) cutter(cuts int, limit int64, stall bool) *cutter {
	g.t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		g.t.Fatal(err)
	}
	c := &cutter{addr: ln.Addr().String(), limit: limit, stall: stall}
	c.cuts.Store(int64(cuts))
	target := strings.TrimPrefix(g.srv.URL, "https://")
	var wg sync.WaitGroup
	done := make(chan struct{})
	g.t.Cleanup(func() { close(done); ln.Close(); wg.Wait() })
	go func() {
		for {
			in, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				c.serve(in, target, done)
			}()
		}
	}()
	return c
}

func (c *cutter) serve(in net.Conn, target string, done chan struct{}) {
	defer in.Close()
	out, err := net.Dial("tcp", target)
	if err != nil {
		return
	}
	defer out.Close()
	c.conns.Add(1)
	// Idle keep-alive connections end with the test.
	go func() { <-done; in.Close(); out.Close() }()
	go io.Copy(in, out)
	limit := int64(-1)
	if c.cuts.Add(-1) >= 0 {
		limit = c.limit
	}
	if limit < 0 {
		io.Copy(out, in)
		return
	}
	io.CopyN(out, in, limit)
	if c.stall {
		// Hold both ends open, forwarding nothing, until the test ends
		// or either side gives up.
		buf := make([]byte, 32<<10)
		for {
			if _, err := in.Read(buf); err != nil {
				return
			}
		}
	}
}

// url is the upload URL through the proxy.
func (c *cutter) url(u string) string {
	i := strings.Index(u, api.UploadPathPrefix)
	return "https://" + c.addr + u[i:]
}

// testFile writes n random bytes.
func testFile(t *testing.T, n int, seed uint64) (string, []byte) {
	t.Helper()
	data := make([]byte, n)
	rnd := rand.New(rand.NewPCG(seed, 3))
	for i := range data {
		data[i] = byte(rnd.Uint32())
	}
	p := filepath.Join(t.TempDir(), fmt.Sprintf("disk%d.img", seed))
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p, data
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}
