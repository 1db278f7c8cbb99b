package module

import (
	"errors"
	"fmt"
	"math/bits"
	"net/http"
	"net/mail"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/store"
)

// The rules about what a configuration means live here, next to the config
// structs, and Provision applies them, so a JSON config (Caddy's native
// format, the admin /load endpoint) gets the same rules as a Caddyfile. The
// Caddyfile layer calls the same functions while it parses, to blame the
// offending line at adapt time; it keeps only syntax and positions.

// fieldError is a rule broken by one option of a config struct; Option is
// the option's Caddyfile name, so the Caddyfile layer can blame its line.
type fieldError struct {
	Option string
	Err    error
}

func (e *fieldError) Error() string { return e.Err.Error() }
func (e *fieldError) Unwrap() error { return e.Err }

// optionErr wraps err as broken by option.
func optionErr(option string, err error) error {
	return &fieldError{Option: option, Err: err}
}

// validate checks the app-wide options that compileMetering and
// compileTiers do not compile.
func (a *App) validate() error {
	if a.Redis != "" && a.RedisCluster != "" {
		return optionErr("redis_cluster", errors.New("redis_cluster and redis both set the Redis store: keep one of them"))
	}
	if a.Redis != "" && a.StorePath != "" {
		return optionErr("store_path", errors.New("store_path sets the embedded store's file, but redis is set: remove one of them"))
	}
	if a.RedisCluster != "" && a.StorePath != "" {
		return optionErr("store_path", errors.New("store_path sets the embedded store's file, but redis_cluster is set: remove one of them"))
	}
	if a.RedisPrefix != "" && a.Redis == "" && a.RedisCluster == "" {
		return optionErr("redis_prefix", errors.New("redis_prefix applies only to a Redis store: add 'redis <url>' (or 'redis_cluster <url>') or remove it"))
	}
	if err := checkRedisURL(a.Redis); err != nil {
		return optionErr("redis", err)
	}
	if err := checkRedisClusterURL(a.RedisCluster); err != nil {
		return optionErr("redis_cluster", err)
	}
	if a.RedisWaitReplicas < 0 || a.RedisWaitReplicas > maxWaitReplicas {
		return optionErr("redis_wait_replicas", fmt.Errorf("redis_wait_replicas: expected a number of replicas from 0 to %d, got %d", maxWaitReplicas, a.RedisWaitReplicas))
	}
	if a.RedisWaitReplicas > 0 && a.Redis == "" && a.RedisCluster == "" {
		return optionErr("redis_wait_replicas", errors.New("redis_wait_replicas applies only to a Redis store: add 'redis <url>' (or 'redis_cluster <url>') or remove it"))
	}
	if a.RedisCluster != "" && strings.ContainsAny(a.RedisPrefix, "{}") {
		return optionErr("redis_prefix", fmt.Errorf("redis_prefix '%s': with redis_cluster the prefix must not contain '{' or '}' (they would change the keys' hash slots)", a.RedisPrefix))
	}
	if a.StoreTimeout < 0 {
		return optionErr("store_timeout", errors.New("store_timeout must be a positive duration such as 100ms or 2s"))
	}
	if a.StoreFlushInterval < 0 {
		return optionErr("store_flush_interval", errors.New("store_flush_interval must be a positive duration such as 1s or 200ms"))
	}
	if a.UpgradeURL != "" {
		if err := checkUpgradeURL(a.UpgradeURL); err != nil {
			return optionErr("upgrade_url", fmt.Errorf("upgrade_url '%s': %v", a.UpgradeURL, err))
		}
	}
	if a.UsageCostHeader != "" {
		if err := checkCostHeader(a.UsageCostHeader); err != nil {
			return optionErr("usage_cost_header", err)
		}
	} else if a.MaxUsageCost != 0 {
		return optionErr("usage_cost_header", errors.New("max_usage_cost applies only with usage_cost_header"))
	}
	if a.MaxUsageCost < 0 {
		return optionErr("usage_cost_header", fmt.Errorf("usage_cost_header %s: max must be a whole number of units ≥ 1, got %d", a.UsageCostHeader, a.MaxUsageCost))
	}
	return a.checkMeters()
}

