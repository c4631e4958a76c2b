// Package bootstrap creates, once, the secrets DVCR and the controller share:
// the registry's TLS certificate and the CA that signed it, the users file
// with the admin and pull credentials, and the token signing key.
//
// The controller runs this before it starts reconciling, so `kubectl apply -k
// deploy` is all an installation needs: the DVCR pod waits (the kubelet
// retries missing secret volumes) until the secrets exist. Nothing is ever
// overwritten: a Secret that exists is used as it is, which also makes two
// controller replicas starting together safe (the loser of the create race
// reads what the winner wrote).
package bootstrap

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"maps"
	"math/big"
	"net"
	"time"

	"golang.org/x/crypto/bcrypt"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/klog/v2"
)

// Keys of the Secrets and ConfigMap written here.
const (
	KeyCACert  = "ca.crt"
	KeyCAKey   = "ca.key"
	KeyTLSCert = corev1.TLSCertKey       // tls.crt
	KeyTLSKey  = corev1.TLSPrivateKeyKey // tls.key

	KeyUsers        = "users"
	KeyTokenKey     = "token.key"
	KeyAdminUser    = "admin.username"
	KeyAdminPass    = "admin.password"
	KeyPullUser     = "pull.username"
	KeyPullPassword = "pull.password"
)

// Names says where the objects live and what DVCR is called.
type Names struct {
	Namespace string
	// TLSSecret holds ca.crt, ca.key, tls.crt and tls.key.
	TLSSecret string
	// AuthSecret holds the users file, the token key and the plain
	// credentials of the admin (the controller) and pull (nodes) users.
	AuthSecret string
	// CAConfigMap publishes ca.crt for workers and nodes.
	CAConfigMap string
	// Service is DVCR's Service name; the certificate covers its DNS names.
	Service string
	// UploadTLSSecret holds tls.crt and tls.key of the upload gateway,
	// signed by the same CA, for UploadService's DNS names and
	// UploadExtraNames (the host of the external upload URL: a DNS name or
	// an IP address). Empty: none.
	UploadTLSSecret, UploadService string
	UploadExtraNames               []string
	// PullSecret is kept, in each of PullNamespaces, holding the pull
	// user's credentials and ca.crt only: for components that run
	// elsewhere (the CSI driver's privileged node plugin cannot run in
	// Namespace) and must not see the admin's credentials. A namespace that
	// does not exist is skipped.
	PullSecret     string
	PullNamespaces []string
}

// DVCR is what the controller needs to talk to the registry.
type DVCR struct {
	CA            []byte
	AdminUser     string
	AdminPassword string
}

// certValidity: the CA and the serving certificate live ten years; rotation
// is replacing the Secrets and restarting DVCR and the controller.
const certValidity = 10 * 365 * 24 * time.Hour

// Ensure creates the TLS and auth Secrets and the CA ConfigMap when missing
// and returns what the controller needs from them.
func Ensure(ctx context.Context, cs kubernetes.Interface, n Names) (DVCR, error) {
	log := klog.FromContext(ctx)
	tlsSec, err := ensureSecret(ctx, cs, n.Namespace, n.TLSSecret, corev1.SecretTypeOpaque, func() (map[string][]byte, error) {
		return newPKI(n)
	})
	if err != nil {
		return DVCR{}, err
	}
	ca := tlsSec.Data[KeyCACert]
	if len(ca) == 0 {
		return DVCR{}, fmt.Errorf("secret %s/%s has no %s", n.Namespace, n.TLSSecret, KeyCACert)
	}
	authSec, err := ensureSecret(ctx, cs, n.Namespace, n.AuthSecret, corev1.SecretTypeOpaque, newAuth)
	if err != nil {
		return DVCR{}, err
	}
	d := DVCR{CA: ca, AdminUser: string(authSec.Data[KeyAdminUser]), AdminPassword: string(authSec.Data[KeyAdminPass])}
	if d.AdminUser == "" || d.AdminPassword == "" {
		return DVCR{}, fmt.Errorf("secret %s/%s lacks %s or %s", n.Namespace, n.AuthSecret, KeyAdminUser, KeyAdminPass)
	}
	if err := ensureCAConfigMap(ctx, cs, n, ca); err != nil {
		return DVCR{}, err
	}
	if n.UploadTLSSecret != "" {
		_, err := ensureSecret(ctx, cs, n.Namespace, n.UploadTLSSecret, corev1.SecretTypeTLS, func() (map[string][]byte, error) {
			return issue(tlsSec.Data, append(serviceDNSNames(n.UploadService, n.Namespace), n.UploadExtraNames...))
		})
		if err != nil {
			return DVCR{}, err
		}
	}
	for _, ns := range n.PullNamespaces {
		data := map[string][]byte{KeyPullUser: authSec.Data[KeyPullUser], KeyPullPassword: authSec.Data[KeyPullPassword], KeyCACert: ca}
		if err := ensurePullCopy(ctx, cs, ns, n.PullSecret, data); err != nil {
			return DVCR{}, err
		}
	}
	log.Info("DVCR secrets are in place", "namespace", n.Namespace, "tlsSecret", n.TLSSecret, "authSecret", n.AuthSecret)
	return d, nil
}

