package importer

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"syscall"

	"vimg.dev/vimg/dvcr/client"
	"vimg.dev/vimg/pkg/diskimage"
	"vimg.dev/vimg/pkg/diskimage/source"
	imagesource "vimg.dev/vimg/pkg/diskimage/source/registry"
	"vimg.dev/vimg/pkg/diskimage/stream"
)

// Reasons an import failed, for a condition's reason: each names what the
// user has to fix (nobody, for ReasonTransient).
const (
	// ReasonSourceNotFound: the server answered 404 or 410.
	ReasonSourceNotFound = "SourceNotFound"
	// ReasonSourceUnauthorized: the server answered 401 or 403.
	ReasonSourceUnauthorized = "SourceUnauthorized"
	// ReasonSourceRefused: the server answered another 4xx.
	ReasonSourceRefused = "SourceRefused"
	// ReasonSourceUnreachable: the source's host does not exist
	// (permanent), or cannot be connected to in time (transient).
	ReasonSourceUnreachable = "SourceUnreachable"
	// ReasonTLSError: the source's certificate is not trusted, or not
	// for its host.
	ReasonTLSError = "TLSError"
	// ReasonChecksumMismatch: the bytes received do not have the
	// checksum asked for.
	ReasonChecksumMismatch = "ChecksumMismatch"
	// ReasonInvalidImage: the image is corrupt, truncated or hostile, or
	// uses a feature vimg refuses on purpose (a backing file, extents in
	// other files).
	ReasonInvalidImage = "InvalidImage"
	// ReasonUnsupportedFormat: the image's wrapping is not one vimg reads
	// (compression nested twice, an xz filter other than LZMA2, ...).
	ReasonUnsupportedFormat = "UnsupportedFormat"
	// ReasonTooLarge: the disk is over the import's size limit.
	ReasonTooLarge = "TooLarge"
	// ReasonInternal: the import was asked for wrongly or could not be
	// set up (a bug or a misconfiguration of vimg, not of the image).
	ReasonInternal = "Internal"
	// ReasonTransient: a failure that trying again may fix (the source's
	// 5xx, a lost connection, DVCR unreachable or failing, a cancelled or
	// timed-out context).
	ReasonTransient = "Transient"
)

// Error is a classified import failure.
type Error struct {
	// Reason is one of the constants above.
	Reason string
	// Message says what went wrong and what to do about it, for a user.
	Message string
	// Permanent is true when trying again cannot help until the user
	// changes something.
	Permanent bool
	// Err is the error classified.
	Err error
}

func (e *Error) Error() string { return e.Message }
func (e *Error) Unwrap() error { return e.Err }

// ChecksumError is a source whose bytes do not match the checksum asked for.
// It matches diskimage.ErrChecksum with errors.Is.
type ChecksumError struct {
	Algorithm        string
	Expected, Actual string // lower-case hex
}

func (e *ChecksumError) Error() string {
	return fmt.Sprintf("%v: the source's %s is %s, expected %s", diskimage.ErrChecksum, e.Algorithm, e.Actual, e.Expected)
}

func (e *ChecksumError) Unwrap() error { return diskimage.ErrChecksum }

// Sentinels of the importer's own refusals, classified by Classify.
var (
	errTooLarge          = errors.New("image too large")
	errNestedCompression = errors.New("compression nested twice")
	errInvalidRequest    = errors.New("invalid import request")
	errEmpty             = fmt.Errorf("%w: the source is empty", stream.ErrCorrupt)
)

// stage is the side of an import an error comes from: the same network
// error means "check the URL" from the source and "retry" from DVCR.
type stage int

const (
	stageSource     stage = iota + 1 // reading the source
	stageDecompress                  // decompressing it
	stageValidate                    // the engine's check of the image
	stageRegistry                    // talking to DVCR
)

func (s stage) String() string {
	switch s {
	case stageSource:
		return "reading the source"
	case stageDecompress:
		return "decompressing the source"
	case stageValidate:
		return "checking the image"
	case stageRegistry:
		return "storing in DVCR"
	}
	return "importing"
}

// stageError tags err with its stage; the text is err's.
type stageError struct {
	stage stage
	err   error
}

func (e *stageError) Error() string { return e.err.Error() }
func (e *stageError) Unwrap() error { return e.err }

// tag marks err as coming from s, unless it already carries a stage (an
// error of the source passed on by the decompressor stays the source's).
func tag(s stage, err error) error {
	if err == nil {
		return nil
	}
	var se *stageError
	if errors.As(err, &se) {
		return err
	}
	return &stageError{stage: s, err: err}
}

// stageOf returns the stage err is tagged with. An untagged error holding a
// registry answer is DVCR's; any other untagged one is taken for the
// source's (what source.OpenHTTP returns, which callers classify too).
func stageOf(err error) stage {
	var se *stageError
	if errors.As(err, &se) {
		return se.stage
	}
	var re *client.RegistryError
	if errors.As(err, &re) {
		return stageRegistry
	}
	return stageSource
}

// Classify maps an error of Import, or of opening its source with
// source.OpenHTTP, to a reason, a message for the user and whether retrying
// can help. It returns nil for nil.
func Classify(err error) *Error {
	if err == nil {
		return nil
	}
	var done *Error
	if errors.As(err, &done) {
		return done
	}
	e := classify(err)
	e.Err = err
	return e
}

