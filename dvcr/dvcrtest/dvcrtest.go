// Package dvcrtest runs a real DVCR (dvcr/server: TLS, users, no anonymous
// access) in process on loopback, for the tests of the packages that read
// from it.
package dvcrtest

import (
	"bytes"
	"context"
	"encoding/pem"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"golang.org/x/crypto/bcrypt"

	"vimg.dev/vimg/dvcr/auth"
	"vimg.dev/vimg/dvcr/client"
	"vimg.dev/vimg/dvcr/server"
)

// User and Password are DVCR's one user, an admin.
const User, Password = "tester", "s3cret-tester"

// Registry is a DVCR started for a test.
type Registry struct {
	// Host is host:port; CAPEM the PEM certificate it serves.
	Host  string
	CAPEM []byte
}

// Start starts DVCR for the test's duration and returns a client of it
// logged in as User; its Registry() is DVCR's address.
func Start(t testing.TB) *client.Client {
	t.Helper()
	return StartWith(t, nil).Client(t)
}

// StartWith starts DVCR behind wrap(DVCR's handler), for tests that watch
// or break requests; a nil wrap serves DVCR as it is.
func StartWith(t testing.TB, wrap func(http.Handler) http.Handler) *Registry {
	t.Helper()
	hash, err := bcrypt.GenerateFromPassword([]byte(Password), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	users, err := auth.ParseUsers(strings.NewReader("admin:" + User + ":" + string(hash) + "\n"))
	if err != nil {
		t.Fatal(err)
	}
	srv, err := server.New(context.Background(), server.Config{
		Storage:   server.Storage{RootDirectory: t.TempDir()},
		Users:     users,
		TokenKeys: [][]byte{bytes.Repeat([]byte("k"), 32)},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Close() })
	h := srv.Handler()
	if wrap != nil {
		h = wrap(h)
	}
	ts := httptest.NewUnstartedServer(h)
	// Connections a test cuts on purpose are not worth a log line.
	ts.Config.ErrorLog = log.New(io.Discard, "", 0)
	ts.StartTLS()
	t.Cleanup(ts.Close)
	return &Registry{
		Host:  strings.TrimPrefix(ts.URL, "https://"),
		CAPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ts.Certificate().Raw}),
	}
}

// Client is a client of r logged in as User.
func (r *Registry) Client(t testing.TB) *client.Client {
	t.Helper()
	c, err := client.New(r.Host, client.Options{Username: User, Password: Password, CABundle: r.CAPEM})
	if err != nil {
		t.Fatal(err)
	}
	return c
}
