package module

import (
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/apimonetize/caddy-api-monetize/portal"
)

func init() {
	httpcaddyfile.RegisterHandlerDirective("api_monetize_portal", parsePortal)
	// The portal answers every request it gets, like respond.
	httpcaddyfile.RegisterDirectiveOrder("api_monetize_portal", httpcaddyfile.Before, "respond")
}

func parsePortal(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	if h.Option("api_monetize") == nil {
		h.Next()
		return nil, h.Err("the api_monetize_portal directive needs the api_monetize global option, which declares tiers, customers and keys: add it to the global options block { ... } at the top of the Caddyfile")
	}
	p := new(PortalHandler)
	if err := p.UnmarshalCaddyfile(h.Dispenser); err != nil {
		return nil, err
	}
	return p, nil
}

// UnmarshalCaddyfile sets up the portal:
//
//	api_monetize_portal {
//		base_url     <url>              # required: https://portal.example.com or https://example.com/portal
//		product_name <name>
//		logo_url     <https url | /path>
//		accent_color "<#rrggbb>"        # quoted, or without the #
//		docs_url     <url>
//		signup       open | invite | off  # default invite
//		signup_tier  <tier>             # tier of open signups; default the first tier
//		oidc <issuer> <client_id> <client_secret>  # also sign in with OpenID Connect
//		session_idle_timeout <duration>  # default 1h; from 5m to 12h
//		email {                         # default: the api_monetize notify email settings
//			smtp     <host:port>
//			from     <address>
//			username <user>
//			password <password>
//		}
//	}
func (p *PortalHandler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive
	tok := d.Token()
	if d.NextArg() {
		return d.Errf("api_monetize_portal: unexpected argument '%s'; only a matcher may follow the directive, settings go in a { } block", d.Val())
	}
	seen := make(map[string]caddyfile.Token)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		if opt == "email" {
			if err := once(d, seen); err != nil {
				return err
			}
			e, err := notifyEmail(d)
			if err != nil {
				return err
			}
			p.Email = e
			continue
		}
		if opt == "oidc" {
			args, err := onceArgs(d, seen)
			if err != nil {
				return err
			}
			if len(args) != 3 {
				return d.Errf("api_monetize_portal: oidc expects <issuer> <client_id> <client_secret>, got %d values", len(args))
			}
			p.OIDC = &PortalOIDC{Issuer: args[0], ClientID: args[1], ClientSecret: args[2]}
			continue
		}
		if opt == "accent_color" && !d.NextArg() {
			return d.Errf(`api_monetize_portal: accent_color expects a colour such as "#1f5fbf" or 1f5fbf (quote it: an unquoted # starts a comment)`)
		} else if opt == "accent_color" {
			d.Prev()
		}
		v, err := single(d, seen)
		if err != nil {
			return err
		}
		switch opt {
		case "base_url":
			p.BaseURL = v
		case "product_name":
			p.ProductName = v
		case "logo_url":
			p.LogoURL = v
		case "accent_color":
			if !strings.HasPrefix(v, "#") {
				v = "#" + v
			}
			p.AccentColor = v
		case "docs_url":
			p.DocsURL = v
		case "signup":
			switch v {
			case portal.SignupOpen, portal.SignupInvite, portal.SignupOff:
			default:
				return d.Errf("api_monetize_portal: signup expects open, invite or off, got '%s'", v)
			}
			p.Signup = v
		case "signup_tier":
			p.SignupTier = v
		case "session_idle_timeout":
			dur, err := caddy.ParseDuration(v)
			if err != nil {
				return d.Errf("api_monetize_portal: session_idle_timeout expects a duration such as 30m or 2h, got '%s'", v)
			}
			p.SessionIdleTimeout = caddy.Duration(dur)
		default:
			return d.Errf("api_monetize_portal: unrecognized option '%s'; expected base_url, product_name, logo_url, accent_color, docs_url, signup, signup_tier, session_idle_timeout, email or oidc", opt)
		}
	}
	if p.BaseURL == "" {
		return errAt(tok, "api_monetize_portal: missing 'base_url <url>', the portal's public address (e.g. https://portal.example.com); sign-in links are built from it")
	}
	return nil
}
