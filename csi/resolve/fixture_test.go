package resolve

import (
	"bytes"
	"context"
	"flag"
	"io"
	"os"
	"path/filepath"
	"testing"

	"k8s.io/klog/v2"

	"vimg.dev/vimg/csi/driver"
	"vimg.dev/vimg/dvcr/client"
	"vimg.dev/vimg/dvcr/layout"
	"vimg.dev/vimg/pkg/diskimage/testimg"
)

// The fixtures: a real DVCR in process (dvcr/server, TLS, no anonymous
// access) on loopback, as csi/driver's tests run it, and a raw disk
// pushed to it the way the importer pushes one.

func TestMain(m *testing.M) {
	flag.Parse()
	if !testing.Verbose() {
		klog.LogToStderr(false)
		klog.SetOutput(io.Discard)
	}
	os.Exit(m.Run())
}

// pushed is an image pushed to DVCR: its tagged ref (as a registryURL
// names it, without the address) and the Pin of what DVCR holds.
type pushed struct {
	tagged string
	pin    driver.Pin
}

// pushDisk pushes a raw disk of size bytes as the image of kind
// namespace/name, and reads back its Pin from the registry.
func pushDisk(t testing.TB, c *client.Client, kind, namespace, name string, size int64) pushed {
	t.Helper()
	ctx := context.Background()
	p := filepath.Join(t.TempDir(), "disk.img")
	testimg.Pattern(t, p, size, 3)
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	repo := layout.Repository(kind, namespace, name)
	tagged := layout.Ref(repo, "5f0c1a2b-uid")
	res, err := c.Push(ctx, tagged, bytes.NewReader(data), int64(len(data)), layout.Meta{Format: layout.FormatRaw}, client.PushOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ref := repo + "@" + res.Digest.String()
	im, err := c.Open(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	pin := driver.Pin{Ref: ref, Layer: im.Layer.Digest.String(), File: im.Meta.Name(), Size: im.Size()}
	if err := pin.Validate(); err != nil {
		t.Fatalf("pin of the pushed image: %v", err)
	}
	if pin.Size != size {
		t.Fatalf("pushed %d bytes, DVCR holds %d", size, pin.Size)
	}
	return pushed{tagged: tagged, pin: pin}
}
