// Package registration registers a CSI node plugin with the kubelet the
// way the node-driver-registrar sidecar does (which the Go module proxy
// cannot provide here): it serves the kubelet's pluginregistration/v1 API
// on a socket in the kubelet's plugins_registry directory, which the
// kubelet's plugin watcher finds.
package registration

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"time"

	"google.golang.org/grpc"
	"k8s.io/klog/v2"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// Server answers the kubelet for one CSI driver.
type Server struct {
	registerapi.UnimplementedRegistrationServer
	// Driver is the CSI driver's name.
	Driver string
	// Endpoint is the driver's CSI socket as the kubelet sees it.
	Endpoint string
}

// SocketPath is the registration socket of driver in the kubelet's
// plugins_registry directory dir.
func SocketPath(dir, driver string) string { return filepath.Join(dir, driver+"-reg.sock") }

func (s *Server) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              s.Driver,
		Endpoint:          s.Endpoint,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

func (s *Server) NotifyRegistrationStatus(_ context.Context, st *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if st.GetPluginRegistered() {
		klog.InfoS("Kubelet registered the plugin", "driver", s.Driver, "endpoint", s.Endpoint)
	} else {
		klog.ErrorS(errors.New(st.GetError()), "Kubelet did not register the plugin", "driver", s.Driver)
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}

// Serve waits until the CSI socket csiSocket (this process's path of
// s.Endpoint) accepts connections, since the kubelet dials it as soon as
// it sees the registration socket and does not retry, then serves s on
// SocketPath(dir, s.Driver) until ctx ends. A socket left by an earlier
// run is replaced: the kubelet registers the plugin anew on the new one.
func Serve(ctx context.Context, s *Server, dir, csiSocket string) error {
	for {
		c, err := net.DialTimeout("unix", csiSocket, time.Second)
		if err == nil {
			c.Close()
			break
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(100 * time.Millisecond):
		}
	}
	path := SocketPath(dir, s.Driver)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return fmt.Errorf("registration socket %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("registration socket %s: removing a stale one: %w", path, err)
	}
	lis, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("registration socket %s: %w", path, err)
	}
	srv := grpc.NewServer()
	registerapi.RegisterRegistrationServer(srv, s)
	go func() {
		<-ctx.Done()
		srv.GracefulStop()
	}()
	klog.InfoS("Serving kubelet plugin registration", "socket", path, "driver", s.Driver, "endpoint", s.Endpoint)
	if err := srv.Serve(lis); err != nil && ctx.Err() == nil {
		return fmt.Errorf("registration socket %s: %w", path, err)
	}
	return nil
}
