// Package benchdvcr runs the real dvcr binary for the benchmarks, the way a
// cluster runs it: TLS with a fresh certificate, token auth with one admin
// user, filesystem storage. It also measures CPU time, of this process and
// of dvcr, so that a benchmark can say where the cycles went.
package benchdvcr

import (
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/crypto/bcrypt"

	"vimg.dev/vimg/pkg/selfsigned"
)

// User is the admin user Start creates; Server.Password is its password.
const User = "bench"

// Server is a running dvcr process.
type Server struct {
	Storage  string // the storage root, in the directory given to Start
	Cmd      *exec.Cmd
	Addr     string // host:port on loopback
	Password string // User's
	CA       []byte // PEM of the server's self-signed certificate
	Plain    bool   // plain HTTP instead of TLS
}

// Start runs the dvcr binary with a fresh TLS certificate, one admin user
// and a token key, on a free loopback port, and waits until it is ready.
// Its files (and its log, dvcr.log) go to dir; earlier storage is removed.
func Start(bin, dir string, plain bool) (*Server, error) {
	cert, key, err := selfsigned.Loopback("dvcr-bench")
	if err != nil {
		return nil, fmt.Errorf("making a TLS certificate: %w", err)
	}
	pw := base64.RawURLEncoding.EncodeToString(randomBytes(18))
	hash, err := bcrypt.GenerateFromPassword([]byte(pw), bcrypt.MinCost)
	if err != nil {
		return nil, fmt.Errorf("hashing the password: %w", err)
	}
	files := map[string][]byte{
		"tls.crt":   cert,
		"tls.key":   key,
		"users":     []byte("admin:" + User + ":" + string(hash) + "\n"),
		"token.key": []byte(base64.StdEncoding.EncodeToString(randomBytes(32)) + "\n"),
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			return nil, err
		}
	}
	storage := filepath.Join(dir, "storage")
	if err := os.RemoveAll(storage); err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	addr := ln.Addr().String()
	ln.Close()
	args := []string{"--listen", addr, "--storage-root", storage, "--users-file", filepath.Join(dir, "users"),
		"--token-key-file", filepath.Join(dir, "token.key")}
	if plain {
		args = append(args, "--insecure-http")
	} else {
		args = append(args, "--tls-cert-file", filepath.Join(dir, "tls.crt"), "--tls-key-file", filepath.Join(dir, "tls.key"))
	}
	cmd := exec.Command(bin, args...)
	cmd.Stderr, err = os.Create(filepath.Join(dir, "dvcr.log"))
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", bin, err)
	}
	s := &Server{Storage: storage, Cmd: cmd, Addr: addr, Password: pw, CA: cert, Plain: plain}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(cert)
	hc := &http.Client{Timeout: time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		resp, err := hc.Get(s.URL() + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return s, nil
			}
		}
	}
	s.Stop()
	return nil, fmt.Errorf("dvcr did not become ready on %s (log: %s)", addr, filepath.Join(dir, "dvcr.log"))
}

// URL is the server's base URL: scheme and address.
func (s *Server) URL() string {
	if s.Plain {
		return "http://" + s.Addr
	}
	return "https://" + s.Addr
}

// Reset removes what earlier pushes stored (the registry keeps no cache),
// so that every push writes new files.
func (s *Server) Reset() {
	os.RemoveAll(filepath.Join(s.Storage, "docker"))
}

// Stop ends the process and waits for it.
func (s *Server) Stop() {
	s.Cmd.Process.Signal(syscall.SIGTERM)
	s.Cmd.Wait()
}

// CPU is the dvcr process's user+system CPU time so far.
func (s *Server) CPU() time.Duration { return procCPU(s.Cmd.Process.Pid) }

// SelfCPU is this process's user+system CPU time; with children, that of
// its waited-for child processes (qemu-img) too.
func SelfCPU(children bool) time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	d := time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	if children {
		syscall.Getrusage(syscall.RUSAGE_CHILDREN, &ru)
		d += time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	return d
}

// procCPU is another process's user+system CPU time, from /proc (clock
// ticks of 10 ms).
func procCPU(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// Fields after the command name, which is in parentheses.
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	if len(f) < 13 {
		return 0
	}
	u, _ := strconv.ParseInt(f[11], 10, 64)
	s, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(u+s) * 10 * time.Millisecond
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return b
}
