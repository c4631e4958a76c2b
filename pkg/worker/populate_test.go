package worker

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"vimg.dev/vimg/pkg/diskimage/source"
	"vimg.dev/vimg/pkg/diskimage/testimg"
	"vimg.dev/vimg/pkg/importer"
	"vimg.dev/vimg/pkg/worker/api"
)

// pushQcow2 imports a compressed qcow2 of a 20 MiB pattern into DVCR the
// way an import pod does and returns the raw disk and the pinned ref.
func pushQcow2(t *testing.T, reg dvcrFixture, ref string) (raw []byte, pinned string) {
	t.Helper()
	dir := t.TempDir()
	disk := filepath.Join(dir, "disk.raw")
	testimg.Pattern(t, disk, 20<<20, 21)
	testimg.QemuImg(t, "convert", "-O", "qcow2", "-c", disk, filepath.Join(dir, "disk.qcow2"))
	src, err := source.OpenFile(filepath.Join(dir, "disk.qcow2"))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	res, err := importer.Import(context.Background(), importer.Request{Source: src, Client: reg.client(t), Ref: ref})
	if err != nil {
		t.Fatal(err)
	}
	raw, err = os.ReadFile(disk)
	if err != nil {
		t.Fatal(err)
	}
	repo, _ := importer.Repository(ref)
	return raw, repo + "@" + res.ManifestDigest
}

func populateRequest(t *testing.T, req api.PopulateRequest) string {
	t.Helper()
	b, _ := json.Marshal(req)
	path := filepath.Join(t.TempDir(), api.RequestFile)
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestPopulate_FilesystemVolumeGetsAGrownDiskImg: a qcow2 in DVCR becomes
// disk.img at the volume's root, as large as the claim less the file
// system overhead, holding the disk followed by zeros.
func TestPopulate_FilesystemVolumeGetsAGrownDiskImg(t *testing.T) {
	const repo, ref = "vi/ns/disk", "vi/ns/disk:0c5e6a1e-0000-4000-8000-000000000002"
	reg := newDVCR(t, repo)
	raw, pinned := pushQcow2(t, reg, ref)
	mount := t.TempDir()
	const capacity = 32 << 20
	req := api.PopulateRequest{
		DVCR:     api.DVCRSpec{Address: reg.address, Ref: pinned, Token: reg.token, CABundle: reg.ca},
		Capacity: capacity, FilesystemOverhead: 0.055, UID: os.Getuid(), GID: os.Getgid(),
	}
	out := populate(context.Background(), PopulateConfig{Config: Config{RequestPath: populateRequest(t, req)}, MountPath: mount})
	if out.Populated == nil {
		t.Fatalf("populate failed: %+v", out)
	}
	want := api.UsableDiskSize(capacity, 0.055)
	if out.Populated.VirtualSize != int64(len(raw)) || out.Populated.DiskSize != want {
		t.Fatalf("result %+v, want virtual %d and disk %d", out.Populated, len(raw), want)
	}
	got, err := os.ReadFile(filepath.Join(mount, api.DiskFile))
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(got)) != want || !bytes.Equal(got[:len(raw)], raw) || !bytes.Equal(got[len(raw):], make([]byte, want-int64(len(raw)))) {
		t.Fatalf("disk.img (%d bytes) is not the disk padded to %d", len(got), want)
	}
	fi, _ := os.Stat(filepath.Join(mount, api.DiskFile))
	if fi.Mode().Perm() != 0o660 {
		t.Errorf("disk.img mode %v, want 0660", fi.Mode().Perm())
	}
}

// TestPopulate_TooSmallVolumeIsPermanentAndUntouched: a volume that cannot
// hold the disk fails for good, saying the size to ask for, and gets no
// data.
func TestPopulate_TooSmallVolumeIsPermanentAndUntouched(t *testing.T) {
	const repo, ref = "vi/ns/disk", "vi/ns/disk:0c5e6a1e-0000-4000-8000-000000000003"
	reg := newDVCR(t, repo)
	_, pinned := pushQcow2(t, reg, ref)
	mount := t.TempDir()
	req := api.PopulateRequest{
		DVCR:     api.DVCRSpec{Address: reg.address, Ref: pinned, Token: reg.token, CABundle: reg.ca},
		Capacity: 21 << 20, FilesystemOverhead: 0.055,
	}
	out := populate(context.Background(), PopulateConfig{Config: Config{RequestPath: populateRequest(t, req)}, MountPath: mount})
	if out.Populated != nil || out.Reason != api.ReasonTooSmall || !out.Permanent ||
		!strings.Contains(out.Message, "at least 22Mi") {
		t.Fatalf("outcome %+v, want a permanent %s asking for 22Mi", out, api.ReasonTooSmall)
	}
	if _, err := os.Stat(filepath.Join(mount, api.DiskFile)); !os.IsNotExist(err) {
		t.Fatalf("a too-small volume got a disk.img (%v)", err)
	}
}

// TestPopulate_MissingImageIsRetried: an image deleted or re-imported
// since the pod was made is not a permanent failure.
func TestPopulate_MissingImageIsRetried(t *testing.T) {
	const repo = "vi/ns/disk"
	reg := newDVCR(t, repo)
	req := api.PopulateRequest{
		DVCR:     api.DVCRSpec{Address: reg.address, Ref: repo + "@sha256:" + strings.Repeat("ab", 32), Token: reg.token, CABundle: reg.ca},
		Capacity: 1 << 30,
	}
	out := populate(context.Background(), PopulateConfig{Config: Config{RequestPath: populateRequest(t, req)}, MountPath: t.TempDir()})
	if out.Reason != api.ReasonImageChanged || out.Permanent {
		t.Fatalf("outcome %+v, want a transient %s", out, api.ReasonImageChanged)
	}
}
