// Package api is the contract between the image controller and the import
// worker (package worker): the request, the progress report and the
// outcome.
//
// The controller and the worker talk only through the API server: the
// request is a file mounted from a Secret, progress is an annotation the
// worker patches onto its own pod (an admission policy lets the worker's
// service account patch nothing else), and the outcome is the container's
// termination message. The controller watches pods, so no endpoint of the
// worker is ever scraped.
package api

import (
	"encoding/json"
	"fmt"
	"strconv"
)

// Files in the worker's Secret, mounted at RequestDir.
const (
	RequestDir  = "/etc/vimg/import"
	RequestFile = "request.json"
	// TerminationMessagePath is where the outcome is written (the
	// kubelet's default path, set explicitly in the pod).
	TerminationMessagePath = "/dev/termination-log"
)

// AnnotationProgress is the annotation the worker keeps on its own pod.
const AnnotationProgress = "vimg.dev/progress"

// Source kinds of a Request.
const (
	SourceHTTP     = "HTTP"
	SourceRegistry = "ContainerImage"
)

// Request is what one import pod does. It holds credentials, so it lives
// only in a Secret and is never logged.
type Request struct {
	Source SourceSpec `json:"source"`
	DVCR   DVCRSpec   `json:"dvcr"`
	// Checksums lists "algo:hex" values the source must match (the user
	// may give several; each is checked).
	Checksums []string `json:"checksums,omitempty"`
}

// SourceSpec says where the bytes come from.
type SourceSpec struct {
	Type string `json:"type"`
	// URL for HTTP, the image reference for ContainerImage.
	URL                string            `json:"url"`
	CABundle           []byte            `json:"caBundle,omitempty"`
	InsecureSkipVerify bool              `json:"insecureSkipVerify,omitempty"`
	Headers            map[string]string `json:"headers,omitempty"`
	Username           string            `json:"username,omitempty"`
	Password           string            `json:"password,omitempty"`
	// DockerConfig is a pull secret's .dockerconfigjson (or .dockercfg);
	// the entry of the image's registry gives the credentials.
	DockerConfig []byte `json:"dockerConfig,omitempty"`
	// Size of a DVCRBlob source.
	Size int64 `json:"size,omitempty"`
}

// DVCRSpec says where the image goes: a registry address, the reference
// to push and a token scoped to that one repository.
type DVCRSpec struct {
	Address  string `json:"address"`
	Ref      string `json:"ref"`
	Token    string `json:"token"`
	CABundle []byte `json:"caBundle,omitempty"`
}

// Progress is the worker's report, as written into AnnotationProgress.
type Progress struct {
	// Fraction of the import done, 0..1; -1 when it cannot be told.
	Fraction    float64 `json:"fraction"`
	SourceRead  int64   `json:"sourceRead"`
	SourceTotal int64   `json:"sourceTotal"`
	// Download speeds in bytes per second.
	AvgSpeed     int64 `json:"avgSpeed"`
	CurrentSpeed int64 `json:"currentSpeed"`
}

// Outcome is the termination message: a Result, or why there is none.
type Outcome struct {
	Result *Result `json:"result,omitempty"`
	// Populated is a populate pod's result.
	Populated *PopulateResult `json:"populated,omitempty"`
	// Reason is a constant CamelCase word; Message says what to fix.
	Reason    string `json:"reason,omitempty"`
	Message   string `json:"message,omitempty"`
	Permanent bool   `json:"permanent,omitempty"`
}

// Result describes the image as pushed.
type Result struct {
	Digest         string `json:"digest"`
	Format         string `json:"format"`
	VirtualSize    int64  `json:"virtualSize"`
	StoredSize     int64  `json:"storedSize"`
	SourceSize     int64  `json:"sourceSize"`
	SourceChecksum string `json:"sourceChecksum,omitempty"`
	CDROM          bool   `json:"cdrom"`
}

// maxMessage is what fits a termination message (the kubelet keeps 4096
// bytes) with room for the JSON around it.
const maxMessage = 3000

// Encode renders an outcome for the termination message, shortening the
// message so the JSON always fits and stays valid.
func (o Outcome) Encode() []byte {
	if len(o.Message) > maxMessage {
		o.Message = o.Message[:maxMessage] + "…"
	}
	b, _ := json.Marshal(o)
	return b
}

// DecodeOutcome parses a termination message.
func DecodeOutcome(s string) (Outcome, error) {
	var o Outcome
	if err := json.Unmarshal([]byte(s), &o); err != nil {
		return Outcome{}, fmt.Errorf("parsing the worker's termination message: %w", err)
	}
	return o, nil
}

// DecodeProgress parses the progress annotation.
func DecodeProgress(s string) (Progress, error) {
	var p Progress
	if err := json.Unmarshal([]byte(s), &p); err != nil {
		return Progress{}, fmt.Errorf("parsing %s: %w", AnnotationProgress, err)
	}
	return p, nil
}

// Encode renders the progress annotation.
func (p Progress) Encode() string {
	b, _ := json.Marshal(p)
	return string(b)
}

// Percent formats a fraction the way status.progress shows it: "12.3%".
func Percent(f float64) string {
	return strconv.FormatFloat(f*100, 'f', 1, 64) + "%"
}
