package diskimage

import (
	"crypto/md5"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"strings"
)

// ErrChecksum is returned when the source's bytes do not match the expected
// checksum. The target must not be used: it holds what was received, which
// is not what was asked for.
var ErrChecksum = errors.New("checksum mismatch")

// Checksum is an expected digest of the source, as received (before any
// decompression or conversion).
type Checksum struct {
	Algorithm string // md5, sha1, sha256, sha512
	Hex       string // lower case
}

var checksumAlgorithms = map[string]struct {
	new  func() hash.Hash
	size int
}{
	"md5":    {md5.New, md5.Size},
	"sha1":   {sha1.New, sha1.Size},
	"sha256": {sha256.New, sha256.Size},
	"sha512": {sha512.New, sha512.Size},
}

// ParseChecksum parses "ALGO:HEX", e.g. "sha256:9f86d0...".
func ParseChecksum(s string) (Checksum, error) {
	algo, value, ok := strings.Cut(s, ":")
	if !ok {
		return Checksum{}, fmt.Errorf("checksum %q: want ALGO:HEX with ALGO one of md5, sha1, sha256, sha512", s)
	}
	return NewChecksum(algo, value)
}

// NewChecksum checks an algorithm name and a hex digest.
func NewChecksum(algo, value string) (Checksum, error) {
	algo = strings.ToLower(algo)
	a, ok := checksumAlgorithms[algo]
	if !ok {
		return Checksum{}, fmt.Errorf("checksum algorithm %q: want md5, sha1, sha256 or sha512", algo)
	}
	value = strings.ToLower(value)
	if b, err := hex.DecodeString(value); err != nil || len(b) != a.size {
		return Checksum{}, fmt.Errorf("%s checksum %q: want %d hex digits", algo, value, 2*a.size)
	}
	return Checksum{Algorithm: algo, Hex: value}, nil
}

func (c Checksum) String() string { return c.Algorithm + ":" + c.Hex }

func (c Checksum) newHash() hash.Hash { return checksumAlgorithms[c.Algorithm].new() }

// verify compares a finished hash with the expectation.
func (c Checksum) verify(h hash.Hash) error {
	got := hex.EncodeToString(h.Sum(nil))
	if got != c.Hex {
		return fmt.Errorf("%w: source %s is %s, expected %s", ErrChecksum, c.Algorithm, got, c.Hex)
	}
	return nil
}
