package driver

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"k8s.io/klog/v2"

	"vimg.dev/vimg/csi/cache"
	"vimg.dev/vimg/csi/mount"
	"vimg.dev/vimg/dvcr/client"
	"vimg.dev/vimg/dvcr/layout"
	"vimg.dev/vimg/pkg/diskimage/testimg"
)

// The fixtures: a real DVCR in process (dvcr/server, TLS, no anonymous
// access) on loopback, as pkg/importer's tests run it, and an ISO-like
// raw disk pushed to it the way the importer pushes one.

func TestMain(m *testing.M) {
	flag.Parse()
	if !testing.Verbose() {
		klog.LogToStderr(false)
		klog.SetOutput(io.Discard)
	}
	os.Exit(m.Run())
}

// isoBytes is a raw disk of size bytes (a multiple of 2 KiB) with the
// pattern of testimg and an ISO 9660 primary volume descriptor at sector 16,
// as pkg/importer's tests make an "iso" without genisoimage.
func isoBytes(t testing.TB, size int64) []byte {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.iso")
	testimg.Pattern(t, p, size, 7)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	copy(b[16*2048:], "\x01CD001\x01")
	return b
}

// pushImage pushes data as the ISO of VirtualImage ns/name and returns the
// Pin of what the registry holds, read back from its manifest.
func pushImage(t testing.TB, c *client.Client, name string, data []byte) Pin {
	t.Helper()
	ctx := context.Background()
	repo := layout.Repository(layout.KindVirtualImage, "ns", name)
	p, err := c.Push(ctx, layout.Ref(repo, "0b1e5d2c-uid"), bytes.NewReader(data), int64(len(data)), layout.Meta{Format: layout.FormatISO}, client.PushOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ref := repo + "@" + p.Digest.String()
	im, err := c.Open(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	pin := Pin{Ref: ref, Layer: im.Layer.Digest.String(), File: im.Meta.Name(), Size: im.Size()}
	if err := pin.Validate(); err != nil {
		t.Fatalf("pin of the pushed image: %v", err)
	}
	return pin
}

// openFunc opens DVCR refs for a Driver.
func openFunc(c *client.Client) func(ctx context.Context, ref string) (cache.Source, error) {
	return func(ctx context.Context, ref string) (cache.Source, error) {
		im, err := c.Open(ctx, ref)
		if err != nil {
			return nil, err
		}
		return im, nil
	}
}

// newNodeDriver opens the cache in state/cache and a Driver on state.
func newNodeDriver(t testing.TB, state string, c *client.Client) (*Driver, *cache.Cache) {
	t.Helper()
	ch, err := cache.Open(filepath.Join(state, "cache"), cache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ch.Close)
	d, err := New(Config{NodeID: "node-1", Version: "test", StateDir: state, Cache: ch, Open: openFunc(c)})
	if err != nil {
		t.Fatal(err)
	}
	return d, ch
}

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("publishing needs root (mount(2), loop devices)")
	}
}

func requireLoop(t testing.TB) {
	t.Helper()
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		t.Skipf("no loop devices here (%v)", err)
	}
}

// cleanupTargets makes sure no mount or loop device of these targets
// outlives the test, even a failed one. Registered after the targets'
// t.TempDir, it runs before the directories are removed.
func cleanupTargets(t testing.TB, targets ...string) {
	t.Cleanup(func() {
		for _, target := range targets {
			for i := 0; i < 10; i++ { // stacked mounts, one at a time
				if m, _, err := mount.MountInfo(target); err != nil || !m {
					break
				}
				if err := mount.Unmount(target); err != nil {
					t.Errorf("cleanup: %v", err)
					break
				}
			}
			devs, err := mount.FindLoop(loopTag(target))
			if err != nil && !errors.Is(err, os.ErrNotExist) {
				t.Logf("cleanup: %v", err)
			}
			for _, dev := range devs {
				if err := mount.DetachLoop(dev, loopTag(target)); err != nil {
					t.Errorf("cleanup: %v", err)
				}
			}
		}
	})
}

// cleanupMountsUnder unmounts every mount point below dir at cleanup.
func cleanupMountsUnder(t testing.TB, dir string) {
	t.Cleanup(func() {
		data, err := os.ReadFile("/proc/self/mountinfo")
		if err != nil {
			t.Errorf("cleanup: %v", err)
			return
		}
		var points []string
		for _, line := range strings.Split(string(data), "\n") {
			f := strings.Fields(line)
			if len(f) > 4 && strings.HasPrefix(f[4], dir+"/") {
				points = append(points, f[4])
			}
		}
		for i := len(points) - 1; i >= 0; i-- {
			t.Logf("cleanup: unmounting leftover %s", points[i])
			if err := mount.Unmount(points[i]); err != nil {
				t.Errorf("cleanup: %v", err)
			}
		}
	})
}

func sha256Hex(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// waitForSocket waits until the driver's socket exists.
func waitForSocket(t testing.TB, path string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if fi, err := os.Stat(path); err == nil && fi.Mode().Type() == os.ModeSocket {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the driver did not listen on %s", path)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
