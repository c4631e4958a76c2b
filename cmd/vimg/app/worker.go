package app

import (
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/klog/v2"

	"vimg.dev/vimg/pkg/worker"
	"vimg.dev/vimg/pkg/worker/api"
)

// newWorkerCommand is `vimg worker import`, what an import pod runs. It is
// hidden: users never call it; the controller writes its request.
func newWorkerCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "worker", Short: "Data movers run by the vimg controller in pods", Hidden: true}
	var request string
	imp := &cobra.Command{
		Use:   "import",
		Short: "Import the source a request file names into DVCR",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			ctx = klog.NewContext(ctx, klog.Background())
			cfg, err := podConfig(request)
			if err != nil {
				return err
			}
			// The outcome is already in the termination message; the
			// error only sets the exit code.
			cmd.SilenceErrors = true
			return worker.Run(ctx, cfg)
		},
	}
	imp.Flags().StringVar(&request, "request", api.RequestDir+"/"+api.RequestFile, "the import request file")
	cmd.AddCommand(imp)
	var populateRequest string
	pop := &cobra.Command{
		Use:   "populate",
		Short: "Write the image a request file names onto the pod's volume",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			ctx = klog.NewContext(ctx, klog.Background())
			cfg, err := podConfig(populateRequest)
			if err != nil {
				return err
			}
			cmd.SilenceErrors = true
			return worker.Populate(ctx, worker.PopulateConfig{Config: cfg})
		},
	}
	pop.Flags().StringVar(&populateRequest, "request", api.PopulateRequestDir+"/"+api.RequestFile, "the populate request file")
	cmd.AddCommand(pop)
	cmd.AddCommand(newUploadGatewayCommand())
	return cmd
}

// podConfig is the worker's configuration in a pod (POD_NAME set: progress
// on the pod, outcome in the termination message) or run by hand.
func podConfig(request string) (worker.Config, error) {
	cfg := worker.Config{
		RequestPath:            request,
		PodName:                os.Getenv("POD_NAME"),
		PodNamespace:           os.Getenv("POD_NAMESPACE"),
		TerminationMessagePath: api.TerminationMessagePath,
	}
	if cfg.PodName == "" {
		cfg.TerminationMessagePath = ""
		return cfg, nil
	}
	rc, err := rest.InClusterConfig()
	if err != nil {
		return cfg, err
	}
	cfg.Kube, err = kubernetes.NewForConfig(rc)
	return cfg, err
}
