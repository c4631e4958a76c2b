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

// Start starts DVCR for the test's duration and returns a client of it
// logged in as User; its Registry() is DVCR's address.
func Start(t testing.TB) *client.Client {
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
	ts := httptest.NewUnstartedServer(srv.Handler())
	ts.Config.ErrorLog = log.New(io.Discard, "", 0)
	ts.StartTLS()
	t.Cleanup(ts.Close)
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ts.Certificate().Raw})
	c, err := client.New(strings.TrimPrefix(ts.URL, "https://"), client.Options{Username: User, Password: Password, CABundle: caPEM})
	if err != nil {
		t.Fatal(err)
	}
	return c
}
