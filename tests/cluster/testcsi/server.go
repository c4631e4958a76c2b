package testcsi

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"k8s.io/klog/v2"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"

	"vimg.dev/vimg/csi/registration"
)

type socket struct {
	server *grpc.Server
	path   string
}

// Run serves CSI and, when configured, the kubelet registration until ctx is
// done or a server fails. Stopping closes the listeners, which removes their
// sockets.
func (d *Driver) Run(ctx context.Context) error {
	csiServer := newServer()
	csi.RegisterIdentityServer(csiServer, d)
	csi.RegisterControllerServer(csiServer, d)
	csi.RegisterNodeServer(csiServer, d)
	// The CSI socket listens first: the kubelet dials it as soon as it
	// sees the registration socket.
	sockets := []socket{{csiServer, d.cfg.Endpoint}}
	if d.cfg.RegistrationDir != "" {
		reg := newServer()
		registerapi.RegisterRegistrationServer(reg, &registration.Server{Driver: DriverName, Endpoint: d.cfg.KubeletRegistrationPath})
		sockets = append(sockets, socket{reg, registration.SocketPath(d.cfg.RegistrationDir, DriverName)})
	}

	errc := make(chan error, len(sockets))
	var err error
	for _, s := range sockets {
		var lis net.Listener
		if lis, err = listen(s.path); err != nil {
			break
		}
		klog.InfoS("Serving", "socket", s.path)
		go func() { errc <- s.server.Serve(lis) }()
	}
	if err == nil {
		select {
		case <-ctx.Done():
		case err = <-errc:
		}
	}
	for _, s := range sockets {
		s.server.GracefulStop()
	}
	return err
}

// listen removes a socket left by an earlier run, which would make the bind
// fail.
func listen(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("remove stale socket: %w", err)
	}
	return net.Listen("unix", path)
}

func newServer() *grpc.Server {
	return grpc.NewServer(grpc.UnaryInterceptor(logCall))
}

// logCall logs neither requests nor responses, which can carry secrets; only
// the volume name and ID, which never do.
func logCall(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	start := time.Now()
	resp, err := handler(ctx, req)
	kv := []any{"method", info.FullMethod, "duration", time.Since(start)}
	if r, ok := req.(interface{ GetName() string }); ok {
		kv = append(kv, "name", r.GetName())
	}
	if r, ok := req.(interface{ GetVolumeId() string }); ok {
		kv = append(kv, "volumeID", r.GetVolumeId())
	}
	if err != nil {
		klog.ErrorS(err, "gRPC call failed", kv...)
	} else {
		klog.InfoS("gRPC call", kv...)
	}
	return resp, err
}
