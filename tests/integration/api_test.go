package integration

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"sigs.k8s.io/yaml"

	v1alpha2 "vimg.dev/vimg/pkg/apis/virtualization/v1alpha2"
)

var (
	viGVR  = v1alpha2.SchemeGroupVersion.WithResource("virtualimages")
	cviGVR = v1alpha2.SchemeGroupVersion.WithResource("clustervirtualimages")
)

func ctxFor(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// kubectl runs the built kubectl against the test API server.
func kubectl(t *testing.T, stdin []byte, args ...string) (string, error) {
	t.Helper()
	needControlPlane(t)
	return cp.Kubectl(ctxFor(t), stdin, args...)
}

// newNamespace creates a namespace for one test case and deletes it after.
func newNamespace(t *testing.T, name string) string {
	t.Helper()
	if _, err := kubectl(t, nil, "create", "namespace", name); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = cp.Kubectl(context.Background(), nil, "delete", "namespace", name, "--wait=false") })
	return name
}

func readManifest(t *testing.T, path string) (*unstructured.Unstructured, []byte) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	u := &unstructured.Unstructured{}
	if err := yaml.Unmarshal(data, &u.Object); err != nil {
		t.Fatalf("parse %s: %v", path, err)
	}
	return u, data
}

// resource is the client for gvr in namespace ns, or cluster-wide when ns is "".
func resource(t *testing.T, gvr schema.GroupVersionResource, ns string) dynamic.ResourceInterface {
	t.Helper()
	ri := dynamicClient(t).Resource(gvr)
	if ns == "" {
		return ri
	}
	return ri.Namespace(ns)
}

func gvrOf(u *unstructured.Unstructured) schema.GroupVersionResource {
	if u.GetKind() == "ClusterVirtualImage" {
		return cviGVR
	}
	return viGVR
}

// applyAndCompare applies a manifest with kubectl as a user would, reads the
// object back and checks that the server kept every field the manifest set,
// and that the stored object decodes into the Go types with no unknown field.
func applyAndCompare(t *testing.T, path string, data []byte) {
	t.Helper()
	want := &unstructured.Unstructured{}
	if err := yaml.Unmarshal(data, &want.Object); err != nil {
		t.Fatalf("parse %s: %v", path, err)
	}
	ns := ""
	args := []string{"apply", "-f", "-"}
	if want.GetKind() == "VirtualImage" {
		ns = newNamespace(t, "t-"+strings.ToLower(strings.NewReplacer(".", "-", "_", "-").Replace(strings.TrimSuffix(filepath.Base(path), ".yaml"))))
		args = append(args, "-n", ns)
	}
	if out, err := kubectl(t, data, args...); err != nil {
		t.Fatalf("kubectl apply %s: %v", path, err)
	} else if !strings.Contains(out, "created") {
		t.Fatalf("kubectl apply %s printed %q, want a created object", path, out)
	}
	r := resource(t, gvrOf(want), ns)
	if ns == "" {
		t.Cleanup(func() { _ = r.Delete(context.Background(), want.GetName(), metav1.DeleteOptions{}) })
	}
	got, err := r.Get(ctxFor(t), want.GetName(), metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if diff := missingFields("spec", want.Object["spec"], got.Object["spec"]); diff != "" {
		t.Errorf("%s: the server did not keep the manifest's spec: %s", path, diff)
	}
	switch want.GetKind() {
	case "VirtualImage":
		if err := runtime.DefaultUnstructuredConverter.FromUnstructuredWithValidation(got.Object, &v1alpha2.VirtualImage{}, true); err != nil {
			t.Errorf("%s: stored object does not decode into VirtualImage: %v", path, err)
		}
	case "ClusterVirtualImage":
		if err := runtime.DefaultUnstructuredConverter.FromUnstructuredWithValidation(got.Object, &v1alpha2.ClusterVirtualImage{}, true); err != nil {
			t.Errorf("%s: stored object does not decode into ClusterVirtualImage: %v", path, err)
		}
	}
}

// missingFields reports where got lacks or changes a value of want; got may
// hold more (defaults).
func missingFields(path string, want, got any) string {
	if wm, ok := want.(map[string]any); ok {
		gm, ok := got.(map[string]any)
		if !ok {
			return fmt.Sprintf("%s: want an object, got %v", path, got)
		}
		for k, v := range wm {
			if d := missingFields(path+"."+k, v, gm[k]); d != "" {
				return d
			}
		}
		return ""
	}
	if !equality.Semantic.DeepEqual(want, got) && !reflect.DeepEqual(fmt.Sprint(want), fmt.Sprint(got)) {
		return fmt.Sprintf("%s: want %v, got %v", path, want, got)
	}
	return ""
}

func TestSeedManifests_AreAcceptedUnchanged(t *testing.T) {
	files, _ := filepath.Glob(filepath.Join(seedTestdata, "*.yaml"))
	if len(files) < 11 {
		t.Fatalf("found %d seed manifests in %s, want the 11 of the user docs", len(files), seedTestdata)
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			data, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			applyAndCompare(t, f, fillPlaceholders(data))
		})
	}
}

