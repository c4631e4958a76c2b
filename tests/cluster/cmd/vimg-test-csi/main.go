// Command vimg-test-csi runs the test cluster's CSI driver: controller, node
// and kubelet registration in one process on the cluster's only node.
package main

import (
	"context"
	"flag"
	"os"
	"os/signal"
	"syscall"

	"k8s.io/klog/v2"

	"vimg.dev/vimg/tests/cluster/testcsi"
)

func main() {
	klog.InitFlags(nil)
	var cfg testcsi.Config
	flag.StringVar(&cfg.Endpoint, "endpoint", "", "unix socket path of the CSI gRPC server")
	flag.StringVar(&cfg.DataDir, "data-dir", "", "directory where volumes live")
	flag.StringVar(&cfg.NodeID, "node-id", "", "ID of this node, to which volumes are pinned")
	flag.StringVar(&cfg.RegistrationDir, "registration-dir", "", "kubelet plugins_registry directory; empty means do not register")
	flag.StringVar(&cfg.KubeletRegistrationPath, "kubelet-registration-path", "", "CSI socket path as the kubelet sees it (default --endpoint)")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	d, err := testcsi.New(cfg)
	if err == nil {
		err = d.Run(ctx)
	}
	if err != nil {
		klog.ErrorS(err, "CSI driver failed")
		klog.FlushAndExit(klog.ExitFlushTimeout, 1)
	}
	klog.InfoS("CSI driver stopped")
	klog.Flush()
}