// validate checks a tier's own options and their consistency: its name,
// path patterns, price, included units, SLA, features, and that its quota
// options fit together. compileTiers checks the rest (rate, over_quota mode and rate,
// on_store_error, period zone) while compiling them.
func (t *Tier) validate() error {
	if err := checkName(t.Name); err != nil {
		return optionErr("tier", fmt.Errorf("tier '%s': %v", t.Name, err))
	}
	for _, list := range []struct {
		option   string
		patterns []string
	}{{"endpoints", t.Endpoints}, {"exclude", t.Exclude}} {
		for _, pat := range list.patterns {
			if err := checkPathPattern(pat); err != nil {
				return optionErr(list.option, fmt.Errorf("%s: %v", list.option, err))
			}
		}
	}
	if err := t.Price.validate(); err != nil {
		return optionErr("price", fmt.Errorf("tier %s: price: %v", t.Name, err))
	}
	if inc := t.Included; inc != nil && inc.Interval != "month" {
		return optionErr("included", fmt.Errorf("tier %s: included units are counted per month; write %d/month", t.Name, inc.Units))
	}
	if t.SLA != "" {
		if err := checkSLA(t.SLA); err != nil {
			return optionErr("sla", fmt.Errorf("sla '%s': %v", t.SLA, err))
		}
	}
	if err := t.checkFeatures(); err != nil {
		return err
	}
	if err := t.checkQuota(); err != nil {
		return err
	}
	return t.checkMeterBlocks()
}

// checkQuota checks a tier's quota options against each other.
func (t *Tier) checkQuota() error {
	if t.OverQuota != nil && t.Included == nil {
		return optionErr("over_quota", fmt.Errorf("tier %s: over_quota needs included, as in 'included 1000/month': it decides what happens once the included units are used up", t.Name))
	}
	if t.Included == nil && len(t.Thresholds) > 0 {
		return optionErr("thresholds", fmt.Errorf("tier %s: thresholds needs included, as in 'included 1000/month': thresholds are percentages of the included units", t.Name))
	}
	if len(t.Thresholds) > 0 {
		if _, err := parseThresholds(intArgs(t.Thresholds)); err != nil {
			return optionErr("thresholds", fmt.Errorf("tier %s: %v", t.Name, err))
		}
	}
	if oq := t.OverQuota; oq != nil && oq.Throttle != nil && t.Rate != nil && !slower(oq.Throttle, t.Rate) {
		return optionErr("over_quota", fmt.Errorf("tier %s: over_quota throttle %s is not slower than the tier's rate %s; throttling beyond the quota needs a lower rate", t.Name, rateText(oq.Throttle), rateText(t.Rate)))
	}
	return nil
}

// validate checks a price: custom, or a non-negative amount per month or
// year. A nil price is free.
func (p *Price) validate() error {
	switch {
	case p == nil:
		return nil
	case p.Custom && (p.AmountMicros != 0 || p.Interval != ""):
		return errors.New("a custom price has no amount and no interval")
	case p.Custom:
		return nil
	case p.AmountMicros < 0:
		return errors.New("must not be negative")
	case p.Interval != "month" && p.Interval != "year":
		return fmt.Errorf("the interval must be month or year, as in 49.00/month, got '%s'", p.Interval)
	}
	return nil
}

// intArgs writes ns as Caddyfile arguments, to check them with the parser
// of the same option.
func intArgs(ns []int) []string {
	s := make([]string, len(ns))
	for i, n := range ns {
		s[i] = strconv.Itoa(n)
	}
	return s
}

// slower reports whether a admits fewer units per unit of time than b,
// compared exactly: a.Limit/a.Window < b.Limit/b.Window.
func slower(a, b *Rate) bool {
	ah, al := bits.Mul64(uint64(a.Limit), uint64(b.Window))
	bh, bl := bits.Mul64(uint64(b.Limit), uint64(a.Window))
	return ah < bh || ah == bh && al < bl
}

// rateText writes r as in a Caddyfile, e.g. 50/min, for error messages.
func rateText(r *Rate) string {
	return strconv.FormatInt(r.Limit, 10) + "/" + windowName(time.Duration(r.Window))
}

