package app

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"syscall"

	"github.com/spf13/cobra"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/klog/v2"

	"vimg.dev/vimg/pkg/worker"
	"vimg.dev/vimg/pkg/worker/api"
)

// newWorkerCommand is `vimg worker import|probe|populate`, what the pods of
// the controller and the populator run. It is hidden: users never call it;
// the controller writes its requests.
func newWorkerCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "worker", Short: "Data movers run by the vimg controller in pods", Hidden: true}
	importRequest := api.RequestDir + "/" + api.RequestFile
	cmd.AddCommand(
		podCommand("import", "Import the source a request file names into DVCR", importRequest, "the import request file", worker.Run),
		podCommand("probe", "Tell the format and virtual size of the source an import request file names", importRequest, "the import request file", worker.Probe),
		podCommand("populate", "Write the image a request file names onto the pod's volume", api.PopulateRequestDir+"/"+api.RequestFile, "the populate request file",
			func(ctx context.Context, cfg worker.Config) error {
				return worker.Populate(ctx, worker.PopulateConfig{Config: cfg})
			}),
		newServeCommand(),
		newUploadGatewayCommand(),
	)
	return cmd
}

// newServeCommand is `vimg worker serve`, what the populator's serve pods
// run: the disk of an image stored in a claim, to the pods copying it. The
// token and the image's size come from the environment.
func newServeCommand() *cobra.Command {
	cfg := worker.ServeConfig{Path: api.ServeSourceDir + "/" + api.DiskFile, Addr: fmt.Sprintf(":%d", api.ServePort)}
	c := &cobra.Command{
		Use:   "serve",
		Short: "Serve an image stored in a claim to the pods copying it",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			ctx = klog.NewContext(ctx, klog.Background())
			cfg.Token = os.Getenv(api.ServeTokenEnv)
			size, err := strconv.ParseInt(os.Getenv(api.ServeSizeEnv), 10, 64)
			if err != nil {
				return fmt.Errorf("%s: %w", api.ServeSizeEnv, err)
			}
			cfg.Size = size
			return worker.Serve(ctx, cfg)
		},
	}
	c.Flags().StringVar(&cfg.Path, "path", cfg.Path, "the disk to serve")
	c.Flags().StringVar(&cfg.Addr, "listen", cfg.Addr, "address to listen on")
	return c
}

// podCommand is a worker subcommand: run, on the request file its --request
// flag names (request by default, usage describing it), in a pod or by hand.
func podCommand(use, short, request, usage string, run func(context.Context, worker.Config) error) *cobra.Command {
	c := &cobra.Command{
		Use:   use,
		Short: short,
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
			return run(ctx, cfg)
		},
	}
	c.Flags().StringVar(&request, "request", request, usage)
	return c
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
