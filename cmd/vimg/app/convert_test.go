package app

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"vimg.dev/vimg/pkg/diskimage/testimg"
)

// withStdin makes os.Stdin read the file at path while fn runs, as a shell
// redirect would.
func withStdin(t *testing.T, path string, fn func()) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	go func() { w.Write(data); w.Close() }()
	old := os.Stdin
	os.Stdin = r
	defer func() { os.Stdin = old; r.Close() }()
	fn()
}

func image(t *testing.T, args ...string) (img, ref string) {
	t.Helper()
	dir := t.TempDir()
	raw := filepath.Join(dir, "disk.raw")
	testimg.Pattern(t, raw, 6<<20+512, 11)
	img = filepath.Join(dir, "disk.img")
	testimg.QemuImg(t, append(append([]string{"convert"}, args...), raw, img)...)
	return img, testimg.RawOf(t, img)
}

func TestInfoJSON_AgreesWithQemuImg(t *testing.T) {
	img, _ := image(t, "-c", "-O", "qcow2")
	out, _, err := run(t, "info", "--output", "json", img)
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]any
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, out)
	}
	var q struct {
		VirtualSize float64 `json:"virtual-size"`
		Format      string  `json:"format"`
	}
	json.Unmarshal(testimg.QemuImg(t, "info", "--output=json", img), &q)
	st, _ := os.Stat(img)
	if got["format"] != q.Format || got["compression"] != "" || got["virtualSize"] != q.VirtualSize || got["fileSize"] != float64(st.Size()) {
		t.Fatalf("vimg info = %v; qemu-img says format %s, virtual size %.0f; file is %d bytes", got, q.Format, q.VirtualSize, st.Size())
	}

	// The same image, xz-compressed, from stdin: fileSize is what was read.
	testimg.Run(t, "xz", "-0", "-T1", "-k", img)
	xst, _ := os.Stat(img + ".xz")
	withStdin(t, img+".xz", func() {
		out, _, err = run(t, "info", "-o", "json", "-")
	})
	if err != nil {
		t.Fatal(err)
	}
	got = nil
	json.Unmarshal([]byte(out), &got)
	if got["format"] != "qcow2" || got["compression"] != "xz" || got["virtualSize"] != q.VirtualSize || got["fileSize"] != float64(xst.Size()) {
		t.Fatalf("vimg info - < img.xz = %v; want qcow2/xz, %.0f, fileSize %d", got, q.VirtualSize, xst.Size())
	}
}

func TestConvert_FromStdinAndFile(t *testing.T) {
	img, ref := image(t, "-O", "vmdk", "-o", "subformat=streamOptimized")
	dst := filepath.Join(t.TempDir(), "out.raw")
	var err error
	withStdin(t, img, func() { _, _, err = run(t, "convert", "-O", "raw", "-", dst) })
	if err != nil {
		t.Fatal(err)
	}
	testimg.SameContent(t, ref, dst)

	_, errOut, err := run(t, "convert", "--progress=always", img, dst)
	if err != nil {
		t.Fatal(err)
	}
	testimg.SameContent(t, ref, dst)
	if !strings.Contains(errOut, "100.0%") || !strings.Contains(errOut, "written in") {
		t.Fatalf("no progress bar on stderr: %q", errOut)
	}
}

func TestConvert_ChecksumMismatchFailsAndRemovesTarget(t *testing.T) {
	img, ref := image(t, "-O", "qcow2")
	dst := filepath.Join(t.TempDir(), "out.raw")
	_, errOut, err := run(t, "convert", "--checksum", "sha256:"+strings.Repeat("0", 64), img, dst)
	if err == nil {
		t.Fatal("converted despite a wrong checksum")
	}
	if lines := strings.Split(strings.TrimSpace(errOut), "\n"); len(lines) != 1 || !strings.Contains(lines[0], "checksum mismatch: source sha256 is") {
		t.Fatalf("want one clear line on stderr, got %q", errOut)
	}
	if _, err := os.Stat(dst); !os.IsNotExist(err) {
		t.Fatalf("the target of a failed conversion is still there (%v)", err)
	}
	sum := strings.Fields(string(testimg.Run(t, "sha256sum", img)))[0]
	if _, _, err := run(t, "convert", "--checksum", "sha256:"+sum, img, dst); err != nil {
		t.Fatalf("right checksum refused: %v", err)
	}
	testimg.SameContent(t, ref, dst)
}

func TestConvert_BadInputGivesOneLine(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.qcow2")
	testimg.QemuImg(t, "create", "-f", "qcow2", "-b", "/etc/hostname", "-F", "raw", bad)
	for name, args := range map[string][]string{
		"backing file": {"convert", bad, filepath.Join(dir, "out.raw")},
		"no such file": {"convert", filepath.Join(dir, "missing.qcow2"), filepath.Join(dir, "out.raw")},
		"bad checksum": {"convert", "--checksum", "sha256:xyz", bad, filepath.Join(dir, "out.raw")},
		"bad format":   {"convert", "-O", "qcow2", bad, filepath.Join(dir, "out.raw")},
	} {
		_, errOut, err := run(t, args...)
		lines := strings.Split(strings.TrimSpace(errOut), "\n")
		if err == nil || len(lines) != 1 || !strings.HasPrefix(lines[0], "Error: ") {
			t.Errorf("%s: want a failure with one line on stderr, got err=%v stderr=%q", name, err, errOut)
		}
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Fatalf("failed conversions left files behind: %v", entries)
	}
}

// TestConvert_ToBlockDevice writes to a loop device larger than the disk:
// the image lands from byte 0 and everything after it reads as zeros, though
// the device was full of 0xff before.
func TestConvert_ToBlockDevice(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("CI runs as root; this test needs a loop device")
		}
		t.Skip("skipping: needs root for a loop device")
	}
	testimg.Require(t, "losetup")
	img, ref := image(t, "-c", "-O", "qcow2")
	backing := filepath.Join(t.TempDir(), "dev.img")
	ff := bytes.Repeat([]byte{0xff}, 10<<20)
	if err := os.WriteFile(backing, ff, 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("losetup", "-f", "--show", backing).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup: %v: %s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "-d", dev).Run() })
	if _, _, err := run(t, "convert", img, dev); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(dev)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := os.ReadFile(ref)
	if !bytes.Equal(got[:len(want)], want) {
		t.Fatal("device content differs from qemu-img convert")
	}
	if !bytes.Equal(got[len(want):], make([]byte, len(got)-len(want))) {
		t.Fatal("the device past the disk still holds old data")
	}
}
