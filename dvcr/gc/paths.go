package gc

import (
	"errors"
	"io/fs"
	"path"
	"strings"

	"github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/opencontainers/go-digest"
)

// Distribution keeps its path builders private; the layout below is its
// documented, stable on-disk format (registry/storage/paths.go).
const (
	registryRoot = "/docker/registry/v2"
	reposRoot    = registryRoot + "/repositories"
	// leasesRoot lives outside distribution's tree so that its walks never
	// see our files.
	leasesRoot = "/vimg/leases"
)

func blobDataPath(d digest.Digest) string {
	hex := d.Encoded()
	return path.Join(registryRoot, "blobs", d.Algorithm().String(), hex[:2], hex, "data")
}

func repoPath(repo string) string { return path.Join(reposRoot, repo) }

func leasePath(d digest.Digest) string {
	return path.Join(leasesRoot, d.Algorithm().String(), d.Encoded())
}

// digestFromLinkDir parses ".../<algorithm>/<hex>/link" as a digest, the
// layout of both layer and revision links, without reading the link.
func digestFromLinkPath(p string) (digest.Digest, bool) {
	if path.Base(p) != "link" {
		return "", false
	}
	dir := path.Dir(p)
	d := digest.NewDigestFromEncoded(digest.Algorithm(path.Base(path.Dir(dir))), path.Base(dir))
	if d.Validate() != nil {
		return "", false
	}
	return d, true
}

func digestFromLeasePath(p string) (digest.Digest, bool) {
	rel := strings.TrimPrefix(p, leasesRoot+"/")
	alg, hex, ok := strings.Cut(rel, "/")
	if !ok {
		return "", false
	}
	d := digest.NewDigestFromEncoded(digest.Algorithm(alg), hex)
	if d.Validate() != nil {
		return "", false
	}
	return d, true
}

// isNotFound also recognises a directory that vanished while it was being
// listed, which the filesystem driver reports as a bare driver.Error.
func isNotFound(err error) bool {
	var pnf driver.PathNotFoundError
	if errors.As(err, &pnf) {
		return true
	}
	var de driver.Error
	return errors.As(err, &de) && errors.Is(de.Detail, fs.ErrNotExist)
}
