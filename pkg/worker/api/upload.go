package api

import (
	"encoding/json"
	"fmt"
	"time"
)

// Uploads. The controller writes one Secret per image waiting for an upload
// into UploadNamespace (a namespace holding nothing else, so that the upload
// gateway's access to Secrets reaches nothing else); the gateway
// authenticates uploads against it, streams the bytes into a DVCR blob
// (resumable) and records its progress in the Secret's AnnotationUploadState.
// When the state says Done, the controller imports the blob like any other
// source (SourceDVCRBlob), in an import pod.
const (
	// UploadSecretPrefix + the image's UID names the Secret.
	UploadSecretPrefix = "vimg-upload-"
	// LabelUpload marks upload Secrets (value "true").
	LabelUpload = "vimg.dev/upload"

	// Keys of the upload Secret, written by the controller.
	UploadKeyToken      = "token"      // the URL's secret, hex
	UploadKeyRepository = "repository" // the image's DVCR repository
	UploadKeyDVCRToken  = "dvcrToken"  // a push token for that repository
	UploadKeyExpires    = "expires"    // RFC 3339: no upload may start after it

	// AnnotationUploadState holds an UploadState, written by the gateway.
	AnnotationUploadState = "vimg.dev/upload-state"

	// UploadPathPrefix is the URL path of an upload: /upload/<uid>/<token>.
	UploadPathPrefix = "/upload/"
)

// UploadState is how far an upload has come.
type UploadState struct {
	// Received is how many bytes are in the blob upload session.
	Received int64 `json:"received"`
	// Total is the size the client announced, -1 when unknown (chunked).
	Total int64 `json:"total"`
	// Session is the DVCR blob upload location; HashState the marshalled
	// sha256 of the first Received bytes. Both let another request, or
	// another gateway replica, resume.
	Session   string `json:"session,omitempty"`
	HashState []byte `json:"hashState,omitempty"`
	// Done is set once the blob is committed: Digest and Size name it.
	Done   bool   `json:"done,omitempty"`
	Digest string `json:"digest,omitempty"`
	Size   int64  `json:"size,omitempty"`
	// StartedAt is when the first byte arrived; UpdatedAt the last write.
	StartedAt time.Time `json:"startedAt,omitzero"`
	UpdatedAt time.Time `json:"updatedAt,omitzero"`
	// Speed is the current receive rate in bytes per second.
	Speed int64 `json:"speed,omitempty"`
}

// DecodeUploadState parses AnnotationUploadState.
func DecodeUploadState(s string) (UploadState, error) {
	var u UploadState
	if err := json.Unmarshal([]byte(s), &u); err != nil {
		return UploadState{}, fmt.Errorf("parsing %s: %w", AnnotationUploadState, err)
	}
	return u, nil
}

// Encode renders AnnotationUploadState.
func (u UploadState) Encode() string {
	b, _ := json.Marshal(u)
	return string(b)
}

// SourceDVCRBlob imports a blob of the image's own repository (an upload):
// SourceSpec.URL is the blob's digest and SourceSpec.Size its size.
const SourceDVCRBlob = "DVCRBlob"
