// Package fsync makes the renames and removals of the CSI driver's state
// durable: on Linux a rename is on disk only once its directory is synced.
package fsync

import (
	"fmt"
	"os"
)

// Dir syncs the directory dir.
func Dir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("syncing %s: %w", dir, err)
	}
	return nil
}
