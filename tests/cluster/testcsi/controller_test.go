package testcsi

import (
	"crypto/sha256"
	"io"
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
		{"snapshot source", &csi.CreateVolumeRequest{Name: "v", VolumeCapabilities: caps(fsCap),
			VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
				Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: "snap"}}}}, codes.InvalidArgument},
		{"source without type", &csi.CreateVolumeRequest{Name: "v", VolumeCapabilities: caps(fsCap),
			VolumeContentSource: &csi.VolumeContentSource{}}, codes.InvalidArgument},
		{"source without ID", &csi.CreateVolumeRequest{Name: "v", VolumeCapabilities: caps(fsCap),
			VolumeContentSource: volumeSource("")}, codes.InvalidArgument},
		{"unknown cloning parameter", &csi.CreateVolumeRequest{Name: "v", VolumeCapabilities: caps(fsCap),
			Parameters: map[string]string{cloningParameter: "yes"}}, codes.InvalidArgument},
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

func volumeSource(id string) *csi.VolumeContentSource {
	return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
		Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: id}}}
}

func cloneRequest(name, source string, c *csi.VolumeCapability, required int64) *csi.CreateVolumeRequest {
	return &csi.CreateVolumeRequest{
		Name:                name,
		VolumeCapabilities:  []*csi.VolumeCapability{c},
		CapacityRange:       &csi.CapacityRange{RequiredBytes: required},
		VolumeContentSource: volumeSource(source),
	}
}

func cloneVolume(t *testing.T, d *Driver, name, source string, c *csi.VolumeCapability, required int64) *csi.Volume {
	t.Helper()
	resp, err := d.CreateVolume(t.Context(), cloneRequest(name, source, c, required))
	if err != nil {
		t.Fatalf("CreateVolume(%q) from %s: %v", name, source, err)
	}
	if got := resp.GetVolume().GetContentSource().GetVolume().GetVolumeId(); got != source {
		t.Errorf("clone %q has content source %q, want %q", name, got, source)
	}
	return resp.GetVolume()
}

func writeAt(t *testing.T, path string, off int64, data []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(data, off); err != nil {
		t.Fatal(err)
	}
}

// sumOf hashes the first n bytes of path, or all of it if n < 0.
func sumOf(t *testing.T, path string, n int64) [sha256.Size]byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var r io.Reader = f
	if n >= 0 {
		r = io.LimitReader(f, n)
	}
	h := sha256.New()
	if _, err := io.Copy(h, r); err != nil {
		t.Fatal(err)
	}
	return [sha256.Size]byte(h.Sum(nil))
}

func statOf(t *testing.T, path string) syscall.Stat_t {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Lstat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st
}

