package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"
	"k8s.io/klog/v2"
)

// Copy makes dstRef the same image as srcRef inside the registry. Each
// blob is mounted across repositories (no data moves); when the registry
// declines a mount (202) that blob is streamed from src to dst. The
// manifest is stored byte for byte, so dst has the same digest.
func (c *Client) Copy(ctx context.Context, srcRef, dstRef string) (Pushed, error) {
	p, err := c.copy(ctx, srcRef, dstRef)
	if err != nil {
		return Pushed{}, fmt.Errorf("copy %s to %s: %w", srcRef, dstRef, err)
	}
	return p, nil
}

func (c *Client) copy(ctx context.Context, srcRef, dstRef string) (Pushed, error) {
	srcRepo, srcTag, _, err := parseRef(srcRef)
	if err != nil {
		return Pushed{}, err
	}
	dstRepo, dstTag, _, err := parseRef(dstRef)
	if err != nil {
		return Pushed{}, err
	}
	raw, mediaType, d, err := c.getManifest(ctx, srcRepo, srcTag)
	if err != nil {
		return Pushed{}, fmt.Errorf("getting source manifest: %w", err)
	}
	var man v1.Manifest
	if err := json.Unmarshal(raw, &man); err != nil {
		return Pushed{}, fmt.Errorf("decoding source manifest: %w", err)
	}
	if man.MediaType != "" {
		mediaType = man.MediaType
	}
	if man.Config.Digest == "" || len(man.Layers) == 0 {
		return Pushed{}, fmt.Errorf("source manifest (%s) is not a single image", mediaType)
	}
	streamed := false
	for _, b := range append([]v1.Descriptor{man.Config}, man.Layers...) {
		if err := b.Digest.Validate(); err != nil {
			return Pushed{}, fmt.Errorf("source manifest: %w", err)
		}
		moved, err := c.copyBlob(ctx, srcRepo, dstRepo, b)
		if err != nil {
			return Pushed{}, fmt.Errorf("copying blob %s: %w", b.Digest, err)
		}
		streamed = streamed || moved
	}
	got, err := c.putManifest(ctx, dstRepo, dstTag, mediaType, raw)
	if err != nil {
		return Pushed{}, fmt.Errorf("putting manifest: %w", err)
	}
	if got != d {
		return Pushed{}, fmt.Errorf("copied manifest digest %s differs from source %s", got, d)
	}
	klog.FromContext(ctx).V(2).Info("Copied disk image", "src", srcRef, "dst", dstRef, "digest", d, "streamed", streamed)
	p := Pushed{Digest: d, Size: int64(len(raw)), Config: man.Config, LayerUploaded: streamed}
	if len(man.Layers) == 1 {
		p.Layer = man.Layers[0]
	}
	return p, nil
}

