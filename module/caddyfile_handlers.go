package module

// The handler directives' Caddyfile syntax: api_monetize and
// api_monetize_usage, and the key sources they share. The global option is
// in caddyfile.go; feature blocks have their own files (stripe_caddyfile.go,
// notify_caddyfile.go, idempotency.go, features.go).

import (
	"strings"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/apimonetize/caddy-api-monetize/metering"
)

// parseHandler sets up the api_monetize handler from the directive of the
// same name. See (*Handler).UnmarshalCaddyfile for the syntax.
func parseHandler(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	if h.Option("api_monetize") == nil {
		h.Next() // the directive, for the error's position
		return nil, h.Err("the api_monetize directive needs the api_monetize global option, which declares tiers, customers and keys: add it to the global options block { ... } at the top of the Caddyfile")
	}
	handler := new(Handler)
	if err := handler.UnmarshalCaddyfile(h.Dispenser); err != nil {
		return nil, err
	}
	return handler, nil
}

// parseUsageHandler sets up the api_monetize_usage handler from the
// directive of the same name. See (*UsageHandler).UnmarshalCaddyfile for
// the syntax.
func parseUsageHandler(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	if h.Option("api_monetize") == nil {
		h.Next() // the directive, for the error's position
		return nil, h.Err("the api_monetize_usage directive needs the api_monetize global option, which declares tiers, customers and keys: add it to the global options block { ... } at the top of the Caddyfile")
	}
	handler := new(UsageHandler)
	if err := handler.UnmarshalCaddyfile(h.Dispenser); err != nil {
		return nil, err
	}
	return handler, nil
}

// UnmarshalCaddyfile sets up the handler from the api_monetize directive:
//
//	api_monetize [<matcher>] {
//		cost     <path pattern> <units>   # first match wins; default cost 1
//		key_from header <Name> | query <param> | bearer   # repeatable, tried in order
//		forward_key                       # pass the key on to the upstream
//		require_feature <path pattern> <feature>   # repeatable; 403 unless the tier includes it
//	}
//
// The block is optional. Without key_from, the key is read from the
// X-API-Key header, then from "Authorization: Bearer". Without
// forward_key, the key is removed from the request once checked.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume directive name
	if d.NextArg() {
		return d.Errf("api_monetize: unexpected argument '%s'; only a matcher may follow the directive, settings go in a { } block", d.Val())
	}
	costs := make(map[string]caddyfile.Token)
	sources := make(map[KeySource]caddyfile.Token)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch opt := d.Val(); opt {
		case "cost":
			args, err := lineArgs(d)
			if err != nil {
				return err
			}
			if len(args) != 2 {
				return d.Errf("cost: expected 'cost <path pattern> <units>', as in 'cost /v1/ml/* 10'")
			}
			if err := checkPathPattern(args[0]); err != nil {
				return d.Errf("cost: %v", err)
			}
			units, err := metering.ParseUnits(args[1])
			if err != nil {
				return d.Errf("cost %s: units must be a whole number ≥ 0, got '%s'", args[0], args[1])
			}
			if prev, dup := costs[args[0]]; dup {
				return d.Errf("cost %s: this pattern is given twice (first at %s)", args[0], position(prev))
			}
			costs[args[0]] = d.Token()
			h.Costs = append(h.Costs, Cost{Path: args[0], Units: units})
		case "key_from":
			if err := addKeySource(d, sources, &h.KeyFrom); err != nil {
				return err
			}
		case "forward_key":
			if d.NextArg() {
				return d.Errf("forward_key: takes no argument, got '%s'", d.Val())
			}
			h.ForwardKey = true
		case "require_feature":
			req, err := parseRequireFeature(d)
			if err != nil {
				return err
			}
			h.RequireFeatures = append(h.RequireFeatures, req)
		default:
			return d.Errf("api_monetize: unrecognized option '%s'; expected cost, key_from, forward_key or require_feature", opt)
		}
	}
	return nil
}

// UnmarshalCaddyfile sets up the handler from the api_monetize_usage
// directive:
//
//	api_monetize_usage [<matcher>] {
//		key_from header <Name> | query <param> | bearer   # repeatable, tried in order
//	}
//
// The block is optional; key_from is as for the api_monetize directive.
func (u *UsageHandler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume directive name
	if d.NextArg() {
		return d.Errf("api_monetize_usage: unexpected argument '%s'; only a matcher may follow the directive, settings go in a { } block", d.Val())
	}
	sources := make(map[KeySource]caddyfile.Token)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch opt := d.Val(); opt {
		case "key_from":
			if err := addKeySource(d, sources, &u.KeyFrom); err != nil {
				return err
			}
		default:
			return d.Errf("api_monetize_usage: unrecognized option '%s'; expected key_from", opt)
		}
	}
	return nil
}

// addKeySource parses a key_from line and appends its source to list,
// refusing a source already in seen.
func addKeySource(d *caddyfile.Dispenser, seen map[KeySource]caddyfile.Token, list *[]KeySource) error {
	src, err := parseKeySource(d)
	if err != nil {
		return err
	}
	if prev, dup := seen[src]; dup {
		return d.Errf("key_from: this source is given twice (first at %s)", position(prev))
	}
	seen[src] = d.Token()
	*list = append(*list, src)
	return nil
}

// parseKeySource parses the arguments of key_from.
func parseKeySource(d *caddyfile.Dispenser) (KeySource, error) {
	args, err := lineArgs(d)
	if err != nil {
		return KeySource{}, err
	}
	const usage = "key_from: expected 'header <Name>', 'query <param>' or 'bearer'"
	if len(args) == 0 {
		return KeySource{}, d.Err(usage)
	}
	switch args[0] {
	case "header":
		if len(args) != 2 {
			return KeySource{}, d.Err(usage)
		}
		name := args[1]
		if strings.Contains(name, "_") {
			return KeySource{}, d.Errf("key_from header %s: Caddy (since v2.11.4) drops request headers whose name contains '_' before any handler sees them; use a hyphen instead, e.g. %s", name, strings.ReplaceAll(name, "_", "-"))
		}
		if strings.Contains(name, ".") {
			return KeySource{}, d.Errf("key_from header %s: Caddy drops request headers whose name contains '.' before any handler sees them; use a hyphen instead, e.g. %s", name, strings.ReplaceAll(name, ".", "-"))
		}
		if !validHeaderName(name) {
			return KeySource{}, d.Errf("key_from header: '%s' is not a valid header name", name)
		}
		return KeySource{Header: name}, nil
	case "query":
		if len(args) != 2 || args[1] == "" {
			return KeySource{}, d.Err(usage)
		}
		return KeySource{Query: args[1]}, nil
	case "bearer":
		if len(args) != 1 {
			return KeySource{}, d.Err(usage)
		}
		return KeySource{Bearer: true}, nil
	}
	return KeySource{}, d.Errf("%s, got '%s'", usage, args[0])
}

// Interface guards
var (
	_ caddyfile.Unmarshaler = (*Handler)(nil)
	_ caddyfile.Unmarshaler = (*UsageHandler)(nil)
)