// checkName accepts tier names and customer ids: 1 to 64 ASCII letters,
// digits, '.', '_' or '-'. They appear in response headers, metrics and
// store keys.
func checkName(s string) error {
	if len(s) == 0 || len(s) > 64 {
		return errors.New("must be 1 to 64 characters long")
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return errors.New("may only contain ASCII letters, digits, '.', '_' and '-'")
		}
	}
	return nil
}

// checkPathPattern accepts Caddy path-matcher patterns, which start with
// '/' or '*'.
func checkPathPattern(p string) error {
	if !strings.HasPrefix(p, "/") && !strings.HasPrefix(p, "*") {
		return fmt.Errorf("path pattern '%s' must start with '/' or '*', as in /v1/*", p)
	}
	return nil
}

// checkRedisURL validates a literal Redis URL the way the store will parse
// it; a placeholder or an empty URL passes. The URL is never echoed: it may
// hold a password.
func checkRedisURL(v string) error {
	if v == "" || hasPlaceholder(v) {
		return nil
	}
	if _, err := redis.ParseURL(v); err != nil {
		const usage = "redis: expected a URL such as redis://[user:password@]host:6379/0 (rediss:// for TLS, or unix://)"
		var urlErr *url.Error
		if errors.As(err, &urlErr) {
			return errors.New(usage)
		}
		return fmt.Errorf("%s: %v", usage, err)
	}
	return nil
}

// maxWaitReplicas bounds redis_wait_replicas: more replicas than that per
// master is not a deployment this is meant for.
const maxWaitReplicas = 16

// checkRedisClusterURL validates a literal Redis Cluster URL the way the
// store will parse it; a placeholder or an empty URL passes. The URL is
// never echoed: it may hold a password.
func checkRedisClusterURL(v string) error {
	if v == "" || hasPlaceholder(v) {
		return nil
	}
	if _, err := redis.ParseClusterURL(v); err != nil {
		const usage = "redis_cluster: expected a URL such as redis://[user:password@]host1:6379?addr=host2:6379&addr=host3:6379 (rediss:// for TLS)"
		var urlErr *url.Error
		if errors.As(err, &urlErr) {
			return errors.New(usage)
		}
		return fmt.Errorf("%s: %v", usage, err)
	}
	return nil
}

// checkUpgradeURL accepts an absolute http(s) URL, or a placeholder.
func checkUpgradeURL(v string) error {
	if hasPlaceholder(v) {
		return nil
	}
	u, err := url.Parse(v)
	if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		return errors.New("expected an absolute URL such as https://example.com/pricing")
	}
	return nil
}

// checkCostHeader accepts the name of usage_cost_header: a valid header
// name without '_' or '.'.
func checkCostHeader(name string) error { return checkUsageHeader("usage_cost_header", name) }

// checkUsageHeader accepts the name of a response header an upstream
// reports usage in (usage_cost_header, a meter's header source), as option
// writes it: a valid header name without '_' or '.'.
func checkUsageHeader(option, name string) error {
	if strings.ContainsAny(name, "_.") {
		return fmt.Errorf("%s %s: header names with '_' or '.' are refused, as for key_from: Caddy drops such request headers, and CGI-style backends confuse them with the hyphenated name; use a hyphen instead, e.g. %s", option, name, strings.NewReplacer("_", "-", ".", "-").Replace(name))
	}
	if !validHeaderName(name) {
		return fmt.Errorf("%s: '%s' is not a valid header name", option, name)
	}
	return nil
}

// checkSLA accepts "<percent>%" with 0 < percent ≤ 100.
func checkSLA(s string) error {
	num, ok := strings.CutSuffix(s, "%")
	if !ok {
		return errors.New("expected a percentage such as 99.9%")
	}
	micros, err := metering.ParseMicros(num)
	if err != nil {
		return fmt.Errorf("expected a percentage such as 99.9%%: %v", err)
	}
	if micros == 0 || micros > 100_000_000 {
		return errors.New("must be more than 0% and at most 100%")
	}
	return nil
}

// stripeCustomerIDPattern is a Stripe customer id: "cus_" and letters and
// digits, as Stripe issues them.
var stripeCustomerIDPattern = regexp.MustCompile(`^cus_[A-Za-z0-9]{1,250}$`)

