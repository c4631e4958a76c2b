package testcsi

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

const nodeID = "node-1"

var (
	fsCap    = capability(filesystemVolume, csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER)
	blockCap = capability(blockVolume, csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER)
)

func capability(kind volumeKind, mode csi.VolumeCapability_AccessMode_Mode) *csi.VolumeCapability {
	c := &csi.VolumeCapability{AccessMode: &csi.VolumeCapability_AccessMode{Mode: mode}}
	if kind == blockVolume {
		c.AccessType = &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}}
	} else {
		c.AccessType = &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}}
	}
	return c
}

func newTestDriver(t *testing.T, dataDir string) *Driver {
	t.Helper()
	d, err := New(Config{Endpoint: filepath.Join(t.TempDir(), "csi.sock"), DataDir: dataDir, NodeID: nodeID})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func createVolume(t *testing.T, d *Driver, name string, c *csi.VolumeCapability, required int64) *csi.Volume {
	t.Helper()
	resp, err := d.CreateVolume(t.Context(), &csi.CreateVolumeRequest{
		Name:               name,
		VolumeCapabilities: []*csi.VolumeCapability{c},
		CapacityRange:      &csi.CapacityRange{RequiredBytes: required},
	})
	if err != nil {
		t.Fatalf("CreateVolume(%q): %v", name, err)
	}
	return resp.GetVolume()
}

func wantCode(t *testing.T, what string, err error, want codes.Code) {
	t.Helper()
	if got := status.Code(err); got != want {
		t.Errorf("%s: got code %s (%v), want %s", what, got, err, want)
	}
}

func TestNewRequiresConfig(t *testing.T) {
	if _, err := New(Config{DataDir: t.TempDir()}); err == nil {
		t.Error("New without endpoint and node ID succeeded")
	}
}

func TestCreateVolumeRejectsInvalidRequests(t *testing.T) {
	dataDir := t.TempDir()
	d := newTestDriver(t, dataDir)
	caps := func(c ...*csi.VolumeCapability) []*csi.VolumeCapability { return c }
	for _, tc := range []struct {
		name string
		req  *csi.CreateVolumeRequest
		want codes.Code
	}{
		{"no name", &csi.CreateVolumeRequest{VolumeCapabilities: caps(fsCap)}, codes.InvalidArgument},
		{"no capabilities", &csi.CreateVolumeRequest{Name: "v"}, codes.InvalidArgument},
		{"multi-node access", &csi.CreateVolumeRequest{Name: "v", VolumeCapabilities: caps(
			capability(filesystemVolume, csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER))}, codes.InvalidArgument},
		{"no access mode", &csi.CreateVolumeRequest{Name: "v", VolumeCapabilities: caps(
			&csi.VolumeCapability{AccessType: fsCap.AccessType})}, codes.InvalidArgument},
		{"no access type", &csi.CreateVolumeRequest{Name: "v", VolumeCapabilities: caps(
			&csi.VolumeCapability{AccessMode: fsCap.AccessMode})}, codes.InvalidArgument},
		{"mount and block", &csi.CreateVolumeRequest{Name: "v", VolumeCapabilities: caps(fsCap, blockCap)}, codes.InvalidArgument},
		{"content source", &csi.CreateVolumeRequest{Name: "v", VolumeCapabilities: caps(fsCap),
			VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
				Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: "other"}}}}, codes.InvalidArgument},
		{"negative capacity", &csi.CreateVolumeRequest{Name: "v", VolumeCapabilities: caps(fsCap),
			CapacityRange: &csi.CapacityRange{RequiredBytes: -1}}, codes.InvalidArgument},
		{"required over limit", &csi.CreateVolumeRequest{Name: "v", VolumeCapabilities: caps(fsCap),
			CapacityRange: &csi.CapacityRange{RequiredBytes: 2 << 20, LimitBytes: 1 << 20}}, codes.OutOfRange},
		{"other node", &csi.CreateVolumeRequest{Name: "v", VolumeCapabilities: caps(fsCap),
			AccessibilityRequirements: &csi.TopologyRequirement{Requisite: []*csi.Topology{
				{Segments: map[string]string{TopologyKey: "node-2"}}}}}, codes.ResourceExhausted},
	} {
		_, err := d.CreateVolume(t.Context(), tc.req)
		wantCode(t, tc.name, err, tc.want)
	}
	if entries, _ := os.ReadDir(dataDir); len(entries) != 0 {
		t.Errorf("rejected requests left %d entries in the data dir", len(entries))
	}
}

