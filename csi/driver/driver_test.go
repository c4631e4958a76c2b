package driver

import (
	"context"
	"errors"
	"maps"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"vimg.dev/vimg/csi/cache"
)

var (
	hexA    = strings.Repeat("a", 64)
	hexB    = strings.Repeat("b", 64)
	goodPin = Pin{Ref: "vi/ns/cdrom@sha256:" + hexA, Layer: "sha256:" + hexB, File: "disk.iso", Size: 4 << 20}
)

func TestPinFromContext(t *testing.T) {
	with := func(k, v string) map[string]string {
		m := goodPin.Context()
		if v == "<delete>" {
			delete(m, k)
		} else {
			m[k] = v
		}
		return m
	}
	for _, tc := range []struct {
		name    string
		m       map[string]string
		wantErr string
	}{
		{"valid", goodPin.Context(), ""},
		{"cluster image", with(KeyImageRef, "cvi/ubuntu-iso@sha256:"+hexA), ""},
		{"raw disk", with(KeyDiskFile, "disk.img"), ""},
		{"largest size", with(KeyDiskSize, "1099511627776"), ""},
		{"no ref", with(KeyImageRef, "<delete>"), "no " + KeyImageRef},
		{"no layer", with(KeyLayerDigest, "<delete>"), "no " + KeyLayerDigest},
		{"no file", with(KeyDiskFile, "<delete>"), "no " + KeyDiskFile},
		{"no size", with(KeyDiskSize, "<delete>"), "no " + KeyDiskSize},
		{"ref by tag", with(KeyImageRef, "vi/ns/cdrom:latest"), KeyImageRef},
		{"ref with host", with(KeyImageRef, "dvcr.example:5000/vi/ns/cdrom@sha256:"+hexA), KeyImageRef},
		{"ref uppercase", with(KeyImageRef, "vi/NS/cdrom@sha256:"+hexA), KeyImageRef},
		{"ref short digest", with(KeyImageRef, "vi/ns/cdrom@sha256:abc"), KeyImageRef},
		{"ref sha512", with(KeyImageRef, "vi/ns/cdrom@sha512:"+hexA+hexA), KeyImageRef},
		{"ref empty repo", with(KeyImageRef, "@sha256:"+hexA), KeyImageRef},
		{"layer uppercase", with(KeyLayerDigest, "sha256:"+strings.ToUpper(hexB)), KeyLayerDigest},
		{"layer no algorithm", with(KeyLayerDigest, hexB), KeyLayerDigest},
		{"file with slash", with(KeyDiskFile, "../disk.iso"), KeyDiskFile},
		{"file dotdot", with(KeyDiskFile, ".."), KeyDiskFile},
		{"file empty", with(KeyDiskFile, ""), KeyDiskFile},
		{"file with NUL", with(KeyDiskFile, "disk\x00.iso"), KeyDiskFile},
		{"file too long", with(KeyDiskFile, strings.Repeat("d", 101)), KeyDiskFile},
		{"size zero", with(KeyDiskSize, "0"), KeyDiskSize},
		{"size negative", with(KeyDiskSize, "-1"), KeyDiskSize},
		{"size over 1 TiB", with(KeyDiskSize, "1099511627777"), KeyDiskSize},
		{"size with sign", with(KeyDiskSize, "+5"), KeyDiskSize},
		{"size hex", with(KeyDiskSize, "0x10"), KeyDiskSize},
		{"size text", with(KeyDiskSize, "4Mi"), KeyDiskSize},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := PinFromContext(tc.m)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				if !maps.Equal(p.Context(), tc.m) {
					t.Fatalf("round trip: %v, want %v", p.Context(), tc.m)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("PinFromContext = %+v, %v; want an error about %s", p, err, tc.wantErr)
			}
		})
	}
}

