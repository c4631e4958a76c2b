package testcsi

import (
	"context"
	"maps"
	"slices"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
)

const (
	defaultCapacity = 1 << 30

	// cloningParameter set to cloningUnsupported in a StorageClass makes
	// the driver refuse clones of that class, so e2e tests can model a
	// class whose driver cannot clone.
	cloningParameter   = "cloning"
	cloningUnsupported = "unsupported"
)

func (d *Driver) ControllerGetCapabilities(context.Context, *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	rpc := func(t csi.ControllerServiceCapability_RPC_Type) *csi.ControllerServiceCapability {
		return &csi.ControllerServiceCapability{Type: &csi.ControllerServiceCapability_Rpc{
			Rpc: &csi.ControllerServiceCapability_RPC{Type: t}}}
	}
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: []*csi.ControllerServiceCapability{
		rpc(csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME),
		rpc(csi.ControllerServiceCapability_RPC_CLONE_VOLUME),
	}}, nil
}

func (d *Driver) CreateVolume(_ context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	if req.GetName() == "" {
		return nil, status.Error(codes.InvalidArgument, "volume name is required")
	}
	kind, err := kindOf(req.GetVolumeCapabilities())
	if err != nil {
		return nil, err
	}
	source, err := sourceOf(req.GetVolumeContentSource(), req.GetParameters())
	if err != nil {
		return nil, err
	}
	capacity, err := capacityOf(req.GetCapacityRange(), kind)
	if err != nil {
		return nil, err
	}
	if !d.accessible(req.GetAccessibilityRequirements()) {
		return nil, status.Errorf(codes.ResourceExhausted, "volumes can only be created on node %s", d.cfg.NodeID)
	}

	// The lock stays held through a clone's copy: releasing it would need
	// in-flight tracking so that neither a retry nor a DeleteVolume of the
	// source could race the copy, and sparse copies of test volumes are quick.
	d.mu.Lock()
	defer d.mu.Unlock()
	id := volumeID(req.GetName())
	// Existing volumes come first: a retry must succeed even if the source
	// has been deleted since.
	if v := d.store.vols[id]; v != nil {
		if v.Name != req.GetName() || v.Kind != kind || v.Capacity != capacity {
			return nil, status.Errorf(codes.AlreadyExists, "volume %q exists as a %s volume of %d bytes", v.Name, v.Kind, v.Capacity)
		}
		if v.Source != source {
			return nil, status.Errorf(codes.AlreadyExists, "volume %q exists with content source %q", v.Name, v.Source)
		}
		return &csi.CreateVolumeResponse{Volume: d.csiVolume(v)}, nil
	}
	var src *volume
	if source != "" {
		if src = d.store.vols[source]; src == nil {
			return nil, status.Errorf(codes.NotFound, "source volume %s does not exist", source)
		}
		if src.Kind != kind {
			return nil, status.Errorf(codes.InvalidArgument, "cannot clone %s volume %s into a %s volume", src.Kind, source, kind)
		}
		if capacity < src.Capacity {
			return nil, status.Errorf(codes.OutOfRange, "capacity of %d bytes is less than the %d bytes of source volume %s", capacity, src.Capacity, source)
		}
	}
	v := &volume{Name: req.GetName(), ID: id, Kind: kind, Capacity: capacity, Source: source}
	if err := d.store.create(v, src); err != nil {
		return nil, status.Errorf(codes.Internal, "create volume %q: %v", v.Name, err)
	}
	klog.InfoS("Created volume", "name", v.Name, "volumeID", id, "kind", kind, "capacity", capacity, "source", source)
	return &csi.CreateVolumeResponse{Volume: d.csiVolume(v)}, nil
}

