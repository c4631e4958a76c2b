package app

import (
	"encoding/json"
	"fmt"

	"github.com/spf13/cobra"

	"vimg.dev/vimg/pkg/diskimage"
)

func newInfoCommand() *cobra.Command {
	var (
		output string
		sf     sourceFlags
	)
	cmd := &cobra.Command{
		Use:   "info [--output json] SRC",
		Short: "Detect an image's format, compression and sizes (SRC: a path, an http(s) URL, or - for stdin)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if output != "" && output != "json" && output != "text" {
				return fmt.Errorf("--output %q: want json or text", output)
			}
			src, err := sf.open(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			defer src.Close()
			info, err := diskimage.Inspect(cmd.Context(), src)
			if err != nil {
				return fmt.Errorf("%s: %w", src.Name(), err)
			}
			if output == "json" {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(info)
			}
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "image: %s\n", src.Name())
			fmt.Fprintf(w, "format: %s\n", info.Format)
			if info.Subformat != "" {
				fmt.Fprintf(w, "subformat: %s\n", info.Subformat)
			}
			if info.Compression != "" {
				fmt.Fprintf(w, "compression: %s\n", info.Compression)
			}
			fmt.Fprintf(w, "virtual size: %s (%d bytes)\n", humanBytes(info.VirtualSize), info.VirtualSize)
			if info.FileSize >= 0 {
				fmt.Fprintf(w, "file size: %s (%d bytes)\n", humanBytes(info.FileSize), info.FileSize)
			}
			if info.ClusterSize > 0 {
				fmt.Fprintf(w, "cluster size: %d\n", info.ClusterSize)
			}
			fmt.Fprintf(w, "cdrom: %t\n", info.CDROM)
			return nil
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "text", "output format: text or json")
	sf.register(cmd.Flags())
	return cmd
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
