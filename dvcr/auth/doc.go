// Package auth is DVCR's authentication and authorization: a users file with
// bcrypt passwords and two roles, short-lived HMAC-signed tokens scoped to
// repositories and actions, the Docker/OCI token endpoint that issues them,
// and an access controller that plugs into distribution's registry.
//
// There is no anonymous access: every registry request carries either a
// token (Authorization: Bearer) or a configured user's password
// (Authorization: Basic).
//
// # Users file
//
// One user per line, three fields separated by colons:
//
//	role:name:bcrypt-hash
//
// role is "admin" (every action on every repository, and the catalog) or
// "pull" (pull on every repository, nothing else). name is 1-128 characters
// without colons or whitespace. The hash is a bcrypt hash ("$2a$", "$2b$" or
// "$2y$"), for example from `htpasswd -nbB -C 10 name password | cut -d: -f2`.
// Blank lines and lines starting with '#' are ignored. A name may appear
// only once.
//
// # Token format
//
// A token is a compact JWS (a JWT) signed with HMAC-SHA256:
//
//	base64url(header) "." base64url(claims) "." base64url(HMAC-SHA256(key, first two parts))
//
// with header {"alg":"HS256","typ":"JWT"} and claims
//
//	{"sub":"user","aud":"dvcr","iat":1700000000,"exp":1700000300,
//	 "access":[{"type":"repository","name":"vi/ns/x","actions":["pull","push"]}]}
//
// Registry clients treat it as opaque; the JWT shape only makes it readable
// by the usual debugging tools. Only HS256 is accepted, so a token cannot
// choose a weaker algorithm ("none") for itself.
//
// # Key file
//
// One key per line, base64 (standard or URL alphabet, padded or not) of at
// least 32 random bytes, e.g. `head -c 32 /dev/urandom | base64`. The first
// key signs new tokens; every key verifies. To rotate, put the new key first,
// keep the old one second for longer than the maximum token lifetime, then
// drop it. Blank lines and lines starting with '#' are ignored.
package auth