func TestCloneFilesystemVolume(t *testing.T) {
	dataDir := t.TempDir()
	d := newTestDriver(t, dataDir)
	createVolume(t, d, "pvc-src", fsCap, 1<<20)
	src := filepath.Join(dataDir, "pvc-src", "data")

	// A sparse file with data at both ends of a hole, as a pod's files can be.
	big := filepath.Join(src, "big")
	writeAt(t, big, 0, []byte(strings.Repeat("head", 1024)))
	writeAt(t, big, 100<<20, []byte(strings.Repeat("tail", 1024)))
	if err := os.Truncate(big, 200<<20); err != nil {
		t.Fatal(err)
	}
	sub := filepath.Join(src, "sub")
	if err := os.Mkdir(sub, 0o700); err != nil {
		t.Fatal(err)
	}
	writeAt(t, filepath.Join(sub, "tool"), 0, []byte("#!/bin/sh\n"))
	if err := os.Symlink("../big", filepath.Join(sub, "link")); err != nil {
		t.Fatal(err)
	}
	for _, o := range []struct {
		path     string
		uid, gid int
		mode     os.FileMode
	}{
		{big, 1000, 2000, 0o640},
		{filepath.Join(sub, "tool"), 1001, 1001, 0o755 | os.ModeSetgid},
		{filepath.Join(sub, "link"), 1002, 1002, 0},
		// Read-only: the copy sets a directory's mode once it is filled.
		{sub, 1003, 1003, 0o555},
	} {
		if err := os.Lchown(o.path, o.uid, o.gid); err != nil {
			t.Fatal(err)
		}
		if o.mode != 0 {
			if err := os.Chmod(o.path, o.mode); err != nil {
				t.Fatal(err)
			}
		}
	}
	// What a clone that died half-way leaves behind must not end up in the
	// retried clone.
	leftover := filepath.Join(dataDir, "pvc-clone", "data", "leftover")
	if err := os.MkdirAll(filepath.Dir(leftover), 0o755); err != nil {
		t.Fatal(err)
	}
	writeAt(t, leftover, 0, []byte("partial"))
	d = newTestDriver(t, dataDir)

	cloneVolume(t, d, "pvc-clone", "pvc-src", fsCap, 1<<20)
	dst := filepath.Join(dataDir, "pvc-clone", "data")
	bigSum := sumOf(t, big, -1)
	if _, err := os.Lstat(filepath.Join(dst, "leftover")); !os.IsNotExist(err) {
		t.Errorf("leftover of an earlier attempt still there: %v", err)
	}
	if sumOf(t, filepath.Join(dst, "big"), -1) != bigSum {
		t.Error("cloned file differs from its source")
	}
	if st := statOf(t, filepath.Join(dst, "big")); st.Size != 200<<20 || st.Blocks*512 > 1<<20 {
		t.Errorf("cloned file has size %d and %d bytes allocated, want a sparse file of %d bytes", st.Size, st.Blocks*512, 200<<20)
	}
	for _, rel := range []string{".", "big", "sub", "sub/tool", "sub/link"} {
		want, got := statOf(t, filepath.Join(src, rel)), statOf(t, filepath.Join(dst, rel))
		if got.Mode != want.Mode || got.Uid != want.Uid || got.Gid != want.Gid {
			t.Errorf("%s: clone has mode %o, owner %d:%d; want %o, %d:%d", rel, got.Mode, got.Uid, got.Gid, want.Mode, want.Uid, want.Gid)
		}
	}
	if target, err := os.Readlink(filepath.Join(dst, "sub", "link")); err != nil || target != "../big" {
		t.Errorf("cloned symlink points to %q, %v; want ../big", target, err)
	}

	// Retries, even after a restart, get the clone; other content does not.
	d = newTestDriver(t, dataDir)
	if again := cloneVolume(t, d, "pvc-clone", "pvc-src", fsCap, 1<<20); again.GetVolumeId() != "pvc-clone" {
		t.Errorf("re-create returned %v", again)
	}
	createVolume(t, d, "pvc-other", fsCap, 1<<20)
	_, err := d.CreateVolume(t.Context(), cloneRequest("pvc-clone", "pvc-other", fsCap, 1<<20))
	wantCode(t, "other source", err, codes.AlreadyExists)
	_, err = d.CreateVolume(t.Context(), &csi.CreateVolumeRequest{Name: "pvc-clone",
		VolumeCapabilities: []*csi.VolumeCapability{fsCap}, CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20}})
	wantCode(t, "no source", err, codes.AlreadyExists)
	_, err = d.CreateVolume(t.Context(), cloneRequest("pvc-other", "pvc-src", fsCap, 1<<20))
	wantCode(t, "source for an empty volume", err, codes.AlreadyExists)

	// The clone is a copy: deleting its source leaves it and its retries be.
	if _, err := d.DeleteVolume(t.Context(), &csi.DeleteVolumeRequest{VolumeId: "pvc-src"}); err != nil {
		t.Fatal(err)
	}
	cloneVolume(t, d, "pvc-clone", "pvc-src", fsCap, 1<<20)
	if sumOf(t, filepath.Join(dst, "big"), -1) != bigSum {
		t.Error("clone changed after its source was deleted")
	}
}

