// Package testcsi is the CSI driver of the project's test cluster. It gives
// the cluster both volume modes users have: Filesystem volumes are
// directories, Block volumes are sparse files attached to loop devices.
//
// Storage is node-local, so every volume carries a topology that pins it to
// the node holding its data, and only single-node access modes are offered.
// The driver must run as root in the kubelet's mount namespace, since the
// kubelet uses the mounts it makes.
//
// Caveat: the capacity of a Filesystem volume is recorded but not enforced; a
// pod can fill the host disk through it. Block volumes are exactly as large as
// their capacity.
package testcsi

import (
	"errors"
	"fmt"
	"path/filepath"
	"sync"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

const (
	DriverName    = "hostpath.test.vimg.dev"
	driverVersion = "v0.1.0"
	// TopologyKey names the node that holds a volume's data.
	TopologyKey = "topology.hostpath.test.vimg.dev/node"
)

// Config is what the command line sets.
type Config struct {
	// Endpoint is the unix socket path of the CSI gRPC server.
	Endpoint string
	// DataDir holds one directory per volume.
	DataDir string
	NodeID  string
	// RegistrationDir is the kubelet's plugins_registry directory; empty
	// means the driver does not register with the kubelet.
	RegistrationDir string
	// KubeletRegistrationPath is Endpoint as the kubelet sees it; it
	// defaults to Endpoint.
	KubeletRegistrationPath string
}

// Driver serves the CSI Identity, Controller and Node services from one
// process, which is enough on a single-node cluster.
type Driver struct {
	csi.UnimplementedIdentityServer
	csi.UnimplementedControllerServer
	csi.UnimplementedNodeServer

	cfg Config
	// mu serializes all volume operations: mounts and loop devices are
	// shared host state, and a test cluster's requests are too rare for
	// finer locking to pay off.
	mu    sync.Mutex
	store *store
}

// New loads the volumes already in cfg.DataDir, so a restart loses nothing.
func New(cfg Config) (*Driver, error) {
	if cfg.Endpoint == "" || cfg.DataDir == "" || cfg.NodeID == "" {
		return nil, errors.New("endpoint, data dir and node ID are required")
	}
	if cfg.KubeletRegistrationPath == "" {
		cfg.KubeletRegistrationPath = cfg.Endpoint
	}
	// losetup matches backing files by path: keep every path absolute.
	dir, err := filepath.Abs(cfg.DataDir)
	if err != nil {
		return nil, fmt.Errorf("resolve data dir: %w", err)
	}
	s, err := openStore(dir)
	if err != nil {
		return nil, err
	}
	return &Driver{cfg: cfg, store: s}, nil
}

func (d *Driver) topology() *csi.Topology {
	return &csi.Topology{Segments: map[string]string{TopologyKey: d.cfg.NodeID}}
}
