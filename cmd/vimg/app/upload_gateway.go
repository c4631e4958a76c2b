package app

import (
	"context"
	"crypto/tls"
	"errors"
	goflag "flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"

	"vimg.dev/vimg/pkg/certfile"
	"vimg.dev/vimg/pkg/upload"
	"vimg.dev/vimg/pkg/version"
	"vimg.dev/vimg/pkg/worker/api"
)

type gatewayOptions struct {
	listen          string
	tlsCert, tlsKey string
	namespace       string
	dvcrAddress     string
	dvcrCAFile      string
	kubeconfig      string
	idleTimeout     time.Duration
	shutdownTimeout time.Duration
	verbosity       int
}

// newUploadGatewayCommand is `vimg worker upload-gateway`: the HTTPS
// endpoint users upload images to (package upload, docs/upload.md).
func newUploadGatewayCommand() *cobra.Command {
	var o gatewayOptions
	cmd := &cobra.Command{
		Use:   "upload-gateway",
		Short: "Receive image uploads over HTTPS and stream them into DVCR",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var fs goflag.FlagSet
			klog.InitFlags(&fs)
			if err := fs.Set("v", strconv.Itoa(o.verbosity)); err != nil {
				return err
			}
			return runUploadGateway(cmd.Context(), o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.listen, "listen", ":8443", "address to serve HTTPS on (uploads, /healthz, /readyz)")
	f.StringVar(&o.tlsCert, "tls-cert-file", "", "PEM certificate (chain); re-read when the file changes (required)")
	f.StringVar(&o.tlsKey, "tls-key-file", "", "PEM private key (required)")
	f.StringVar(&o.namespace, "namespace", "vimg-uploads", "namespace of the upload Secrets")
	f.StringVar(&o.dvcrAddress, "dvcr-address", "vimg-dvcr.vimg-system.svc:443", "host:port of DVCR")
	f.StringVar(&o.dvcrCAFile, "dvcr-ca-file", "", "PEM CA certificates of DVCR, besides the system's")
	f.StringVar(&o.kubeconfig, "kubeconfig", "", "kubeconfig file (default: the in-cluster service account)")
	f.DurationVar(&o.idleTimeout, "idle-timeout", 2*time.Minute, "drop an upload whose client sent nothing for this long (its bytes are kept for a resume)")
	f.IntVarP(&o.verbosity, "v", "v", 0, "log verbosity (2: every request)")
	f.DurationVar(&o.shutdownTimeout, "shutdown-timeout", 20*time.Second, "after SIGTERM, how long uploads in progress get to record their state and answer")
	return cmd
}

func runUploadGateway(parent context.Context, o gatewayOptions) error {
	if o.tlsCert == "" || o.tlsKey == "" {
		return errors.New("--tls-cert-file and --tls-key-file are required")
	}
	sigCtx, stop := signal.NotifyContext(parent, os.Interrupt, syscall.SIGTERM)
	defer stop()
	log := klog.Background().WithName("upload-gateway")
	// Requests and the informer live on beyond the signal, until the
	// shutdown is over: a signal must not cut uploads mid-request.
	runCtx, cancelRun := context.WithCancel(klog.NewContext(context.WithoutCancel(parent), log))
	defer cancelRun()

	rc, err := kubeConfig(o.kubeconfig)
	if err != nil {
		return err
	}
	rc.UserAgent = "vimg-upload-gateway/" + version.Version
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return err
	}
	var ca []byte
	if o.dvcrCAFile != "" {
		if ca, err = os.ReadFile(o.dvcrCAFile); err != nil {
			return fmt.Errorf("reading the DVCR CA: %w", err)
		}
	}
	reg, err := upload.NewDVCR(o.dvcrAddress, ca)
	if err != nil {
		return err
	}
	store := upload.NewSecretStore(cs, o.namespace)
	store.Start(runCtx)
	gw, err := upload.New(upload.Config{Store: store, Registry: reg, ID: os.Getenv("POD_NAME"), IdleTimeout: o.idleTimeout})
	if err != nil {
		return err
	}
	kp, err := certfile.Load(o.tlsCert, o.tlsKey)
	if err != nil {
		return err
	}

	mux := http.NewServeMux()
	mux.Handle(api.UploadPathPrefix, gw)
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if gw.ShuttingDown() || !store.Synced() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	var protocols http.Protocols
	// HTTP/1.1 only: an upload is one long stream, which HTTP/2's
	// flow-control window would throttle to a window per round trip.
	protocols.SetHTTP1(true)
	srv := &http.Server{
		Handler:   mux,
		Protocols: &protocols,
		TLSConfig: &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: kp.GetCertificate},
		// No ReadTimeout or WriteTimeout: an upload takes as long as it
		// takes; the gateway drops idle ones itself.
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		BaseContext:       func(net.Listener) context.Context { return runCtx },
		ErrorLog:          klog.NewStandardLogger("INFO"),
	}
	ln, err := net.Listen("tcp", o.listen)
	if err != nil {
		return fmt.Errorf("listening on %s: %w", o.listen, err)
	}
	log.Info("Serving uploads", "address", ln.Addr().String(), "namespace", o.namespace, "dvcr", o.dvcrAddress, "version", version.Version)
	errc := make(chan error, 1)
	go func() { errc <- srv.ServeTLS(ln, "", "") }()
	go func() {
		if store.WaitForSync(runCtx) {
			log.Info("Upload Secrets cached; ready")
		}
	}()
	select {
	case err := <-errc:
		return fmt.Errorf("serving: %w", err)
	case <-sigCtx.Done():
	}
	log.Info("Shutting down: uploads in progress record their state and are told to resume", "timeout", o.shutdownTimeout)
	gw.Shutdown()
	sctx, cancel := context.WithTimeout(context.WithoutCancel(parent), o.shutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		log.Info("Requests still open at the end of the grace period", "err", err)
	}
	return nil
}

func kubeConfig(path string) (*rest.Config, error) {
	if path == "" {
		rc, err := rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("in-cluster Kubernetes configuration (use --kubeconfig outside a pod): %w", err)
		}
		return rc, nil
	}
	rc, err := clientcmd.BuildConfigFromFlags("", path)
	if err != nil {
		return nil, fmt.Errorf("loading %s: %w", path, err)
	}
	return rc, nil
}
