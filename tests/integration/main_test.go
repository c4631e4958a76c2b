// Package integration tests the API against a real etcd and kube-apiserver.
package integration

import (
	"context"
	"errors"
	"fmt"
	"os"
	"testing"
	"time"

	"k8s.io/client-go/dynamic"

	"vimg.dev/vimg/tests/integration/controlplane"
)

var (
	cp *controlplane.ControlPlane
	// unavailable says why the control plane could not be started.
	unavailable error
)

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	bins, err := controlplane.FindBinaries()
	if err != nil {
		unavailable = err
		return m.Run()
	}
	dir, err := os.MkdirTemp("", "vimg-controlplane-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	start := time.Now()
	cp, err = controlplane.Start(ctx, bins, dir)
	if err == nil {
		err = cp.InstallCRDs(ctx, controlplane.CRDDir())
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "start control plane: %v\n", err)
		if cp != nil {
			cp.Stop()
		}
		return 1
	}
	fmt.Fprintf(os.Stderr, "control plane with CRDs ready in %s at %s\n", time.Since(start).Round(time.Millisecond), cp.URL)
	code := m.Run()
	cp.Stop()
	if code == 0 {
		os.RemoveAll(dir)
	} else {
		fmt.Fprintf(os.Stderr, "control plane files kept in %s\n", dir)
	}
	return code
}

// needControlPlane skips the test when the binaries are not built, except in
// CI, where a missing control plane is a failure: nothing may skip there.
func needControlPlane(t *testing.T) {
	t.Helper()
	if cp != nil {
		return
	}
	if errors.Is(unavailable, controlplane.ErrBinariesMissing) && os.Getenv("CI") == "" {
		t.Skipf("needs a real kube-apiserver: %v", unavailable)
	}
	t.Fatalf("no control plane: %v", unavailable)
}

func dynamicClient(t *testing.T) dynamic.Interface {
	t.Helper()
	needControlPlane(t)
	dc, err := dynamic.NewForConfig(cp.Config)
	if err != nil {
		t.Fatal(err)
	}
	return dc
}
