package testcsi

import (
	"context"
	"errors"

	"k8s.io/klog/v2"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// registrationSocket is what the kubelet's plugin watcher finds in its
// plugins_registry directory.
const registrationSocket = DriverName + "-reg.sock"

// registration does the job of the node-driver-registrar sidecar, which the
// Go module proxy cannot provide.
type registration struct {
	registerapi.UnimplementedRegistrationServer
	endpoint string
}

func (r *registration) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              DriverName,
		Endpoint:          r.endpoint,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

func (r *registration) NotifyRegistrationStatus(_ context.Context, s *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if s.GetPluginRegistered() {
		klog.InfoS("Kubelet registered the plugin", "driver", DriverName, "endpoint", r.endpoint)
	} else {
		klog.ErrorS(errors.New(s.GetError()), "Kubelet did not register the plugin", "driver", DriverName)
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}
