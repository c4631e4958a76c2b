//go:build e2e

package e2e

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	ggcrregistry "github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/yaml"

	v1 "vimg.dev/vimg/pkg/apis/virtualization/v1alpha2"
	"vimg.dev/vimg/pkg/diskimage/testimg"
	"vimg.dev/vimg/tests/e2e/framework"
)

// The hosts the documented examples download from. The test serves them
// from this machine: cluster DNS points them at the node, and import pods
// trust the test's CA through the vimg-trusted-ca ConfigMap, an
// installation's way to add a corporate CA. The manifests stay unchanged.
var seedHosts = []string{"cloud-images.ubuntu.com", "index.docker.io", "registry-1.docker.io", "docker.io"}

const seedDir = "../integration/testdata/seeds"

// TestSeeds_ExamplesWorkAsDocumented applies every example of the user
// docs, unchanged (but for the <username> the reader fills in), and checks
// what the docs promise. The class one example names ("substitute your
// StorageClass") is made, backed by the test cluster's storage.
func TestSeeds_ExamplesWorkAsDocumented(t *testing.T) {
	f := framework.New(t)
	dir := t.TempDir()
	raw := filepath.Join(dir, "disk.raw")
	testimg.Pattern(t, raw, 32<<20, 9)
	qcow := filepath.Join(dir, "cloudimg.qcow2")
	testimg.QemuImg(t, "convert", "-O", "qcow2", "-c", raw, qcow)

	caPEM, cert := seedCertificate(t)
	serveSeedHosts(t, f, qcow, cert)
	useSeedDNSAndCA(t, f, caPEM)
	seedClass := &storagev1.StorageClass{ObjectMeta: metav1.ObjectMeta{Name: "i-sds-replicated-thin-r2"},
		Provisioner: "hostpath.test.vimg.dev", VolumeBindingMode: ptr.To(storagev1.VolumeBindingImmediate)}
	if _, err := f.Client.StorageV1().StorageClasses().Create(f.Ctx(time.Minute), seedClass, metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating the StorageClass an example names: %v", err)
	}
	t.Cleanup(func() {
		_ = f.Client.StorageV1().StorageClasses().Delete(context.Background(), seedClass.Name, metav1.DeleteOptions{})
	})

	files, err := filepath.Glob(filepath.Join(seedDir, "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no seed manifests in %s: %v", seedDir, err)
	}
	placeholder := regexp.MustCompile(`<([a-z]+)>`)
	bySeed := map[string][]string{}
	for _, file := range files {
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		var vi v1.VirtualImage
		if err := yaml.Unmarshal(data, &vi); err != nil {
			t.Fatal(err)
		}
		seed := strings.SplitN(filepath.Base(file), "-", 2)[0]
		bySeed[seed] = append(bySeed[seed], string(placeholder.ReplaceAll(data, []byte("vimg-$1"))))
	}
	for seed, docs := range bySeed {
		t.Run("seed-"+seed, func(t *testing.T) {
			// One namespace per example: the docs offer some as
			// alternatives under one name (linux-vm-root from a disk or
			// from a snapshot).
			fs := make([]*framework.Framework, len(docs))
			for i, doc := range docs {
				fs[i] = framework.New(t)
				fs[i].Apply(doc)
			}
			for i, doc := range docs {
				var vi v1.VirtualImage
				if err := yaml.Unmarshal([]byte(doc), &vi); err != nil {
					t.Fatal(err)
				}
				checkSeed(fs[i], &vi, qcow)
			}
		})
	}
	// Beyond the docs: every source of seed 001 (HTTPS, a registry, an
	// upload) into an image stored in a claim of its own.
	t.Run("seed-001-sources-into-claims", func(t *testing.T) {
		for _, doc := range bySeed["001"] {
			var vi v1.VirtualImage
			if err := yaml.Unmarshal([]byte(doc), &vi); err != nil {
				t.Fatal(err)
			}
			if vi.Spec.Storage != v1.StorageContainerRegistry || vi.Spec.DataSource.Type == v1.DataSourceTypeObjectRef {
				continue
			}
			f := framework.New(t)
			doc = strings.Replace(doc, "storage: ContainerRegistry", "storage: PersistentVolumeClaim", 1)
			f.Apply(doc)
			if err := yaml.Unmarshal([]byte(doc), &vi); err != nil {
				t.Fatal(err)
			}
			checkSeed(f, &vi, qcow)
		}
	})
}