func TestCloneBlockVolume(t *testing.T) {
	dataDir := t.TempDir()
	d := newTestDriver(t, dataDir)
	createVolume(t, d, "pvc-src", blockCap, 8<<20)
	src := filepath.Join(dataDir, "pvc-src", "disk.img")
	writeAt(t, src, 0, []byte(strings.Repeat("boot", 1024)))
	writeAt(t, src, 4<<20, []byte(strings.Repeat("data", 1024)))

	vol := cloneVolume(t, d, "pvc-clone", "pvc-src", blockCap, 16<<20)
	if vol.GetCapacityBytes() != 16<<20 {
		t.Errorf("clone capacity %d, want %d", vol.GetCapacityBytes(), 16<<20)
	}
	dst := filepath.Join(dataDir, "pvc-clone", "disk.img")
	if st := statOf(t, dst); st.Size != 16<<20 || st.Blocks*512 > 1<<20 {
		t.Errorf("cloned disk image has size %d and %d bytes allocated, want a sparse file of %d bytes", st.Size, st.Blocks*512, 16<<20)
	}
	if sumOf(t, dst, 8<<20) != sumOf(t, src, -1) {
		t.Error("cloned disk image does not start with its source")
	}
	b, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Trim(string(b[8<<20:]), "\x00") != "" {
		t.Error("growth of the cloned disk image is not zeroed")
	}
	if again := cloneVolume(t, d, "pvc-clone", "pvc-src", blockCap, 16<<20); again.GetCapacityBytes() != 16<<20 {
		t.Errorf("re-create returned %v", again)
	}
}

func TestCloneVolumeRejects(t *testing.T) {
	dataDir := t.TempDir()
	d := newTestDriver(t, dataDir)
	createVolume(t, d, "pvc-fs", fsCap, 1<<20)
	createVolume(t, d, "pvc-block", blockCap, 8<<20)
	refusing := cloneRequest("refused", "pvc-fs", fsCap, 1<<20)
	refusing.Parameters = map[string]string{cloningParameter: cloningUnsupported}
	for _, tc := range []struct {
		name string
		req  *csi.CreateVolumeRequest
		want codes.Code
		says string
	}{
		{"missing source", cloneRequest("missing", "pvc-none", fsCap, 1<<20), codes.NotFound, "does not exist"},
		{"filesystem into block", cloneRequest("fs-to-block", "pvc-fs", blockCap, 8<<20), codes.InvalidArgument, "into a Block volume"},
		{"block into filesystem", cloneRequest("block-to-fs", "pvc-block", fsCap, 8<<20), codes.InvalidArgument, "into a Filesystem volume"},
		{"smaller than source", cloneRequest("smaller", "pvc-block", blockCap, 4<<20), codes.OutOfRange, "less than"},
		{"cloning unsupported", refusing, codes.Unimplemented, "refused by this class's parameters"},
	} {
		_, err := d.CreateVolume(t.Context(), tc.req)
		wantCode(t, tc.name, err, tc.want)
		if !strings.Contains(status.Convert(err).Message(), tc.says) {
			t.Errorf("%s: error %v does not say %q", tc.name, err, tc.says)
		}
		if _, err := os.Lstat(filepath.Join(dataDir, tc.req.GetName())); !os.IsNotExist(err) {
			t.Errorf("%s: rejected clone left its directory: %v", tc.name, err)
		}
	}

	// The parameter refuses clones only; empty volumes are still made.
	refusing.Name, refusing.VolumeContentSource = "empty", nil
	if _, err := d.CreateVolume(t.Context(), refusing); err != nil {
		t.Errorf("empty volume in a class refusing clones: %v", err)
	}

	// Only regular files, directories and symlinks are copied; a failed copy
	// leaves nothing behind.
	if err := syscall.Mkfifo(filepath.Join(dataDir, "pvc-fs", "data", "fifo"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := d.CreateVolume(t.Context(), cloneRequest("with-fifo", "pvc-fs", fsCap, 1<<20))
	wantCode(t, "source with a fifo", err, codes.Internal)
	if _, err := os.Lstat(filepath.Join(dataDir, "with-fifo")); !os.IsNotExist(err) {
		t.Errorf("failed clone left its directory: %v", err)
	}
}
