//go:build cgo

package codec

import (
	"debug/elf"
	"os"
	"strings"
	"testing"
)

const (
	wantImplementation   = "libdeflate"
	wantXZImplementation = "liblzma-mt"
)

// TestLibdeflateStatic: the binary must run where libdeflate.so and
// liblzma.so are not installed, so the test binary itself may not ask for
// them. (That the libraries' code is in it shows in the other tests
// passing with Implementation and XZImplementation naming them.)
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
		if strings.Contains(l, "deflate") || strings.Contains(l, "lzma") {
			t.Fatalf("binary links %s dynamically (needs %v); want libdeflate.a and liblzma.a linked in", l, libs)
		}
	}
}
