package testcsi

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"regexp"

	"golang.org/x/sys/unix"
)

type volumeKind string

const (
	filesystemVolume volumeKind = "Filesystem"
	blockVolume      volumeKind = "Block"

	metadataFile = "volume.json"
)

// volume is the state of one volume, kept in <data-dir>/<id>/volume.json.
type volume struct {
	Name     string     `json:"name"`
	ID       string     `json:"id"`
	Kind     volumeKind `json:"kind"`
	Capacity int64      `json:"capacity"`
	// Source is the ID of the volume this one was cloned from; it tells a
	// retried CreateVolume from one that asks for other content.
	Source string `json:"source,omitempty"`
	// Publishes maps each target path the volume is published on to
	// whether that publish is read-only.
	Publishes map[string]bool `json:"publishes,omitempty"`
}

func (v *volume) clone() *volume {
	c := *v
	c.Publishes = maps.Clone(v.Publishes)
	return &c
}

var safeName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9.-]{0,127}$`)

// volumeID derives the ID from the name, which makes CreateVolume idempotent
// without an index. Hashed IDs contain '_', which safe names cannot, so the
// two never collide.
func volumeID(name string) string {
	if safeName.MatchString(name) {
		return name
	}
	sum := sha256.Sum256([]byte(name))
	return "sha256_" + hex.EncodeToString(sum[:16])
}

// store is the on-disk state and its in-memory view; the Driver's mutex
// guards it.
type store struct {
	dir  string
	vols map[string]*volume
}

func openStore(dir string) (*store, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("create data dir: %w", err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("list volumes: %w", err)
	}
	s := &store{dir: dir, vols: map[string]*volume{}}
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		b, err := os.ReadFile(s.path(e.Name(), metadataFile))
		// A directory without metadata is a CreateVolume that died half-way;
		// the provisioner retries it, which reuses the directory.
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("load volume: %w", err)
		}
		var v volume
		if err := json.Unmarshal(b, &v); err != nil {
			return nil, fmt.Errorf("parse %s: %w", s.path(e.Name(), metadataFile), err)
		}
		s.vols[v.ID] = &v
	}
	return s, nil
}

func (s *store) path(id string, elem ...string) string {
	return filepath.Join(append([]string{s.dir, id}, elem...)...)
}

// dataPath is the directory of a Filesystem volume or the disk image of a
// Block volume.
func (s *store) dataPath(v *volume) string {
	if v.Kind == blockVolume {
		return s.path(v.ID, "disk.img")
	}
	return s.path(v.ID, "data")
}

// create allocates the volume's storage, a copy of src's if src is not nil,
// before its metadata, so metadata on disk always means usable storage.
func (s *store) create(v, src *volume) error {
	var err error
	if src != nil {
		err = s.allocateClone(v, src)
	} else {
		err = s.allocate(v)
	}
	if err == nil {
		err = s.put(v)
	}
	if err != nil {
		return errors.Join(err, os.RemoveAll(s.path(v.ID)))
	}
	return nil
}

func (s *store) allocate(v *volume) error {
	if err := os.MkdirAll(s.path(v.ID), 0o755); err != nil {
		return err
	}
	if v.Kind == blockVolume {
		f, err := os.Create(s.dataPath(v))
		if err != nil {
			return err
		}
		// Truncating keeps the file sparse: capacity costs no disk until written.
		return errors.Join(f.Truncate(v.Capacity), f.Close())
	}
	if err := os.MkdirAll(s.dataPath(v), 0o777); err != nil {
		return err
	}
	// The umask strips the write bits non-root pods need.
	return os.Chmod(s.dataPath(v), 0o777)
}

// allocateClone copies src's data into v, which has src's kind and at least
// its capacity.
func (s *store) allocateClone(v, src *volume) error {
	if err := os.MkdirAll(s.path(v.ID), 0o755); err != nil {
		return err
	}
	// A clone that died half-way leaves part of a copy: start over.
	if err := os.RemoveAll(s.dataPath(v)); err != nil {
		return err
	}
	if err := copyTree(s.dataPath(v), s.dataPath(src)); err != nil {
		return err
	}
	if v.Kind == blockVolume {
		// Growing by truncation keeps the new space sparse, as in allocate.
		if err := os.Truncate(s.dataPath(v), v.Capacity); err != nil {
			return err
		}
	}
	// The metadata written next must not survive a crash that loses the
	// copy; one syncfs flushes every file and directory of it.
	d, err := os.Open(s.path(v.ID))
	if err != nil {
		return err
	}
	return errors.Join(unix.Syncfs(int(d.Fd())), d.Close())
}

// put persists v before making it visible, so memory never holds state that
// a restart would lose.
func (s *store) put(v *volume) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode volume %s: %w", v.ID, err)
	}
	if err := writeFileAtomic(s.path(v.ID, metadataFile), b); err != nil {
		return fmt.Errorf("save volume %s: %w", v.ID, err)
	}
	s.vols[v.ID] = v
	return nil
}

func (s *store) remove(id string) error {
	if err := os.RemoveAll(s.path(id)); err != nil {
		return fmt.Errorf("remove volume %s: %w", id, err)
	}
	delete(s.vols, id)
	return nil
}

// writeFileAtomic leaves either the old or the new content at path, even
// across a crash.
func writeFileAtomic(path string, data []byte) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, ".volume-*.json")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name()) // fails harmlessly once renamed
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return err
	}
	// The rename itself is durable only once the directory is synced.
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	return errors.Join(d.Sync(), d.Close())
}
