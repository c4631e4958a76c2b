// Package driver is the CSI driver images.vimg.dev: it serves read-only disk
// images (ISOs, CD-ROMs) from DVCR to pods through the node cache
// (csi/cache), as Filesystem volumes (a directory holding disk.img, which is
// what KubeVirt looks for) or Block volumes (a read-only loop device).
//
// The content of a volume is immutable, so every access mode is accepted
// and every publish is read-only whatever the request says: a VM with a
// ReadWriteMany CD-ROM stays live-migratable.
//
// State under Config.StateDir:
//
//	cache/                       the node cache (opened by the caller)
//	volumes/<volume ID>.json     volumes made by CreateVolume (controller)
//	publishes/<sha256(target)>.json  one per published target (node)
//	views/<layer hex>/disk.img   a hard link to a cache file, bind-mounted
//	                             read-only onto Filesystem targets
//
// A publish record is written before anything is mounted or pinned, so
// that after a crash NodeUnpublishVolume finds what to undo.
package driver

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"k8s.io/klog/v2"

	"vimg.dev/vimg/csi/cache"
	"vimg.dev/vimg/csi/internal/fsync"
)

// DefaultName is the driver's name.
const DefaultName = "images.vimg.dev"

// qemuUID and qemuGID own the published disk files: KubeVirt's
// virt-launcher runs qemu as 107 and opens a disk on a read-only mount
// only if it owns it.
const qemuUID, qemuGID = 107, 107

// Config configures a Driver.
type Config struct {
	// Name is the driver's name; DefaultName if empty.
	Name string
	// NodeID is this node's ID; required when Cache is set.
	NodeID string
	// Version is reported by GetPluginInfo.
	Version string
	// StateDir holds the driver's records (see the package doc); the
	// cache usually lives in StateDir/cache.
	StateDir string
	// Cache is the node cache. Nil for a controller-only instance, whose
	// node service then refuses to publish.
	Cache *cache.Cache
	// Open opens a DVCR ref "<repository>@sha256:...". Required with Cache.
	Open func(ctx context.Context, ref string) (cache.Source, error)
	// Resolve resolves inline volumes and claims without a Pin; may be nil.
	Resolve Resolver
}

// Driver implements the CSI identity, controller and node services.
type Driver struct {
	// The embedded types answer Unimplemented for what the driver does
	// not do, and keep the build working when the spec grows.
	csi.UnimplementedIdentityServer
	csi.UnimplementedControllerServer
	csi.UnimplementedNodeServer

	cfg   Config
	locks keyedMutex

	// mu guards the maps; per-key locks serialize the operations.
	mu        sync.Mutex
	volumes   map[string]volumeRecord  // by volume ID
	publishes map[string]publishRecord // by target path
}

// volumeRecord is a volume made by CreateVolume.
type volumeRecord struct {
	Name     string `json:"name"`
	VolumeID string `json:"volumeID"`
	Pin      Pin    `json:"pin"`
	Capacity int64  `json:"capacity"`
}

// publishRecord is one published target.
type publishRecord struct {
	VolumeID string    `json:"volumeID"`
	Target   string    `json:"target"`
	Key      cache.Key `json:"key"`
	Block    bool      `json:"block"`
	// Loop is the loop device of a Block target, once attached.
	Loop string `json:"loop,omitempty"`
}

func (r publishRecord) pinID() string { return pinID(r.VolumeID, r.Target) }

// pinID names the cache pin of one volume at one target: the same volume
// published twice (a CD-ROM hotplugged into a second pod) pins twice.
func pinID(volumeID, target string) string { return volumeID + "\x00" + target }

// loopTag names the loop device of a Block target, so that it is found
// again after a crash between attaching it and recording it.
func loopTag(target string) string {
	sum := sha256.Sum256([]byte(target))
	return "vimg:" + hex.EncodeToString(sum[:])[:16]
}

var csiNameRE = regexp.MustCompile(`^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$`)

