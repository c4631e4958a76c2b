package driver

import (
	"context"
	"errors"
	"fmt"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

func (d *Driver) GetPluginInfo(ctx context.Context, req *csi.GetPluginInfoRequest) (*csi.GetPluginInfoResponse, error) {
	return &csi.GetPluginInfoResponse{Name: d.cfg.Name, VendorVersion: d.cfg.Version}, nil
}

func (d *Driver) GetPluginCapabilities(ctx context.Context, req *csi.GetPluginCapabilitiesRequest) (*csi.GetPluginCapabilitiesResponse, error) {
	return &csi.GetPluginCapabilitiesResponse{Capabilities: []*csi.PluginCapability{{
		Type: &csi.PluginCapability_Service_{Service: &csi.PluginCapability_Service{
			Type: csi.PluginCapability_Service_CONTROLLER_SERVICE,
		}},
	}}}, nil
}

func (d *Driver) Probe(ctx context.Context, req *csi.ProbeRequest) (*csi.ProbeResponse, error) {
	return &csi.ProbeResponse{Ready: wrapperspb.Bool(true)}, nil
}

// accessModes are the modes served. The content never changes and every
// publish is read-only, so "writer" modes are as safe as reader ones; they
// are accepted because KubeVirt asks for ReadWriteMany to live-migrate.
var accessModes = map[csi.VolumeCapability_AccessMode_Mode]bool{
	csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER:        true,
	csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY:   true,
	csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER: true,
	csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER:  true,
	csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY:    true,
	csi.VolumeCapability_AccessMode_MULTI_NODE_SINGLE_WRITER:  true,
	csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER:   true,
}

// checkCapability tells whether c is served, and how: as a block device or
// as a directory. A Filesystem volume's fs_type and mount flags are
// ignored: the volume is a bind mount of a directory, there is no
// filesystem to make, and the mount is always ro,nosuid,nodev,noexec.
func checkCapability(c *csi.VolumeCapability) (block bool, err error) {
	if c == nil {
		return false, errors.New("no volume capability")
	}
	mode := c.GetAccessMode().GetMode()
	if !accessModes[mode] {
		return false, fmt.Errorf("access mode %s is not supported", mode)
	}
	switch {
	case c.GetBlock() != nil:
		return true, nil
	case c.GetMount() != nil:
		return false, nil
	}
	return false, errors.New("volume capability has neither a block nor a mount access type")
}

func checkCapabilities(cs []*csi.VolumeCapability) error {
	if len(cs) == 0 {
		return errors.New("no volume capabilities")
	}
	for _, c := range cs {
		if _, err := checkCapability(c); err != nil {
			return err
		}
	}
	return nil
}
