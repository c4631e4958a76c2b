// Command vimg-populator fills PersistentVolumeClaims whose dataSourceRef
// names a VirtualImage or a ClusterVirtualImage (package populator). main
// only wires flags to the package.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"

	"vimg.dev/vimg/pkg/controller/image"
	"vimg.dev/vimg/pkg/podinfo"
	"vimg.dev/vimg/pkg/version"
	"vimg.dev/vimg/pkg/worker/api"
	"vimg.dev/vimg/populator"
)

func main() {
	if err := run(); err != nil {
		klog.ErrorS(err, "vimg-populator failed")
		klog.FlushAndExit(klog.ExitFlushTimeout, 1)
	}
}

func run() error {
	// A flag set of its own: a dependency (controller-runtime, through the
	// DVCR client of package image) registers -kubeconfig on the global one.
	fs := flag.NewFlagSet(os.Args[0], flag.ExitOnError)
	klog.InitFlags(fs)
	var (
		cfg                            populator.Config
		kubeconfig, caFile, pullPolicy string
		cpu, memory, memoryLimit       string
	)
	fs.StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig file (default: in-cluster)")
	fs.StringVar(&cfg.Namespace, "namespace", "vimg-populate", "namespace of prime claims, populate pods and their requests (Pod Security baseline: Block pods run as root)")
	fs.StringVar(&cfg.DVCRAddress, "dvcr-address", "vimg-dvcr.vimg-system.svc:443", "host:port of DVCR as pods reach it")
	fs.StringVar(&caFile, "dvcr-ca-file", "/etc/vimg/dvcr-ca/ca.crt", "PEM CA bundle of DVCR")
	fs.StringVar(&cfg.WorkerImage, "worker-image", "", "image of populate pods (default: the populator's own image)")
	fs.StringVar(&pullPolicy, "worker-image-pull-policy", string(corev1.PullIfNotPresent), "pull policy of the worker image")
	fs.StringVar(&cfg.WorkerServiceAccount, "worker-service-account", "vimg-worker", "service account of populate pods (may patch only its own pod's progress)")
	fs.StringVar(&cpu, "worker-cpu-request", "100m", "CPU request of a populate pod")
	fs.StringVar(&memory, "worker-memory-request", "64Mi", "memory request of a populate pod")
	fs.StringVar(&memoryLimit, "worker-memory-limit", "512Mi", "memory limit of a populate pod (the reader caches a few 8 MiB windows)")
	fs.Float64Var(&cfg.FilesystemOverhead, "filesystem-overhead", api.DefaultFilesystemOverhead, "fraction of a Filesystem volume left to the file system; disk.img gets the rest")
	fs.IntVar(&cfg.MaxAttempts, "max-attempts", 5, "populate pods tried after transient failures before a claim is given up")
	fs.DurationVar(&cfg.CloneTimeout, "clone-timeout", 3*time.Minute, "how long a CSI clone may take to be bound before the copy is streamed instead")
	fs.DurationVar(&cfg.MaxRetryDelay, "max-retry-delay", 0, "cap of the backoff of claims waiting for an image or a pod (default 30s)")
	if err := fs.Parse(os.Args[1:]); err != nil {
		return err
	}
	if cfg.FilesystemOverhead <= 0 || cfg.FilesystemOverhead > 0.5 {
		return fmt.Errorf("--filesystem-overhead %v: want a fraction above 0 and at most 0.5", cfg.FilesystemOverhead)
	}
	cfg.WorkerImagePullPolicy = corev1.PullPolicy(pullPolicy)
	var err error
	if cfg.WorkerResources, err = resources(cpu, memory, memoryLimit); err != nil {
		return err
	}
	if cfg.DVCRCA, err = os.ReadFile(caFile); err != nil {
		return fmt.Errorf("reading DVCR's CA: %w", err)
	}
	// The pull role is all the populator holds: it mints pull tokens
	// scoped to one repository for each pod.
	user, pass := os.Getenv("DVCR_PULL_USERNAME"), os.Getenv("DVCR_PULL_PASSWORD")
	if user == "" || pass == "" {
		return fmt.Errorf("DVCR_PULL_USERNAME and DVCR_PULL_PASSWORD must be set")
	}
	if cfg.Registry, err = image.NewDVCR(cfg.DVCRAddress, user, pass, cfg.DVCRCA); err != nil {
		return err
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx = klog.NewContext(ctx, klog.Background())
	rc, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return err
	}
	if cfg.WorkerImage == "" {
		cs, err := kubernetes.NewForConfig(rc)
		if err != nil {
			return err
		}
		if cfg.WorkerImage, err = podinfo.OwnImage(ctx, cs, os.Getenv("POD_NAMESPACE"), os.Getenv("POD_NAME"), "populator"); err != nil {
			return err
		}
	}
	klog.InfoS("Starting vimg-populator", "version", version.Version)
	return populator.Run(ctx, cfg, rc, kubeconfig)
}

func resources(cpu, memory, limit string) (corev1.ResourceRequirements, error) {
	var r corev1.ResourceRequirements
	q := map[string]string{"cpu request": cpu, "memory request": memory, "memory limit": limit}
	parsed := map[string]resource.Quantity{}
	for k, v := range q {
		p, err := resource.ParseQuantity(v)
		if err != nil {
			return r, fmt.Errorf("worker %s %q: %w", k, v, err)
		}
		parsed[k] = p
	}
	r.Requests = corev1.ResourceList{corev1.ResourceCPU: parsed["cpu request"], corev1.ResourceMemory: parsed["memory request"]}
	r.Limits = corev1.ResourceList{corev1.ResourceMemory: parsed["memory limit"]}
	return r, nil
}