func TestInlineTarget(t *testing.T) {
	for _, tc := range []struct {
		name                string
		vc                  map[string]string
		kind, ns, imageName string
	}{
		{"virtual image", map[string]string{keyVirtualImage: "iso", keyPodNamespace: "ns"}, KindVirtualImage, "ns", "iso"},
		{"cluster virtual image", map[string]string{keyClusterVirtualImage: "iso", keyPodNamespace: "ns"}, KindClusterVirtualImage, "", "iso"},
		{"virtual image without namespace", map[string]string{keyVirtualImage: "iso"}, "", "", ""},
		{"both", map[string]string{keyVirtualImage: "a", keyClusterVirtualImage: "b", keyPodNamespace: "ns"}, "", "", ""},
		{"neither", map[string]string{keyPodNamespace: "ns"}, "", "", ""},
		{"a pin", maps.Collect(func(yield func(string, string) bool) {
			for k, v := range goodPin.Context() {
				yield(k, v)
			}
			yield(keyVirtualImage, "iso")
			yield(keyPodNamespace, "ns")
		}), "", "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			kind, ns, name, err := inlineTarget(tc.vc)
			if tc.kind == "" {
				if err == nil {
					t.Fatalf("inlineTarget = %s %s/%s, want an error", kind, ns, name)
				}
				return
			}
			if err != nil || kind != tc.kind || ns != tc.ns || name != tc.imageName {
				t.Fatalf("inlineTarget = %s %s/%s, %v; want %s %s/%s", kind, ns, name, err, tc.kind, tc.ns, tc.imageName)
			}
		})
	}
}

func TestCheckCapability(t *testing.T) {
	for mode := range csi.VolumeCapability_AccessMode_Mode_name {
		m := csi.VolumeCapability_AccessMode_Mode(mode)
		for _, block := range []bool{false, true} {
			got, err := checkCapability(capability(block, m))
			if m == csi.VolumeCapability_AccessMode_UNKNOWN {
				if err == nil {
					t.Errorf("mode %s accepted", m)
				}
				continue
			}
			if err != nil || got != block {
				t.Errorf("checkCapability(%s, block %v) = %v, %v", m, block, got, err)
			}
		}
	}
	for name, c := range map[string]*csi.VolumeCapability{
		"nil":            nil,
		"no access mode": {AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}}},
		"no access type": {AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}},
	} {
		if _, err := checkCapability(c); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// newControllerDriver is a Driver without a node cache.
func newControllerDriver(t *testing.T, state string, r Resolver) *Driver {
	t.Helper()
	d, err := New(Config{StateDir: state, Resolve: r})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func createReq(name string, required, limit int64, params map[string]string) *csi.CreateVolumeRequest {
	return &csi.CreateVolumeRequest{
		Name:               name,
		VolumeCapabilities: []*csi.VolumeCapability{capability(false, csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER)},
		CapacityRange:      &csi.CapacityRange{RequiredBytes: required, LimitBytes: limit},
		Parameters:         params,
	}
}

type fakeResolver struct {
	pin   Pin
	err   error
	calls []string
}

func (f *fakeResolver) Resolve(ctx context.Context, kind, namespace, name string) (Pin, error) {
	f.calls = append(f.calls, kind+" "+namespace+"/"+name)
	return f.pin, f.err
}

func TestCreateVolume(t *testing.T) {
	ctx := context.Background()
	size := goodPin.Size
	otherPin := goodPin
	otherPin.Layer = "sha256:" + hexA
	pvc := map[string]string{keyPVCName: "cdrom", keyPVCNamespace: "ns"}
	for _, tc := range []struct {
		name     string
		first    *csi.CreateVolumeRequest // made first, must succeed
		req      *csi.CreateVolumeRequest
		resolver Resolver
		want     codes.Code
		capacity int64
	}{
		{name: "pin, no capacity", req: createReq("v", 0, 0, goodPin.Context()), want: codes.OK, capacity: size},
		{name: "more than the disk", req: createReq("v", 2*size, 0, goodPin.Context()), want: codes.OK, capacity: 2 * size},
		{name: "limit below the disk", req: createReq("v", 0, size-1, goodPin.Context()), want: codes.OutOfRange},
		{name: "required over limit", req: createReq("v", 2*size, size+1, goodPin.Context()), want: codes.OutOfRange},
		{name: "negative", req: createReq("v", -1, 0, goodPin.Context()), want: codes.InvalidArgument},
		{name: "no name", req: createReq("", 0, 0, goodPin.Context()), want: codes.InvalidArgument},
		{name: "bad pin", req: createReq("v", 0, 0, map[string]string{KeyImageRef: "x"}), want: codes.InvalidArgument},
		{name: "no pin nor claim", req: createReq("v", 0, 0, nil), want: codes.InvalidArgument},
		{name: "claim without resolver", req: createReq("v", 0, 0, pvc), want: codes.FailedPrecondition},
		{name: "claim resolved", req: createReq("v", 0, 0, pvc), resolver: &fakeResolver{pin: goodPin}, want: codes.OK, capacity: size},
		{name: "claim not annotated yet", req: createReq("v", 0, 0, pvc), resolver: &fakeResolver{err: status.Error(codes.FailedPrecondition, "no pin yet")}, want: codes.FailedPrecondition},
		{name: "resolver down", req: createReq("v", 0, 0, pvc), resolver: &fakeResolver{err: errors.New("connection refused")}, want: codes.Unavailable},
		{name: "resolver gives junk", req: createReq("v", 0, 0, pvc), resolver: &fakeResolver{pin: Pin{Ref: "x"}}, want: codes.Internal},
		{name: "same again", first: createReq("v", size, 0, goodPin.Context()), req: createReq("v", size, 0, goodPin.Context()), want: codes.OK, capacity: size},
		{name: "same name, other image", first: createReq("v", 0, 0, goodPin.Context()), req: createReq("v", 0, 0, otherPin.Context()), want: codes.AlreadyExists},
		{name: "same name, larger", first: createReq("v", size, size, goodPin.Context()), req: createReq("v", 2*size, 2*size, goodPin.Context()), want: codes.AlreadyExists},
		{name: "same name, smaller limit", first: createReq("v", 2*size, 0, goodPin.Context()), req: createReq("v", 0, size, goodPin.Context()), want: codes.AlreadyExists},
		{name: "same name, within range", first: createReq("v", 2*size, 0, goodPin.Context()), req: createReq("v", size, 3*size, goodPin.Context()), want: codes.OK, capacity: 2 * size},
		{name: "clone", req: func() *csi.CreateVolumeRequest {
			r := createReq("v", 0, 0, goodPin.Context())
			r.VolumeContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: "x"}}}
			return r
		}(), want: codes.InvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := newControllerDriver(t, t.TempDir(), tc.resolver)
			if tc.first != nil {
				if _, err := d.CreateVolume(ctx, tc.first); err != nil {
					t.Fatal(err)
				}
			}
			resp, err := d.CreateVolume(ctx, tc.req)
			if status.Code(err) != tc.want {
				t.Fatalf("CreateVolume: %v, want %s", err, tc.want)
			}
			if err != nil {
				t.Log(err)
				return
			}
			v := resp.GetVolume()
			if v.GetVolumeId() != volumeID(tc.req.GetName()) || v.GetCapacityBytes() != tc.capacity || !maps.Equal(v.GetVolumeContext(), goodPin.Context()) {
				t.Fatalf("volume %+v: want ID %s, capacity %d, the pin as context", v, volumeID(tc.req.GetName()), tc.capacity)
			}
		})
	}
}