func classify(err error) *Error {
	var sum *ChecksumError
	switch {
	case errors.As(err, &sum):
		return &Error{Reason: ReasonChecksumMismatch, Permanent: true, Message: fmt.Sprintf(
			"the source's %s checksum is %s but %s was expected: check the checksum given for the image, or whether the file at the source has changed",
			sum.Algorithm, sum.Actual, sum.Expected)}
	case errors.Is(err, diskimage.ErrChecksum):
		return &Error{Reason: ReasonChecksumMismatch, Permanent: true, Message: "the source does not have the checksum given for it (" + err.Error() + "): check the checksum, or whether the file at the source has changed"}
	case errors.Is(err, errTooLarge):
		return &Error{Reason: ReasonTooLarge, Permanent: true, Message: err.Error() + ": import a smaller image, or raise the size limit"}
	case errors.Is(err, errNestedCompression):
		return &Error{Reason: ReasonUnsupportedFormat, Permanent: true, Message: err.Error() + ": decompress the image once before importing it"}
	case errors.Is(err, errInvalidRequest):
		return &Error{Reason: ReasonInternal, Permanent: true, Message: err.Error()}
	case errors.Is(err, imagesource.ErrNotFound):
		return &Error{Reason: ReasonSourceNotFound, Permanent: true, Message: "the registry has no such image: check containerImage.image (repository and tag): " + err.Error()}
	case errors.Is(err, imagesource.ErrUnauthorized):
		return &Error{Reason: ReasonSourceUnauthorized, Permanent: true, Message: "the registry refused access: check imagePullSecret (or whether the image exists; Docker Hub answers both the same way): " + err.Error()}
	case errors.Is(err, imagesource.ErrInvalidImage):
		return &Error{Reason: ReasonInvalidImage, Permanent: true, Message: "the container image holds no usable disk: " + err.Error()}
	}
	st := stageOf(err)
	switch {
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return &Error{Reason: ReasonTransient, Message: "the import was interrupted (cancelled or timed out) and will be retried: " + err.Error()}
	case st == stageRegistry:
		return &Error{Reason: ReasonTransient, Message: "storing the image in DVCR, the in-cluster registry, failed; the import will be retried: " + err.Error()}
	case st == stageDecompress && errors.Is(err, stream.ErrUnsupported):
		return &Error{Reason: ReasonUnsupportedFormat, Permanent: true, Message: "the image's compression uses a feature vimg does not read: " + err.Error() + ": recompress it with plain gzip, xz or zstd"}
	case errors.Is(err, stream.ErrCorrupt), errors.Is(err, stream.ErrUnsupported):
		return &Error{Reason: ReasonInvalidImage, Permanent: true, Message: "the image was refused: " + err.Error()}
	case errors.Is(err, source.ErrChanged):
		return &Error{Reason: ReasonTransient, Message: "the file changed at the source during the download; it will be downloaded again: " + err.Error()}
	}
	if e := classifyStatus(err); e != nil {
		return e
	}
	return classifyNetwork(err)
}

// classifyStatus handles an HTTP answer of the source.
func classifyStatus(err error) *Error {
	var se *source.StatusError
	if !errors.As(err, &se) {
		return nil
	}
	switch code := se.StatusCode; {
	case code == http.StatusNotFound || code == http.StatusGone:
		return &Error{Reason: ReasonSourceNotFound, Permanent: true, Message: "the source has no image at this URL: check the URL: " + err.Error()}
	case code == http.StatusUnauthorized || code == http.StatusForbidden:
		return &Error{Reason: ReasonSourceUnauthorized, Permanent: true, Message: "the source refused access: check the credentials (authSecretRef, or user and password) it needs: " + err.Error()}
	case code == http.StatusRequestTimeout || code == http.StatusTooEarly || code == http.StatusTooManyRequests || code >= 500:
		return &Error{Reason: ReasonTransient, Message: "the source failed for now; the import will be retried: " + err.Error()}
	}
	return &Error{Reason: ReasonSourceRefused, Permanent: true, Message: "the source refused the request: check the URL and the headers sent: " + err.Error()}
}

// classifyNetwork handles the source's transport failures.
func classifyNetwork(err error) *Error {
	var (
		certErr    *tls.CertificateVerificationError
		unknownCA  x509.UnknownAuthorityError
		hostErr    x509.HostnameError
		invalidErr x509.CertificateInvalidError
		dnsErr     *net.DNSError
		opErr      *net.OpError
		netErr     net.Error
	)
	switch {
	case errors.As(err, &certErr), errors.As(err, &unknownCA), errors.As(err, &hostErr), errors.As(err, &invalidErr):
		return &Error{Reason: ReasonTLSError, Permanent: true, Message: "the source's TLS certificate is not trusted: set caBundle to the CA that signed it (or insecureSkipVerify, to accept any certificate): " + err.Error()}
	case errors.As(err, &dnsErr) && dnsErr.IsNotFound:
		return &Error{Reason: ReasonSourceUnreachable, Permanent: true, Message: fmt.Sprintf("the source's host %q does not exist: check the URL's host: %v", dnsErr.Name, err)}
	case errors.As(err, &dnsErr), errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.EHOSTUNREACH),
		errors.Is(err, syscall.ENETUNREACH), errors.As(err, &opErr) && opErr.Op == "dial",
		errors.As(err, &netErr) && netErr.Timeout():
		return &Error{Reason: ReasonSourceUnreachable, Message: "cannot reach the source for now (is the server up and reachable from the cluster?); the import will be retried: " + err.Error()}
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, syscall.EPIPE):
		return &Error{Reason: ReasonTransient, Message: "the connection to the source was lost; the import will be retried: " + err.Error()}
	}
	return &Error{Reason: ReasonTransient, Message: "the import failed and will be retried: " + err.Error()}
}