func checkSeed(f *framework.Framework, vi *v1.VirtualImage, disk string) {
	t := f.T
	ds := vi.Spec.DataSource
	switch {
	case vi.Spec.Storage == v1.StoragePersistentVolumeClaim && ds.Type != v1.DataSourceTypeUpload:
		// "Ready, 100%", in a claim of the class the example names or of
		// the cluster's default.
		st := waitPhase(f, "vi", vi.Name, v1.ImagePhaseReady, 5*time.Minute)
		class := "local-wffc"
		if p := vi.Spec.PersistentVolumeClaim; p != nil && p.StorageClassName != nil {
			class = *p.StorageClassName
		}
		if st.Format != v1.ImageFormatQCOW2 || st.Size.UnpackedBytes != "33554432" || st.Progress != "100%" ||
			st.Target.PersistentVolumeClaimName == "" || st.Target.RegistryURL != "" || st.StorageClassName != class {
			t.Errorf("%s (storage PersistentVolumeClaim): status %+v", vi.Name, st)
		}
		t.Logf("%s (%s, storage PersistentVolumeClaim): Ready, %s, %s, claim %s of class %s", vi.Name, ds.Type, st.Format, st.Size.Unpacked, st.Target.PersistentVolumeClaimName, st.StorageClassName)
	case ds.Type == v1.DataSourceTypeHTTP || ds.Type == v1.DataSourceTypeContainerImage:
		st := waitPhase(f, "vi", vi.Name, v1.ImagePhaseReady, 3*time.Minute)
		if st.Format != v1.ImageFormatQCOW2 || st.Size.UnpackedBytes != "33554432" || st.CDROM || st.Progress != "100%" {
			t.Errorf("%s (%s): format %s size %s cdrom %v progress %s", vi.Name, ds.Type, st.Format, st.Size.UnpackedBytes, st.CDROM, st.Progress)
		}
		t.Logf("%s (%s): Ready, %s, %s, %s", vi.Name, ds.Type, st.Format, st.Size.Unpacked, st.Target.RegistryURL)
	case ds.Type == v1.DataSourceTypeObjectRef && (ds.ObjectRef.Kind == v1.ObjectRefKindVirtualDisk || ds.ObjectRef.Kind == v1.ObjectRefKindVirtualDiskSnapshot):
		var st v1.VirtualImageStatus
		f.WaitFor(vi.Name+" to say its source is not supported yet", time.Minute, func(context.Context) (bool, error) {
			st, _ = imageStatus(f, "vi", vi.Name)
			return st.Phase == v1.ImagePhasePending && strings.Contains(datasourceMessage(st), "not supported yet"), nil
		})
		t.Logf("%s (ObjectRef %s): Pending: %s", vi.Name, ds.ObjectRef.Kind, datasourceMessage(st))
	case ds.Type == v1.DataSourceTypeUpload:
		// As the docs do it: curl URL --progress-bar -T cirros.img | cat,
		// to the external URL (a NodePort of the node here, whose
		// certificate the controller's CA signed).
		st := waitPhase(f, "vi", vi.Name, v1.ImagePhaseWaitForUserUpload, time.Minute)
		_, caFile, _ := gateway(f)
		if _, err := curl(t, nil, st.ImageUploadURLs.External, "--progress-bar", "--fail", "--cacert", caFile, "-T", disk); err != nil {
			t.Fatal(err)
		}
		st = waitPhase(f, "vi", vi.Name, v1.ImagePhaseReady, 3*time.Minute)
		if st.Format != v1.ImageFormatQCOW2 || st.Size.UnpackedBytes != "33554432" {
			t.Errorf("%s (Upload): format %s size %s", vi.Name, st.Format, st.Size.UnpackedBytes)
		}
		t.Logf("%s (Upload, storage %s): WaitForUserUpload, then after curl -T: %s, %s, %s %s", vi.Name, vi.Spec.Storage, st.Phase, st.Format, st.Size.Unpacked, st.Target.PersistentVolumeClaimName)
	default:
		t.Errorf("%s: no expectation for data source %s", vi.Name, ds.Type)
	}
}

func datasourceMessage(st v1.VirtualImageStatus) string {
	for _, c := range st.Conditions {
		if c.Type == v1.ConditionDatasourceReady {
			return c.Reason + ": " + c.Message
		}
	}
	return ""
}

