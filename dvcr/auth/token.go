package auth

import (
	"bufio"
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"
)

const (
	// MinKeyLen is the shortest accepted signing key: a key shorter than
	// SHA-256's output would be the weakest part of HMAC-SHA256.
	MinKeyLen = 32
	// MaxTokenLen bounds a token before it is decoded.
	MaxTokenLen = 16 << 10
	// clockSkew is how far in the future a token's issued-at may be,
	// because replicas' clocks differ slightly.
	clockSkew = time.Minute
	maxKeys   = 16
)

var (
	// ErrTokenInvalid is a malformed token or a bad signature.
	ErrTokenInvalid = errors.New("invalid token")
	// ErrTokenExpired is a well-signed token past its expiry.
	ErrTokenExpired = errors.New("token expired")
)

// ResourceActions is one entry of a token's access list: the actions granted
// on one resource. Type is "repository" (Name is the repository) or
// "registry" (Name "catalog", action "*").
type ResourceActions struct {
	Type    string   `json:"type"`
	Name    string   `json:"name"`
	Actions []string `json:"actions"`
}

// Claims are what a token asserts.
type Claims struct {
	Subject   string
	Audience  string // the service name
	IssuedAt  time.Time
	ExpiresAt time.Time
	Access    []ResourceActions
}

// Allows reports whether the claims grant action on the resource.
func (c Claims) Allows(typ, name, action string) bool {
	for _, ra := range c.Access {
		if ra.Type != typ || ra.Name != name {
			continue
		}
		for _, a := range ra.Actions {
			if a == action {
				return true
			}
		}
	}
	return false
}

type wireClaims struct {
	Subject  string            `json:"sub"`
	Audience string            `json:"aud,omitempty"`
	IssuedAt int64             `json:"iat"`
	Expiry   int64             `json:"exp"`
	Access   []ResourceActions `json:"access"`
}

type wireHeader struct {
	Alg string `json:"alg"`
	Typ string `json:"typ,omitempty"`
}

var b64 = base64.RawURLEncoding

// headerHS256 is fixed: Verify compares the decoded header, not the bytes,
// but Mint always writes exactly this.
var headerHS256 = b64.EncodeToString([]byte(`{"alg":"HS256","typ":"JWT"}`))

// Mint signs claims with key.
func Mint(key []byte, c Claims) (string, error) {
	if len(key) < MinKeyLen {
		return "", fmt.Errorf("signing key is %d bytes, want at least %d", len(key), MinKeyLen)
	}
	if c.Subject == "" || c.ExpiresAt.IsZero() || c.IssuedAt.IsZero() {
		return "", errors.New("token claims need a subject, issued-at and expiry")
	}
	access := c.Access
	if access == nil {
		access = []ResourceActions{} // "access":[] rather than null
	}
	payload, err := json.Marshal(wireClaims{
		Subject:  c.Subject,
		Audience: c.Audience,
		IssuedAt: c.IssuedAt.Unix(),
		Expiry:   c.ExpiresAt.Unix(),
		Access:   access,
	})
	if err != nil {
		return "", fmt.Errorf("encoding token claims: %w", err)
	}
	signed := headerHS256 + "." + b64.EncodeToString(payload)
	tok := signed + "." + b64.EncodeToString(sign(key, signed))
	if len(tok) > MaxTokenLen {
		return "", fmt.Errorf("token would be %d bytes, more than the %d a verifier accepts", len(tok), MaxTokenLen)
	}
	return tok, nil
}

func sign(key []byte, signed string) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(signed))
	return m.Sum(nil)
}

// Verify checks the token's signature against every key and its validity at
// now. It returns ErrTokenExpired for a genuine but expired token and an
// error wrapping ErrTokenInvalid for anything else.
func Verify(keys [][]byte, token string, now time.Time) (Claims, error) {
	if len(token) > MaxTokenLen {
		return Claims{}, fmt.Errorf("%w: longer than %d bytes", ErrTokenInvalid, MaxTokenLen)
	}
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return Claims{}, fmt.Errorf("%w: not three dot-separated parts", ErrTokenInvalid)
	}
	sig, err := b64.DecodeString(parts[2])
	if err != nil {
		return Claims{}, fmt.Errorf("%w: signature encoding", ErrTokenInvalid)
	}
	signed := token[:len(parts[0])+1+len(parts[1])]
	ok := false
	for _, k := range keys {
		// Every key is tried even after a match so that the time taken
		// does not say which key signed.
		if hmac.Equal(sign(k, signed), sig) {
			ok = true
		}
	}
	if !ok {
		return Claims{}, fmt.Errorf("%w: signature does not match", ErrTokenInvalid)
	}
	// Only a signed token's contents are parsed: nothing below is
	// attacker-controlled unless a key leaked.
	var h wireHeader
	if err := decodePart(parts[0], &h); err != nil || h.Alg != "HS256" {
		return Claims{}, fmt.Errorf("%w: header", ErrTokenInvalid)
	}
	var w wireClaims
	if err := decodePart(parts[1], &w); err != nil {
		return Claims{}, fmt.Errorf("%w: claims: %v", ErrTokenInvalid, err)
	}
	c := Claims{
		Subject:   w.Subject,
		Audience:  w.Audience,
		IssuedAt:  time.Unix(w.IssuedAt, 0),
		ExpiresAt: time.Unix(w.Expiry, 0),
		Access:    w.Access,
	}
	if c.Subject == "" || w.Expiry == 0 || w.IssuedAt == 0 {
		return Claims{}, fmt.Errorf("%w: missing subject, issued-at or expiry", ErrTokenInvalid)
	}
	if c.IssuedAt.After(now.Add(clockSkew)) {
		return Claims{}, fmt.Errorf("%w: issued in the future", ErrTokenInvalid)
	}
	if !now.Before(c.ExpiresAt) {
		return Claims{}, ErrTokenExpired
	}
	return c, nil
}

func decodePart(s string, v any) error {
	data, err := b64.DecodeString(s)
	if err != nil {
		return err
	}
	return json.Unmarshal(data, v)
}

// LoadKeys reads a key file (format above).
func LoadKeys(path string) ([][]byte, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading token key file: %w", err)
	}
	keys, err := ParseKeys(data)
	if err != nil {
		return nil, fmt.Errorf("token key file %s: %w", path, err)
	}
	return keys, nil
}

// ParseKeys parses the key file format.
func ParseKeys(data []byte) ([][]byte, error) {
	var keys [][]byte
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, err := decodeKey(line)
		if err != nil {
			return nil, fmt.Errorf("line %d: key is not base64: %w", n, err)
		}
		if len(k) < MinKeyLen {
			return nil, fmt.Errorf("line %d: key is %d bytes, want at least %d", n, len(k), MinKeyLen)
		}
		keys = append(keys, k)
		if len(keys) > maxKeys {
			return nil, fmt.Errorf("more than %d keys", maxKeys)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("reading keys: %w", err)
	}
	if len(keys) == 0 {
		return nil, errors.New("no keys")
	}
	return keys, nil
}

func decodeKey(s string) ([]byte, error) {
	s = strings.TrimRight(s, "=")
	if strings.ContainsAny(s, "-_") {
		return base64.RawURLEncoding.DecodeString(s)
	}
	return base64.RawStdEncoding.DecodeString(s)
}
