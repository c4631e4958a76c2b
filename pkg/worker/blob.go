package worker

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/opencontainers/go-digest"

	"vimg.dev/vimg/dvcr/client"
	"vimg.dev/vimg/pkg/diskimage/source"
	"vimg.dev/vimg/pkg/importer"
	"vimg.dev/vimg/pkg/worker/api"
)

// openBlob opens an uploaded blob (api.SourceDVCRBlob) of the repository
// the image is pushed to: the upload gateway streamed the user's bytes
// there as they came, and the import reads them back once, front to back.
// There is no random access: a ranged read per request would cost more
// than the one stream the importer needs.
func openBlob(ctx context.Context, s api.SourceSpec, dvcr *client.Client, ref string) (source.Source, error) {
	d, err := digest.Parse(s.URL)
	if err != nil {
		return nil, &importer.Error{Reason: importer.ReasonInternal, Message: fmt.Sprintf("the uploaded blob's digest %q: %v", s.URL, err), Permanent: true}
	}
	repo, err := importer.Repository(ref)
	if err != nil {
		return nil, &importer.Error{Reason: importer.ReasonInternal, Message: err.Error(), Permanent: true}
	}
	if s.Size < 0 {
		return nil, &importer.Error{Reason: importer.ReasonInternal, Message: fmt.Sprintf("the uploaded blob's size %d is negative", s.Size), Permanent: true}
	}
	return &blobSource{ctx: ctx, dvcr: dvcr, repo: repo, digest: d, size: s.Size}, nil
}

type blobSource struct {
	ctx    context.Context
	dvcr   *client.Client
	repo   string
	digest digest.Digest
	size   int64

	mu   sync.Mutex
	used bool
}

func (b *blobSource) Size() int64           { return b.size }
func (b *blobSource) ReaderAt() io.ReaderAt { return nil }
func (b *blobSource) Name() string          { return "the upload " + b.digest.String() }
func (b *blobSource) Close() error          { return nil }
func (b *blobSource) Stream() (io.ReadCloser, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.used {
		return nil, source.ErrStreamUsed
	}
	b.used = true
	rc, err := b.dvcr.BlobReader(b.ctx, b.repo, b.digest)
	if errors.Is(err, client.ErrNotFound) {
		// Gone for good (deleted, or collected after the image waited too
		// long): only a new upload brings it back.
		return nil, &importer.Error{Reason: importer.ReasonSourceNotFound, Permanent: true, Err: err,
			Message: "the uploaded data is no longer in DVCR: delete the image, create it again and upload once more"}
	}
	return rc, err
}