// ensurePullCopy creates or updates the Secret ns/name to hold data, which
// the auth and TLS Secrets are the source of.
func ensurePullCopy(ctx context.Context, cs kubernetes.Interface, ns, name string, data map[string][]byte) error {
	secrets := cs.CoreV1().Secrets(ns)
	s, err := secrets.Get(ctx, name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		s = &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{"app.kubernetes.io/part-of": "vimg"}},
			Type:       corev1.SecretTypeOpaque,
			Data:       data,
		}
		_, err = secrets.Create(ctx, s, metav1.CreateOptions{})
		if apierrors.IsNotFound(err) {
			klog.FromContext(ctx).Info("Namespace does not exist; no DVCR pull secret there", "namespace", ns)
			return nil
		}
		if err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("creating secret %s/%s: %w", ns, name, err)
		}
		return nil
	case err != nil:
		return fmt.Errorf("reading secret %s/%s: %w", ns, name, err)
	case maps.EqualFunc(s.Data, data, bytes.Equal):
		return nil
	}
	s = s.DeepCopy()
	s.Data = data
	if _, err := secrets.Update(ctx, s, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("updating secret %s/%s: %w", ns, name, err)
	}
	return nil
}

func ensureSecret(ctx context.Context, cs kubernetes.Interface, ns, name string, typ corev1.SecretType, gen func() (map[string][]byte, error)) (*corev1.Secret, error) {
	s, err := cs.CoreV1().Secrets(ns).Get(ctx, name, metav1.GetOptions{})
	if err == nil {
		return s, nil
	}
	if !apierrors.IsNotFound(err) {
		return nil, fmt.Errorf("reading secret %s/%s: %w", ns, name, err)
	}
	data, err := gen()
	if err != nil {
		return nil, fmt.Errorf("generating secret %s/%s: %w", ns, name, err)
	}
	s = &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{"app.kubernetes.io/part-of": "vimg"}},
		Type:       typ,
		Data:       data,
	}
	created, err := cs.CoreV1().Secrets(ns).Create(ctx, s, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		// Another replica won the race: use its secret, never ours.
		return cs.CoreV1().Secrets(ns).Get(ctx, name, metav1.GetOptions{})
	}
	if err != nil {
		return nil, fmt.Errorf("creating secret %s/%s: %w", ns, name, err)
	}
	klog.FromContext(ctx).Info("Created secret", "secret", klog.KObj(created))
	return created, nil
}

func ensureCAConfigMap(ctx context.Context, cs kubernetes.Interface, n Names, ca []byte) error {
	cms := cs.CoreV1().ConfigMaps(n.Namespace)
	cm, err := cms.Get(ctx, n.CAConfigMap, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		cm = &corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Name: n.CAConfigMap, Namespace: n.Namespace, Labels: map[string]string{"app.kubernetes.io/part-of": "vimg"}},
			Data:       map[string]string{KeyCACert: string(ca)},
		}
		if _, err := cms.Create(ctx, cm, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("creating configmap %s/%s: %w", n.Namespace, n.CAConfigMap, err)
		}
		return nil
	case err != nil:
		return fmt.Errorf("reading configmap %s/%s: %w", n.Namespace, n.CAConfigMap, err)
	case cm.Data[KeyCACert] == string(ca):
		return nil
	}
	// The ConfigMap follows the Secret, which is the source of truth.
	cm = cm.DeepCopy()
	if cm.Data == nil {
		cm.Data = map[string]string{}
	}
	cm.Data[KeyCACert] = string(ca)
	if _, err := cms.Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("updating configmap %s/%s: %w", n.Namespace, n.CAConfigMap, err)
	}
	return nil
}

