// Command vimg is the user's tool for disk images: offline conversion and
// inspection, and uploads into a cluster.
package main

import (
	"os"

	"vimg.dev/vimg/cmd/vimg/app"
)

func main() {
	if err := app.NewRootCommand(os.Stdout, os.Stderr).Execute(); err != nil {
		os.Exit(1)
	}
}