func TestCreateVolumeCapacity(t *testing.T) {
	d := newTestDriver(t, t.TempDir())
	for _, tc := range []struct {
		name            string
		required, limit int64
		want            int64
	}{
		{"default", 0, 0, 1 << 30},
		{"default under limit", 0, 64 << 20, 64 << 20},
		{"required", 5 << 20, 0, 5 << 20},
		{"required within limit", 5 << 20, 8 << 20, 5 << 20},
		{"whole sectors", 1000, 0, 1024},
	} {
		resp, err := d.CreateVolume(t.Context(), &csi.CreateVolumeRequest{
			Name:               strings.ReplaceAll(tc.name, " ", "-"),
			VolumeCapabilities: []*csi.VolumeCapability{blockCap},
			CapacityRange:      &csi.CapacityRange{RequiredBytes: tc.required, LimitBytes: tc.limit},
		})
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if got := resp.GetVolume().GetCapacityBytes(); got != tc.want {
			t.Errorf("%s: capacity %d, want %d", tc.name, got, tc.want)
		}
	}
}

func TestCreateVolumeIsIdempotentAndSurvivesRestart(t *testing.T) {
	dataDir := t.TempDir()
	d := newTestDriver(t, dataDir)

	fsVol := createVolume(t, d, "pvc-fs", fsCap, 1<<20)
	if fsVol.GetVolumeId() != "pvc-fs" {
		t.Errorf("volume ID %q, want the safe name itself", fsVol.GetVolumeId())
	}
	if seg := fsVol.GetAccessibleTopology()[0].GetSegments(); seg[TopologyKey] != nodeID {
		t.Errorf("topology %v, want %s=%s", seg, TopologyKey, nodeID)
	}
	if fi, err := os.Stat(filepath.Join(dataDir, "pvc-fs", "data")); err != nil || fi.Mode().Perm() != 0o777 {
		t.Errorf("filesystem data dir: %v, %v; want mode 0777", fi, err)
	}

	blockVol := createVolume(t, d, "pvc-block", blockCap, 8<<20)
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Join(dataDir, "pvc-block", "disk.img"), &st); err != nil {
		t.Fatal(err)
	}
	if st.Size != 8<<20 || st.Blocks*512 >= st.Size {
		t.Errorf("disk image has size %d and %d blocks, want a sparse file of %d bytes", st.Size, st.Blocks, 8<<20)
	}

	odd := createVolume(t, d, "Odd/Name with spaces", fsCap, 0)
	if id := odd.GetVolumeId(); !strings.HasPrefix(id, "sha256_") || strings.ContainsAny(id, "/ ") {
		t.Errorf("volume ID %q is not a hashed path component", id)
	}
	if again := createVolume(t, d, "Odd/Name with spaces", fsCap, 0); again.GetVolumeId() != odd.GetVolumeId() {
		t.Errorf("re-create returned ID %q, want %q", again.GetVolumeId(), odd.GetVolumeId())
	}

	// A restart must see every volume with its kind and capacity.
	d = newTestDriver(t, dataDir)
	if again := createVolume(t, d, "pvc-fs", fsCap, 1<<20); again.GetVolumeId() != "pvc-fs" || again.GetCapacityBytes() != 1<<20 {
		t.Errorf("re-create after restart returned %v", again)
	}
	if again := createVolume(t, d, "pvc-block", blockCap, 8<<20); again.GetVolumeId() != blockVol.GetVolumeId() {
		t.Errorf("re-create after restart returned %v", again)
	}
	for what, req := range map[string]*csi.CreateVolumeRequest{
		"other capacity": {Name: "pvc-fs", VolumeCapabilities: []*csi.VolumeCapability{fsCap},
			CapacityRange: &csi.CapacityRange{RequiredBytes: 2 << 20}},
		"other kind": {Name: "pvc-block", VolumeCapabilities: []*csi.VolumeCapability{fsCap},
			CapacityRange: &csi.CapacityRange{RequiredBytes: 8 << 20}},
	} {
		_, err := d.CreateVolume(t.Context(), req)
		wantCode(t, what, err, codes.AlreadyExists)
	}
}

func TestDeleteVolume(t *testing.T) {
	dataDir := t.TempDir()
	d := newTestDriver(t, dataDir)
	vol := createVolume(t, d, "pvc-1", fsCap, 0)

	_, err := d.DeleteVolume(t.Context(), &csi.DeleteVolumeRequest{})
	wantCode(t, "no volume ID", err, codes.InvalidArgument)
	for range 2 {
		if _, err := d.DeleteVolume(t.Context(), &csi.DeleteVolumeRequest{VolumeId: vol.GetVolumeId()}); err != nil {
			t.Fatalf("DeleteVolume: %v", err)
		}
	}
	if _, err := os.Stat(filepath.Join(dataDir, vol.GetVolumeId())); !os.IsNotExist(err) {
		t.Errorf("volume directory still there: %v", err)
	}
	if _, err := newTestDriver(t, dataDir).DeleteVolume(t.Context(), &csi.DeleteVolumeRequest{VolumeId: "never-existed"}); err != nil {
		t.Errorf("DeleteVolume of an unknown ID: %v", err)
	}
}
