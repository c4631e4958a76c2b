// Command vimg-csi is the CSI driver images.vimg.dev (package csi/driver):
// read-only disk images from DVCR as volumes. It runs as the node plugin
// (with the node cache), as the controller plugin, or as both. main only
// wires flags to the packages.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"

	"vimg.dev/vimg/csi/cache"
	"vimg.dev/vimg/csi/driver"
	"vimg.dev/vimg/csi/registration"
	"vimg.dev/vimg/csi/resolve"
	"vimg.dev/vimg/dvcr/client"
	"vimg.dev/vimg/pkg/version"
)

func main() {
	if err := run(); err != nil {
		klog.ErrorS(err, "vimg-csi failed")
		klog.FlushAndExit(klog.ExitFlushTimeout, 1)
	}
}

func run() error {
	// A flag set of its own: a dependency may register -kubeconfig on the
	// global one.
	fs := flag.NewFlagSet(os.Args[0], flag.ExitOnError)
	klog.InitFlags(fs)
	var (
		endpoint, nodeID, stateDir, mode string
		dvcrAddress, caFile, kubeconfig  string
		registrationDir, kubeletEndpoint string
		populateNamespace                string
		maxBytes                         int64
	)
	fs.StringVar(&endpoint, "endpoint", "unix:///csi/csi.sock", "CSI endpoint (unix:///absolute/path)")
	fs.StringVar(&nodeID, "node-id", os.Getenv("NODE_NAME"), "this node's ID (default: $NODE_NAME); required in node mode")
	fs.StringVar(&stateDir, "state-dir", "/var/lib/vimg-csi", "directory of the driver's records and, in node mode, of the cache (state-dir/cache)")
	fs.Int64Var(&maxBytes, "cache-max-bytes", 20<<30, "size the node cache evicts unpinned images down to, in bytes")
	fs.StringVar(&dvcrAddress, "dvcr-address", "vimg-dvcr.vimg-system.svc:443", "host:port of DVCR as images' registryURL names it")
	fs.StringVar(&caFile, "dvcr-ca-file", "/etc/vimg/dvcr-ca/ca.crt", "PEM CA bundle of DVCR")
	fs.StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig file (default: in-cluster)")
	fs.StringVar(&mode, "mode", "node", "services to run: node, controller or both")
	fs.StringVar(&registrationDir, "registration-dir", "", "the kubelet's plugins_registry directory, where the node plugin registers itself; empty: do not register")
	fs.StringVar(&kubeletEndpoint, "kubelet-endpoint", "", "the CSI socket's path as the kubelet sees it (default: --endpoint's path)")
	fs.StringVar(&populateNamespace, "populate-namespace", "vimg-populate", "namespace of the vimg populator's prime claims, the only claims the controller provisions")
	if err := fs.Parse(os.Args[1:]); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	var node bool
	switch mode {
	case "node", "both":
		node = true
	case "controller":
	default:
		return fmt.Errorf("--mode %q: want node, controller or both", mode)
	}
	if node && nodeID == "" {
		return fmt.Errorf("--node-id (or NODE_NAME) must be set in %s mode", mode)
	}
	if node && maxBytes <= 0 {
		return fmt.Errorf("--cache-max-bytes %d: want a positive size", maxBytes)
	}
	if !filepath.IsAbs(stateDir) {
		return fmt.Errorf("--state-dir %q: want an absolute path", stateDir)
	}

	ca, err := os.ReadFile(caFile)
	if err != nil {
		return fmt.Errorf("reading DVCR's CA: %w", err)
	}
	// A node pulls with the pull role; the controller needs it too, to
	// resolve images to digests.
	user, pass := os.Getenv("DVCR_PULL_USERNAME"), os.Getenv("DVCR_PULL_PASSWORD")
	if node && (user == "" || pass == "") {
		return fmt.Errorf("DVCR_PULL_USERNAME and DVCR_PULL_PASSWORD must be set in %s mode", mode)
	}
	dvcr, err := client.New(dvcrAddress, client.Options{
		Username:  user,
		Password:  pass,
		CABundle:  ca,
		UserAgent: "vimg-csi/" + version.Version,
	})
	if err != nil {
		return err
	}

	rc, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return err
	}
	rc.UserAgent = "vimg-csi/" + version.Version
	dyn, err := dynamic.NewForConfig(rc)
	if err != nil {
		return err
	}
	kube, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return err
	}

	cfg := driver.Config{
		Version:  version.Version,
		StateDir: stateDir,
		Resolve: &resolve.Resolver{Dynamic: dyn, Kube: kube, DVCR: dvcr, DVCRAddress: dvcrAddress,
			PopulateNamespace: populateNamespace},
	}
	if node {
		ch, err := cache.Open(filepath.Join(stateDir, "cache"), cache.Options{MaxBytes: maxBytes})
		if err != nil {
			return err
		}
		defer ch.Close()
		cfg.NodeID = nodeID
		cfg.Cache = ch
		cfg.Open = func(ctx context.Context, ref string) (cache.Source, error) {
			im, err := dvcr.Open(ctx, ref)
			if err != nil {
				return nil, err
			}
			return im, nil
		}
	}
	d, err := driver.New(cfg)
	if err != nil {
		return err
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx = klog.NewContext(ctx, klog.Background())
	klog.InfoS("Starting vimg-csi", "version", version.Version, "mode", mode, "node", nodeID, "endpoint", endpoint)
	regErr := make(chan error, 1)
	if node && registrationDir != "" {
		socket, err := driver.ParseEndpoint(endpoint)
		if err != nil {
			return err
		}
		if kubeletEndpoint == "" {
			kubeletEndpoint = socket
		}
		reg := &registration.Server{Driver: driver.DefaultName, Endpoint: kubeletEndpoint}
		go func() {
			if err := registration.Serve(ctx, reg, registrationDir, socket); err != nil {
				regErr <- err
				stop() // exit with the error: the pod restarts and registers anew
			}
		}()
	}
	err = driver.Serve(ctx, endpoint, d)
	select {
	case rerr := <-regErr:
		return fmt.Errorf("kubelet plugin registration: %w", rerr)
	default:
		return err
	}
}
