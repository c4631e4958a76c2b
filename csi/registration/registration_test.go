package registration

import (
	"context"
	"errors"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// The registration socket appears only once the CSI socket answers, and
// tells the kubelet the driver's name and endpoint.
func TestServe_RegistersOnceTheCSISocketListens(t *testing.T) {
	dir := t.TempDir()
	csiSocket, regDir := filepath.Join(dir, "csi.sock"), filepath.Join(dir, "plugins_registry")
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		errc <- Serve(ctx, &Server{Driver: "images.vimg.dev", Endpoint: "/var/lib/kubelet/plugins/images.vimg.dev/csi.sock"}, regDir, csiSocket)
	}()
	regSocket := SocketPath(regDir, "images.vimg.dev")
	time.Sleep(300 * time.Millisecond)
	if _, err := os.Stat(regSocket); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("registration socket before the CSI socket listens: %v", err)
	}
	lis, err := net.Listen("unix", csiSocket)
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()

	conn, err := grpc.NewClient("unix://"+regSocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := registerapi.NewRegistrationClient(conn)
	var info *registerapi.PluginInfo
	deadline := time.Now().Add(10 * time.Second)
	for {
		info, err = c.GetInfo(ctx, &registerapi.InfoRequest{})
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("GetInfo: %v", err)
	}
	if info.GetType() != registerapi.CSIPlugin || info.GetName() != "images.vimg.dev" ||
		info.GetEndpoint() != "/var/lib/kubelet/plugins/images.vimg.dev/csi.sock" || len(info.GetSupportedVersions()) == 0 {
		t.Errorf("GetInfo = %v", info)
	}
	if _, err := c.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{PluginRegistered: false, Error: "refused"}); err != nil {
		t.Errorf("NotifyRegistrationStatus: %v", err)
	}
	cancel()
	select {
	case err := <-errc:
		if err != nil {
			t.Errorf("Serve: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after its context ended")
	}
}
