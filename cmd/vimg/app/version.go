package app

import (
	"encoding/json"
	"fmt"
	"runtime"

	"github.com/spf13/cobra"

	"vimg.dev/vimg/pkg/diskimage/codec"
	"vimg.dev/vimg/pkg/version"
)

func newVersionCommand() *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "version",
		Short: "Print the version of vimg",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			switch output {
			case "":
				fmt.Fprintln(cmd.OutOrStdout(), version.String("vimg"))
			case "json":
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(map[string]string{
					"version":   version.Get(),
					"goVersion": runtime.Version(),
					"platform":  runtime.GOOS + "/" + runtime.GOARCH,
					"inflate":   codec.Implementation(),
					"xz":        codec.XZImplementation(),
				})
			default:
				return fmt.Errorf("unknown --output %q: use json, or omit it for one line", output)
			}
			return nil
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "", "output format: json")
	return cmd
}
