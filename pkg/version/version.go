// Package version reports the build of vimg's binaries.
package version

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// Version is set at link time (-X vimg.dev/vimg/pkg/version.Version=...) by
// the Makefile from `git describe`; a plain `go build` reports the module
// version or "devel".
var Version = ""

// Get returns the version of this binary.
func Get() string {
	if Version != "" {
		return Version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "devel"
}

// String is the one-line version report of a binary.
func String(binary string) string {
	return fmt.Sprintf("%s %s (%s, %s/%s)", binary, Get(), runtime.Version(), runtime.GOOS, runtime.GOARCH)
}
