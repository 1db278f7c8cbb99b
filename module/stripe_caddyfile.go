package module

import (
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// stripe parses the stripe block of the global option:
//
//	stripe {
//		secret_key     <sk_…>          # required; use {env.STRIPE_SECRET_KEY}
//		meter          <event name>    # default api_calls
//		report_every   <duration>      # default 1h
//		settle_grace   <duration>      # default 2m; 0 reports an hour as it ends
//		namespace      <name>          # default: generated once per store
//		webhook_secret <whsec_…>       # use {env.STRIPE_WEBHOOK_SECRET}
//		past_due_grace <duration>      # default 72h
//		downgrade_to   <tier>
//		api_base       <url>           # only for tests against stripe-mock or a double
//	}
//
// Literal secrets are checked here; values with placeholders are checked
// when the config is loaded. downgrade_to must name a declared tier.
func (p *appParser) stripe(d *caddyfile.Dispenser) error {
	if err := once(d, p.seen); err != nil {
		return err
	}
	start := d.Token()
	if d.NextArg() {
		return d.Errf("stripe takes no arguments, got '%s'; its settings go in a { } block", d.Val())
	}
	cfg := &StripeConfig{}
	seen := make(map[string]caddyfile.Token)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		v, err := single(d, seen)
		if err != nil {
			return err
		}
		switch opt {
		case "secret_key":
			if !hasPlaceholder(v) && !stripeSecretPattern.MatchString(v) {
				return d.Err("stripe: secret_key must be a Stripe secret key (sk_test_…, sk_live_…, rk_…); better, use {env.STRIPE_SECRET_KEY}")
			}
			cfg.SecretKey = v
		case "meter":
			if len(v) > 100 {
				return d.Err("stripe: meter event names are at most 100 characters")
			}
			cfg.Meter = v
		case "report_every", "settle_grace", "past_due_grace":
			dur, err := caddy.ParseDuration(v)
			switch {
			case opt == "settle_grace" && (err != nil || dur < 0):
				return d.Errf("stripe: settle_grace: expected a duration such as 2m, or 0 to report an hour as soon as it ends, got '%s'", v)
			case opt != "settle_grace" && (err != nil || dur <= 0):
				return d.Errf("stripe: %s: expected a positive duration such as 1h or 2m, got '%s'", opt, v)
			}
			switch opt {
			case "report_every":
				cfg.ReportEvery = caddy.Duration(dur)
			case "settle_grace":
				grace := caddy.Duration(dur)
				cfg.SettleGrace = &grace
			default:
				cfg.PastDueGrace = caddy.Duration(dur)
			}
		case "webhook_secret":
			if !hasPlaceholder(v) && !webhookSecretPattern.MatchString(v) {
				return d.Err("stripe: webhook_secret must be the endpoint's signing secret (whsec_…); better, use {env.STRIPE_WEBHOOK_SECRET}")
			}
			cfg.WebhookSecret = v
		case "downgrade_to":
			cfg.DowngradeTo = v
			p.customerTiers = append(p.customerTiers, reference{name: v, tok: d.Token()})
		case "namespace":
			if !hasPlaceholder(v) && !stripeNamespacePattern.MatchString(v) {
				return d.Errf("stripe: namespace: expected 1 to 100 letters, digits or . _ : / -, got '%s'", v)
			}
			cfg.Namespace = v
		case "api_base":
			cfg.APIBase = v
		default:
			return d.Errf("stripe: unrecognized option '%s'; expected secret_key, meter, report_every, settle_grace, namespace, webhook_secret, past_due_grace, downgrade_to or api_base", opt)
		}
	}
	if cfg.SecretKey == "" {
		return errAt(start, "stripe: secret_key is required; use {env.STRIPE_SECRET_KEY}")
	}
	p.app.Stripe = cfg
	return nil
}
