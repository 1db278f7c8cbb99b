package module

import (
	"errors"
	"fmt"
	"slices"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/apimonetize/caddy-api-monetize/metering"
)

// meterUsage is how the global meter block is written, for errors.
const meterUsage = "meter <name> { source cost | header <Header-Name> max <units> | request_bytes [max <bytes>] | response_bytes [max <bytes>]; stripe <event name> }"

// meter parses the global `meter <name> { source …; stripe <event> }`.
func (p *appParser) meter(d *caddyfile.Dispenser) error {
	if !d.NextArg() {
		return d.Errf("meter: expected a name, as in 'meter tokens { source header X-Tokens-Used max 100000 }'")
	}
	m, tok := MeterConfig{Name: d.Val()}, d.Token()
	if d.NextArg() {
		return d.Errf("meter %s: unexpected '%s'; a meter's settings go in a { } block: %s", m.Name, d.Val(), meterUsage)
	}
	seen := make(map[string]caddyfile.Token)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		if err := once(d, seen); err != nil {
			return fmt.Errorf("meter %s: %w", m.Name, err)
		}
		switch opt {
		case "source":
			args, err := lineArgs(d)
			if err != nil {
				return err
			}
			src, err := parseMeterSource(m.Name, args)
			if err != nil {
				return d.Err(err.Error())
			}
			m.Source = src
		case "stripe":
			v, err := oneArg(d)
			if err != nil {
				return err
			}
			if err := checkStripeEvent(v); err != nil {
				return d.Errf("meter %s: stripe: %v", m.Name, err)
			}
			m.StripeEvent = v
		default:
			return d.Errf("meter %s: unrecognized option '%s'; expected source or stripe", m.Name, opt)
		}
	}
	if m.Source.Kind == "" {
		return errAt(tok, "meter %s: missing 'source …'; %s", m.Name, meterUsage)
	}
	if err := m.validate(); err != nil {
		return blame(err, seen, tok)
	}
	p.meters = append(p.meters, declaration{tok: tok, seen: seen})
	p.app.Meters = append(p.app.Meters, m)
	return nil
}

// declaration is where a block was declared, and where each of its
// options was, to blame errors found once the whole option is read.
type declaration struct {
	tok  caddyfile.Token
	seen map[string]caddyfile.Token
}

// parseMeterSource parses the arguments of a meter's source option.
func parseMeterSource(meter string, args []string) (MeterSource, error) {
	usage := fmt.Sprintf("meter %s: expected 'source cost', 'source header <Header-Name> max <units>', 'source request_bytes [max <bytes>]' or 'source response_bytes [max <bytes>]'", meter)
	if len(args) == 0 {
		return MeterSource{}, errors.New(usage)
	}
	src := MeterSource{Kind: args[0]}
	rest := args[1:]
	switch src.Kind {
	case sourceCost:
	case sourceHeader:
		if len(rest) == 0 {
			return src, errors.New(usage)
		}
		src.Header, rest = rest[0], rest[1:]
		if len(rest) == 0 {
			return src, fmt.Errorf("meter %s: source header %s needs 'max <units>' (≥ 1): a trusted upstream's value is capped, which bounds what one request can add", meter, src.Header)
		}
	case sourceRequestBytes, sourceResponseBytes:
	default:
		return src, fmt.Errorf("meter %s: unknown source '%s'; %s", meter, src.Kind, usage[len("meter "+meter+": "):])
	}
	if len(rest) > 0 {
		if src.Kind == sourceCost || len(rest) != 2 || rest[0] != "max" {
			return src, fmt.Errorf("meter %s: unexpected '%s'; %s", meter, rest[0], usage[len("meter "+meter+": "):])
		}
		n, err := metering.ParseUnits(rest[1])
		if err != nil || n == 0 {
			return src, fmt.Errorf("meter %s: max must be a whole number ≥ 1, got '%s'", meter, rest[1])
		}
		src.Max = n
	}
	return src, src.validate(meter)
}

// parseTierMeter parses a tier's `meter <name> { included …; over_quota …;
// thresholds … }` with the parsers of the tier's own options; the cursor
// is on "meter".
func parseTierMeter(d *caddyfile.Dispenser, t *Tier, seen map[string]caddyfile.Token) error {
	if !d.NextArg() {
		return d.Errf("tier %s: meter: expected a meter's name, as in 'meter tokens { included 1000000/month }'", t.Name)
	}
	name, tok := d.Val(), d.Token()
	key := "meter " + name
	if prev, dup := seen[key]; dup {
		return d.Errf("tier %s: meter '%s' has two blocks (first at %s); merge them", t.Name, name, position(prev))
	}
	seen[key] = tok
	if d.NextArg() {
		return d.Errf("tier %s: meter %s: unexpected '%s'; the meter's settings go in a { } block", t.Name, name, d.Val())
	}
	// The block's options are the tier's own quota options, parsed by
	// tierOption into a scratch tier.
	scratch := Tier{Name: t.Name}
	inner := make(map[string]caddyfile.Token)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch opt := d.Val(); opt {
		case "included", "over_quota", "thresholds":
			if err := tierOption(d, &scratch, inner); err != nil {
				return err
			}
		default:
			return d.Errf("tier %s meter %s: unrecognized option '%s'; expected included, over_quota or thresholds", t.Name, name, opt)
		}
	}
	tm := TierMeter{Meter: name, Included: scratch.Included, OverQuota: scratch.OverQuota, Thresholds: scratch.Thresholds}
	if err := tm.validate(t); err != nil {
		return blame(err, inner, tok)
	}
	t.Meters = append(t.Meters, tm)
	return nil
}

// checkMeters checks the meters against each other and the tiers' meter
// blocks against the declared meters, once the whole block is read, and
// blames the line at fault.
func (p *appParser) checkMeters() error {
	if i, err := p.app.checkMeterDecls(); err != nil {
		return blame(err, p.meters[i].seen, p.meters[i].tok)
	}
	for _, t := range p.app.Tiers {
		for _, tm := range t.Meters {
			if !slices.ContainsFunc(p.app.Meters, func(m MeterConfig) bool { return m.Name == tm.Meter }) {
				return errAt(p.tierMeters[t.Name+"\x00"+tm.Meter], "tier %s: meter '%s' is not declared; declare it with 'meter %s { source … }' in the api_monetize block", t.Name, tm.Meter, tm.Meter)
			}
		}
	}
	return nil
}
