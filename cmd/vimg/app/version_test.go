package app

import (
	"bytes"
	"encoding/json"
	"runtime"
	"strings"
	"testing"

	"vimg.dev/vimg/pkg/version"
)

func run(t *testing.T, args ...string) (string, string, error) {
	t.Helper()
	var out, errOut bytes.Buffer
	cmd := NewRootCommand(&out, &errOut)
	cmd.SetArgs(args)
	err := cmd.Execute()
	return out.String(), errOut.String(), err
}

func TestVersion_PrintsLinkedVersion(t *testing.T) {
	old := version.Version
	version.Version = "v1.2.3-4-gabcdef"
	t.Cleanup(func() { version.Version = old })

	out, _, err := run(t, "version")
	if err != nil {
		t.Fatal(err)
	}
	want := "vimg v1.2.3-4-gabcdef (" + runtime.Version() + ", " + runtime.GOOS + "/" + runtime.GOARCH + ")\n"
	if out != want {
		t.Fatalf("vimg version printed %q, want %q", out, want)
	}

	out, _, err = run(t, "version", "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]string
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("vimg version -o json is not JSON: %v\n%s", err, out)
	}
	if got["version"] != "v1.2.3-4-gabcdef" || got["platform"] != runtime.GOOS+"/"+runtime.GOARCH {
		t.Fatalf("vimg version -o json = %v", got)
	}
}

func TestVersion_RejectsUnknownOutputAndArguments(t *testing.T) {
	if _, errOut, err := run(t, "version", "-o", "yaml"); err == nil || !strings.Contains(errOut, `unknown --output "yaml"`) {
		t.Fatalf("want an error naming the bad format, got err=%v stderr=%q", err, errOut)
	}
	if _, _, err := run(t, "version", "extra"); err == nil {
		t.Fatal("vimg version accepted a stray argument")
	}
}
