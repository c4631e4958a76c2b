// Command vimg-controller reconciles VirtualImages and ClusterVirtualImages:
// it bootstraps DVCR's secrets, then runs the image controllers with leader
// election and metrics. main only wires flags to packages.
package main

import (
	"context"
	"flag"
	"fmt"
	"net/url"
	"os"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/klog/v2"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	v1 "vimg.dev/vimg/pkg/apis/virtualization/v1alpha2"
	"vimg.dev/vimg/pkg/controller/bootstrap"
	"vimg.dev/vimg/pkg/controller/image"
	"vimg.dev/vimg/pkg/podinfo"
	"vimg.dev/vimg/pkg/version"
	"vimg.dev/vimg/pkg/worker/api"
)

func main() {
	if err := run(); err != nil {
		klog.ErrorS(err, "vimg-controller failed")
		klog.FlushAndExit(klog.ExitFlushTimeout, 1)
	}
}

type options struct {
	namespace                            string
	dvcrService, dvcrAddress             string
	tlsSecret, authSecret, caConfigMap   string
	pullSecret, pullNamespaces           string
	workerImage, workerPullPolicy        string
	workerServiceAccount                 string
	workerCPU, workerMemory              string
	workerMemoryLimit                    string
	trustedCA                            string
	uploadNamespace                      string
	uploadInClusterURL                   string
	uploadExternalURL                    string
	uploadTimeout                        time.Duration
	maxAttempts                          int
	retryBackoff                         time.Duration
	populateNamespace, imageStorageClass string
	filesystemOverhead                   float64
	leaderElect                          bool
	metricsAddr, probeAddr               string
}