func TestControllerVolumes_SurviveRestart(t *testing.T) {
	ctx := context.Background()
	state := t.TempDir()
	d := newControllerDriver(t, state, nil)
	resp, err := d.CreateVolume(ctx, createReq("pvc-1", 0, 0, goodPin.Context()))
	if err != nil {
		t.Fatal(err)
	}
	id := resp.GetVolume().GetVolumeId()
	caps := []*csi.VolumeCapability{capability(true, csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY)}

	d = newControllerDriver(t, state, nil)
	v, err := d.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: id, VolumeCapabilities: caps})
	if err != nil || v.GetConfirmed() == nil {
		t.Fatalf("ValidateVolumeCapabilities after restart: %+v, %v", v, err)
	}
	if _, err := d.CreateVolume(ctx, createReq("pvc-1", 0, 0, goodPin.Context())); err != nil {
		t.Fatalf("CreateVolume again after restart: %v", err)
	}
	if _, err := d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Fatal(err)
	}
	d = newControllerDriver(t, state, nil)
	_, err = d.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: id, VolumeCapabilities: caps})
	if status.Code(err) != codes.NotFound {
		t.Fatalf("ValidateVolumeCapabilities of a deleted volume: %v, want NotFound", err)
	}
	for _, id := range []string{id, "unknown", "../../etc/passwd"} {
		if _, err := d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Errorf("DeleteVolume(%q): %v, want success", id, err)
		}
	}
}