// checkStripeCustomerID validates a customer's Stripe id, wherever it comes
// from (Caddyfile, JSON config, admin API).
func checkStripeCustomerID(v string) error {
	if !stripeCustomerIDPattern.MatchString(v) {
		return errors.New("expected a Stripe customer id such as cus_NffrFeUfNV2Hib (cus_ and letters and digits)")
	}
	return nil
}

// maxEmailLength is the longest address SMTP carries (RFC 5321: a path of
// 256 octets, less the angle brackets).
const maxEmailLength = 254

// checkEmail validates a customer's notification address, wherever it comes
// from (Caddyfile, JSON config, admin API): one plain address, nothing
// around it (no display name, no comment, no line break that could add a
// header to a notification email).
func checkEmail(v string) error {
	bad := len(v) > maxEmailLength || strings.ContainsFunc(v, func(r rune) bool { return r < 0x20 || r == 0x7f })
	if !bad {
		addr, err := mail.ParseAddress(v)
		bad = err != nil || addr.Address != v
	}
	if bad {
		return errors.New("expected a plain address such as billing@example.com")
	}
	return nil
}

// validate checks one meter declaration on its own: its name, its source
// and its Stripe event name. App.checkMeters checks them against each
// other.
func (m *MeterConfig) validate() error {
	if err := checkName(m.Name); err != nil {
		return optionErr("meter", fmt.Errorf("meter '%s': %v", m.Name, err))
	}
	if m.Name == store.DefaultMeter {
		return optionErr("meter", fmt.Errorf("meter '%s': the name is the default meter's (the request's cost units); choose another", m.Name))
	}
	if err := m.Source.validate(m.Name); err != nil {
		return optionErr("source", err)
	}
	if m.StripeEvent != "" {
		if err := checkStripeEvent(m.StripeEvent); err != nil {
			return optionErr("stripe", fmt.Errorf("meter %s: stripe: %v", m.Name, err))
		}
	}
	return nil
}

// validate checks a meter's source: a known kind, a header (with a max)
// only for a header source, a max only where it applies.
func (s MeterSource) validate(meter string) error {
	const usage = "expected 'source cost', 'source header <Header-Name> max <units>', 'source request_bytes [max <bytes>]' or 'source response_bytes [max <bytes>]'"
	switch s.Kind {
	case sourceCost:
		if s.Header != "" || s.Max != 0 {
			return fmt.Errorf("meter %s: a cost source has no header and no max; %s", meter, usage)
		}
	case sourceHeader:
		if err := checkUsageHeader("meter "+meter+": source header", s.Header); err != nil {
			return err
		}
		if s.Max < 1 {
			return fmt.Errorf("meter %s: source header %s needs 'max <units>' (≥ 1): a trusted upstream's value is capped, which bounds what one request can add", meter, s.Header)
		}
	case sourceRequestBytes, sourceResponseBytes:
		if s.Header != "" {
			return fmt.Errorf("meter %s: a %s source has no header; %s", meter, s.Kind, usage)
		}
		if s.Max < 0 {
			return fmt.Errorf("meter %s: source %s: max must be a whole number of bytes ≥ 1, got %d", meter, s.Kind, s.Max)
		}
	default:
		return fmt.Errorf("meter %s: unknown source '%s'; %s", meter, s.Kind, usage)
	}
	return nil
}

// checkStripeEvent accepts a Stripe meter event name: 1 to 100 printable
// ASCII characters without spaces.
func checkStripeEvent(v string) error {
	if len(v) == 0 || len(v) > 100 {
		return errors.New("meter event names are 1 to 100 characters")
	}
	for i := 0; i < len(v); i++ {
		if v[i] <= ' ' || v[i] >= 0x7f {
			return fmt.Errorf("'%s' is not a meter event name: printable ASCII characters without spaces", v)
		}
	}
	return nil
}

// stripeEvent is the meter's Stripe event name: StripeEvent, or its name.
func (m *MeterConfig) stripeEvent() string {
	if m.StripeEvent != "" {
		return m.StripeEvent
	}
	return m.Name
}