// seedCertificate makes a CA and a certificate for the seed hosts.
func seedCertificate(t *testing.T) ([]byte, tls.Certificate) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "vimg e2e CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: seedHosts[0]}, DNSNames: seedHosts,
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// serveSeedHosts serves, on the node's port 443, the two cloud images the
// docs name (a qcow2 made here stands in for each) and Docker Hub with the
// image vimg-username/ubuntu2204:latest built the way the docs build it
// (FROM scratch, COPY the disk to /disk/).
func serveSeedHosts(t *testing.T, f *framework.Framework, qcow string, cert tls.Certificate) {
	t.Helper()
	hub := httptest.NewServer(ggcrregistry.New())
	t.Cleanup(hub.Close)
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return diskLayer(t, qcow) })
	if err != nil {
		t.Fatal(err)
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		t.Fatal(err)
	}
	ref, err := name.ParseReference(strings.TrimPrefix(hub.URL, "http://") + "/vimg-username/ubuntu2204:latest")
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, img); err != nil {
		t.Fatalf("pushing the seed image: %v", err)
	}
	hubURL := hub.URL
	mux := http.NewServeMux()
	for _, p := range []string{"/minimal/releases/jammy/release/ubuntu-22.04-minimal-cloudimg-amd64.img", "/noble/current/noble-server-cloudimg-amd64.img"} {
		mux.HandleFunc("cloud-images.ubuntu.com"+p, func(w http.ResponseWriter, r *http.Request) { http.ServeFile(w, r, qcow) })
	}
	registry := func(w http.ResponseWriter, r *http.Request) {
		// Docker Hub's names, answered by the in-process registry.
		req, _ := http.NewRequestWithContext(r.Context(), r.Method, hubURL+r.URL.RequestURI(), r.Body)
		req.Header = r.Header.Clone()
		resp, err := http.DefaultTransport.RoundTrip(req)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		defer resp.Body.Close()
		for k, v := range resp.Header {
			w.Header()[k] = v
		}
		w.WriteHeader(resp.StatusCode)
		_, _ = io.Copy(w, resp.Body)
	}
	for _, h := range seedHosts[1:] {
		mux.HandleFunc(h+"/", registry)
	}
	l, err := net.Listen("tcp", nodeIP+":443")
	if err != nil {
		t.Fatalf("listening on %s:443 for the seed hosts: %v", nodeIP, err)
	}
	srv := &http.Server{Handler: mux, TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}}}
	go srv.ServeTLS(l, "", "")
	t.Cleanup(func() { srv.Close() })
}

// useSeedDNSAndCA points the seed hosts at the node in cluster DNS and
// makes import pods trust the test CA, and undoes both afterwards.
func useSeedDNSAndCA(t *testing.T, f *framework.Framework, caPEM []byte) {
	t.Helper()
	ctx := f.Ctx(5 * time.Minute)
	cms := f.Client.CoreV1().ConfigMaps("vimg-system")
	trusted := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "vimg-trusted-ca", Namespace: "vimg-system"}, Data: map[string]string{"e2e-ca.crt": string(caPEM)}}
	if _, err := cms.Create(ctx, trusted, metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating the trusted CA ConfigMap: %v", err)
	}
	t.Cleanup(func() { _ = cms.Delete(context.Background(), "vimg-trusted-ca", metav1.DeleteOptions{}) })

	dns := f.Client.CoreV1().ConfigMaps("kube-system")
	cm, err := dns.Get(ctx, "coredns", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	orig := cm.Data["hosts"]
	setHosts := func(hosts string) {
		cm, err := dns.Get(context.Background(), "coredns", metav1.GetOptions{})
		if err != nil {
			t.Error(err)
			return
		}
		cm.Data["hosts"] = hosts
		if _, err := dns.Update(context.Background(), cm, metav1.UpdateOptions{}); err != nil {
			t.Error(err)
		}
		// The kubelet refreshes a ConfigMap volume within a minute; a new
		// pod reads it at once.
		f.Kubectl("", "-n", "kube-system", "rollout", "restart", "deployment/coredns")
		f.Kubectl("", "-n", "kube-system", "rollout", "status", "deployment/coredns", "--timeout=120s")
	}
	setHosts(orig + nodeIP + " " + strings.Join(seedHosts, " ") + "\n")
	t.Cleanup(func() { setHosts(orig) })
}

// diskLayer is a tar layer holding disk/<file>, as `COPY x.img /disk/`
// makes it.
func diskLayer(t *testing.T, path string) (io.ReadCloser, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: "disk/", Mode: 0o755}); err != nil {
		return nil, err
	}
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "disk/" + filepath.Base(path), Mode: 0o644, Size: int64(len(data))}); err != nil {
		return nil, err
	}
	if _, err := tw.Write(data); err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return io.NopCloser(bytes.NewReader(buf.Bytes())), nil
}
