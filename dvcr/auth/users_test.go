package auth

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"
)

func hash(t testing.TB, password string) string {
	t.Helper()
	h, err := bcrypt.GenerateFromPassword([]byte(password), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	return string(h)
}

func testUsers(t testing.TB) *Users {
	t.Helper()
	u, err := ParseUsers(strings.NewReader(fmt.Sprintf(
		"# DVCR users\nadmin:controller:%s\n\npull:node:%s\n", hash(t, "s3cret"), hash(t, "n0de"))))
	if err != nil {
		t.Fatal(err)
	}
	return u
}

func TestUsers_Authenticate(t *testing.T) {
	u := testUsers(t)
	if role, err := u.Authenticate("controller", "s3cret"); err != nil || role != RoleAdmin {
		t.Errorf("controller: role %q, err %v", role, err)
	}
	if role, err := u.Authenticate("node", "n0de"); err != nil || role != RolePull {
		t.Errorf("node: role %q, err %v", role, err)
	}
	for _, c := range [][2]string{{"controller", "n0de"}, {"node", ""}, {"nobody", "s3cret"}, {"", ""}} {
		if _, err := u.Authenticate(c[0], c[1]); !errors.Is(err, ErrBadCredentials) {
			t.Errorf("%q/%q: err = %v, want ErrBadCredentials", c[0], c[1], err)
		}
	}
}

func TestLoadUsers_ReadsAFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "users")
	if err := os.WriteFile(p, []byte("pull:node:"+hash(t, "pw")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	u, err := LoadUsers(p)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := u.Authenticate("node", "pw"); err != nil {
		t.Error(err)
	}
	if _, err := LoadUsers(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Error("a missing file was accepted")
	}
}

func TestParseUsers_RejectsBadLines(t *testing.T) {
	h := hash(t, "pw")
	for name, data := range map[string]string{
		"unknown role":   "push:ci:" + h,
		"two fields":     "admin:" + h,
		"plain password": "admin:ci:password",
		"duplicate":      "admin:ci:" + h + "\npull:ci:" + h,
		"space in name":  "admin:c i:" + h,
		"empty name":     "admin::" + h,
		"no users":       "# nobody\n",
		"too large":      strings.Repeat("#", maxUsersFile+1),
	} {
		if _, err := ParseUsers(strings.NewReader(data)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestParseScope(t *testing.T) {
	cases := []struct {
		in   string
		want ResourceActions
	}{
		{"repository:vi/ns/disk:pull,push", ResourceActions{TypeRepository, "vi/ns/disk", []string{"pull", "push"}}},
		{"repository(plugin):cvi/ubuntu:pull", ResourceActions{TypeRepository, "cvi/ubuntu", []string{"pull"}}},
		{"registry:catalog:*", ResourceActions{TypeRegistry, "catalog", []string{"*"}}},
		{"repository:host:5000/a:pull,pull", ResourceActions{TypeRepository, "host:5000/a", []string{"pull"}}},
	}
	for _, c := range cases {
		got, err := ParseScope(c.in)
		if err != nil {
			t.Errorf("%q: %v", c.in, err)
			continue
		}
		if got.Type != c.want.Type || got.Name != c.want.Name || !slices.Equal(got.Actions, c.want.Actions) {
			t.Errorf("%q = %+v, want %+v", c.in, got, c.want)
		}
	}
	for _, bad := range []string{"", "repository", "repository:x", "repository:x:", `repository:a"b:pull`, "repository::pull",
		"repository:" + strings.Repeat("a", maxScopeName+1) + ":pull"} {
		if _, err := ParseScope(bad); err == nil {
			t.Errorf("%q: accepted", bad)
		}
	}
}

func TestGrant_IntersectsWithTheRole(t *testing.T) {
	repo := func(name string, actions ...string) ResourceActions {
		return ResourceActions{Type: TypeRepository, Name: name, Actions: actions}
	}
	catalog := ResourceActions{Type: TypeRegistry, Name: CatalogName, Actions: []string{ActionAll}}
	cases := []struct {
		name      string
		role      Role
		requested []ResourceActions
		want      []ResourceActions
	}{
		{"admin gets what it asks", RoleAdmin,
			[]ResourceActions{repo("vi/a", "pull", "push"), repo("vi/b", "delete")},
			[]ResourceActions{repo("vi/a", "pull", "push"), repo("vi/b", "delete")}},
		{"admin star expands", RoleAdmin, []ResourceActions{repo("vi/a", "*")}, []ResourceActions{repo("vi/a", "pull", "push", "delete")}},
		{"admin catalog", RoleAdmin, []ResourceActions{catalog}, []ResourceActions{catalog}},
		{"pull user never pushes or deletes", RolePull,
			[]ResourceActions{repo("vi/a", "pull", "push"), repo("vi/b", "delete"), repo("vi/c", "*")},
			[]ResourceActions{repo("vi/a", "pull"), repo("vi/c", "pull")}},
		{"pull user no catalog", RolePull, []ResourceActions{catalog}, nil},
		{"unknown type and action dropped", RoleAdmin,
			[]ResourceActions{{Type: "plugin", Name: "x", Actions: []string{"pull"}}, repo("vi/a", "scribble")}, nil},
		{"same repository merged", RoleAdmin,
			[]ResourceActions{repo("vi/a", "pull"), repo("vi/a", "push", "pull")}, []ResourceActions{repo("vi/a", "pull", "push")}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := Grant(c.role, c.requested)
			if len(got) != len(c.want) {
				t.Fatalf("Grant = %v, want %v", got, c.want)
			}
			for i := range got {
				if got[i].String() != c.want[i].String() {
					t.Errorf("Grant[%d] = %v, want %v", i, got[i], c.want[i])
				}
			}
		})
	}
}

// A password that passed is remembered for a minute (a client sending Basic
// with every request pays bcrypt once), keyed by name AND password: another
// password for the same name is checked for real, and after the minute the
// file's hash is consulted again.
func TestUsers_AuthenticateRemembersPassedCredentialsBriefly(t *testing.T) {
	u := testUsers(t)
	now := time.Unix(1_700_000_000, 0)
	u.now = func() time.Time { return now }
	if _, err := u.Authenticate("node", "n0de"); err != nil {
		t.Fatal(err)
	}
	// The password changes behind the cache's back (as if the file were
	// reloaded): the remembered pair still passes within the minute...
	usr := u.byName["node"]
	usr.hash = []byte(hash(t, "changed"))
	u.byName["node"] = usr
	if role, err := u.Authenticate("node", "n0de"); err != nil || role != RolePull {
		t.Fatalf("remembered credentials: role %q, err %v", role, err)
	}
	// ...a different password is never taken from the cache...
	if _, err := u.Authenticate("node", "n0de-wrong"); !errors.Is(err, ErrBadCredentials) {
		t.Fatalf("a wrong password passed: %v", err)
	}
	// ...and after the minute bcrypt decides again.
	now = now.Add(passedTTL + time.Second)
	if _, err := u.Authenticate("node", "n0de"); !errors.Is(err, ErrBadCredentials) {
		t.Fatalf("expired entry still passed: %v", err)
	}
	if _, err := u.Authenticate("node", "changed"); err != nil {
		t.Fatalf("the current password: %v", err)
	}
}