// copyBlob mounts b from src into dst, or streams it when the registry
// will not mount. It reports whether data moved.
func (c *Client) copyBlob(ctx context.Context, src, dst string, b v1.Descriptor) (bool, error) {
	if src == dst {
		return false, nil
	}
	mounted, loc, err := c.mount(ctx, dst, src, b.Digest)
	if err != nil {
		return false, fmt.Errorf("mounting from %s: %w", src, err)
	}
	if mounted {
		return false, nil
	}
	sc := scope{repo: dst, push: true}
	req, err := c.newRequest(ctx, http.MethodGet, c.url(src, "blobs", b.Digest.String()), nil)
	if err != nil {
		return false, err
	}
	resp, err := c.do(req, scope{repo: src})
	if err != nil {
		c.cancelUpload(ctx, loc, sc)
		return false, fmt.Errorf("getting source blob: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		c.cancelUpload(ctx, loc, sc)
		return false, fmt.Errorf("getting source blob: %w", readError(resp))
	}
	defer resp.Body.Close()
	// The registry checks the digest of what the PUT carries.
	if err := c.commit(ctx, loc, b.Digest, io.LimitReader(resp.Body, b.Size), b.Size, sc); err != nil {
		c.cancelUpload(context.WithoutCancel(ctx), loc, sc)
		return false, fmt.Errorf("streaming blob: %w", err)
	}
	return true, nil
}

// Head returns the descriptor of ref's manifest. A missing image gives an
// error matching ErrNotFound.
func (c *Client) Head(ctx context.Context, ref string) (v1.Descriptor, error) {
	repo, tagOrDigest, _, err := parseRef(ref)
	if err != nil {
		return v1.Descriptor{}, fmt.Errorf("head %s: %w", ref, err)
	}
	desc, err := c.headManifest(ctx, repo, tagOrDigest)
	if err != nil {
		return v1.Descriptor{}, fmt.Errorf("head %s: %w", ref, err)
	}
	return desc, nil
}

func (c *Client) headManifest(ctx context.Context, repo, ref string) (v1.Descriptor, error) {
	req, err := c.newRequest(ctx, http.MethodHead, c.url(repo, "manifests", ref), nil)
	if err != nil {
		return v1.Descriptor{}, err
	}
	req.Header.Set("Accept", manifestAccept)
	resp, err := c.do(req, scope{repo: repo})
	if err != nil {
		return v1.Descriptor{}, err
	}
	if resp.StatusCode != http.StatusOK {
		err := readError(resp)
		var re *RegistryError
		if errors.As(err, &re) && re.StatusCode == http.StatusNotFound {
			re.Code = "MANIFEST_UNKNOWN" // a HEAD answer has no body to say so
		}
		return v1.Descriptor{}, err
	}
	resp.Body.Close()
	d, err := digest.Parse(resp.Header.Get("Docker-Content-Digest"))
	if err != nil {
		// Without the header, the digest needs the bytes.
		raw, mt, gd, gerr := c.getManifest(ctx, repo, ref)
		if gerr != nil {
			return v1.Descriptor{}, gerr
		}
		return v1.Descriptor{MediaType: mt, Digest: gd, Size: int64(len(raw))}, nil
	}
	size, _ := strconv.ParseInt(resp.Header.Get("Content-Length"), 10, 64)
	return v1.Descriptor{MediaType: resp.Header.Get("Content-Type"), Digest: d, Size: size}, nil
}

// Delete removes ref's manifest: a tag is resolved to its digest, and the
// manifest is deleted by digest (which distribution 2.x requires). Blobs
// stay until the registry's garbage collection.
//
// Deleting by digest also removes every other tag of that manifest, and
// two objects with identical content in one repository share it (an
// object re-created under the same name while its old image awaits
// deletion). So when another tag points at the same digest, only the tag
// is deleted, which distribution 3 supports; a registry that cannot do
// that gets an error rather than losing the other image.
func (c *Client) Delete(ctx context.Context, ref string) error {
	if err := c.delete(ctx, ref); err != nil {
		return fmt.Errorf("delete %s: %w", ref, err)
	}
	return nil
}

func (c *Client) delete(ctx context.Context, ref string) error {
	repo, tagOrDigest, d, err := parseRef(ref)
	if err != nil {
		return err
	}
	target := tagOrDigest
	if d == "" {
		desc, err := c.headManifest(ctx, repo, tagOrDigest)
		if err != nil {
			return fmt.Errorf("resolving tag: %w", err)
		}
		d = desc.Digest
		shared, err := c.otherTagOf(ctx, repo, tagOrDigest, d)
		if err != nil {
			return err
		}
		if shared == "" {
			target = d.String()
		} else {
			klog.FromContext(ctx).V(2).Info("Deleting only the tag: its manifest has another tag", "ref", ref, "digest", d, "otherTag", shared)
		}
	}
	req, err := c.newRequest(ctx, http.MethodDelete, c.url(repo, "manifests", target), nil)
	if err != nil {
		return err
	}
	resp, err := c.do(req, scope{repo: repo, push: true})
	if err != nil {
		return fmt.Errorf("deleting manifest %s: %w", target, err)
	}
	if resp.StatusCode != http.StatusAccepted && resp.StatusCode != http.StatusOK {
		err := readError(resp)
		if target != d.String() {
			return fmt.Errorf("manifest %s has other tags, and deleting only tag %s failed: %w", d, target, err)
		}
		return fmt.Errorf("deleting manifest %s: %w", d, err)
	}
	resp.Body.Close()
	klog.FromContext(ctx).V(2).Info("Deleted disk image", "ref", ref, "digest", d)
	return nil
}

// Bounds on the tag listing Delete does.
const (
	maxTagListBody  = 1 << 20
	maxTagListPages = 20
)

// otherTagOf returns a tag of repo other than tag whose manifest is d, or "".
func (c *Client) otherTagOf(ctx context.Context, repo, tag string, d digest.Digest) (string, error) {
	next := c.url(repo, "tags", "list") + "?n=1000"
	for page := 0; next != "" && page < maxTagListPages; page++ {
		req, err := c.newRequest(ctx, http.MethodGet, next, nil)
		if err != nil {
			return "", err
		}
		resp, err := c.do(req, scope{repo: repo})
		if err != nil {
			return "", fmt.Errorf("listing tags: %w", err)
		}
		if resp.StatusCode != http.StatusOK {
			return "", fmt.Errorf("listing tags: %w", readError(resp))
		}
		var list struct {
			Tags []string `json:"tags"`
		}
		err = json.NewDecoder(io.LimitReader(resp.Body, maxTagListBody)).Decode(&list)
		resp.Body.Close()
		if err != nil {
			return "", fmt.Errorf("decoding tag list: %w", err)
		}
		for _, t := range list.Tags {
			if t == tag {
				continue
			}
			desc, err := c.headManifest(ctx, repo, t)
			if errors.Is(err, ErrNotFound) {
				continue // deleted meanwhile
			}
			if err != nil {
				return "", fmt.Errorf("resolving tag %s: %w", t, err)
			}
			if desc.Digest == d {
				return t, nil
			}
		}
		next = ""
		if link := resp.Header.Get("Link"); link != "" {
			// `<url>; rel="next"`
			if start, end := strings.IndexByte(link, '<'), strings.IndexByte(link, '>'); start >= 0 && end > start {
				u, err := resp.Request.URL.Parse(link[start+1 : end])
				if err == nil {
					next = u.String()
				}
			}
		}
	}
	return "", nil
}
