package v1alpha2

import (
	"encoding/json"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/runtime"
)

// The CDROM column shows status.cdrom: false must be written, not dropped.
func TestStatus_SerializesCDROMFalse(t *testing.T) {
	for _, status := range []any{VirtualImageStatus{Phase: ImagePhaseProvisioning}, ClusterVirtualImageStatus{Phase: ImagePhaseProvisioning}} {
		data, err := json.Marshal(status)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(data), `"cdrom":false`) {
			t.Errorf("%T serializes as %s, without cdrom:false", status, data)
		}
	}
}

func TestScheme_KnowsBothKinds(t *testing.T) {
	s := runtime.NewScheme()
	if err := AddToScheme(s); err != nil {
		t.Fatal(err)
	}
	for _, kind := range []string{"VirtualImage", "VirtualImageList", "ClusterVirtualImage", "ClusterVirtualImageList"} {
		if !s.Recognizes(SchemeGroupVersion.WithKind(kind)) {
			t.Errorf("scheme does not recognize %s", kind)
		}
	}
}

func TestDeepCopy_SharesNothing(t *testing.T) {
	sc := "fast"
	vi := &VirtualImage{Spec: VirtualImageSpec{
		PersistentVolumeClaim: &VirtualImagePersistentVolumeClaim{StorageClassName: &sc},
		DataSource: VirtualImageDataSource{Type: DataSourceTypeHTTP, HTTP: &VirtualImageHTTP{HTTPSource: HTTPSource{
			URL: "https://example.com/a.qcow2", CABundle: []byte("pem"), Headers: []HTTPHeader{{Name: "X", Value: "1"}},
		}}},
	}}
	cp := vi.DeepCopy()
	*cp.Spec.PersistentVolumeClaim.StorageClassName = "slow"
	cp.Spec.DataSource.HTTP.CABundle[0] = 'X'
	cp.Spec.DataSource.HTTP.Headers[0].Value = "2"
	if sc != "fast" || string(vi.Spec.DataSource.HTTP.CABundle) != "pem" || vi.Spec.DataSource.HTTP.Headers[0].Value != "1" {
		t.Fatal("a change to the deep copy changed the original")
	}
}