// New validates cfg, creates the state directories and loads the records
// a previous run left: volumes, and published targets, which a restarted
// plugin must still be able to unpublish. (The cache restores its pins
// itself.)
func New(cfg Config) (*Driver, error) {
	if cfg.Name == "" {
		cfg.Name = DefaultName
	}
	if !csiNameRE.MatchString(cfg.Name) {
		return nil, fmt.Errorf("driver name %q: want a domain name of at most 63 characters", cfg.Name)
	}
	if cfg.Version == "" {
		cfg.Version = "unknown"
	}
	if cfg.StateDir == "" || !filepath.IsAbs(cfg.StateDir) {
		return nil, fmt.Errorf("state directory %q: want an absolute path", cfg.StateDir)
	}
	if cfg.Cache != nil && (cfg.Open == nil || cfg.NodeID == "") {
		return nil, errors.New("a node driver (with a cache) needs Open and NodeID")
	}
	d := &Driver{cfg: cfg, volumes: map[string]volumeRecord{}, publishes: map[string]publishRecord{}}
	for _, sub := range []string{"volumes", "publishes", "views"} {
		if err := os.MkdirAll(filepath.Join(cfg.StateDir, sub), 0o755); err != nil {
			return nil, fmt.Errorf("creating state directory: %w", err)
		}
	}
	logger := klog.Background().WithValues("driver", cfg.Name)
	err := loadRecords(logger, filepath.Join(cfg.StateDir, "volumes"), func(path string, r volumeRecord) error {
		if r.VolumeID != volumeID(r.Name) || filepath.Base(path) != r.VolumeID+".json" {
			return fmt.Errorf("volume record of %q is not named for it", r.Name)
		}
		if err := r.Pin.Validate(); err != nil {
			return err
		}
		d.volumes[r.VolumeID] = r
		return nil
	})
	if err != nil {
		return nil, err
	}
	err = loadRecords(logger, filepath.Join(cfg.StateDir, "publishes"), func(path string, r publishRecord) error {
		if r.VolumeID == "" || path != d.publishPath(r.Target) {
			return fmt.Errorf("publish record of %q is not named for it", r.Target)
		}
		d.publishes[r.Target] = r
		return nil
	})
	if err != nil {
		return nil, err
	}
	logger.Info("Loaded driver state", "volumes", len(d.volumes), "publishes", len(d.publishes))
	return d, nil
}

func (d *Driver) volumePath(id string) string {
	return filepath.Join(d.cfg.StateDir, "volumes", id+".json")
}

func (d *Driver) publishPath(target string) string {
	sum := sha256.Sum256([]byte(target))
	return filepath.Join(d.cfg.StateDir, "publishes", hex.EncodeToString(sum[:])+".json")
}

// maxRecordSize bounds what is read of a record; a real one is a few
// hundred bytes plus a path.
const maxRecordSize = 64 << 10

// tmpPrefix marks records being written; loading removes them.
const tmpPrefix = ".tmp-"

// loadRecords decodes every record in dir and hands it to add. A record
// that cannot be read is an error (it may stand for a mount to undo); one
// that add refuses is logged and kept for a human to look at.
func loadRecords[T any](logger klog.Logger, dir string, add func(path string, r T) error) error {
	des, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("reading records: %w", err)
	}
	for _, de := range des {
		path := filepath.Join(dir, de.Name())
		if strings.HasPrefix(de.Name(), tmpPrefix) {
			if err := os.Remove(path); err != nil {
				return fmt.Errorf("removing an unfinished record: %w", err)
			}
			continue
		}
		var r T
		if err := readJSON(path, &r); err != nil {
			return fmt.Errorf("loading record %s: %w", path, err)
		}
		if err := add(path, r); err != nil {
			logger.Error(err, "Ignoring a record", "path", path)
		}
	}
	return nil
}

func readJSON(path string, v any) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxRecordSize+1))
	if err != nil {
		return err
	}
	if len(b) > maxRecordSize {
		return fmt.Errorf("over %d bytes", maxRecordSize)
	}
	return json.Unmarshal(b, v)
}

// writeJSON writes v to path atomically: temp file, fsync, rename, fsync
// of the directory.
func writeJSON(path string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, tmpPrefix)
	if err != nil {
		return err
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return fsync.Dir(dir)
}

// removeFile removes path (absent is fine) and syncs its directory.
func removeFile(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return fsync.Dir(filepath.Dir(path))
}

// keyedMutex serializes the operations on one key (a target path, a
// volume ID, a view) while others proceed.
type keyedMutex struct {
	mu sync.Mutex
	m  map[string]*keyLock
}

type keyLock struct {
	mu sync.Mutex
	n  int // holders and waiters
}

func (k *keyedMutex) lock(key string) (unlock func()) {
	k.mu.Lock()
	if k.m == nil {
		k.m = map[string]*keyLock{}
	}
	l := k.m[key]
	if l == nil {
		l = &keyLock{}
		k.m[key] = l
	}
	l.n++
	k.mu.Unlock()
	l.mu.Lock()
	return func() {
		l.mu.Unlock()
		k.mu.Lock()
		if l.n--; l.n == 0 {
			delete(k.m, key)
		}
		k.mu.Unlock()
	}
}
