package driver

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"regexp"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
)

// volumeID is the ID of the volume named name: the same name always gives
// the same ID, which makes CreateVolume idempotent across restarts too.
func volumeID(name string) string {
	sum := sha256.Sum256([]byte(name))
	return "vimg-" + hex.EncodeToString(sum[:])[:40]
}

var volumeIDRE = regexp.MustCompile(`^vimg-[0-9a-f]{40}$`)

func (d *Driver) ControllerGetCapabilities(ctx context.Context, req *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: []*csi.ControllerServiceCapability{{
		Type: &csi.ControllerServiceCapability_Rpc{Rpc: &csi.ControllerServiceCapability_RPC{
			Type: csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME,
		}},
	}}}, nil
}

// CreateVolume records a volume serving the Pin in the parameters (a
// StorageClass naming an image, or csi-sanity), or the Pin the Resolver
// finds for the claim being provisioned. Nothing is downloaded here: the
// node fills its cache on publish.
func (d *Driver) CreateVolume(ctx context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	name := req.GetName()
	if name == "" {
		return nil, status.Error(codes.InvalidArgument, "CreateVolume: no name")
	}
	if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "CreateVolume %q: %v", name, err)
	}
	if req.GetVolumeContentSource() != nil {
		return nil, status.Errorf(codes.InvalidArgument, "CreateVolume %q: a volume content source is not supported: the content is the image", name)
	}
	required, limit := req.GetCapacityRange().GetRequiredBytes(), req.GetCapacityRange().GetLimitBytes()
	if required < 0 || limit < 0 {
		return nil, status.Errorf(codes.InvalidArgument, "CreateVolume %q: negative capacity range [%d, %d]", name, required, limit)
	}
	pin, err := d.createPin(ctx, req.GetParameters())
	if err != nil {
		return nil, err
	}
	if limit > 0 && (limit < pin.Size || limit < required) {
		return nil, status.Errorf(codes.OutOfRange, "CreateVolume %q: the image's disk has %d bytes, over the limit of %d (required %d)", name, pin.Size, limit, required)
	}
	rec := volumeRecord{Name: name, VolumeID: volumeID(name), Pin: pin, Capacity: max(pin.Size, required)}

	unlock := d.locks.lock("volume/" + rec.VolumeID)
	defer unlock()
	d.mu.Lock()
	old, ok := d.volumes[rec.VolumeID]
	d.mu.Unlock()
	if ok {
		if old.Name != name || old.Pin != pin || old.Capacity < required || limit > 0 && old.Capacity > limit {
			return nil, status.Errorf(codes.AlreadyExists, "CreateVolume %q: volume %s exists with another image or capacity (%s, %d bytes)", name, old.VolumeID, old.Pin.Ref, old.Capacity)
		}
		rec = old
	} else {
		if err := writeJSON(d.volumePath(rec.VolumeID), rec); err != nil {
			return nil, status.Errorf(codes.Internal, "CreateVolume %q: recording volume %s: %v", name, rec.VolumeID, err)
		}
		d.mu.Lock()
		d.volumes[rec.VolumeID] = rec
		d.mu.Unlock()
		klog.FromContext(ctx).Info("Created volume", "name", name, "volumeID", rec.VolumeID, "ref", pin.Ref, "capacity", rec.Capacity)
	}
	return &csi.CreateVolumeResponse{Volume: &csi.Volume{
		VolumeId:      rec.VolumeID,
		CapacityBytes: rec.Capacity,
		VolumeContext: rec.Pin.Context(),
	}}, nil
}

// createPin finds the Pin of a new volume: in the parameters, or from the
// claim through the Resolver.
func (d *Driver) createPin(ctx context.Context, params map[string]string) (Pin, error) {
	if HasPin(params) {
		pin, err := PinFromContext(params)
		if err != nil {
			return Pin{}, status.Errorf(codes.InvalidArgument, "CreateVolume: parameters: %v", err)
		}
		return pin, nil
	}
	ns, claim := params[keyPVCNamespace], params[keyPVCName]
	if ns == "" || claim == "" {
		return Pin{}, status.Errorf(codes.InvalidArgument, "CreateVolume: the parameters carry neither an image pin (%s, %s, %s, %s) nor the claim (%s, %s: run the external-provisioner with --extra-create-metadata)",
			KeyImageRef, KeyLayerDigest, KeyDiskFile, KeyDiskSize, keyPVCNamespace, keyPVCName)
	}
	return d.resolve(ctx, KindPersistentVolumeClaim, ns, claim)
}

// resolve asks the Resolver for a Pin and checks it.
func (d *Driver) resolve(ctx context.Context, kind, namespace, name string) (Pin, error) {
	if d.cfg.Resolve == nil {
		return Pin{}, status.Errorf(codes.FailedPrecondition, "%s %s/%s: this driver has no resolver of images: give the volume a pinned image (%s...)", kind, namespace, name, KeyImageRef)
	}
	pin, err := d.cfg.Resolve.Resolve(ctx, kind, namespace, name)
	if err != nil {
		if st, ok := status.FromError(err); ok {
			return Pin{}, status.Errorf(st.Code(), "resolving %s %s/%s: %s", kind, namespace, name, st.Message())
		}
		return Pin{}, status.Errorf(codes.Unavailable, "resolving %s %s/%s: %v", kind, namespace, name, err)
	}
	if err := pin.Validate(); err != nil {
		return Pin{}, status.Errorf(codes.Internal, "resolving %s %s/%s: the resolver gave an invalid pin: %v", kind, namespace, name, err)
	}
	return pin, nil
}

// DeleteVolume forgets a volume; an unknown one is deleted already. The
// cache entries go by LRU once no target pins them.
func (d *Driver) DeleteVolume(ctx context.Context, req *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "DeleteVolume: no volume ID")
	}
	if !volumeIDRE.MatchString(id) {
		return &csi.DeleteVolumeResponse{}, nil // not one of ours: never was
	}
	unlock := d.locks.lock("volume/" + id)
	defer unlock()
	if err := removeFile(d.volumePath(id)); err != nil {
		return nil, status.Errorf(codes.Internal, "DeleteVolume %s: removing its record: %v", id, err)
	}
	d.mu.Lock()
	_, ok := d.volumes[id]
	delete(d.volumes, id)
	d.mu.Unlock()
	if ok {
		klog.FromContext(ctx).Info("Deleted volume", "volumeID", id)
	}
	return &csi.DeleteVolumeResponse{}, nil
}

func (d *Driver) ValidateVolumeCapabilities(ctx context.Context, req *csi.ValidateVolumeCapabilitiesRequest) (*csi.ValidateVolumeCapabilitiesResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "ValidateVolumeCapabilities: no volume ID")
	}
	if len(req.GetVolumeCapabilities()) == 0 {
		return nil, status.Errorf(codes.InvalidArgument, "ValidateVolumeCapabilities %s: no volume capabilities", id)
	}
	d.mu.Lock()
	_, ok := d.volumes[id]
	d.mu.Unlock()
	if !ok {
		return nil, status.Errorf(codes.NotFound, "ValidateVolumeCapabilities: volume %s does not exist", id)
	}
	if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: err.Error()}, nil
	}
	return &csi.ValidateVolumeCapabilitiesResponse{Confirmed: &csi.ValidateVolumeCapabilitiesResponse_Confirmed{
		VolumeContext:      req.GetVolumeContext(),
		VolumeCapabilities: req.GetVolumeCapabilities(),
		Parameters:         req.GetParameters(),
	}}, nil
}
