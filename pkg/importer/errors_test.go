package importer

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	imagesource "vimg.dev/vimg/pkg/diskimage/source/registry"

	"vimg.dev/vimg/dvcr/client"
	"vimg.dev/vimg/pkg/diskimage"
	"vimg.dev/vimg/pkg/diskimage/source"
	"vimg.dev/vimg/pkg/diskimage/stream"
)

// timeoutErr is a net.Error that timed out, as a dial or read deadline gives.
type timeoutErr struct{}

func (timeoutErr) Error() string   { return "i/o timeout" }
func (timeoutErr) Timeout() bool   { return true }
func (timeoutErr) Temporary() bool { return true }

func TestClassify_MapsEachFailureToWhatTheUserMustDo(t *testing.T) {
	get := func(err error) error { return fmt.Errorf("GET http://images.example/disk.qcow2: %w", err) }
	status := func(code int) error {
		return get(&source.StatusError{StatusCode: code, Status: fmt.Sprintf("%d Something", code)})
	}
	dial := func(err error) error {
		return get(&net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", err)})
	}
	registry := func(err error) error { return tag(stageRegistry, fmt.Errorf("push vi/ns/x:u: %w", err)) }
	for _, tc := range []struct {
		name      string
		err       error
		reason    string
		permanent bool
		says      []string
	}{
		{"404", status(404), ReasonSourceNotFound, true, []string{"check the URL", "404"}},
		{"410", status(410), ReasonSourceNotFound, true, nil},
		{"401", status(401), ReasonSourceUnauthorized, true, []string{"authSecretRef"}},
		{"403", status(403), ReasonSourceUnauthorized, true, []string{"credentials"}},
		{"400", status(400), ReasonSourceRefused, true, nil},
		{"500", status(500), ReasonTransient, false, nil},
		{"503 after retries", get(fmt.Errorf("gave up after 5 retries: %w", &source.StatusError{StatusCode: 503})), ReasonTransient, false, nil},
		{"429", status(429), ReasonTransient, false, nil},
		{"DNS not found", get(&net.DNSError{Err: "no such host", Name: "nope.invalid", IsNotFound: true}), ReasonSourceUnreachable, true, []string{"check the URL's host", "nope.invalid"}},
		{"DNS timeout", get(&net.DNSError{Err: "i/o timeout", Name: "slow.example", IsTimeout: true}), ReasonSourceUnreachable, false, nil},
		{"connection refused", dial(syscall.ECONNREFUSED), ReasonSourceUnreachable, false, nil},
		{"no route", dial(syscall.EHOSTUNREACH), ReasonSourceUnreachable, false, nil},
		{"timeout", get(timeoutErr{}), ReasonSourceUnreachable, false, nil},
		{"unknown CA", get(x509.UnknownAuthorityError{}), ReasonTLSError, true, []string{"caBundle", "insecureSkipVerify"}},
		{"hostname mismatch", get(x509.HostnameError{Certificate: &x509.Certificate{}, Host: "images.example"}), ReasonTLSError, true, []string{"caBundle"}},
		{"expired", get(x509.CertificateInvalidError{Reason: x509.Expired}), ReasonTLSError, true, nil},
		{"connection reset", get(syscall.ECONNRESET), ReasonTransient, false, nil},
		{"body cut short", get(io.ErrUnexpectedEOF), ReasonTransient, false, nil},
		{"file changed", get(fmt.Errorf("%w (ETag was \"a\", now \"b\")", source.ErrChanged)), ReasonTransient, false, []string{"changed"}},
		{"deadline", tag(stageSource, context.DeadlineExceeded), ReasonTransient, false, nil},
		{"registry: no such image", fmt.Errorf("resolving x: %w", imagesource.ErrNotFound), ReasonSourceNotFound, true, []string{"containerImage.image"}},
		{"registry: unauthorized", fmt.Errorf("resolving x: %w", imagesource.ErrUnauthorized), ReasonSourceUnauthorized, true, []string{"imagePullSecret"}},
		{"registry: no disk", fmt.Errorf("x: %w", imagesource.ErrInvalidImage), ReasonInvalidImage, true, []string{"no usable disk"}},
		{"cancelled", tag(stageValidate, context.Canceled), ReasonTransient, false, nil},
		{"checksum", &ChecksumError{Algorithm: "sha256", Expected: "aa", Actual: "bb"}, ReasonChecksumMismatch, true, []string{"sha256", "aa", "bb"}},
		{"engine's checksum", fmt.Errorf("%w: source md5 is 1, expected 2", diskimage.ErrChecksum), ReasonChecksumMismatch, true, nil},
		{"corrupt", tag(stageValidate, fmt.Errorf("qcow2: %w: L2 table beyond the end", stream.ErrCorrupt)), ReasonInvalidImage, true, []string{"L2 table"}},
		{"backing file", tag(stageValidate, fmt.Errorf("qcow2: %w: image has a backing file", stream.ErrUnsupported)), ReasonInvalidImage, true, []string{"backing file"}},
		{"corrupt compression", tag(stageDecompress, fmt.Errorf("%w: xz: stream is truncated", stream.ErrCorrupt)), ReasonInvalidImage, true, nil},
		{"unsupported compression", tag(stageDecompress, fmt.Errorf("%w: xz: block uses filter 0x4", stream.ErrUnsupported)), ReasonUnsupportedFormat, true, []string{"filter"}},
		{"nested compression", fmt.Errorf("%w: xz inside gzip", errNestedCompression), ReasonUnsupportedFormat, true, []string{"xz inside gzip"}},
		{"too large", fmt.Errorf("%w: the disk is 9 bytes, over the 8-byte limit", errTooLarge), ReasonTooLarge, true, []string{"limit"}},
		{"bad request", fmt.Errorf("%w: no source", errInvalidRequest), ReasonInternal, true, nil},
		{"DVCR unreachable", registry(dial(syscall.ECONNREFUSED)), ReasonTransient, false, []string{"DVCR"}},
		{"DVCR host unknown", registry(&net.DNSError{Err: "no such host", Name: "dvcr.invalid", IsNotFound: true}), ReasonTransient, false, nil},
		{"DVCR request cancelled", registry(context.Canceled), ReasonTransient, false, []string{"interrupted"}},
		{"DVCR 503", registry(&client.RegistryError{StatusCode: 503, Code: "SERVICE_UNAVAILABLE"}), ReasonTransient, false, nil},
		{"DVCR error untagged", fmt.Errorf("x: %w", &client.RegistryError{StatusCode: 401, Code: "UNAUTHORIZED"}), ReasonTransient, false, nil},
		{"source failure passed on by the decompressor", tag(stageDecompress, fmt.Errorf("xz: reading the compressed stream: %w", tag(stageSource, status(404)))), ReasonSourceNotFound, true, nil},
		{"unknown", errors.New("something odd"), ReasonTransient, false, []string{"something odd"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := Classify(tc.err)
			if e.Reason != tc.reason || e.Permanent != tc.permanent {
				t.Fatalf("Classify(%v) = %s (permanent %v), want %s (permanent %v)", tc.err, e.Reason, e.Permanent, tc.reason, tc.permanent)
			}
			if !errors.Is(e, tc.err) || e.Error() != e.Message {
				t.Errorf("Classify(%v) does not wrap it, or its Error() is not the message", tc.err)
			}
			for _, s := range tc.says {
				if !strings.Contains(e.Message, s) {
					t.Errorf("message %q does not say %q", e.Message, s)
				}
			}
			if again := Classify(fmt.Errorf("importing: %w", e)); again != e {
				t.Errorf("classifying a classified error gave %+v", again)
			}
		})
	}
	if Classify(nil) != nil {
		t.Error("Classify(nil) is not nil")
	}
}
