package certfile

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
	"time"

	"vimg.dev/vimg/pkg/selfsigned"
)

func TestKeyPair_ReloadsAChangedCertificate(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	write := func(cn string, mod time.Time) []byte {
		cert, key, err := selfsigned.Loopback(cn)
		if err != nil {
			t.Fatal(err)
		}
		for p, b := range map[string][]byte{certFile: cert, keyFile: key} {
			if err := os.WriteFile(p, b, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Chtimes(p, mod, mod); err != nil {
				t.Fatal(err)
			}
		}
		return cert
	}
	write("first", time.Now().Add(-time.Hour))
	kp, err := Load(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	first, err := kp.GetCertificate(nil)
	if err != nil {
		t.Fatal(err)
	}
	write("second", time.Now())
	kp.checked = time.Time{} // as if 10 s had passed
	second, err := kp.GetCertificate(nil)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(first.Certificate[0], second.Certificate[0]) {
		t.Fatal("the changed certificate was not loaded")
	}
	// Half-written files keep the last good certificate.
	if err := os.WriteFile(keyFile, []byte("garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	os.Chtimes(certFile, time.Now().Add(time.Minute), time.Now().Add(time.Minute))
	kp.checked = time.Time{}
	third, err := kp.GetCertificate(nil)
	if err != nil || !bytes.Equal(third.Certificate[0], second.Certificate[0]) {
		t.Fatalf("a broken key pair replaced the certificate: %v", err)
	}
}