// DNSNames are the names the DVCR certificate is valid for.
func DNSNames(n Names) []string { return serviceDNSNames(n.Service, n.Namespace) }

func serviceDNSNames(s, ns string) []string {
	return []string{s, s + "." + ns, s + "." + ns + ".svc", s + "." + ns + ".svc.cluster.local"}
}

func newPKI(n Names) (map[string][]byte, error) {
	now := time.Now()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating the CA key: %w", err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "vimg CA", Organization: []string{"vimg"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(certValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, fmt.Errorf("signing the CA: %w", err)
	}
	caKeyPEM, err := ecPEM(caKey)
	if err != nil {
		return nil, err
	}
	ca := map[string][]byte{
		KeyCACert: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}),
		KeyCAKey:  caKeyPEM,
	}
	leaf, err := issue(ca, DNSNames(n))
	if err != nil {
		return nil, err
	}
	ca[KeyTLSCert], ca[KeyTLSKey] = leaf[KeyTLSCert], leaf[KeyTLSKey]
	return ca, nil
}

// issue signs a serving certificate for names (DNS names or IP addresses;
// the first four are a Service's) with the CA in ca (ca.crt and ca.key);
// the result holds tls.crt, tls.key and ca.crt.
func issue(ca map[string][]byte, names []string) (map[string][]byte, error) {
	cb, _ := pem.Decode(ca[KeyCACert])
	kb, _ := pem.Decode(ca[KeyCAKey])
	if cb == nil || kb == nil {
		return nil, errors.New("the CA secret has no ca.crt or ca.key")
	}
	caCert, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		return nil, fmt.Errorf("parsing the CA certificate: %w", err)
	}
	caKey, err := x509.ParseECPrivateKey(kb.Bytes)
	if err != nil {
		return nil, fmt.Errorf("parsing the CA key: %w", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating a serving key: %w", err)
	}
	now := time.Now()
	var dns []string
	var ips []net.IP
	for _, n := range names {
		if ip := net.ParseIP(n); ip != nil {
			ips = append(ips, ip)
		} else {
			dns = append(dns, n)
		}
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: dns[len(dns)-2]},
		DNSNames:     dns,
		IPAddresses:  ips,
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(certValidity),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
	if err != nil {
		return nil, fmt.Errorf("signing a serving certificate: %w", err)
	}
	keyPEM, err := ecPEM(key)
	if err != nil {
		return nil, err
	}
	return map[string][]byte{
		KeyTLSCert: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		KeyTLSKey:  keyPEM,
		KeyCACert:  ca[KeyCACert],
	}, nil
}

func ecPEM(k *ecdsa.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		return nil, fmt.Errorf("encoding a key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), nil
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 126))
	if err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return n
}

// The admin is the controller; pull is for nodes (the CSI driver and the
// populator read images with it).
const (
	adminUser = "vimg-controller"
	pullUser  = "vimg-node"
)

func newAuth() (map[string][]byte, error) {
	adminPass, err := randomHex(24)
	if err != nil {
		return nil, err
	}
	pullPass, err := randomHex(24)
	if err != nil {
		return nil, err
	}
	users := ""
	for _, u := range []struct{ role, name, pass string }{{"admin", adminUser, adminPass}, {"pull", pullUser, pullPass}} {
		h, err := bcrypt.GenerateFromPassword([]byte(u.pass), bcrypt.DefaultCost)
		if err != nil {
			return nil, fmt.Errorf("hashing the %s password: %w", u.role, err)
		}
		users += u.role + ":" + u.name + ":" + string(h) + "\n"
	}
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		return nil, err
	}
	return map[string][]byte{
		KeyUsers:        []byte(users),
		KeyTokenKey:     []byte(base64.StdEncoding.EncodeToString(key) + "\n"),
		KeyAdminUser:    []byte(adminUser),
		KeyAdminPass:    []byte(adminPass),
		KeyPullUser:     []byte(pullUser),
		KeyPullPassword: []byte(pullPass),
	}, nil
}

func randomHex(n int) (string, error) {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		return "", errors.New("reading random bytes failed")
	}
	return hex.EncodeToString(b), nil
}
