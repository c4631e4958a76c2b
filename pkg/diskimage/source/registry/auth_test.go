package registry

import (
	"encoding/base64"
	"errors"
	"strings"
	"testing"
)

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

func TestAuthFromDockerConfig(t *testing.T) {
	for _, c := range []struct {
		name, config, ref string
		user, pass        string
		wantErr           string
		noCreds           bool
	}{
		{
			name:   "auth-base64",
			config: `{"auths":{"registry.example.com":{"auth":"` + b64("alice:pa:ss") + `"}}}`,
			ref:    "registry.example.com/vm/disk:1",
			user:   "alice", pass: "pa:ss",
		},
		{
			name:   "username-password-fields",
			config: `{"auths":{"registry.example.com:5000":{"username":"bob","password":"pw"}}}`,
			ref:    "registry.example.com:5000/vm/disk@sha256:" + strings.Repeat("a", 64),
			user:   "bob", pass: "pw",
		},
		{
			name:   "auth-wins-over-fields",
			config: `{"auths":{"r.example.com":{"auth":"` + b64("fromauth:1") + `","username":"fields","password":"2"}}}`,
			ref:    "r.example.com/xx",
			user:   "fromauth", pass: "1",
		},
		{
			name:   "auth-without-padding",
			config: `{"auths":{"r.example.com":{"auth":"` + strings.TrimRight(b64("ab:c"), "=") + `"}}}`,
			ref:    "r.example.com/xx",
			user:   "ab", pass: "c",
		},
		{
			name:   "docker-hub-key-for-docker.io-ref",
			config: `{"auths":{"https://index.docker.io/v1/":{"auth":"` + b64("hubuser:hubpass") + `"}}}`,
			ref:    "docker.io/hubuser/ubuntu2204:latest",
			user:   "hubuser", pass: "hubpass",
		},
		{
			name:   "docker-hub-key-for-short-ref",
			config: `{"auths":{"https://index.docker.io/v1/":{"auth":"` + b64("hubuser:hubpass") + `"}}}`,
			ref:    "ubuntu",
			user:   "hubuser", pass: "hubpass",
		},
		{
			name:   "docker.io-key",
			config: `{"auths":{"docker.io":{"username":"u","password":"p"}}}`,
			ref:    "index.docker.io/u/disk:v1",
			user:   "u", pass: "p",
		},
		{
			name:   "scheme-and-v2-path",
			config: `{"auths":{"http://10.0.0.5:5000/v2/":{"username":"u","password":"p"}}}`,
			ref:    "10.0.0.5:5000/disk",
			user:   "u", pass: "p",
		},
		{
			name: "most-specific-wins",
			config: `{"auths":{
				"registry.example.com":{"username":"host","password":"1"},
				"registry.example.com/team":{"username":"team","password":"2"},
				"registry.example.com/team/vm":{"username":"vm","password":"3"},
				"registry.example.com/other":{"username":"other","password":"4"}}}`,
			ref:  "registry.example.com/team/vm/disk:1",
			user: "vm", pass: "3",
		},
		{
			name:   "path-prefix-on-component-boundary",
			config: `{"auths":{"registry.example.com":{"username":"host","password":"1"},"registry.example.com/te":{"username":"te","password":"2"}}}`,
			ref:    "registry.example.com/team/disk:1",
			user:   "host", pass: "1",
		},
		{
			name:   "glob-host",
			config: `{"auths":{"*.example.com":{"username":"glob","password":"g"}}}`,
			ref:    "eu.example.com/disk:1",
			user:   "glob", pass: "g",
		},
		{
			name:   "exact-beats-glob",
			config: `{"auths":{"*.example.com":{"username":"glob","password":"g"},"eu.example.com":{"username":"exact","password":"e"}}}`,
			ref:    "eu.example.com/disk:1",
			user:   "exact", pass: "e",
		},
		{
			name:    "glob-needs-same-depth",
			config:  `{"auths":{"*.example.com":{"username":"glob","password":"g"}}}`,
			ref:     "a.b.example.com/disk:1",
			wantErr: "no entry for registry a.b.example.com", noCreds: true,
		},
		{
			name:   "legacy-dockercfg",
			config: `{"https://index.docker.io/v1/":{"auth":"` + b64("old:style") + `","email":"x@example.com"}}`,
			ref:    "docker.io/old/disk",
			user:   "old", pass: "style",
		},
		{
			name:    "no-entry",
			config:  `{"auths":{"other.example.com":{"auth":"` + b64("a:b") + `"}}}`,
			ref:     "registry.example.com/xx",
			wantErr: `no entry for registry registry.example.com (it has "other.example.com")`, noCreds: true,
		},
		{
			name:    "port-matters",
			config:  `{"auths":{"registry.example.com":{"auth":"` + b64("a:b") + `"}}}`,
			ref:     "registry.example.com:5000/xx",
			wantErr: "no entry", noCreds: true,
		},
		{
			name:    "bad-base64",
			config:  `{"auths":{"r.example.com":{"auth":"!!!secretish!!!"}}}`,
			ref:     "r.example.com/xx",
			wantErr: "not base64",
		},
		{
			name:    "no-colon",
			config:  `{"auths":{"r.example.com":{"auth":"` + b64("justauser") + `"}}}`,
			ref:     "r.example.com/xx",
			wantErr: "user:password",
		},
		{
			name:    "identity-token-only",
			config:  `{"auths":{"r.example.com":{"identitytoken":"tok"}}}`,
			ref:     "r.example.com/xx",
			wantErr: "identity token",
		},
		{
			name:    "not-json",
			config:  `{"auths":`,
			ref:     "r.example.com/xx",
			wantErr: "parsing docker config",
		},
		{
			name:    "bad-ref",
			config:  `{"auths":{}}`,
			ref:     "UPPER/x",
			wantErr: "invalid image reference",
		},
	} {
		t.Run(c.name, func(t *testing.T) {
			u, p, err := AuthFromDockerConfig([]byte(c.config), c.ref)
			if c.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), c.wantErr) {
					t.Fatalf("got (%q, %q, %v), want an error with %q", u, p, err, c.wantErr)
				}
				if errors.Is(err, ErrNoCredentials) != c.noCreds {
					t.Errorf("errors.Is(%v, ErrNoCredentials) = %v, want %v", err, !c.noCreds, c.noCreds)
				}
				if strings.Contains(err.Error(), "secretish") {
					t.Errorf("the error quotes the secret: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if u != c.user || p != c.pass {
				t.Errorf("got (%q, %q), want (%q, %q)", u, p, c.user, c.pass)
			}
		})
	}
}