func TestNodePublish_Validation(t *testing.T) {
	ch, err := cache.Open(filepath.Join(t.TempDir(), "cache"), cache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ch.Close)
	noOpen := func(ctx context.Context, ref string) (cache.Source, error) {
		return nil, errors.New("no registry in this test")
	}
	ephemeral := map[string]string{keyEphemeral: "true", keyVirtualImage: "iso", keyPodNamespace: "ns"}
	target := filepath.Join(t.TempDir(), "target")
	for _, tc := range []struct {
		name      string
		req       *csi.NodePublishVolumeRequest
		resolver  *fakeResolver
		want      codes.Code
		wantCalls string
	}{
		{name: "no volume ID", req: &csi.NodePublishVolumeRequest{TargetPath: target}, want: codes.InvalidArgument},
		{name: "relative target", req: publishReq("v", "target", false, goodPin), want: codes.InvalidArgument},
		{name: "no capability", req: &csi.NodePublishVolumeRequest{VolumeId: "v", TargetPath: target, VolumeContext: goodPin.Context()}, want: codes.InvalidArgument},
		{name: "no pin", req: &csi.NodePublishVolumeRequest{VolumeId: "v", TargetPath: target, VolumeCapability: capability(false, csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER)}, want: codes.InvalidArgument},
		{name: "ephemeral without resolver", req: &csi.NodePublishVolumeRequest{VolumeId: "v", TargetPath: target, VolumeCapability: capability(false, csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER), VolumeContext: ephemeral}, want: codes.FailedPrecondition},
		{name: "ephemeral, image not found", req: &csi.NodePublishVolumeRequest{VolumeId: "v", TargetPath: target, VolumeCapability: capability(false, csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER), VolumeContext: ephemeral},
			resolver: &fakeResolver{err: status.Error(codes.NotFound, "no such VirtualImage")}, want: codes.NotFound, wantCalls: "VirtualImage ns/iso"},
		{name: "ephemeral with a pin", req: &csi.NodePublishVolumeRequest{VolumeId: "v", TargetPath: target, VolumeCapability: capability(false, csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER), VolumeContext: func() map[string]string {
			m := goodPin.Context()
			m[keyEphemeral] = "true"
			return m
		}()}, resolver: &fakeResolver{pin: goodPin}, want: codes.InvalidArgument},
		{name: "fill fails", req: publishReq("v", target, false, goodPin), want: codes.Internal},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := Config{NodeID: "n", StateDir: t.TempDir(), Cache: ch, Open: noOpen}
			if tc.resolver != nil {
				cfg.Resolve = tc.resolver
			}
			d, err := New(cfg)
			if err != nil {
				t.Fatal(err)
			}
			_, err = d.NodePublishVolume(context.Background(), tc.req)
			if status.Code(err) != tc.want {
				t.Fatalf("NodePublishVolume: %v, want %s", err, tc.want)
			}
			t.Log(err)
			if tc.resolver != nil && strings.Join(tc.resolver.calls, ",") != tc.wantCalls {
				t.Errorf("resolver calls %q, want %q", tc.resolver.calls, tc.wantCalls)
			}
			if len(d.publishes) != 0 {
				t.Errorf("a refused publish left records: %v", d.publishes)
			}
		})
	}
}

func TestNew_RefusesBadConfig(t *testing.T) {
	ch, err := cache.Open(filepath.Join(t.TempDir(), "cache"), cache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ch.Close)
	for name, cfg := range map[string]Config{
		"relative state dir": {StateDir: "state"},
		"bad name":           {Name: "Images_VIMG", StateDir: t.TempDir()},
		"cache without Open": {NodeID: "n", StateDir: t.TempDir(), Cache: ch},
		"cache without node": {StateDir: t.TempDir(), Cache: ch, Open: openFunc(nil)},
	} {
		if _, err := New(cfg); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestParseEndpoint(t *testing.T) {
	for in, want := range map[string]string{
		"unix:///csi/csi.sock": "/csi/csi.sock",
		"unix:/csi/csi.sock":   "/csi/csi.sock",
		"unix://csi.sock":      "",
		"tcp://127.0.0.1:1":    "",
		"/csi/csi.sock":        "",
	} {
		got, err := ParseEndpoint(in)
		if got != want || (want == "") != (err != nil) {
			t.Errorf("ParseEndpoint(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
}