// defaultStripeEvent is the default meter's Stripe event name.
func (a *App) defaultStripeEvent() string {
	if a.Stripe != nil && a.Stripe.Meter != "" {
		return a.Stripe.Meter
	}
	return defaultStripeMeter
}

// checkMeters checks the app's meters (checkMeterDecls) and that every
// tier's meter blocks name declared meters.
func (a *App) checkMeters() error {
	if _, err := a.checkMeterDecls(); err != nil {
		return err
	}
	for _, t := range a.Tiers {
		for _, tm := range t.Meters {
			if !slices.ContainsFunc(a.Meters, func(m MeterConfig) bool { return m.Name == tm.Meter }) {
				return optionErr("meter", fmt.Errorf("tier %s: meter '%s' is not declared; declare it with 'meter %s { source … }' in the api_monetize block", t.Name, tm.Meter, tm.Meter))
			}
		}
	}
	return nil
}

// checkMeterDecls checks the app's meter declarations: each on its own,
// names declared once, header sources on distinct headers (and not
// usage_cost_header), Stripe event names distinct from each other and
// from the default meter's. On an error it returns the index of the
// meter at fault.
func (a *App) checkMeterDecls() (int, error) {
	names := make(map[string]bool, len(a.Meters))
	headers := map[string]string{}
	if a.UsageCostHeader != "" {
		headers[http.CanonicalHeaderKey(a.UsageCostHeader)] = "usage_cost_header"
	}
	events := map[string]string{a.defaultStripeEvent(): "the default meter"}
	for i := range a.Meters {
		m := &a.Meters[i]
		if i == store.MaxMeters {
			return i, optionErr("meter", fmt.Errorf("meter %s: at most %d meters besides the default one", m.Name, store.MaxMeters))
		}
		if err := m.validate(); err != nil {
			return i, err
		}
		if names[m.Name] {
			return i, optionErr("meter", fmt.Errorf("meter '%s' is declared twice", m.Name))
		}
		names[m.Name] = true
		if m.Source.Kind == sourceHeader {
			h := http.CanonicalHeaderKey(m.Source.Header)
			if other, dup := headers[h]; dup {
				return i, optionErr("source", fmt.Errorf("meter %s: header %s is already read by %s", m.Name, m.Source.Header, other))
			}
			headers[h] = "meter " + m.Name
		}
		ev := m.stripeEvent()
		if other, dup := events[ev]; dup {
			return i, optionErr("stripe", fmt.Errorf("meter %s: Stripe event name '%s' is already %s's; each meter is reported under its own event name (set 'stripe <event>' in the meter block)", m.Name, ev, other))
		}
		events[ev] = "meter " + m.Name
	}
	return -1, nil
}

// checkMeterBlocks checks a tier's meter blocks: each meter once, and
// each block's options as the tier's own quota options are checked.
func (t *Tier) checkMeterBlocks() error {
	for i, tm := range t.Meters {
		for _, prev := range t.Meters[:i] {
			if prev.Meter == tm.Meter {
				return optionErr("meter", fmt.Errorf("tier %s: meter '%s' has two blocks; merge them", t.Name, tm.Meter))
			}
		}
		if err := tm.validate(t); err != nil {
			return err
		}
	}
	return nil
}

// validate checks a tier's meter block with the rules of the tier's own
// quota options (see Tier.checkQuota), the throttle against the tier's
// rate.
func (tm *TierMeter) validate(t *Tier) error {
	if inc := tm.Included; inc != nil && inc.Interval != "month" {
		return optionErr("included", fmt.Errorf("tier %s meter %s: included units are counted per month; write %d/month", t.Name, tm.Meter, inc.Units))
	}
	if inc := tm.Included; inc != nil && inc.Units < 0 {
		return optionErr("included", fmt.Errorf("tier %s meter %s: included must not be negative", t.Name, tm.Meter))
	}
	return tm.asTier(t).checkQuota()
}

// asTier is the meter block as a tier's quota options, named "<tier>
// meter <meter>" in messages, with the tier's rate (for the throttle rule).
func (tm *TierMeter) asTier(t *Tier) *Tier {
	return &Tier{Name: t.Name + " meter " + tm.Meter, Rate: t.Rate, Included: tm.Included, OverQuota: tm.OverQuota, Thresholds: tm.Thresholds}
}
