// Package app holds the vimg command tree; main only runs it.
package app

import (
	"io"

	"github.com/spf13/cobra"
)

// NewRootCommand builds the vimg command with its subcommands, writing to
// out and errOut.
func NewRootCommand(out, errOut io.Writer) *cobra.Command {
	root := &cobra.Command{
		Use:           "vimg",
		Short:         "Disk images for virtual machines on Kubernetes",
		SilenceUsage:  true,
		SilenceErrors: false,
	}
	root.SetOut(out)
	root.SetErr(errOut)
	root.AddCommand(newVersionCommand(), newInfoCommand(), newConvertCommand(), newUploadCommand(), newWorkerCommand())
	return root
}