func TestClusterAndExtensionManifests_AreAccepted(t *testing.T) {
	files, _ := filepath.Glob("testdata/valid/*.yaml")
	if len(files) == 0 {
		t.Fatal("no manifests in testdata/valid")
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			data, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			applyAndCompare(t, f, data)
		})
	}
}

// TestInvalidManifests_AreRejectedWithTheirReason: each file's first line,
// "# want: ...", is the message kubectl must show; nothing may be created.
func TestInvalidManifests_AreRejectedWithTheirReason(t *testing.T) {
	files, _ := filepath.Glob("testdata/invalid/*.yaml")
	if len(files) < 12 {
		t.Fatalf("found %d invalid manifests, want at least 12", len(files))
	}
	ns := newNamespace(t, "invalid")
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			obj, data := readManifest(t, f)
			first, _, _ := bytes.Cut(data, []byte("\n"))
			want, ok := strings.CutPrefix(string(first), "# want: ")
			if !ok {
				t.Fatalf("%s must start with a '# want: <message>' line", f)
			}
			out, err := kubectl(t, data, "create", "-n", ns, "-f", "-")
			if err == nil {
				t.Fatalf("the API server accepted %s: %s", f, out)
			}
			if !strings.Contains(err.Error(), want) {
				t.Fatalf("rejected with\n  %v\nwant a message containing\n  %s", err, want)
			}
			objNS := ""
			if obj.GetKind() == "VirtualImage" {
				objNS = ns
			}
			if _, err := resource(t, gvrOf(obj), objNS).Get(ctxFor(t), obj.GetName(), metav1.GetOptions{}); err == nil {
				t.Fatalf("%s was rejected but the object exists", f)
			}
		})
	}
}

func TestStorage_DefaultsToContainerRegistry(t *testing.T) {
	ns := newNamespace(t, "defaults")
	manifest := []byte(`apiVersion: virtualization.deckhouse.io/v1alpha2
kind: VirtualImage
metadata:
  name: no-storage
spec:
  dataSource:
    type: Upload
`)
	if _, err := kubectl(t, manifest, "apply", "-n", ns, "-f", "-"); err != nil {
		t.Fatal(err)
	}
	out, err := kubectl(t, nil, "get", "vi", "no-storage", "-n", ns, "-o", "jsonpath={.spec.storage}")
	if err != nil {
		t.Fatal(err)
	}
	if out != "ContainerRegistry" {
		t.Fatalf("spec.storage = %q, want the default ContainerRegistry", out)
	}
}

