package app

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

func TestTransferBar_LinesWhenNotATerminal(t *testing.T) {
	var out bytes.Buffer
	b := &transferBar{w: &out}
	b.update(10, 100)
	b.update(20, 100) // within 5 s: not printed
	b.notice("resuming at byte 20 of 100")
	b.update(100, 100) // the end always is
	b.importing("42.0%")
	b.importing("42.0%")
	b.done()
	got := out.String()
	for _, want := range []string{"Uploading: [###", "10.0% 10 B of 100 B", "resuming at byte 20 of 100\n", "100.0% 100 B of 100 B", "Importing: 42.0%\n"} {
		if !strings.Contains(got, want) {
			t.Errorf("output lacks %q:\n%s", want, got)
		}
	}
	if strings.Contains(got, "\r") || strings.Count(got, "Uploading:") != 2 || strings.Count(got, "Importing:") != 1 {
		t.Errorf("plain output should have no carriage returns, two progress lines and one import line:\n%q", got)
	}
}

func TestTransferBar_RewritesOneLineOnATerminal(t *testing.T) {
	var out bytes.Buffer
	b := &transferBar{w: &out, tty: true}
	b.update(50, 100)
	b.notice("the upload was interrupted; resuming")
	b.done()
	got := out.String()
	if !strings.HasPrefix(got, "\r[") || !strings.Contains(got, "\r\x1b[Kthe upload was interrupted; resuming\n") {
		t.Errorf("terminal output %q", got)
	}
}

func TestOpenUploadSource_FilesResumeStreamsDoNot(t *testing.T) {
	path := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(path, []byte("0123456789"), 0o600); err != nil {
		t.Fatal(err)
	}
	src, closeSrc, err := openUploadSource(path)
	if err != nil {
		t.Fatal(err)
	}
	defer closeSrc()
	if src.File == nil || src.Size != 10 || src.Stream != nil {
		t.Errorf("a regular file opened as %+v", src)
	}
	src, _, err = openUploadSource("-")
	if err != nil || src.File != nil || src.Stream == nil {
		t.Errorf("stdin opened as %+v, %v", src, err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	src, closePipe, err := openUploadSource("/dev/fd/" + strconv.Itoa(int(r.Fd())))
	if err != nil {
		t.Fatal(err)
	}
	defer closePipe()
	if src.File != nil || src.Stream == nil {
		t.Errorf("a pipe opened as %+v", src)
	}
	if _, _, err := openUploadSource(t.TempDir()); err == nil {
		t.Error("a directory was accepted")
	}
}

func TestUpload_NeedsAKubeconfig(t *testing.T) {
	t.Setenv("KUBECONFIG", filepath.Join(t.TempDir(), "missing"))
	t.Setenv("HOME", t.TempDir())
	_, _, err := run(t, "upload", "--kubeconfig", filepath.Join(t.TempDir(), "nope"), "img", "disk.img")
	if err == nil || !strings.Contains(err.Error(), "kubeconfig") {
		t.Fatalf("vimg upload without a kubeconfig: %v", err)
	}
}