// sourceOf returns the ID of the volume to clone, or "" for an empty volume.
func sourceOf(cs *csi.VolumeContentSource, params map[string]string) (string, error) {
	refuse := false
	if p, ok := params[cloningParameter]; ok {
		if p != cloningUnsupported {
			return "", status.Errorf(codes.InvalidArgument, "parameter %s=%q: the only value is %q", cloningParameter, p, cloningUnsupported)
		}
		refuse = true
	}
	if cs == nil {
		return "", nil
	}
	if cs.GetSnapshot() != nil {
		return "", status.Error(codes.InvalidArgument, "snapshots are not supported")
	}
	if cs.GetVolume() == nil {
		return "", status.Error(codes.InvalidArgument, "volume content source has no type")
	}
	if refuse {
		return "", status.Errorf(codes.Unimplemented, "clones are refused by this class's parameters (%s: %s)", cloningParameter, cloningUnsupported)
	}
	id := cs.GetVolume().GetVolumeId()
	if id == "" {
		return "", status.Error(codes.InvalidArgument, "source volume ID is required")
	}
	return id, nil
}

func (d *Driver) DeleteVolume(_ context.Context, req *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "volume ID is required")
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	v := d.store.vols[id]
	if v == nil {
		return &csi.DeleteVolumeResponse{}, nil
	}
	if len(v.Publishes) > 0 {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %s is still published on %v", id, slices.Sorted(maps.Keys(v.Publishes)))
	}
	if err := d.store.remove(id); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	klog.InfoS("Deleted volume", "volumeID", id)
	return &csi.DeleteVolumeResponse{}, nil
}

func (d *Driver) csiVolume(v *volume) *csi.Volume {
	cv := &csi.Volume{VolumeId: v.ID, CapacityBytes: v.Capacity, AccessibleTopology: []*csi.Topology{d.topology()}}
	if v.Source != "" {
		cv.ContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
			Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: v.Source}}}
	}
	return cv
}

// accessible reports whether the requisite topology, if any, includes this
// node: the data cannot live anywhere else.
func (d *Driver) accessible(req *csi.TopologyRequirement) bool {
	if len(req.GetRequisite()) == 0 {
		return true
	}
	return slices.ContainsFunc(req.GetRequisite(), func(t *csi.Topology) bool {
		return t.GetSegments()[TopologyKey] == d.cfg.NodeID
	})
}

// kindOf validates the capabilities of a volume, which must agree on its kind.
func kindOf(caps []*csi.VolumeCapability) (volumeKind, error) {
	if len(caps) == 0 {
		return "", status.Error(codes.InvalidArgument, "volume capabilities are required")
	}
	var kind volumeKind
	for _, c := range caps {
		k, err := capabilityKind(c)
		if err != nil {
			return "", err
		}
		if kind != "" && k != kind {
			return "", status.Error(codes.InvalidArgument, "volume capabilities mix Filesystem and Block access")
		}
		kind = k
	}
	return kind, nil
}

func capabilityKind(c *csi.VolumeCapability) (volumeKind, error) {
	switch m := c.GetAccessMode().GetMode(); m {
	case csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER,
		csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER,
		csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER,
		csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY:
	default:
		return "", status.Errorf(codes.InvalidArgument, "access mode %s is not supported: storage is node-local", m)
	}
	switch {
	case c.GetMount() != nil:
		return filesystemVolume, nil
	case c.GetBlock() != nil:
		return blockVolume, nil
	}
	return "", status.Error(codes.InvalidArgument, "volume capability needs a mount or block access type")
}

func capacityOf(r *csi.CapacityRange, kind volumeKind) (int64, error) {
	required, limit := r.GetRequiredBytes(), r.GetLimitBytes()
	if required < 0 || limit < 0 {
		return 0, status.Error(codes.InvalidArgument, "capacity must not be negative")
	}
	capacity := required
	if capacity == 0 {
		capacity = defaultCapacity
		if limit > 0 {
			capacity = min(limit, defaultCapacity)
		}
	}
	if kind == blockVolume {
		// A loop device has whole 512-byte sectors: anything less would
		// leave the device smaller than the capacity.
		capacity = (capacity + 511) &^ 511
	}
	if limit > 0 && capacity > limit {
		return 0, status.Errorf(codes.OutOfRange, "capacity of %d bytes exceeds the limit of %d bytes", capacity, limit)
	}
	return capacity, nil
}
