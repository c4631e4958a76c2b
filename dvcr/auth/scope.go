package auth

import (
	"fmt"
	"slices"
	"strings"
)

// Actions and resource types of the Docker token scope grammar.
const (
	ActionPull   = "pull"
	ActionPush   = "push"
	ActionDelete = "delete"
	// ActionAll is "*": on a repository it means pull, push and delete; on
	// the registry's catalog it is the only action.
	ActionAll = "*"

	TypeRepository = "repository"
	TypeRegistry   = "registry"
	// CatalogName is the registry resource that lists repositories.
	CatalogName = "catalog"

	// maxScopes bounds the scopes in one token request, and so the size
	// of the token.
	maxScopes    = 32
	maxScopeName = 255
)

// ParseScope parses one scope, "type[(class)]:name:action[,action...]",
// e.g. "repository:vi/ns/disk:pull,push" or "registry:catalog:*". The class
// is dropped. The name is everything between the first and the last colon,
// so it may itself contain colons (a registry host:port).
func ParseScope(s string) (ResourceActions, error) {
	first := strings.IndexByte(s, ':')
	last := strings.LastIndexByte(s, ':')
	if first < 0 || first == last {
		return ResourceActions{}, fmt.Errorf("scope %q: want type:name:actions", s)
	}
	typ, name, actions := s[:first], s[first+1:last], s[last+1:]
	if i := strings.IndexByte(typ, '('); i >= 0 && strings.HasSuffix(typ, ")") {
		typ = typ[:i]
	}
	if err := validScopeName(name); err != nil {
		return ResourceActions{}, fmt.Errorf("scope %q: %w", s, err)
	}
	ra := ResourceActions{Type: typ, Name: name}
	for a := range strings.SplitSeq(actions, ",") {
		if a != "" && !slices.Contains(ra.Actions, a) {
			ra.Actions = append(ra.Actions, a)
		}
	}
	if len(ra.Actions) == 0 {
		return ResourceActions{}, fmt.Errorf("scope %q: no actions", s)
	}
	return ra, nil
}

// validScopeName keeps names to the characters repository names may hold
// (plus ':' for host:port): they end up in tokens and challenge headers.
func validScopeName(name string) error {
	if name == "" || len(name) > maxScopeName {
		return fmt.Errorf("resource name must be 1-%d characters", maxScopeName)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		switch {
		case 'a' <= c && c <= 'z', '0' <= c && c <= '9', 'A' <= c && c <= 'Z':
		case c == '.', c == '_', c == '-', c == '/', c == ':':
		default:
			return fmt.Errorf("resource name contains %q", c)
		}
	}
	return nil
}

// String formats the scope back into the grammar ParseScope reads.
func (ra ResourceActions) String() string {
	return ra.Type + ":" + ra.Name + ":" + strings.Join(ra.Actions, ",")
}

// Permits reports whether role may do action on the resource. It is the one
// place the roles are defined.
func (r Role) Permits(typ, name, action string) bool {
	switch {
	case typ == TypeRepository && name != "":
		switch r {
		case RoleAdmin:
			return action == ActionPull || action == ActionPush || action == ActionDelete
		case RolePull:
			return action == ActionPull
		}
	case typ == TypeRegistry && name == CatalogName:
		return r == RoleAdmin && action == ActionAll
	}
	return false
}

// Grant returns the part of the requested access that role permits: the
// token endpoint issues exactly this. Requests for the same resource are
// merged; "*" on a repository expands to the permitted actions.
// Resources with no permitted action are left out, as the token
// specification asks (an empty grant is not an error).
func Grant(role Role, requested []ResourceActions) []ResourceActions {
	var out []ResourceActions
	for _, req := range requested {
		actions := req.Actions
		if req.Type == TypeRepository && slices.Contains(actions, ActionAll) {
			actions = []string{ActionPull, ActionPush, ActionDelete}
		}
		var granted []string
		for _, a := range actions {
			if role.Permits(req.Type, req.Name, a) {
				granted = append(granted, a)
			}
		}
		if len(granted) == 0 {
			continue
		}
		i := slices.IndexFunc(out, func(o ResourceActions) bool { return o.Type == req.Type && o.Name == req.Name })
		if i < 0 {
			out = append(out, ResourceActions{Type: req.Type, Name: req.Name})
			i = len(out) - 1
		}
		for _, a := range granted {
			if !slices.Contains(out[i].Actions, a) {
				out[i].Actions = append(out[i].Actions, a)
			}
		}
	}
	return out
}