// setStatus writes status through the status subresource, as the controller
// will, and checks that the main resource ignores status.
func setStatus(t *testing.T, gvr schema.GroupVersionResource, ns, name string, status map[string]any) {
	t.Helper()
	r := resource(t, gvr, ns)
	obj, err := r.Get(ctxFor(t), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	obj.Object["status"] = status
	upd, err := r.Update(ctxFor(t), obj, metav1.UpdateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, found := upd.Object["status"]; found {
		t.Fatalf("an update of the main resource changed status: %v", upd.Object["status"])
	}
	upd.Object["status"] = status
	if _, err := r.UpdateStatus(ctxFor(t), upd, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("update status: %v", err)
	}
}

func TestKubectlGet_ShowsPrinterColumns(t *testing.T) {
	ns := newNamespace(t, "columns")
	vi := []byte(`apiVersion: virtualization.deckhouse.io/v1alpha2
kind: VirtualImage
metadata:
  name: debian-netinst
spec:
  storage: PersistentVolumeClaim
  dataSource:
    type: HTTP
    http:
      url: http://mirror.local/debian-12-netinst.iso
`)
	cvi := []byte(`apiVersion: virtualization.deckhouse.io/v1alpha2
kind: ClusterVirtualImage
metadata:
  name: columns-cvi
spec:
  dataSource:
    type: Upload
`)
	for _, m := range [][]byte{vi, cvi} {
		if _, err := kubectl(t, m, "apply", "-n", ns, "-f", "-"); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() { _, _ = cp.Kubectl(context.Background(), nil, "delete", "cvi", "columns-cvi") })
	setStatus(t, viGVR, ns, "debian-netinst", map[string]any{
		"phase":    "Provisioning",
		"progress": "42.5%",
		"cdrom":    true,
		"format":   "iso",
		"size":     map[string]any{"stored": "631Mi", "storedBytes": "661651456", "unpacked": "631Mi", "unpackedBytes": "661651456"},
		"target":   map[string]any{"persistentVolumeClaimName": "vi-debian-netinst-pvc"},
	})
	setStatus(t, cviGVR, "", "columns-cvi", map[string]any{
		"phase":           "WaitForUserUpload",
		"progress":        "0%",
		"target":          map[string]any{"registryURL": "dvcr.vimg-system.svc/cvi/columns-cvi:6b1c"},
		"cdrom":           false,
		"imageUploadURLs": map[string]any{"inCluster": "http://upload.vimg-system.svc/upload/abc"},
	})

	cases := []struct {
		args []string
		// want maps each column a user must see to its value; "" is a
		// column that must be there and be empty.
		want   map[string]string
		absent []string
	}{
		{
			args:   []string{"get", "vi", "-n", ns},
			want:   map[string]string{"NAME": "debian-netinst", "PHASE": "Provisioning", "CDROM": "true", "PROGRESS": "42.5%", "AGE": "*"},
			absent: []string{"STOREDSIZE", "UNPACKEDSIZE", "REGISTRY URL", "TARGETPVC"},
		},
		{
			args: []string{"get", "vi", "-n", ns, "-o", "wide"},
			want: map[string]string{"NAME": "debian-netinst", "PHASE": "Provisioning", "CDROM": "true", "PROGRESS": "42.5%",
				"STOREDSIZE": "631Mi", "UNPACKEDSIZE": "631Mi", "REGISTRY URL": "", "TARGETPVC": "vi-debian-netinst-pvc", "AGE": "*"},
		},
		{
			args:   []string{"get", "cvi", "columns-cvi"},
			want:   map[string]string{"NAME": "columns-cvi", "PHASE": "WaitForUserUpload", "CDROM": "false", "PROGRESS": "0%", "AGE": "*"},
			absent: []string{"REGISTRY URL", "TARGETPVC"},
		},
		{
			args: []string{"get", "cvi", "columns-cvi", "-o", "wide"},
			want: map[string]string{"NAME": "columns-cvi", "PHASE": "WaitForUserUpload", "CDROM": "false", "PROGRESS": "0%",
				"STOREDSIZE": "", "UNPACKEDSIZE": "", "REGISTRY URL": "dvcr.vimg-system.svc/cvi/columns-cvi:6b1c", "AGE": "*"},
			absent: []string{"TARGETPVC"},
		},
		{
			// The category names every namespaced image kind.
			args: []string{"get", "virtualization", "-n", ns},
			want: map[string]string{"NAME": "debian-netinst", "PHASE": "Provisioning"},
		},
	}
	for _, c := range cases {
		t.Run(strings.Join(c.args, " "), func(t *testing.T) {
			out, err := kubectl(t, nil, c.args...)
			if err != nil {
				t.Fatal(err)
			}
			lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
			if len(lines) != 2 {
				t.Fatalf("want a header and one row, got:\n%s", out)
			}
			got := cells(lines[0], lines[1])
			for col, want := range c.want {
				v, ok := got[col]
				switch {
				case !ok:
					t.Errorf("no column %s in\n%s", col, out)
				case want == "*" && v == "":
					t.Errorf("column %s is empty in\n%s", col, out)
				case want != "*" && v != want:
					t.Errorf("column %s = %q, want %q in\n%s", col, v, want, out)
				}
			}
			for _, col := range c.absent {
				if _, ok := got[col]; ok {
					t.Errorf("column %s belongs to -o wide or to the other kind, but shows in\n%s", col, out)
				}
			}
		})
	}
}

// cells maps kubectl's table header to a row's values by column position:
// kubectl left-aligns every cell under its header, and an empty field leaves
// a blank cell. Headers are separated by two or more spaces ("REGISTRY URL"
// is one header).
func cells(header, row string) map[string]string {
	type col struct {
		name  string
		start int
	}
	var cols []col
	for i := 0; i < len(header); {
		if header[i] == ' ' {
			i++
			continue
		}
		end := strings.Index(header[i:], "  ")
		if end < 0 {
			end = len(header) - i
		}
		cols = append(cols, col{strings.TrimSpace(header[i : i+end]), i})
		i += end
	}
	out := map[string]string{}
	for k, c := range cols {
		end := len(row)
		if k+1 < len(cols) && cols[k+1].start < end {
			end = cols[k+1].start
		}
		v := ""
		if c.start < len(row) {
			v = strings.TrimSpace(row[c.start:end])
		}
		out[c.name] = v
	}
	return out
}

func hasInOrder(got, want []string) bool {
	i := 0
	for _, g := range got {
		if i < len(want) && g == want[i] {
			i++
		}
	}
	return i == len(want)
}

func TestKubectlExplain_DescribesTheSchema(t *testing.T) {
	cases := []struct {
		path string
		want []string
	}{
		{"vi.spec.dataSource.http", []string{"url", "caBundle", "checksum", "insecureSkipVerify", "authSecretRef", "headers", "-required-"}},
		{"vi.spec.dataSource", []string{"type", "http", "containerImage", "objectRef", "upload", "enum: HTTP, ContainerImage, ObjectRef, Upload"}},
		{"vi.spec.storage", []string{"ENUM:", "ContainerRegistry", "PersistentVolumeClaim", "the default"}},
		{"vi.status", []string{"phase", "progress", "downloadSpeed", "size", "format", "cdrom", "imageUploadURLs", "target", "sourceUID", "storageClassName", "conditions", "observedGeneration"}},
		{"cvi.spec.dataSource.objectRef", []string{"kind", "name", "namespace"}},
		{"cvi.status", []string{"usedInNamespaces"}},
		{"cvi.spec.dataSource.http.checksum", []string{"md5", "sha1", "sha256", "sha512"}},
	}
	for _, c := range cases {
		t.Run(c.path, func(t *testing.T) {
			out, err := kubectl(t, nil, "explain", c.path)
			if err != nil {
				t.Fatal(err)
			}
			for _, w := range c.want {
				if !strings.Contains(out, w) {
					t.Errorf("kubectl explain %s lacks %q:\n%s", c.path, w, out)
				}
			}
		})
	}
}

// TestSpec_FrozenOnceReady: before Ready a spec edit is accepted (the
// controller starts over); once Ready, a VirtualImage's dataSource and
// storage and any part of a ClusterVirtualImage's spec are refused with a
// message that says what to do instead.
func TestSpec_FrozenOnceReady(t *testing.T) {
	ns := newNamespace(t, "frozen")
	vi := []byte(`apiVersion: virtualization.deckhouse.io/v1alpha2
kind: VirtualImage
metadata:
  name: frozen
spec:
  dataSource:
    type: HTTP
    http:
      url: https://images.example/a.qcow2
`)
	cvi := []byte(`apiVersion: virtualization.deckhouse.io/v1alpha2
kind: ClusterVirtualImage
metadata:
  name: frozen-` + ns + `
spec:
  dataSource:
    type: HTTP
    http:
      url: https://images.example/a.qcow2
`)
	for _, m := range [][]byte{vi, cvi} {
		if _, err := kubectl(t, m, "apply", "-n", ns, "-f", "-"); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() { _, _ = kubectl(t, nil, "delete", "cvi", "frozen-"+ns, "--ignore-not-found") })
	edit := func(kind, name, url string) error {
		patch := `{"spec":{"dataSource":{"http":{"url":"` + url + `"}}}}`
		_, err := kubectl(t, nil, "patch", kind, name, "-n", ns, "--type=merge", "-p", patch)
		return err
	}
	for _, kind := range []string{"vi", "cvi"} {
		name := "frozen"
		if kind == "cvi" {
			name = "frozen-" + ns
		}
		if err := edit(kind, name, "https://images.example/b.qcow2"); err != nil {
			t.Fatalf("%s: an edit before Ready was refused: %v", kind, err)
		}
		gvr := viGVR
		if kind == "cvi" {
			gvr = cviGVR
		}
		setStatus(t, gvr, map[string]string{"vi": ns, "cvi": ""}[kind], name, map[string]any{"phase": "Ready", "cdrom": false})
		err := edit(kind, name, "https://images.example/c.qcow2")
		if err == nil || !strings.Contains(err.Error(), "the image is Ready") || !strings.Contains(err.Error(), "create a new image instead") {
			t.Fatalf("%s: an edit of a Ready image: %v, want it refused with the reason", kind, err)
		}
		// Labels and annotations stay editable.
		if _, err := kubectl(t, nil, "label", kind, name, "-n", ns, "team=a"); err != nil {
			t.Fatalf("%s: labelling a Ready image: %v", kind, err)
		}
	}
}
