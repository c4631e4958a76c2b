package client

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"
)

type challenge struct {
	scheme string // lower case
	params map[string]string
}

// parseChallenge reads the first Basic or Bearer challenge of
// WWW-Authenticate headers: `Bearer realm="...",service="...",scope="..."`.
func parseChallenge(headers []string) (challenge, bool) {
	for _, h := range headers {
		scheme, rest, _ := strings.Cut(strings.TrimSpace(h), " ")
		ch := challenge{scheme: strings.ToLower(scheme), params: map[string]string{}}
		if ch.scheme != "basic" && ch.scheme != "bearer" {
			continue
		}
		for rest = strings.TrimSpace(rest); rest != ""; {
			key, after, ok := strings.Cut(rest, "=")
			if !ok {
				break
			}
			key = strings.ToLower(strings.TrimSpace(key))
			var val string
			after = strings.TrimLeft(after, " ")
			if strings.HasPrefix(after, `"`) {
				// Quoted string with backslash escapes; commas inside are data.
				var b strings.Builder
				i := 1
				for ; i < len(after) && after[i] != '"'; i++ {
					if after[i] == '\\' && i+1 < len(after) {
						i++
					}
					b.WriteByte(after[i])
				}
				val = b.String()
				after = after[min(i+1, len(after)):]
			} else {
				end := strings.IndexByte(after, ',')
				if end < 0 {
					end = len(after)
				}
				val, after = strings.TrimSpace(after[:end]), after[end:]
			}
			ch.params[key] = val
			rest = strings.TrimLeft(after, ", ")
		}
		return ch, true
	}
	return challenge{}, false
}

// maxTokenBody bounds a token server's answer.
const maxTokenBody = 1 << 20

// fetchToken gets a bearer token for sc from the challenge's realm, the
// way docker clients do, and caches it.
func (c *Client) fetchToken(ctx context.Context, ch challenge, sc scope) error {
	realm := ch.params["realm"]
	ru, err := url.Parse(realm)
	if err != nil || (ru.Scheme != "https" && ru.Scheme != "http") || ru.Host == "" {
		return fmt.Errorf("bearer challenge has an unusable realm %q", realm)
	}
	if ru.Scheme == "http" && !c.opts.PlainHTTP && c.opts.Username != "" {
		// The registry is reached over TLS; its realm must be too, or the
		// password would cross the network in clear text.
		return fmt.Errorf("refusing to send credentials to the plain-HTTP token realm %s", ru.Redacted())
	}
	q := ru.Query()
	if s := ch.params["service"]; s != "" {
		q.Set("service", s)
	}
	// Ask for what the request needs and what the registry says it needs
	// (its scope may carry actions ours does not, such as delete).
	seen := map[string]bool{}
	for _, s := range append(sc.scopes(), strings.Fields(ch.params["scope"])...) {
		if !seen[s] {
			seen[s] = true
			q.Add("scope", s)
		}
	}
	ru.RawQuery = q.Encode()
	req, err := c.newRequest(ctx, http.MethodGet, ru.String(), nil)
	if err != nil {
		return err
	}
	if c.opts.Username != "" {
		req.SetBasicAuth(c.opts.Username, c.opts.Password)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("fetching a bearer token from %s: %w", ru.Host, err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("fetching a bearer token: %w", readError(resp))
	}
	defer resp.Body.Close()
	var tr struct {
		Token       string `json:"token"`
		AccessToken string `json:"access_token"`
		ExpiresIn   int    `json:"expires_in"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxTokenBody)).Decode(&tr); err != nil {
		return fmt.Errorf("decoding the token answer of %s: %w", ru.Host, err)
	}
	tok := tr.Token
	if tok == "" {
		tok = tr.AccessToken
	}
	if tok == "" {
		return fmt.Errorf("token answer of %s holds no token", ru.Host)
	}
	// The token spec's default lifetime is 60 s; renew a little early.
	life := time.Duration(max(tr.ExpiresIn, 60)) * time.Second
	c.mu.Lock()
	c.tokens[sc.key()] = bearer{token: tok, expires: time.Now().Add(life - 10*time.Second)}
	c.mu.Unlock()
	return nil
}
