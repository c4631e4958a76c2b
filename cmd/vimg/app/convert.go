package app

import (
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"vimg.dev/vimg/pkg/diskimage"
	"vimg.dev/vimg/pkg/diskimage/sink"
)

func newConvertCommand() *cobra.Command {
	var (
		outFormat  string
		checksum   string
		progress   string
		size       int64
		workers    int
		sequential bool
		spillLimit int64
		maxSize    int64
		sf         sourceFlags
	)
	cmd := &cobra.Command{
		Use:   "convert [-O raw] [--checksum ALGO:HEX] SRC DST",
		Short: "Convert an image to a raw disk in one pass (SRC: a path, an http(s) URL, or - for stdin; DST: a file, created sparse, or a block device)",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if outFormat != "raw" {
				return fmt.Errorf("-O %q: only raw output is supported", outFormat)
			}
			opts := diskimage.Options{Workers: workers, Sequential: sequential, SpillLimit: spillLimit, MaxSize: maxSize}
			if checksum != "" {
				c, err := diskimage.ParseChecksum(checksum)
				if err != nil {
					return err
				}
				opts.Checksum = &c
			}
			src, err := sf.open(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			defer src.Close()

			dst := args[1]
			created := false
			if _, err := os.Stat(dst); errors.Is(err, os.ErrNotExist) {
				created = true
			}
			var target sink.Target
			opts.OpenTarget = func(virtual int64) (diskimage.Target, error) {
				want := virtual
				if size > 0 && virtual >= 0 {
					if size < virtual {
						return nil, fmt.Errorf("--size %d is smaller than the image's virtual size %d", size, virtual)
					}
					want = size
				}
				t, err := sink.Open(dst, want)
				if err != nil {
					return nil, err
				}
				target = t
				return t, nil
			}
			var bar *progressBar
			if showProgress(progress, cmd.ErrOrStderr()) {
				bar = &progressBar{w: cmd.ErrOrStderr(), start: time.Now()}
				opts.Progress, opts.ProgressInterval = bar.update, 200*time.Millisecond
			}
			res, err := diskimage.Convert(cmd.Context(), src, opts)
			if bar != nil {
				bar.done()
			}
			if target != nil {
				if cerr := target.Close(); err == nil && cerr != nil {
					err = fmt.Errorf("closing %s: %w", dst, cerr)
				}
			}
			if err != nil {
				// A half-written file must not pass for a converted disk.
				if fi, serr := os.Stat(dst); serr == nil && fi.Mode().IsRegular() && (created || target != nil) {
					os.Remove(dst)
				}
				return fmt.Errorf("%s: %w", src.Name(), err)
			}
			if bar != nil {
				fmt.Fprintf(cmd.ErrOrStderr(), "%s %s → %s: %s virtual, %s written in %s\n",
					res.Info.Format, src.Name(), dst, humanBytes(res.Info.VirtualSize), humanBytes(res.Written), time.Since(bar.start).Round(time.Millisecond))
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVarP(&outFormat, "output-format", "O", "raw", "output format (raw)")
	f.StringVar(&checksum, "checksum", "", "expected checksum of SRC as given, `ALGO:HEX` (md5, sha1, sha256, sha512); a mismatch fails and removes DST")
	f.StringVar(&progress, "progress", "auto", "progress bar on stderr: auto (when it is a terminal), always, never")
	f.Int64Var(&size, "size", 0, "make DST this many bytes (at least the virtual size); the disk is grown with zeros")
	f.IntVar(&workers, "workers", 0, "parallel decode/write workers (default: number of CPUs)")
	f.BoolVar(&sequential, "sequential", false, "read SRC front to back once even when it can seek")
	f.Int64Var(&spillLimit, "spill-limit", 0, "most bytes held in memory for qcow2 clusters that arrive before their tables when streaming (default 128 MiB)")
	f.Int64Var(&maxSize, "max-size", 0, "refuse images whose virtual size (or decompressed raw length) exceeds this many bytes (default 64 TiB)")
	sf.register(f)
	return cmd
}

func showProgress(mode string, w io.Writer) bool {
	switch mode {
	case "always":
		return true
	case "never":
		return false
	}
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// progressBar draws one line, rewritten in place.
type progressBar struct {
	w     io.Writer
	start time.Time
	last  diskimage.Progress
}

func (b *progressBar) update(p diskimage.Progress) {
	b.last = p
	elapsed := time.Since(b.start).Seconds()
	rate := float64(p.SourceRead) / max(elapsed, 0.001)
	line := fmt.Sprintf("%s read", humanBytes(p.SourceRead))
	if p.Fraction >= 0 {
		line = fmt.Sprintf("%s %s read", renderBar(p.Fraction), humanBytes(p.SourceRead))
	}
	fmt.Fprintf(b.w, "\r%s  %s/s  %s written\x1b[K", line, humanBytes(int64(rate)), humanBytes(p.Written))
}

// renderBar draws "[#####     ]  42.1%" for a fraction 0..1.
func renderBar(frac float64) string {
	const width = 30
	frac = min(max(frac, 0), 1)
	filled := int(frac * width)
	bar := make([]byte, width)
	for i := range bar {
		bar[i] = ' '
		if i < filled {
			bar[i] = '#'
		}
	}
	return fmt.Sprintf("[%s] %5.1f%%", bar, frac*100)
}

func (b *progressBar) done() { fmt.Fprintln(b.w) }
