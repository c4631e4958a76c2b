package cache

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"k8s.io/klog/v2"

	"vimg.dev/vimg/csi/internal/fsync"
)

// pin is the content of pins/<sha256(volumeID)>.json. Volume IDs are
// arbitrary text from the CO, so they name no file: their hash does.
type pin struct {
	VolumeID string `json:"volumeID"`
	Digest   string `json:"digest"`
	Name     string `json:"name"`
}

// maxPinSize bounds what is read of a pin file; a real one is ~200 bytes
// plus the volume ID.
const maxPinSize = 64 << 10

func (c *Cache) pinPath(volumeID string) string {
	sum := sha256.Sum256([]byte(volumeID))
	return filepath.Join(c.dir, "pins", hex.EncodeToString(sum[:])+".json")
}

// load empties tmp/ and reads entries/ and pins/, removing what is not a
// complete entry or a pin of one.
func (c *Cache) load(logger klog.Logger) error {
	if err := removeContent(filepath.Join(c.dir, "tmp")); err != nil {
		return fmt.Errorf("emptying tmp: %w", err)
	}
	dir := filepath.Join(c.dir, "entries")
	des, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("reading entries: %w", err)
	}
	for _, de := range des {
		k, e, err := c.loadEntry(filepath.Join(dir, de.Name()))
		if err != nil {
			logger.Error(err, "Removing a malformed cache entry", "entry", de.Name())
			if err := os.RemoveAll(filepath.Join(dir, de.Name())); err != nil {
				return fmt.Errorf("removing malformed entry %s: %w", de.Name(), err)
			}
			continue
		}
		c.entries[k] = e
		c.bytes += e.size
	}

	dir = filepath.Join(c.dir, "pins")
	des, err = os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("reading pins: %w", err)
	}
	for _, de := range des {
		path := filepath.Join(dir, de.Name())
		p, err := c.loadPin(path)
		if err != nil {
			logger.Error(err, "Dropping a cache pin", "pin", de.Name())
			if err := os.Remove(path); err != nil {
				return fmt.Errorf("removing pin %s: %w", de.Name(), err)
			}
			continue
		}
		k := Key{Digest: p.Digest, Name: p.Name}
		c.pins[p.VolumeID] = k
		c.entries[k].pins++
	}
	return nil
}

// loadEntry checks that dir is an entry (a digest-named directory with one
// regular file) and returns its key, size and last use.
func (c *Cache) loadEntry(dir string) (Key, *entry, error) {
	fi, err := os.Stat(dir)
	if err != nil {
		return Key{}, nil, err
	}
	files, err := os.ReadDir(dir)
	if err != nil {
		return Key{}, nil, err
	}
	if len(files) != 1 || !files[0].Type().IsRegular() {
		return Key{}, nil, fmt.Errorf("entry holds %d files: want one regular file", len(files))
	}
	k := Key{Digest: "sha256:" + filepath.Base(dir), Name: files[0].Name()}
	if err := k.validate(); err != nil {
		return Key{}, nil, err
	}
	ffi, err := files[0].Info()
	if err != nil {
		return Key{}, nil, err
	}
	return k, &entry{size: ffi.Size(), used: fi.ModTime()}, nil
}

func (c *Cache) loadPin(path string) (pin, error) {
	f, err := os.Open(path)
	if err != nil {
		return pin{}, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxPinSize+1))
	if err != nil {
		return pin{}, err
	}
	if len(b) > maxPinSize {
		return pin{}, fmt.Errorf("pin file is over %d bytes", maxPinSize)
	}
	var p pin
	if err := json.Unmarshal(b, &p); err != nil {
		return pin{}, fmt.Errorf("decoding pin: %w", err)
	}
	if p.VolumeID == "" || c.pinPath(p.VolumeID) != path {
		return pin{}, fmt.Errorf("pin of volume %q is not named for it", p.VolumeID)
	}
	k := Key{Digest: p.Digest, Name: p.Name}
	if err := k.validate(); err != nil {
		return pin{}, err
	}
	if c.entries[k] == nil {
		return pin{}, fmt.Errorf("volume %q is pinned to %s, which is not in the cache", p.VolumeID, k)
	}
	return p, nil
}

// writePin persists the pin of volumeID: temp file in tmp/, fsync, rename,
// fsync of pins/.
func (c *Cache) writePin(volumeID string, k Key) error {
	b, err := json.Marshal(pin{VolumeID: volumeID, Digest: k.Digest, Name: k.Name})
	if err != nil {
		return err
	}
	f, err := os.CreateTemp(filepath.Join(c.dir, "tmp"), "pin-")
	if err != nil {
		return fmt.Errorf("writing pin: %w", err)
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	dst := c.pinPath(volumeID)
	if err == nil {
		err = os.Rename(f.Name(), dst)
	}
	if err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("writing pin: %w", err)
	}
	if err := fsync.Dir(filepath.Dir(dst)); err != nil {
		return fmt.Errorf("writing pin: %w", err)
	}
	return nil
}

func (c *Cache) removePin(volumeID string) error {
	path := c.pinPath(volumeID)
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("removing pin: %w", err)
	}
	if err := fsync.Dir(filepath.Dir(path)); err != nil {
		return fmt.Errorf("removing pin: %w", err)
	}
	return nil
}

func removeContent(dir string) error {
	des, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, de := range des {
		if err := os.RemoveAll(filepath.Join(dir, de.Name())); err != nil {
			return err
		}
	}
	return nil
}
