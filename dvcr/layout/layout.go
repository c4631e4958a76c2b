// Package layout is the on-registry format of a disk image in DVCR.
//
// A disk image is an OCI image in a repository named after the Kubernetes
// object that owns it, tagged with that object's UID:
//
//	vi/<namespace>/<name>:<uid>   a VirtualImage
//	cvi/<name>:<uid>              a ClusterVirtualImage
//
// Kubernetes names are DNS-1123 subdomains, which the repository grammar of
// distribution accepts as path components unchanged. A repository longer
// than 255 characters (a 253-character name in a long namespace) has its
// name component cut and suffixed with "__" and 16 hex digits of the name's
// SHA-256. "__" never occurs in a Kubernetes name, so a shortened repository
// cannot collide with the repository of another object.
//
// The image manifest (application/vnd.oci.image.manifest.v1+json) has ONE
// uncompressed layer (application/vnd.oci.image.layer.v1.tar) holding:
//
//	disk/            directory, mode 0555, owner 107:107
//	disk/disk.<ext>  the disk file, mode 0440, owner 107:107
//
// ext is img (raw), qcow2, vmdk, vdi or iso. 107 is the qemu user in
// KubeVirt's virt-launcher, and /disk/ is where KubeVirt looks for a
// containerDisk, so the same image also works as a containerDisk. Every
// entry has the modification time 1970-01-01T00:00:00Z and no user or group
// names, so the same disk bytes always give the same layer digest. A disk
// file of 8 GiB or more gets a PAX extended header carrying its size (the
// ustar size field holds at most 8 GiB - 1). The layer ends with zero padding
// to a 512-byte block and two zero blocks.
//
// Because the layer is uncompressed, the disk file is a contiguous byte
// range of the layer blob: a reader finds its offset from the first bytes
// (ParseDiskOffset) and then serves ranged reads from the blob directly.
//
// The image's metadata is written twice, as labels of the image config
// (so that `skopeo inspect` shows it) and as annotations of the manifest (so
// that a puller needs only the manifest):
//
//	vimg.dev/format           raw, qcow2, vmdk, vdi or iso
//	vimg.dev/virtual-size     guest-visible size in bytes (decimal)
//	vimg.dev/stored-size      size of disk/<file> in bytes (decimal)
//	vimg.dev/source-checksum  checksum of the source as imported, "<algo>:<hex>"
//	vimg.dev/file-name        base name of the disk file inside disk/
//
// The config is an ordinary OCI image config (os linux, the architecture from
// Meta, default amd64) whose rootfs lists the layer digest as its diff ID,
// since the layer is not compressed. Its creation time is fixed too, so the
// whole image is reproducible from the disk bytes and Meta.
package layout

import (
	"crypto/sha256"
	"encoding/hex"
	"strings"
)

// Kinds of the objects that own a disk image: the first path component of
// the repository.
const (
	KindVirtualImage        = "vi"
	KindClusterVirtualImage = "cvi"
)

// MaxRepositoryLength is distribution's limit on a repository name.
const MaxRepositoryLength = 255

// hashSuffixLen is how many hex digits of SHA-256 a shortened name keeps:
// 64 bits, far beyond the number of objects one namespace will ever hold.
const hashSuffixLen = 16

// Repository returns the repository of the disk image of a VirtualImage
// (kind "vi") or ClusterVirtualImage (kind "cvi"; namespace is ignored).
// The result is always a valid repository of at most 255 characters for
// valid Kubernetes names, the same for the same input, and different for
// different objects. It returns "" for an unknown kind, which every client
// call rejects as an invalid reference.
//
// A namespace or name that is not a DNS-1123 name (which the API server
// never admits) is replaced by its hash so that the result stays valid and
// distinct rather than failing: callers hold names the API server checked.
func Repository(kind, namespace, name string) string {
	var prefix string
	switch kind {
	case KindVirtualImage:
		prefix = KindVirtualImage + "/" + component(namespace) + "/"
	case KindClusterVirtualImage:
		prefix = KindClusterVirtualImage + "/"
	default:
		return ""
	}
	name = component(name)
	room := MaxRepositoryLength - len(prefix)
	if len(name) <= room {
		return prefix + name
	}
	return prefix + shorten(name, room)
}

// Tag returns the tag of the disk image of the object with this UID.
// Kubernetes UIDs are lowercase UUIDs, which are valid tags as they are.
func Tag(uid string) string { return uid }

// Ref returns "<repository>:<tag>".
func Ref(repository, tag string) string { return repository + ":" + tag }

// shorten cuts name to at most max characters, ending in "__<hash>".
func shorten(name string, max int) string {
	sum := sha256.Sum256([]byte(name))
	suffix := "__" + hex.EncodeToString(sum[:])[:hashSuffixLen]
	keep := max - len(suffix)
	if keep < 1 {
		return "h" + suffix
	}
	head := name[:keep]
	// A path component must end with an alphanumeric before the separator.
	head = strings.TrimRight(head, ".-_")
	if head == "" {
		head = "h"
	}
	return head + suffix
}

// component returns s if it is a DNS-1123 subdomain, otherwise "h__" and its
// hash (still a valid, distinct path component).
func component(s string) string {
	if isDNS1123Subdomain(s) {
		return s
	}
	sum := sha256.Sum256([]byte(s))
	return "h__" + hex.EncodeToString(sum[:])[:hashSuffixLen]
}

func isDNS1123Subdomain(s string) bool {
	if len(s) == 0 || len(s) > 253 {
		return false
	}
	for _, label := range strings.Split(s, ".") {
		if label == "" || len(label) > 63 {
			return false
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			alnum := (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9')
			if !alnum && c != '-' {
				return false
			}
			if c == '-' && (i == 0 || i == len(label)-1) {
				return false
			}
		}
	}
	return true
}
