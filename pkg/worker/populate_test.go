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

// compressedQcow2 makes a compressed qcow2 of a 20 MiB pattern and returns
// the raw disk and the qcow2's path.
func compressedQcow2(t *testing.T) (raw []byte, path string) {
	t.Helper()
	dir := t.TempDir()
	disk, path := filepath.Join(dir, "disk.raw"), filepath.Join(dir, "disk.qcow2")
	testimg.Pattern(t, disk, 20<<20, 21)
	testimg.QemuImg(t, "convert", "-O", "qcow2", "-c", disk, path)
	raw, err := os.ReadFile(disk)
	if err != nil {
		t.Fatal(err)
	}
	return raw, path
}

// pushQcow2 imports a compressed qcow2 of a 20 MiB pattern into DVCR the
// way an import pod does and returns the raw disk and the pinned ref.
func pushQcow2(t *testing.T, reg dvcrFixture, ref string) (raw []byte, pinned string) {
	t.Helper()
	raw, path := compressedQcow2(t)
	src, err := source.OpenFile(path)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	res, err := importer.Import(context.Background(), importer.Request{Source: src, Client: reg.client(t), Ref: ref})
	if err != nil {
		t.Fatal(err)
	}
	repo, _ := importer.Repository(ref)
	return raw, repo + "@" + res.ManifestDigest
}

// writeRequest writes a request (api.Request, api.PopulateRequest) as the
// controller's Secret holds it and returns its path.
func writeRequest(t *testing.T, req any) string {
	t.Helper()
	b, err := json.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), api.RequestFile)
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// checkDiskImg fails unless the volume at mount holds a disk.img of size
// bytes, mode 0660: raw followed by zeros.
func checkDiskImg(t *testing.T, mount string, raw []byte, size int64) {
	t.Helper()
	got, err := os.ReadFile(filepath.Join(mount, api.DiskFile))
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(got)) != size || !bytes.Equal(got[:len(raw)], raw) || !bytes.Equal(got[len(raw):], make([]byte, size-int64(len(raw)))) {
		t.Fatalf("disk.img (%d bytes) is not the disk padded to %d", len(got), size)
	}
	fi, _ := os.Stat(filepath.Join(mount, api.DiskFile))
	if fi.Mode().Perm() != 0o660 {
		t.Errorf("disk.img mode %v, want 0660", fi.Mode().Perm())
	}
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
	out := populate(context.Background(), PopulateConfig{Config: Config{RequestPath: writeRequest(t, req)}, MountPath: mount})
	if out.Populated == nil {
		t.Fatalf("populate failed: %+v", out)
	}
	want := api.UsableDiskSize(capacity, 0.055)
	if out.Populated.VirtualSize != int64(len(raw)) || out.Populated.DiskSize != want {
		t.Fatalf("result %+v, want virtual %d and disk %d", out.Populated, len(raw), want)
	}
	checkDiskImg(t, mount, raw, want)
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
	out := populate(context.Background(), PopulateConfig{Config: Config{RequestPath: writeRequest(t, req)}, MountPath: mount})
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
	out := populate(context.Background(), PopulateConfig{Config: Config{RequestPath: writeRequest(t, req)}, MountPath: t.TempDir()})
	if out.Reason != api.ReasonImageChanged || out.Permanent {
		t.Fatalf("outcome %+v, want a transient %s", out, api.ReasonImageChanged)
	}
}

// fillFromSource runs a populate pod FromSource of the import request
// at source onto a Filesystem volume at mount of the given capacity.
func fillFromSource(t *testing.T, source, mount string, capacity int64) api.Outcome {
	t.Helper()
	req := api.PopulateRequest{FromSource: true, Capacity: capacity, FilesystemOverhead: 0.055, UID: os.Getuid(), GID: os.Getgid()}
	return populate(context.Background(), PopulateConfig{
		Config: Config{RequestPath: writeRequest(t, req)}, MountPath: mount, SourceRequestPath: source,
	})
}

// TestPopulate_FromSourceWritesTheCheckedSource: a compressed qcow2 over
// HTTP goes straight onto the volume, its checksum checked: the right one
// is reported, a wrong one fails for good.
func TestPopulate_FromSourceWritesTheCheckedSource(t *testing.T) {
	raw, path := compressedQcow2(t)
	qcow := readFile(t, path)
	sum := "sha256:" + testimg.SHA256File(t, path)
	const capacity = 32 << 20
	t.Run("right checksum", func(t *testing.T) {
		mount := t.TempDir()
		out := fillFromSource(t, serveHTTP(t, qcow, "md5:"+strings.Repeat("0", 32), sum), mount, capacity)
		if out.Populated == nil {
			t.Fatalf("populate failed: %+v", out)
		}
		want := api.PopulateResult{
			VirtualSize: int64(len(raw)), DiskSize: api.UsableDiskSize(capacity, 0.055), Format: "qcow2",
			SourceSize: int64(len(qcow)), SourceChecksum: sum, Read: int64(len(qcow)), Written: out.Populated.Written,
		}
		if *out.Populated != want {
			t.Fatalf("result %+v, want %+v", *out.Populated, want)
		}
		checkDiskImg(t, mount, raw, want.DiskSize)
	})
	t.Run("wrong checksum", func(t *testing.T) {
		out := fillFromSource(t, serveHTTP(t, qcow, "sha256:"+strings.Repeat("ab", 32)), t.TempDir(), capacity)
		if out.Populated != nil || !out.Permanent || out.Reason != importer.ReasonChecksumMismatch || !strings.Contains(out.Message, "checksum") {
			t.Fatalf("outcome %+v, want a permanent %s", out, importer.ReasonChecksumMismatch)
		}
	})
}

// TestPopulate_FromSourceOfUnknownSize: raw data whose size shows only at
// its end (decompressed) fills the volume; more than the volume holds
// fails as too small.
func TestPopulate_FromSourceOfUnknownSize(t *testing.T) {
	disk := filepath.Join(t.TempDir(), "disk.raw")
	testimg.Pattern(t, disk, 20<<20, 22)
	raw := readFile(t, disk)
	source := serveHTTP(t, gzipped(t, raw))
	mount := t.TempDir()
	out := fillFromSource(t, source, mount, 32<<20)
	if out.Populated == nil || out.Populated.VirtualSize != int64(len(raw)) || out.Populated.Format != "raw" {
		t.Fatalf("outcome %+v, want a raw disk of %d bytes", out, len(raw))
	}
	checkDiskImg(t, mount, raw, out.Populated.DiskSize)

	out = fillFromSource(t, source, t.TempDir(), 16<<20)
	if out.Populated != nil || !out.Permanent || out.Reason != api.ReasonTooSmall || !strings.Contains(out.Message, "is larger") {
		t.Fatalf("outcome %+v, want a permanent %s", out, api.ReasonTooSmall)
	}
}
