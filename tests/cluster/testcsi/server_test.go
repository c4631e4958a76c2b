package testcsi

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"

	"vimg.dev/vimg/csi/registration"
)

func dial(t *testing.T, socket string) *grpc.ClientConn {
	t.Helper()
	// WaitForReady lets calls wait for the server goroutine to listen.
	conn, err := grpc.NewClient("unix://"+socket,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.WaitForReady(true)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func TestServeOverUnixSockets(t *testing.T) {
	dir := t.TempDir()
	endpoint, regDir := filepath.Join(dir, "csi.sock"), filepath.Join(dir, "registry")
	regSocket := registration.SocketPath(regDir, DriverName)
	d, err := New(Config{Endpoint: endpoint, DataDir: filepath.Join(dir, "data"), NodeID: nodeID,
		RegistrationDir: regDir, KubeletRegistrationPath: "/kubelet/view/csi.sock"})
	if err != nil {
		t.Fatal(err)
	}
	// What a killed driver leaves behind must not stop the next one.
	if err := os.MkdirAll(regDir, 0o750); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(regSocket, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	runCtx, stop := context.WithCancel(t.Context())
	defer stop()
	done := make(chan error, 1)
	go func() { done <- d.Run(runCtx) }()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()

	conn := dial(t, endpoint)
	identity := csi.NewIdentityClient(conn)
	if info, err := identity.GetPluginInfo(ctx, &csi.GetPluginInfoRequest{}); err != nil ||
		info.GetName() != DriverName || info.GetVendorVersion() != driverVersion {
		t.Errorf("GetPluginInfo = %v, %v", info, err)
	}
	if probe, err := identity.Probe(ctx, &csi.ProbeRequest{}); err != nil || !probe.GetReady().GetValue() {
		t.Errorf("Probe = %v, %v", probe, err)
	}
	caps, err := identity.GetPluginCapabilities(ctx, &csi.GetPluginCapabilitiesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var services []csi.PluginCapability_Service_Type
	for _, c := range caps.GetCapabilities() {
		services = append(services, c.GetService().GetType())
	}
	if want := []csi.PluginCapability_Service_Type{csi.PluginCapability_Service_CONTROLLER_SERVICE,
		csi.PluginCapability_Service_VOLUME_ACCESSIBILITY_CONSTRAINTS}; !slices.Equal(services, want) {
		t.Errorf("plugin capabilities %v, want %v", services, want)
	}

	controller := csi.NewControllerClient(conn)
	ccaps, err := controller.ControllerGetCapabilities(ctx, &csi.ControllerGetCapabilitiesRequest{})
	if err != nil {
		t.Fatalf("ControllerGetCapabilities: %v", err)
	}
	var rpcs []csi.ControllerServiceCapability_RPC_Type
	for _, c := range ccaps.GetCapabilities() {
		rpcs = append(rpcs, c.GetRpc().GetType())
	}
	if want := []csi.ControllerServiceCapability_RPC_Type{csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME,
		csi.ControllerServiceCapability_RPC_CLONE_VOLUME}; !slices.Equal(rpcs, want) {
		t.Errorf("controller capabilities %v, want %v", rpcs, want)
	}
	vol, err := controller.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-grpc", VolumeCapabilities: []*csi.VolumeCapability{fsCap}})
	if err != nil || vol.GetVolume().GetVolumeId() != "pvc-grpc" {
		t.Errorf("CreateVolume = %v, %v", vol, err)
	}
	_, err = controller.CreateVolume(ctx, &csi.CreateVolumeRequest{VolumeCapabilities: []*csi.VolumeCapability{fsCap}})
	wantCode(t, "CreateVolume without a name over gRPC", err, codes.InvalidArgument)
	if info, err := csi.NewNodeClient(conn).NodeGetInfo(ctx, &csi.NodeGetInfoRequest{}); err != nil || info.GetNodeId() != nodeID {
		t.Errorf("NodeGetInfo = %v, %v", info, err)
	}

	registration := registerapi.NewRegistrationClient(dial(t, regSocket))
	info, err := registration.GetInfo(ctx, &registerapi.InfoRequest{})
	if err != nil || info.GetType() != registerapi.CSIPlugin || info.GetName() != DriverName ||
		info.GetEndpoint() != "/kubelet/view/csi.sock" || !slices.Equal(info.GetSupportedVersions(), []string{"1.0.0"}) {
		t.Errorf("registration GetInfo = %v, %v", info, err)
	}
	if _, err := registration.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{PluginRegistered: true}); err != nil {
		t.Errorf("NotifyRegistrationStatus: %v", err)
	}

	stop()
	if err := <-done; err != nil {
		t.Errorf("Run: %v", err)
	}
	for _, socket := range []string{endpoint, regSocket} {
		if _, err := os.Stat(socket); !os.IsNotExist(err) {
			t.Errorf("socket %s left behind: %v", socket, err)
		}
	}
}
