package auth

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"
)

func testKey(b byte) []byte {
	k := make([]byte, 32)
	for i := range k {
		k[i] = b + byte(i)
	}
	return k
}

var t0 = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

func testClaims() Claims {
	return Claims{
		Subject:   "importer",
		Audience:  "dvcr",
		IssuedAt:  t0,
		ExpiresAt: t0.Add(5 * time.Minute),
		Access:    []ResourceActions{{Type: TypeRepository, Name: "vi/ns/disk", Actions: []string{ActionPull, ActionPush}}},
	}
}

func TestVerify_ReturnsTheMintedClaims(t *testing.T) {
	tok, err := Mint(testKey(1), testClaims())
	if err != nil {
		t.Fatal(err)
	}
	c, err := Verify([][]byte{testKey(1)}, tok, t0.Add(time.Minute))
	if err != nil {
		t.Fatalf("Verify: %v", err)
	}
	if c.Subject != "importer" || c.Audience != "dvcr" || !c.IssuedAt.Equal(t0) || !c.ExpiresAt.Equal(t0.Add(5*time.Minute)) {
		t.Errorf("claims = %+v", c)
	}
	if !c.Allows(TypeRepository, "vi/ns/disk", ActionPush) || !c.Allows(TypeRepository, "vi/ns/disk", ActionPull) {
		t.Errorf("claims do not allow what was minted: %+v", c.Access)
	}
	if c.Allows(TypeRepository, "vi/ns/disk", ActionDelete) || c.Allows(TypeRepository, "vi/ns/other", ActionPull) {
		t.Errorf("claims allow more than was minted: %+v", c.Access)
	}
}

func TestVerify_Expiry(t *testing.T) {
	tok, err := Mint(testKey(1), testClaims())
	if err != nil {
		t.Fatal(err)
	}
	keys := [][]byte{testKey(1)}
	if _, err := Verify(keys, tok, t0.Add(5*time.Minute-time.Second)); err != nil {
		t.Errorf("one second before expiry: %v", err)
	}
	for _, at := range []time.Time{t0.Add(5 * time.Minute), t0.Add(time.Hour)} {
		if _, err := Verify(keys, tok, at); !errors.Is(err, ErrTokenExpired) {
			t.Errorf("at %s: err = %v, want ErrTokenExpired", at.Sub(t0), err)
		}
	}
	// Issued well in the future: a clock far off, or a forged iat.
	if _, err := Verify(keys, tok, t0.Add(-time.Hour)); !errors.Is(err, ErrTokenInvalid) {
		t.Errorf("an hour before issue: err = %v, want ErrTokenInvalid", err)
	}
}

func TestVerify_KeyRotation(t *testing.T) {
	oldKey, newKey := testKey(1), testKey(100)
	byOld, err := Mint(oldKey, testClaims())
	if err != nil {
		t.Fatal(err)
	}
	at := t0.Add(time.Minute)
	if _, err := Verify([][]byte{newKey, oldKey}, byOld, at); err != nil {
		t.Errorf("token of the old key during rotation: %v", err)
	}
	if _, err := Verify([][]byte{newKey}, byOld, at); !errors.Is(err, ErrTokenInvalid) {
		t.Errorf("token of a dropped key: err = %v, want ErrTokenInvalid", err)
	}
	byNew, err := Mint(newKey, testClaims())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Verify([][]byte{newKey, oldKey}, byNew, at); err != nil {
		t.Errorf("token of the new key: %v", err)
	}
}

func TestVerify_RejectsTampering(t *testing.T) {
	key := testKey(1)
	tok, err := Mint(key, testClaims())
	if err != nil {
		t.Fatal(err)
	}
	parts := strings.Split(tok, ".")
	encode := func(v any) string {
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		return base64.RawURLEncoding.EncodeToString(b)
	}
	wider := encode(wireClaims{Subject: "importer", Audience: "dvcr", IssuedAt: t0.Unix(), Expiry: t0.Add(time.Hour).Unix(),
		Access: []ResourceActions{{Type: TypeRepository, Name: "vi/ns/disk", Actions: []string{ActionPull, ActionPush, ActionDelete}}}})
	cases := map[string]string{
		"widened access, old signature": parts[0] + "." + wider + "." + parts[2],
		"alg none, no signature":        encode(map[string]string{"alg": "none"}) + "." + parts[1] + ".",
		"signature of another key":      strings.Join(parts[:2], ".") + "." + strings.Split(mustMint(t, testKey(9), testClaims()), ".")[2],
		"truncated signature":           tok[:len(tok)-4],
		"two parts":                     parts[0] + "." + parts[1],
		"empty":                         "",
		"oversized":                     strings.Repeat("a", MaxTokenLen+1),
	}
	for name, bad := range cases {
		t.Run(name, func(t *testing.T) {
			if _, err := Verify([][]byte{key}, bad, t0.Add(time.Minute)); !errors.Is(err, ErrTokenInvalid) {
				t.Errorf("err = %v, want ErrTokenInvalid", err)
			}
		})
	}
}

func mustMint(t *testing.T, key []byte, c Claims) string {
	t.Helper()
	tok, err := Mint(key, c)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func TestMint_RefusesShortKeysAndIncompleteClaims(t *testing.T) {
	if _, err := Mint(make([]byte, 16), testClaims()); err == nil {
		t.Error("a 16-byte key was accepted")
	}
	c := testClaims()
	c.Subject = ""
	if _, err := Mint(testKey(1), c); err == nil {
		t.Error("claims without a subject were accepted")
	}
}

func TestParseKeys(t *testing.T) {
	std := base64.StdEncoding.EncodeToString(testKey(1))
	url := base64.RawURLEncoding.EncodeToString(testKey(200)) // contains '-' or '_'
	keys, err := ParseKeys([]byte("# signing key first\n" + std + "\n\n" + url + "\n"))
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != 2 || string(keys[0]) != string(testKey(1)) || string(keys[1]) != string(testKey(200)) {
		t.Errorf("keys = %x", keys)
	}
	for name, data := range map[string]string{
		"short":     base64.StdEncoding.EncodeToString(make([]byte, 16)),
		"not b64":   "this is not base64 at all!",
		"no keys":   "# nothing\n\n",
		"empty":     "",
		"too many":  strings.Repeat(std+"\n", maxKeys+1),
		"bad later": std + "\n%%%\n",
	} {
		if _, err := ParseKeys([]byte(data)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