func run() error {
	var o options
	klog.InitFlags(nil)
	ns := os.Getenv("POD_NAMESPACE")
	if ns == "" {
		ns = "vimg-system"
	}
	flag.StringVar(&o.namespace, "namespace", ns, "namespace of DVCR, the import pods and their secrets")
	flag.StringVar(&o.dvcrService, "dvcr-service", "vimg-dvcr", "DVCR's Service name (its certificate covers the Service's DNS names)")
	flag.StringVar(&o.dvcrAddress, "dvcr-address", "", "host:port of DVCR as pods reach it (default <dvcr-service>.<namespace>.svc:443)")
	flag.StringVar(&o.tlsSecret, "dvcr-tls-secret", "vimg-dvcr-tls", "Secret with DVCR's certificate and CA (created when missing)")
	flag.StringVar(&o.authSecret, "dvcr-auth-secret", "vimg-dvcr-auth", "Secret with DVCR's users file, token key and credentials (created when missing)")
	flag.StringVar(&o.caConfigMap, "dvcr-ca-configmap", "vimg-dvcr-ca", "ConfigMap publishing DVCR's CA certificate")
	flag.StringVar(&o.pullSecret, "dvcr-pull-secret", "vimg-dvcr-pull", "Secret kept in each of --dvcr-pull-secret-namespaces with DVCR's pull credentials and CA only")
	flag.StringVar(&o.pullNamespaces, "dvcr-pull-secret-namespaces", "vimg-csi", "comma-separated namespaces (outside --namespace) whose components pull from DVCR: the CSI driver's")
	flag.StringVar(&o.workerImage, "worker-image", "", "container image of the import worker (default: the controller's own image)")
	flag.StringVar(&o.workerPullPolicy, "worker-image-pull-policy", string(corev1.PullIfNotPresent), "pull policy of the worker image")
	flag.StringVar(&o.workerServiceAccount, "worker-service-account", "vimg-worker", "service account of import pods")
	flag.StringVar(&o.workerCPU, "worker-cpu-request", "100m", "CPU request of an import pod")
	flag.StringVar(&o.workerMemory, "worker-memory-request", "128Mi", "memory request of an import pod")
	flag.StringVar(&o.workerMemoryLimit, "worker-memory-limit", "1Gi", "memory limit of an import pod (the engine's spill bound is 128 MiB)")
	flag.StringVar(&o.trustedCA, "trusted-ca-configmap", "vimg-trusted-ca", "optional ConfigMap in --namespace with PEM CA certificates import pods trust for HTTPS sources and registries, besides the system roots")
	flag.StringVar(&o.uploadNamespace, "upload-namespace", "vimg-uploads", "namespace of the upload Secrets (nothing else may live there: the upload gateway reads all its Secrets)")
	flag.StringVar(&o.uploadInClusterURL, "upload-in-cluster-url", "https://vimg-upload.vimg-system.svc", "base of status.imageUploadURLs.inCluster")
	flag.StringVar(&o.uploadExternalURL, "upload-external-url", "", "base of status.imageUploadURLs.external (e.g. https://uploads.example.com, where an Ingress or LoadBalancer reaches the vimg-upload Service); empty shows none")
	flag.DurationVar(&o.uploadTimeout, "upload-timeout", time.Hour, "how long an Upload image waits for its upload to start before it is Failed (WaitForUserUploadTimeout)")
	flag.IntVar(&o.maxAttempts, "max-attempts", 5, "import pods tried after transient failures before an image is Failed")
	flag.DurationVar(&o.retryBackoff, "retry-backoff", 10*time.Second, "wait before the second import attempt, doubled each time (at most 5m)")
	flag.StringVar(&o.populateNamespace, "populate-namespace", "vimg-populate", "the volume populator's namespace, where the source Secrets of images stored in PersistentVolumeClaims go")
	flag.StringVar(&o.imageStorageClass, "image-storage-class", "", "StorageClass of the claims of images stored in PersistentVolumeClaims that name none (default: the cluster's default class)")
	flag.Float64Var(&o.filesystemOverhead, "filesystem-overhead", api.DefaultFilesystemOverhead, "fraction of a Filesystem claim left to the file system, as the populator is told: image claims are sized so that disk.img holds the image")
	flag.BoolVar(&o.leaderElect, "leader-elect", true, "elect a leader among replicas")
	flag.StringVar(&o.metricsAddr, "metrics-bind-address", ":8080", "address of the metrics endpoint (0 turns it off)")
	flag.StringVar(&o.probeAddr, "health-probe-bind-address", ":8081", "address of /healthz and /readyz")
	flag.Parse()
	if o.uploadExternalURL != "" {
		if u, err := url.Parse(o.uploadExternalURL); err != nil || u.Scheme != "https" || u.Host == "" || (u.Path != "" && u.Path != "/") {
			return fmt.Errorf("--upload-external-url %q: want https://host[:port]", o.uploadExternalURL)
		}
		o.uploadExternalURL = strings.TrimSuffix(o.uploadExternalURL, "/")
	}
	if o.filesystemOverhead <= 0 || o.filesystemOverhead > 0.5 {
		return fmt.Errorf("--filesystem-overhead %v: want a fraction above 0 and at most 0.5", o.filesystemOverhead)
	}
	if o.dvcrAddress == "" {
		o.dvcrAddress = o.dvcrService + "." + o.namespace + ".svc:443"
	}
	resources, err := workerResources(o)
	if err != nil {
		return err
	}
	ctrl.SetLogger(klog.NewKlogr())
	ctx := ctrl.SetupSignalHandler()
	log := klog.FromContext(ctx)
	log.Info("Starting vimg-controller", "version", version.Version, "namespace", o.namespace, "dvcr", o.dvcrAddress)

	cfg := ctrl.GetConfigOrDie()
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	if o.workerImage == "" {
		if o.workerImage, err = podinfo.OwnImage(ctx, cs, o.namespace, os.Getenv("POD_NAME"), "controller"); err != nil {
			return err
		}
	}
	secrets, err := bootstrapWithRetry(ctx, cs, bootstrap.Names{
		Namespace: o.namespace, TLSSecret: o.tlsSecret, AuthSecret: o.authSecret,
		CAConfigMap: o.caConfigMap, Service: o.dvcrService,
		UploadTLSSecret: "vimg-upload-tls", UploadService: "vimg-upload",
		UploadExtraNames: hostOf(o.uploadExternalURL),
		PullSecret:       o.pullSecret, PullNamespaces: splitList(o.pullNamespaces),
	})
	if err != nil {
		return err
	}
	dvcr, err := image.NewDVCR(o.dvcrAddress, secrets.AdminUser, secrets.AdminPassword, secrets.CA)
	if err != nil {
		return err
	}

	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		return err
	}
	if err := v1.AddToScheme(scheme); err != nil {
		return err
	}
	importers := labels.SelectorFromSet(labels.Set{image.LabelComponent: "importer"})
	uploadSecrets := labels.SelectorFromSet(labels.Set{api.LabelUpload: "true"})
	imageClaims := labels.SelectorFromSet(labels.Set{image.LabelComponent: image.ComponentImageClaim})
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme:                  scheme,
		LeaderElection:          o.leaderElect,
		LeaderElectionID:        "vimg-controller.vimg.dev",
		LeaderElectionNamespace: o.namespace,
		// A replaced pod hands over at once instead of after the lease.
		LeaderElectionReleaseOnCancel: true,
		Metrics:                       metricsserver.Options{BindAddress: o.metricsAddr},
		HealthProbeBindAddress:        o.probeAddr,
		// Only import pods (in our namespace) and upload Secrets (in the
		// upload namespace) are cached; every other Secret is read on
		// demand and never cached or watched.
		Cache: cache.Options{ByObject: map[client.Object]cache.ByObject{
			&corev1.Pod{}:    {Namespaces: map[string]cache.Config{o.namespace: {}}, Label: importers},
			&corev1.Secret{}: {Namespaces: map[string]cache.Config{o.uploadNamespace: {}}, Label: uploadSecrets},
			// Of claims, only those of images stored in one.
			&corev1.PersistentVolumeClaim{}: {Label: imageClaims},
		}},
		Client: client.Options{Cache: &client.CacheOptions{DisableFor: []client.Object{&corev1.Secret{}}}},
	})
	if err != nil {
		return fmt.Errorf("creating the manager: %w", err)
	}
	icfg := image.Config{
		Namespace: o.namespace, DVCRAddress: o.dvcrAddress, DVCRCA: secrets.CA,
		Registry: dvcr, Tokens: dvcr,
		WorkerImage: o.workerImage, WorkerImagePullPolicy: corev1.PullPolicy(o.workerPullPolicy),
		WorkerServiceAccount: o.workerServiceAccount, WorkerResources: resources, TrustedCAConfigMap: o.trustedCA,
		UploadNamespace: o.uploadNamespace, UploadInClusterURL: o.uploadInClusterURL,
		UploadExternalURL: o.uploadExternalURL, UploadTimeout: o.uploadTimeout,
		MaxAttempts: o.maxAttempts, RetryBackoff: o.retryBackoff,
		PopulateNamespace: o.populateNamespace, ImageStorageClass: o.imageStorageClass, FilesystemOverhead: o.filesystemOverhead,
	}
	vi := image.NewVirtualImageReconciler(mgr.GetClient(), mgr.GetAPIReader(), mgr.GetEventRecorderFor("vimg-controller"), icfg)
	cvi := image.NewClusterVirtualImageReconciler(mgr.GetClient(), mgr.GetAPIReader(), mgr.GetEventRecorderFor("vimg-controller"), icfg)
	if err := image.SetupWithManager(mgr, vi, cvi); err != nil {
		return fmt.Errorf("setting up the image controllers: %w", err)
	}
	if err := mgr.AddHealthzCheck("ping", healthz.Ping); err != nil {
		return err
	}
	if err := mgr.AddReadyzCheck("ping", healthz.Ping); err != nil {
		return err
	}
	return mgr.Start(ctx)
}

