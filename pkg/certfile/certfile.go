// Package certfile serves a TLS certificate from files and re-reads them
// when they change, so that a rotated Secret takes effect without a
// restart (the kubelet updates mounted Secret files in place).
package certfile

import (
	"crypto/tls"
	"fmt"
	"os"
	"sync"
	"time"

	"k8s.io/klog/v2"
)

// recheck is how often a handshake looks at the files: a stat per handshake
// is cheap, but once every few seconds is enough.
const recheck = 10 * time.Second

// KeyPair is a certificate and key read from files.
type KeyPair struct {
	certFile, keyFile string

	mu      sync.Mutex
	cert    *tls.Certificate
	modTime time.Time
	checked time.Time
}

// Load reads the key pair once, so that a server fails at start rather
// than at its first handshake.
func Load(certFile, keyFile string) (*KeyPair, error) {
	k := &KeyPair{certFile: certFile, keyFile: keyFile}
	if _, err := k.GetCertificate(nil); err != nil {
		return nil, err
	}
	return k, nil
}

// GetCertificate is tls.Config.GetCertificate.
func (k *KeyPair) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	now := time.Now()
	if k.cert != nil && now.Sub(k.checked) < recheck {
		return k.cert, nil
	}
	k.checked = now
	fi, err := os.Stat(k.certFile)
	if err == nil && k.cert != nil && fi.ModTime().Equal(k.modTime) {
		return k.cert, nil
	}
	c, lerr := tls.LoadX509KeyPair(k.certFile, k.keyFile)
	if lerr != nil {
		if k.cert != nil {
			// Half-written files during a rotation: keep serving the old
			// certificate and try again on a later handshake.
			klog.Background().Error(lerr, "Reloading the TLS certificate failed; keeping the previous one")
			return k.cert, nil
		}
		return nil, fmt.Errorf("loading the TLS key pair: %w", lerr)
	}
	k.cert = &c
	if err == nil {
		k.modTime = fi.ModTime()
	}
	return k.cert, nil
}
