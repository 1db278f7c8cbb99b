package module

import (
	"net/mail"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/apimonetize/caddy-api-monetize/notify"
)

// notify parses the notify block of the global option:
//
//	notify {
//		webhook <url> {                    # repeatable
//			secret <whsec_…>               # Standard Webhooks secret; use {env.*}
//		}
//		email {
//			smtp     <host:port>
//			username <user>                # optional; use {env.*}
//			password <password>            # optional; use {env.*}
//			from     <address>             # e.g. "API Billing <billing@example.com>"
//		}
//	}
//
// Literal URLs, secrets, servers and senders are checked here; values with
// placeholders are checked when the config is loaded.
func (p *appParser) notify(d *caddyfile.Dispenser) error {
	if err := once(d, p.seen); err != nil {
		return err
	}
	tok := d.Token()
	if d.NextArg() {
		return d.Errf("notify takes no arguments, got '%s'; its channels go in a { } block", d.Val())
	}
	cfg := &NotifyConfig{}
	urls := make(map[string]caddyfile.Token)
	seen := make(map[string]caddyfile.Token)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch opt := d.Val(); opt {
		case "webhook":
			w, err := notifyWebhook(d, urls)
			if err != nil {
				return err
			}
			cfg.Webhooks = append(cfg.Webhooks, w)
		case "email":
			if err := once(d, seen); err != nil {
				return err
			}
			e, err := notifyEmail(d)
			if err != nil {
				return err
			}
			cfg.Email = e
		default:
			return d.Errf("notify: unrecognized channel '%s'; expected webhook or email", opt)
		}
	}
	if len(cfg.Webhooks) == 0 && cfg.Email == nil {
		return errAt(tok, "notify: add at least one 'webhook <url> { secret … }' or 'email { … }'")
	}
	p.app.Notify = cfg
	return nil
}

// notifyWebhook parses `webhook <url> { secret <whsec_…> }`.
func notifyWebhook(d *caddyfile.Dispenser, urls map[string]caddyfile.Token) (WebhookTarget, error) {
	if !d.NextArg() {
		return WebhookTarget{}, d.Err("webhook: expected a URL, as in 'webhook https://hooks.example.com/api-usage { secret {env.USAGE_WEBHOOK_SECRET} }'")
	}
	w := WebhookTarget{URL: d.Val()}
	if !hasPlaceholder(w.URL) {
		if err := notify.CheckURL(w.URL); err != nil {
			return w, d.Errf("webhook '%s': %v", w.URL, err)
		}
	}
	if prev, dup := urls[w.URL]; dup {
		return w, d.Errf("webhook '%s' is declared twice (first at %s)", w.URL, position(prev))
	}
	urls[w.URL] = d.Token()
	if d.NextArg() {
		return w, d.Errf("webhook %s: unexpected argument '%s'; the secret goes in a { } block", w.URL, d.Val())
	}
	tok := d.Token()
	seen := make(map[string]caddyfile.Token)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch opt := d.Val(); opt {
		case "secret":
			v, err := single(d, seen)
			if err != nil {
				return w, err
			}
			// The secret itself is never echoed.
			if !hasPlaceholder(v) {
				if _, err := notify.ParseSecret(v); err != nil {
					return w, d.Errf("webhook %s: secret: %v", w.URL, err)
				}
			}
			w.Secret = v
		default:
			return w, d.Errf("webhook %s: unrecognized option '%s'; expected secret", w.URL, opt)
		}
	}
	if w.Secret == "" {
		return w, errAt(tok, "webhook %s: missing 'secret <whsec_…>' in its block; receivers verify signatures with it (Standard Webhooks)", w.URL)
	}
	return w, nil
}

// notifyEmail parses the email block.
func notifyEmail(d *caddyfile.Dispenser) (*EmailConfig, error) {
	if d.NextArg() {
		return nil, d.Errf("email takes no arguments, got '%s'; its settings go in a { } block", d.Val())
	}
	tok := d.Token()
	e := &EmailConfig{}
	seen := make(map[string]caddyfile.Token)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		v, err := single(d, seen)
		if err != nil {
			return nil, err
		}
		switch opt {
		case "smtp":
			if !hasPlaceholder(v) {
				if err := notify.CheckSMTP(v, "x@example.com"); err != nil {
					return nil, d.Errf("email: %v", err)
				}
			}
			e.SMTP = v
		case "username":
			e.Username = v
		case "password":
			e.Password = v
		case "from":
			if !hasPlaceholder(v) {
				if _, err := mail.ParseAddress(v); err != nil {
					return nil, d.Errf("email: from expects an address such as \"API Billing <billing@example.com>\", got '%s'", v)
				}
			}
			e.From = v
		default:
			return nil, d.Errf("email: unrecognized option '%s'; expected smtp, username, password or from", opt)
		}
	}
	switch {
	case e.SMTP == "":
		return nil, errAt(tok, "email: missing 'smtp <host:port>'")
	case e.From == "":
		return nil, errAt(tok, "email: missing 'from <address>'")
	case e.Password != "" && e.Username == "":
		return nil, errAt(tok, "email: password without username")
	}
	return e, nil
}