func workerResources(o options) (corev1.ResourceRequirements, error) {
	var r corev1.ResourceRequirements
	q := map[string]resource.Quantity{}
	for name, s := range map[string]string{"cpu": o.workerCPU, "memory": o.workerMemory, "limit": o.workerMemoryLimit} {
		v, err := resource.ParseQuantity(s)
		if err != nil {
			return r, fmt.Errorf("worker %s %q: %w", name, s, err)
		}
		q[name] = v
	}
	r.Requests = corev1.ResourceList{corev1.ResourceCPU: q["cpu"], corev1.ResourceMemory: q["memory"]}
	r.Limits = corev1.ResourceList{corev1.ResourceMemory: q["limit"]}
	return r, nil
}

// hostOf returns the host of an external upload URL, which the gateway's
// certificate must cover (when the URL reaches the gateway itself rather
// than a TLS-terminating Ingress).
func hostOf(raw string) []string {
	if raw == "" {
		return nil
	}
	u, err := url.Parse(raw)
	if err != nil || u.Hostname() == "" {
		return nil
	}
	return []string{u.Hostname()}
}

// bootstrapWithRetry waits out an API server that is not reachable yet
// (the controller may start before the network is ready).
func bootstrapWithRetry(ctx context.Context, cs kubernetes.Interface, n bootstrap.Names) (bootstrap.DVCR, error) {
	for delay := time.Second; ; delay = min(2*delay, 30*time.Second) {
		d, err := bootstrap.Ensure(ctx, cs, n)
		if err == nil {
			return d, nil
		}
		klog.FromContext(ctx).Error(err, "Bootstrapping DVCR secrets failed; retrying", "delay", delay)
		select {
		case <-ctx.Done():
			return bootstrap.DVCR{}, ctx.Err()
		case <-time.After(delay):
		}
	}
}

// splitList splits a comma-separated flag value, dropping empty items.
func splitList(s string) []string {
	var out []string
	for _, x := range strings.Split(s, ",") {
		if x = strings.TrimSpace(x); x != "" {
			out = append(out, x)
		}
	}
	return out
}
