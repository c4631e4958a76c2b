package app

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/tools/clientcmd"

	uploadclient "vimg.dev/vimg/pkg/upload/client"
	"vimg.dev/vimg/pkg/version"
)

func newUploadCommand() *cobra.Command {
	var (
		namespace, kubeconfig, cacert string
		cluster, create, inCluster    bool
		insecure                      bool
		timeout                       time.Duration
	)
	cmd := &cobra.Command{
		Use:   "upload NAME FILE",
		Short: "Upload a disk image (FILE, or - for stdin) into a VirtualImage or ClusterVirtualImage with dataSource type Upload",
		Long: `Upload a disk image into a VirtualImage (or, with --cluster, a ClusterVirtualImage)
whose dataSource type is Upload, and wait until it is Ready.

With --create the image is created when it is missing. The file is sent as it is
(qcow2, vmdk, vdi, iso, raw, optionally gzip/xz/zstd-compressed); the cluster
detects and checks its format. A dropped connection is resumed where it stopped,
also by running the command again with the same file. Standard input (-) is sent
in one go and cannot be resumed.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			if timeout > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, timeout)
				defer cancel()
			}
			rules := clientcmd.NewDefaultClientConfigLoadingRules()
			rules.ExplicitPath = kubeconfig
			overrides := &clientcmd.ConfigOverrides{}
			overrides.Context.Namespace = namespace
			cc := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, overrides)
			rc, err := cc.ClientConfig()
			if err != nil {
				return fmt.Errorf("loading the kubeconfig: %w", err)
			}
			rc.UserAgent = "vimg-upload/" + version.Version
			ns, _, err := cc.Namespace()
			if err != nil {
				return fmt.Errorf("loading the kubeconfig: %w", err)
			}
			dyn, err := dynamic.NewForConfig(rc)
			if err != nil {
				return err
			}
			hc, err := uploadHTTPClient(cacert, insecure)
			if err != nil {
				return err
			}
			src, closeSrc, err := openUploadSource(args[1])
			if err != nil {
				return err
			}
			defer closeSrc()

			errOut := cmd.ErrOrStderr()
			bar := &transferBar{w: errOut, tty: showProgress("auto", errOut)}
			ref := uploadclient.ImageRef{Namespace: ns, Name: args[0], Cluster: cluster}
			out, err := uploadclient.Upload(ctx, uploadclient.Options{
				Images:    uploadclient.NewImages(dyn),
				Sender:    &uploadclient.Sender{HTTP: hc, Progress: bar.update, Notice: bar.notice},
				Image:     ref,
				Create:    create,
				InCluster: inCluster,
				Log:       bar.notice,
				Importing: bar.importing,
			}, src)
			bar.done()
			if err != nil {
				if errors.Is(err, context.DeadlineExceeded) {
					return fmt.Errorf("%w (--timeout %s)", err, timeout)
				}
				return err
			}
			size := out.Image.Status.Size
			fmt.Fprintf(cmd.OutOrStdout(), "%s is Ready: %s, %s unpacked, %s stored\n", ref, out.Image.Status.Format, size.Unpacked, size.Stored)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVarP(&namespace, "namespace", "n", "", "namespace of the VirtualImage (default: the kubeconfig context's)")
	f.BoolVar(&cluster, "cluster", false, "upload into a ClusterVirtualImage")
	f.BoolVar(&create, "create", false, "create the image (dataSource type Upload; a VirtualImage is stored in DVCR) when it is missing")
	f.StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
	f.BoolVar(&inCluster, "in-cluster-url", false, "upload to status.imageUploadURLs.inCluster (from a pod or node) instead of the external URL")
	f.StringVar(&cacert, "cacert", "", "PEM CA certificates that verify the upload gateway, besides the system's")
	f.BoolVar(&insecure, "insecure-skip-tls-verify", false, "do not verify the upload gateway's certificate")
	f.DurationVar(&timeout, "timeout", 0, "give up after this long, waits and upload included (0: no limit)")
	return cmd
}

func uploadHTTPClient(cacert string, insecure bool) (*http.Client, error) {
	tlsConf := &tls.Config{MinVersion: tls.VersionTLS12, InsecureSkipVerify: insecure}
	if cacert != "" {
		pem, err := os.ReadFile(cacert)
		if err != nil {
			return nil, fmt.Errorf("reading --cacert: %w", err)
		}
		pool, err := x509.SystemCertPool()
		if err != nil || pool == nil {
			pool = x509.NewCertPool()
		}
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--cacert %s holds no PEM certificate", cacert)
		}
		tlsConf.RootCAs = pool
	}
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.TLSClientConfig = tlsConf
	// HTTP/1.1: one long stream, no flow-control window to throttle it.
	t.ForceAttemptHTTP2 = false
	t.WriteBufferSize = 256 << 10
	// The gateway opens its side before it asks for the body.
	t.ExpectContinueTimeout = 10 * time.Second
	// No overall timeout: an upload takes as long as it takes; the sender
	// abandons a request that stalls.
	return &http.Client{Transport: t}, nil
}

// openUploadSource opens FILE: a regular file or block device can be
// resumed; stdin ("-"), a pipe or a character device is a stream.
func openUploadSource(path string) (uploadclient.Source, func(), error) {
	if path == "-" {
		return uploadclient.Source{Name: "stdin", Stream: os.Stdin}, func() {}, nil
	}
	f, err := os.Open(path)
	if err != nil {
		return uploadclient.Source{}, nil, err
	}
	closeFile := func() { f.Close() }
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return uploadclient.Source{}, nil, err
	}
	mode := fi.Mode()
	switch {
	case mode.IsDir():
		f.Close()
		return uploadclient.Source{}, nil, fmt.Errorf("%s is a directory", path)
	case mode.IsRegular():
		return uploadclient.Source{Name: path, File: f, Size: fi.Size()}, closeFile, nil
	case mode&os.ModeDevice != 0 && mode&os.ModeCharDevice == 0:
		size, err := f.Seek(0, io.SeekEnd)
		if err != nil {
			f.Close()
			return uploadclient.Source{}, nil, fmt.Errorf("size of %s: %w", path, err)
		}
		return uploadclient.Source{Name: path, File: f, Size: size}, closeFile, nil
	}
	return uploadclient.Source{Name: path, Stream: f}, closeFile, nil
}

// transferBar shows an upload's progress: a bar rewritten in place on a
// terminal, a line every few seconds otherwise (a log, CI).
type transferBar struct {
	w   io.Writer
	tty bool

	mu         sync.Mutex
	lastDraw   time.Time
	sampleTime time.Time
	sampleSent int64
	rate       float64
	drawn      bool
	lastImport string
}

func (b *transferBar) update(sent, total int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := time.Now()
	every := 5 * time.Second
	if b.tty {
		every = 200 * time.Millisecond
	}
	if now.Sub(b.lastDraw) < every && sent != total {
		return
	}
	if !b.sampleTime.IsZero() && sent >= b.sampleSent {
		if dt := now.Sub(b.sampleTime).Seconds(); dt > 0 {
			cur := float64(sent-b.sampleSent) / dt
			if b.rate == 0 {
				b.rate = cur
			} else {
				b.rate = 0.7*b.rate + 0.3*cur // smooth, yet follow changes
			}
		}
	} else {
		b.rate = 0 // a new request from another offset
	}
	b.sampleTime, b.sampleSent, b.lastDraw = now, sent, now
	line := fmt.Sprintf("%s sent", humanBytes(sent))
	if total > 0 {
		line = fmt.Sprintf("%s %s of %s", renderBar(float64(sent)/float64(total)), humanBytes(sent), humanBytes(total))
	}
	line += fmt.Sprintf("  %s/s", humanBytes(int64(b.rate)))
	if b.tty {
		fmt.Fprintf(b.w, "\r%s\x1b[K", line)
		b.drawn = true
		return
	}
	fmt.Fprintf(b.w, "Uploading: %s\n", line)
}

// notice prints a message on a line of its own.
func (b *transferBar) notice(msg string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.clearLine()
	fmt.Fprintln(b.w, msg)
}

func (b *transferBar) importing(progress string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if progress == b.lastImport {
		return
	}
	b.lastImport = progress
	if b.tty {
		fmt.Fprintf(b.w, "\rImporting: %s\x1b[K", progress)
		b.drawn = true
		return
	}
	fmt.Fprintf(b.w, "Importing: %s\n", progress)
}

func (b *transferBar) clearLine() {
	if b.drawn {
		fmt.Fprint(b.w, "\r\x1b[K")
		b.drawn = false
	}
}

func (b *transferBar) done() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.clearLine()
}
