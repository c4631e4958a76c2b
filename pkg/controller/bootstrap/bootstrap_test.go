package bootstrap

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"vimg.dev/vimg/dvcr/auth"
)

var names = Names{Namespace: "vimg-system", TLSSecret: "tls", AuthSecret: "auth", CAConfigMap: "ca", Service: "vimg-dvcr",
	UploadTLSSecret: "upload-tls", UploadService: "vimg-upload", UploadExtraNames: []string{"10.244.0.1", "uploads.example.com"}}

func TestEnsure_CreatesWorkingSecretsOnceAndNeverOverwrites(t *testing.T) {
	ctx := context.Background()
	cs := fake.NewClientset()
	first, err := Ensure(ctx, cs, names)
	if err != nil {
		t.Fatal(err)
	}
	second, err := Ensure(ctx, cs, names)
	if err != nil {
		t.Fatal(err)
	}
	if first.AdminPassword != second.AdminPassword || !bytes.Equal(first.CA, second.CA) {
		t.Fatal("a second Ensure replaced the secrets")
	}

	tlsSec, err := cs.CoreV1().Secrets("vimg-system").Get(ctx, "tls", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(first.CA) {
		t.Fatal("CA is not PEM")
	}
	block, _ := pem.Decode(tlsSec.Data[KeyTLSCert])
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"vimg-dvcr.vimg-system.svc", "vimg-dvcr.vimg-system.svc.cluster.local"} {
		if _, err := cert.Verify(x509.VerifyOptions{DNSName: name, Roots: pool}); err != nil {
			t.Errorf("serving certificate for %s: %v", name, err)
		}
	}

	up, err := cs.CoreV1().Secrets("vimg-system").Get(ctx, "upload-tls", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	block, _ = pem.Decode(up.Data[KeyTLSCert])
	upCert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"vimg-upload.vimg-system.svc", "10.244.0.1", "uploads.example.com"} {
		if _, err := upCert.Verify(x509.VerifyOptions{DNSName: name, Roots: pool}); err != nil {
			t.Errorf("upload gateway certificate for %s: %v", name, err)
		}
	}
	if _, err := upCert.Verify(x509.VerifyOptions{DNSName: "vimg-dvcr.vimg-system.svc", Roots: pool}); err == nil {
		t.Error("the upload gateway's certificate is valid for DVCR's name too")
	}

	authSec, err := cs.CoreV1().Secrets("vimg-system").Get(ctx, "auth", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	users, err := auth.ParseUsers(bytes.NewReader(authSec.Data[KeyUsers]))
	if err != nil {
		t.Fatalf("DVCR cannot read the users file: %v", err)
	}
	if role, err := users.Authenticate(first.AdminUser, first.AdminPassword); err != nil || role != auth.RoleAdmin {
		t.Fatalf("admin credentials: role %q, %v", role, err)
	}
	if role, err := users.Authenticate(string(authSec.Data[KeyPullUser]), string(authSec.Data[KeyPullPassword])); err != nil || role != auth.RolePull {
		t.Fatalf("pull credentials: role %q, %v", role, err)
	}
	if _, err := users.Authenticate(first.AdminUser, "wrong"); err == nil {
		t.Fatal("a wrong password passed")
	}
	if keys, err := auth.ParseKeys(authSec.Data[KeyTokenKey]); err != nil || len(keys) != 1 {
		t.Fatalf("DVCR cannot read the token key: %d keys, %v", len(keys), err)
	}

	cm, err := cs.CoreV1().ConfigMaps("vimg-system").Get(ctx, "ca", metav1.GetOptions{})
	if err != nil || cm.Data[KeyCACert] != string(first.CA) {
		t.Fatalf("CA configmap: %v", err)
	}
}

func TestEnsure_ConfigMapFollowsTheSecret(t *testing.T) {
	ctx := context.Background()
	cs := fake.NewClientset()
	d, err := Ensure(ctx, cs, names)
	if err != nil {
		t.Fatal(err)
	}
	cm, _ := cs.CoreV1().ConfigMaps("vimg-system").Get(ctx, "ca", metav1.GetOptions{})
	cm.Data[KeyCACert] = "stale"
	if _, err := cs.CoreV1().ConfigMaps("vimg-system").Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := Ensure(ctx, cs, names); err != nil {
		t.Fatal(err)
	}
	cm, _ = cs.CoreV1().ConfigMaps("vimg-system").Get(ctx, "ca", metav1.GetOptions{})
	if cm.Data[KeyCACert] != string(d.CA) {
		t.Fatal("the CA ConfigMap was not brought back in line with the Secret")
	}
}

// The pull copy holds the pull user and the CA, never the admin's
// credentials, and follows the auth Secret.
func TestEnsure_PullCopyHoldsOnlyWhatPullingNeeds(t *testing.T) {
	ctx := context.Background()
	cs := fake.NewClientset()
	n := names
	n.PullSecret, n.PullNamespaces = "vimg-dvcr-pull", []string{"vimg-csi"}
	d, err := Ensure(ctx, cs, n)
	if err != nil {
		t.Fatal(err)
	}
	authSec, err := cs.CoreV1().Secrets("vimg-system").Get(ctx, "auth", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pull, err := cs.CoreV1().Secrets("vimg-csi").Get(ctx, "vimg-dvcr-pull", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(pull.Data) != 3 || !bytes.Equal(pull.Data[KeyCACert], d.CA) ||
		!bytes.Equal(pull.Data[KeyPullUser], authSec.Data[KeyPullUser]) || !bytes.Equal(pull.Data[KeyPullPassword], authSec.Data[KeyPullPassword]) {
		t.Fatalf("pull copy holds %v, want exactly the pull user, its password and ca.crt", keysOf(pull.Data))
	}
	// A changed pull password (the auth Secret replaced) is copied again.
	authSec.Data[KeyPullPassword] = []byte("rotated")
	if _, err := cs.CoreV1().Secrets("vimg-system").Update(ctx, authSec, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := Ensure(ctx, cs, n); err != nil {
		t.Fatal(err)
	}
	pull, _ = cs.CoreV1().Secrets("vimg-csi").Get(ctx, "vimg-dvcr-pull", metav1.GetOptions{})
	if string(pull.Data[KeyPullPassword]) != "rotated" {
		t.Errorf("pull copy's password = %q after the auth Secret changed", pull.Data[KeyPullPassword])
	}
}

func keysOf(m map[string][]byte) []string {
	var keys []string
	for k := range m {
		keys = append(keys, k)
	}
	return keys
}
