package auth

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"
	"unicode"

	"golang.org/x/crypto/bcrypt"
)

// Role is what a user may do.
type Role string

const (
	// RoleAdmin may pull, push and delete on every repository and list the catalog.
	RoleAdmin Role = "admin"
	// RolePull may pull from every repository and nothing else.
	RolePull Role = "pull"
)

func (r Role) valid() bool { return r == RoleAdmin || r == RolePull }

// maxUsersFile bounds the users file: it is read whole into memory.
const maxUsersFile = 1 << 20

// ErrBadCredentials is returned for an unknown user or a wrong password; the
// two are deliberately indistinguishable.
var ErrBadCredentials = errors.New("invalid username or password")

// Users is an immutable set of users loaded from a users file.
type Users struct {
	byName map[string]user

	// Passwords that passed bcrypt lately, so that a client sending Basic
	// credentials with every request (a node pulling ranges) does not pay
	// a bcrypt comparison, tens of milliseconds at usual costs, each time.
	// Keyed by a salted SHA-256 of name and password: the cache holds no
	// password, and its keys are worthless outside this process.
	mu     sync.Mutex
	passed map[[sha256.Size]byte]passedEntry
	salt   [32]byte
	now    func() time.Time // for tests; time.Now when nil
}

type passedEntry struct {
	role    Role
	expires time.Time
}

// Bounds of the cache of passed credentials.
const (
	passedTTL = time.Minute
	passedMax = 1024
)

type user struct {
	role Role
	hash []byte
}

// LoadUsers reads a users file (format in the package documentation).
func LoadUsers(path string) (*Users, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("opening users file: %w", err)
	}
	defer f.Close()
	u, err := ParseUsers(f)
	if err != nil {
		return nil, fmt.Errorf("users file %s: %w", path, err)
	}
	return u, nil
}

// ParseUsers parses the users file format from r.
func ParseUsers(r io.Reader) (*Users, error) {
	data, err := io.ReadAll(io.LimitReader(r, maxUsersFile+1))
	if err != nil {
		return nil, fmt.Errorf("reading users: %w", err)
	}
	if len(data) > maxUsersFile {
		return nil, fmt.Errorf("users file is larger than %d bytes", maxUsersFile)
	}
	u := &Users{byName: map[string]user{}}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		fields := strings.SplitN(line, ":", 3)
		if len(fields) != 3 {
			return nil, fmt.Errorf("line %d: want role:name:bcrypt-hash", n)
		}
		role, name, hash := Role(fields[0]), fields[1], fields[2]
		if !role.valid() {
			return nil, fmt.Errorf("line %d: unknown role %q (want %q or %q)", n, role, RoleAdmin, RolePull)
		}
		if err := validUserName(name); err != nil {
			return nil, fmt.Errorf("line %d: %w", n, err)
		}
		// Cost() parses the hash, so a truncated or non-bcrypt value is
		// rejected at load time rather than failing every login later.
		if _, err := bcrypt.Cost([]byte(hash)); err != nil {
			return nil, fmt.Errorf("line %d: user %q: password is not a bcrypt hash: %w", n, name, err)
		}
		if _, dup := u.byName[name]; dup {
			return nil, fmt.Errorf("line %d: user %q is listed twice", n, name)
		}
		u.byName[name] = user{role: role, hash: []byte(hash)}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("reading users: %w", err)
	}
	if len(u.byName) == 0 {
		return nil, errors.New("no users defined")
	}
	return u, nil
}

func validUserName(name string) error {
	if name == "" || len(name) > 128 {
		return fmt.Errorf("user name must be 1-128 characters")
	}
	for _, c := range name {
		if unicode.IsSpace(c) || !unicode.IsPrint(c) {
			return fmt.Errorf("user name %q contains whitespace or control characters", name)
		}
	}
	return nil
}

// Len is the number of users.
func (u *Users) Len() int { return len(u.byName) }

// dummyHash is compared against when the user is unknown, so that a missing
// user costs as much time as a wrong password and names cannot be probed.
var dummyHash = sync.OnceValue(func() []byte {
	h, err := bcrypt.GenerateFromPassword([]byte("vimg-dvcr-no-such-user"), bcrypt.DefaultCost)
	if err != nil {
		panic(err) // only fails for an invalid cost
	}
	return h
})

// Authenticate checks a user's password and returns the user's role.
func (u *Users) Authenticate(name, password string) (Role, error) {
	key := u.cacheKey(name, password)
	now := time.Now()
	if u.now != nil {
		now = u.now()
	}
	u.mu.Lock()
	e, hit := u.passed[key]
	u.mu.Unlock()
	if hit && now.Before(e.expires) {
		return e.role, nil
	}
	role, err := u.authenticate(name, password)
	if err != nil {
		return "", err
	}
	u.mu.Lock()
	if u.passed == nil || len(u.passed) >= passedMax {
		u.passed = map[[sha256.Size]byte]passedEntry{} // crude bound: start over
	}
	u.passed[key] = passedEntry{role: role, expires: now.Add(passedTTL)}
	u.mu.Unlock()
	return role, nil
}

func (u *Users) cacheKey(name, password string) [sha256.Size]byte {
	u.mu.Lock()
	if u.salt == [32]byte{} {
		if _, err := rand.Read(u.salt[:]); err != nil {
			panic(err) // crypto/rand does not fail on Linux
		}
	}
	salt := u.salt
	u.mu.Unlock()
	h := sha256.New()
	h.Write(salt[:])
	h.Write([]byte(name))
	h.Write([]byte{0})
	h.Write([]byte(password))
	var k [sha256.Size]byte
	h.Sum(k[:0])
	return k
}

// authenticate is the bcrypt check itself.
func (u *Users) authenticate(name, password string) (Role, error) {
	usr, ok := u.byName[name]
	hash := usr.hash
	if !ok {
		hash = dummyHash()
	}
	// bcrypt compares in constant time.
	if err := bcrypt.CompareHashAndPassword(hash, []byte(password)); err != nil || !ok {
		return "", ErrBadCredentials
	}
	return usr.role, nil
}
