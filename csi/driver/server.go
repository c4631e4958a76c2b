package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
)

// ParseEndpoint returns the socket path of a "unix:///path" (or
// "unix:/path") endpoint.
func ParseEndpoint(endpoint string) (string, error) {
	rest, ok := strings.CutPrefix(endpoint, "unix://")
	if !ok {
		rest, ok = strings.CutPrefix(endpoint, "unix:")
	}
	if !ok || !filepath.IsAbs(rest) {
		return "", fmt.Errorf("endpoint %q: want unix:///absolute/path", endpoint)
	}
	return filepath.Clean(rest), nil
}

// gracePeriod bounds how long Serve waits for RPCs in flight once ctx ends.
const gracePeriod = 30 * time.Second

// Serve serves d's identity, controller and node services on a unix
// socket until ctx ends. A socket left by an earlier run is removed first.
func Serve(ctx context.Context, endpoint string, d *Driver) error {
	path, err := ParseEndpoint(endpoint)
	if err != nil {
		return err
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != fs.ModeSocket {
			return fmt.Errorf("serve on %s: the path exists and is not a socket", path)
		}
		if err := os.Remove(path); err != nil {
			return fmt.Errorf("serve on %s: removing stale socket: %w", path, err)
		}
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return fmt.Errorf("serve on %s: %w", path, err)
	}
	lis, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("serve on %s: %w", path, err)
	}
	srv := grpc.NewServer(grpc.UnaryInterceptor(logRPC))
	csi.RegisterIdentityServer(srv, d)
	csi.RegisterControllerServer(srv, d)
	csi.RegisterNodeServer(srv, d)

	logger := klog.FromContext(ctx)
	logger.Info("Serving CSI", "driver", d.cfg.Name, "endpoint", endpoint, "node", d.cfg.NodeID)
	done := make(chan struct{})
	go func() {
		defer close(done)
		<-ctx.Done()
		stopped := make(chan struct{})
		go func() { srv.GracefulStop(); close(stopped) }()
		select {
		case <-stopped:
		case <-time.After(gracePeriod):
			srv.Stop()
		}
	}()
	err = srv.Serve(lis)
	if ctx.Err() != nil {
		<-done
		return nil
	}
	srv.Stop()
	if errors.Is(err, grpc.ErrServerStopped) {
		return nil
	}
	return fmt.Errorf("serve on %s: %w", path, err)
}

// logRPC logs every call with the identifiers in its request and the
// result. Requests are never logged whole: their secrets fields (unused
// by this driver) may carry credentials.
func logRPC(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	method := info.FullMethod[strings.LastIndex(info.FullMethod, "/")+1:]
	logger := klog.FromContext(ctx).WithValues("rpc", method)
	if r, ok := req.(interface{ GetVolumeId() string }); ok && r.GetVolumeId() != "" {
		logger = logger.WithValues("volumeID", r.GetVolumeId())
	}
	if r, ok := req.(interface{ GetName() string }); ok && r.GetName() != "" {
		logger = logger.WithValues("name", r.GetName())
	}
	if r, ok := req.(interface{ GetTargetPath() string }); ok && r.GetTargetPath() != "" {
		logger = logger.WithValues("target", r.GetTargetPath())
	}
	start := time.Now()
	resp, err := handler(klog.NewContext(ctx, logger), req)
	if err != nil {
		logger.Error(err, "RPC failed", "code", status.Code(err).String(), "duration", time.Since(start))
	} else {
		logger.V(2).Info("RPC done", "duration", time.Since(start))
	}
	return resp, err
}
