//go:build cgo

package codec

import (
	"debug/elf"
	"os"
	"strings"
	"testing"
)

const wantImplementation = "libdeflate"

// TestLibdeflateStatic: the binary must run where libdeflate.so is not
// installed, so the test binary itself may not ask for it.
func TestLibdeflateStatic(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	f, err := elf.Open(exe)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	libs, err := f.ImportedLibraries()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range libs {
		if strings.Contains(l, "deflate") {
			t.Fatalf("binary links %s dynamically (needs %v); want libdeflate.a linked in", l, libs)
		}
	}
}
