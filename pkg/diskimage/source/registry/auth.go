package registry

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"path"
	"sort"
	"strings"
)

// dockerAuth is one registry's entry in a docker config.
type dockerAuth struct {
	Auth          string `json:"auth"`
	Username      string `json:"username"`
	Password      string `json:"password"`
	IdentityToken string `json:"identitytoken"`
}

// AuthFromDockerConfig extracts the credentials for ref's registry from a
// kubernetes.io/dockerconfigjson payload ({"auths": {...}}) or a legacy
// kubernetes.io/dockercfg one (the map alone).
//
// Keys are matched as the kubelet matches them: the scheme and a leading
// /v1/ or /v2/ path are ignored ("https://index.docker.io/v1/" is Docker
// Hub), docker.io, index.docker.io and registry-1.docker.io are the same
// registry, a key may carry a repository prefix ("registry.example.com/team")
// and a host glob ("*.example.com"), and the most specific key wins. An
// entry's "auth" (base64 of user:password) takes precedence over its
// username and password fields, as with docker.
//
// When no key matches, the error wraps ErrNoCredentials. Errors never quote
// the payload's values.
func AuthFromDockerConfig(data []byte, ref string) (username, password string, err error) {
	r, _, err := parseRef(ref, false)
	if err != nil {
		return "", "", err
	}
	host := normalizeHost(r.Context().RegistryStr())
	repo := r.Context().RepositoryStr()

	var top map[string]json.RawMessage
	if err := json.Unmarshal(data, &top); err != nil {
		return "", "", fmt.Errorf("parsing docker config: %w", err)
	}
	entries := map[string]dockerAuth{}
	if raw, ok := top["auths"]; ok {
		if err := json.Unmarshal(raw, &entries); err != nil {
			return "", "", fmt.Errorf("parsing docker config's auths: %w", err)
		}
	} else if err := json.Unmarshal(data, &entries); err != nil {
		return "", "", fmt.Errorf("parsing legacy docker config: %w", err)
	}

	keys := make([]string, 0, len(entries))
	for k := range entries {
		keys = append(keys, k)
	}
	// Sorted, so that equally specific keys pick the same entry every time.
	sort.Strings(keys)
	best, bestScore := "", -1
	for _, k := range keys {
		if score := matchKey(k, host, repo); score > bestScore {
			best, bestScore = k, score
		}
	}
	if bestScore < 0 {
		return "", "", fmt.Errorf("docker config has no entry for registry %s (it has %s): %w", host, strings.Join(quoteAll(keys), ", "), ErrNoCredentials)
	}
	e := entries[best]
	username, password = e.Username, e.Password
	if e.Auth != "" {
		username, password, err = decodeAuth(e.Auth)
		if err != nil {
			return "", "", fmt.Errorf("docker config entry %q: %w", best, err)
		}
	}
	if username == "" && password == "" {
		if e.IdentityToken != "" {
			return "", "", fmt.Errorf("docker config entry %q has only an identity token, which is not supported: use a username and password", best)
		}
		return "", "", fmt.Errorf("docker config entry %q has no username or password", best)
	}
	return username, password, nil
}

func decodeAuth(s string) (string, string, error) {
	s = strings.TrimSpace(s)
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		// Some tools drop the padding.
		b, err = base64.RawStdEncoding.DecodeString(strings.TrimRight(s, "="))
	}
	if err != nil {
		return "", "", errors.New(`"auth" is not base64`)
	}
	user, pass, ok := strings.Cut(string(b), ":")
	if !ok {
		return "", "", errors.New(`"auth" does not decode to user:password`)
	}
	return user, pass, nil
}

// matchKey scores how well a config key fits host and repo: -1 for not at
// all, higher for a longer repository prefix, and an exact host above a
// glob for the same prefix.
func matchKey(key, host, repo string) int {
	k := strings.TrimSpace(key)
	if i := strings.Index(k, "://"); i >= 0 {
		k = k[i+3:]
	}
	khost, kpath, _ := strings.Cut(k, "/")
	kpath = strings.Trim(kpath, "/")
	// docker login writes Docker Hub as https://index.docker.io/v1/, and
	// docker (and the kubelet) treat /v1/ and /v2/ as the bare host.
	for _, v := range []string{"v1", "v2"} {
		if kpath == v {
			kpath = ""
		} else if strings.HasPrefix(kpath, v+"/") {
			kpath = kpath[len(v)+1:]
		}
	}
	khost = normalizeHost(khost)
	exact := khost == host
	if !exact && !globHost(khost, host) {
		return -1
	}
	if kpath != "" && repo != kpath && !strings.HasPrefix(repo, kpath+"/") {
		return -1
	}
	score := 2 * len(kpath)
	if exact {
		score++
	}
	return score
}

// globHost matches a host pattern with * wildcards label by label, as the
// kubelet does: "*.example.com" matches "a.example.com", not
// "example.com" nor "a.b.example.com"; ports must be equal.
func globHost(pattern, host string) bool {
	if !strings.Contains(pattern, "*") {
		return false
	}
	ph, pport, _ := strings.Cut(pattern, ":")
	hh, hport, _ := strings.Cut(host, ":")
	if pport != hport {
		return false
	}
	pl, hl := strings.Split(ph, "."), strings.Split(hh, ".")
	if len(pl) != len(hl) {
		return false
	}
	for i := range pl {
		if ok, err := path.Match(pl[i], hl[i]); err != nil || !ok {
			return false
		}
	}
	return true
}

// normalizeHost lowercases a registry host and folds Docker Hub's names.
func normalizeHost(h string) string {
	h = strings.ToLower(h)
	switch h {
	case "docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com":
		return "docker.io"
	}
	return h
}

func quoteAll(ss []string) []string {
	if len(ss) == 0 {
		return []string{"none"}
	}
	out := make([]string, len(ss))
	for i, s := range ss {
		out[i] = fmt.Sprintf("%q", s)
	}
	return out
}
