package module

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"go.uber.org/zap"

	"github.com/apimonetize/caddy-api-monetize/apikey"
	"github.com/apimonetize/caddy-api-monetize/limiter"
	"github.com/apimonetize/caddy-api-monetize/metering"
)

func init() {
	httpcaddyfile.RegisterGlobalOption("api_monetize", parseApp)
	httpcaddyfile.RegisterHandlerDirective("api_monetize", parseHandler)
	httpcaddyfile.RegisterHandlerDirective("api_monetize_usage", parseUsageHandler)
	// api_monetize_usage answers before api_monetize counts the request:
	// reading one's usage costs nothing and works over the quota. Both go
	// just before basic_auth, in this order.
	httpcaddyfile.RegisterDirectiveOrder("api_monetize_usage", httpcaddyfile.Before, "basic_auth")
	httpcaddyfile.RegisterDirectiveOrder("api_monetize", httpcaddyfile.Before, "basic_auth")
}

// parseApp sets up the api_monetize app from the global option of the same
// name. See (*App).UnmarshalCaddyfile for the syntax.
func parseApp(d *caddyfile.Dispenser, existing any) (any, error) {
	if existing != nil {
		d.Next()
		return nil, d.Err("the api_monetize global option is given twice; put all of its settings in one block")
	}
	app := new(App)
	if err := app.UnmarshalCaddyfile(d); err != nil {
		return nil, err
	}
	return httpcaddyfile.App{Name: "api_monetize", Value: caddyconfig.JSON(app, nil)}, nil
}

// UnmarshalCaddyfile sets up the app from the api_monetize global option:
//
//	api_monetize {
//		redis         <url>        # redis://[user:password@]host:port/db; omit for the embedded store
//		redis_cluster <url>        # redis://host1:port?addr=host2:port&addr=host3:port; instead of redis
//		redis_wait_replicas <n>    # answer metering calls once n replicas have them (WAIT)
//		redis_prefix  <prefix>     # only with redis or redis_cluster
//		store_path    <file>       # embedded store file; not with redis or redis_cluster
//		store_timeout <duration>
//		key_secret    <secret>     # use a placeholder: {env.API_MONETIZE_KEY_SECRET}
//		admin_api     read_only | read_write
//		upgrade_url   <url>
//		currency      <code>                # three letters, e.g. usd (default) or eur
//		bill_on       <1xx-5xx | status>... # billable responses; default 2xx 3xx
//		usage_cost_header <Header-Name> [max <units>]
//		thresholds    <percent>... | off    # ascending; default 80 100 120
//		auth_failures <failures>/<window> [burst <failures>] | off   # per client address; default 20/min
//
//		tier <name> {
//			price          0 | custom | <amount>/<month|year>   # exact decimal, at most 6 decimals
//			included       <units>/month
//			over_quota     block | bill <price> | throttle <units>/<window> [burst <units>] [bill <price>]
//			period         calendar [<IANA zone>] | anniversary
//			thresholds     <percent>... | off   # overrides the global thresholds
//			rate           <units>/<s|sec|second|m|min|minute|h|hour|d|day> [burst <units>]
//			endpoints      <path pattern>...    # repeatable
//			exclude        <path pattern>...    # repeatable
//			features       <name>...            # repeatable; each name once per tier
//			support        <word>
//			sla            <percent>%           # as written, e.g. 99.9%
//			on_store_error local | allow | deny
//			meter          <name> {               # repeatable, once per meter
//				included   <units>/month
//				over_quota block | bill <price> | throttle <units>/<window> [burst <units>] [bill <price>]
//				thresholds <percent>... | off
//			}
//		}
//
//		meter <name> {                       # a meter besides the cost units; repeatable
//			source cost | header <Header-Name> max <units> | request_bytes [max <bytes>] | response_bytes [max <bytes>]
//			stripe <event name>             # default: the meter's name
//		}
//
//		customer <id> tier <tier> [stripe <cus_id>] [email <address>] [anchor <YYYY-MM-DD>]
//		key      <key> <customer id>   # use a placeholder: {env.ACME_KEY}
//	}
//
// A zero price ("price 0", "price 0.00/month") leaves Tier.Price nil: the tier
// is free. over_quota prices are per unit beyond the included quota, in the
// currency, exact to 6 decimals; a tier with over_quota or thresholds needs
// included, and a throttle rate must be slower than the tier's rate. "off"
// thresholds are an empty, non-nil list. Tiers, customers and keys may be
// written in any order; every tier a customer names and every customer a key
// names must be declared somewhere in the block.
func (a *App) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume option name
	if d.NextArg() {
		return d.Errf("api_monetize takes no arguments on its first line, got '%s'; its settings go in a { } block", d.Val())
	}
	p := appParser{
		app:        a,
		start:      d.Token(),
		seen:       make(map[string]caddyfile.Token),
		tiers:      make(map[string]caddyfile.Token),
		customers:  make(map[string]caddyfile.Token),
		keys:       make(map[string]caddyfile.Token),
		tierMeters: make(map[string]caddyfile.Token),
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		if err := p.option(d); err != nil {
			return err
		}
	}
	return p.check()
}

// appParser holds what parsing the global block has seen so far, with the
// token of each declaration so that errors found after parsing can still
// name the offending line.
type appParser struct {
	app   *App
	start caddyfile.Token            // the api_monetize token
	seen  map[string]caddyfile.Token // single-use options
	// tiers, customers and keys map names (keys: the key as written) to
	// their declarations.
	tiers     map[string]caddyfile.Token
	customers map[string]caddyfile.Token
	keys      map[string]caddyfile.Token
	// customerTiers and keyCustomers are the references checked once the
	// whole block is read, with the token to blame.
	customerTiers []reference
	keyCustomers  []reference
	// meters are the meter declarations, in order; tierMeters the
	// tiers' meter blocks, by "<tier>\x00<meter>".
	meters     []declaration
	tierMeters map[string]caddyfile.Token
}

// reference is a name used on a line, to check it is declared.
type reference struct {
	name string
	tok  caddyfile.Token
}

// option parses one line (or tier block) of the global block; the cursor is
// on the option name.
func (p *appParser) option(d *caddyfile.Dispenser) error {
	a := p.app
	switch name := d.Val(); name {
	case "redis":
		v, err := single(d, p.seen)
		if err != nil {
			return err
		}
		if err := checkRedisURL(v); err != nil {
			return d.Err(err.Error())
		}
		a.Redis = v
	case "redis_cluster":
		v, err := single(d, p.seen)
		if err != nil {
			return err
		}
		if err := checkRedisClusterURL(v); err != nil {
			return d.Err(err.Error())
		}
		a.RedisCluster = v
	case "redis_wait_replicas":
		v, err := single(d, p.seen)
		if err != nil {
			return err
		}
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 || n > maxWaitReplicas {
			return d.Errf("redis_wait_replicas: expected a number of replicas from 0 to %d, got '%s'", maxWaitReplicas, v)
		}
		a.RedisWaitReplicas = n
	case "redis_prefix":
		v, err := single(d, p.seen)
		if err != nil {
			return err
		}
		if v == "" {
			return d.Err("redis_prefix: expected a non-empty prefix such as am:")
		}
		a.RedisPrefix = v
	case "store_path":
		v, err := single(d, p.seen)
		if err != nil {
			return err
		}
		a.StorePath = v
	case "store_timeout":
		v, err := single(d, p.seen)
		if err != nil {
			return err
		}
		dur, err := caddy.ParseDuration(v)
		if err != nil || dur <= 0 {
			return d.Errf("store_timeout: expected a positive duration such as 100ms or 2s, got '%s'", v)
		}
		a.StoreTimeout = caddy.Duration(dur)
	case "store_flush_interval":
		v, err := single(d, p.seen)
		if err != nil {
			return err
		}
		dur, err := caddy.ParseDuration(v)
		if err != nil || dur <= 0 {
			return d.Errf("store_flush_interval: expected a positive duration such as 1s or 200ms, got '%s'", v)
		}
		a.StoreFlushInterval = caddy.Duration(dur)
	case "key_secret":
		v, err := single(d, p.seen)
		if err != nil {
			return err
		}
		// The secret itself is never echoed.
		if !hasPlaceholder(v) && len(v) < minKeySecretLen {
			return d.Errf("key_secret: a literal secret must be at least %d characters; better, use a placeholder such as {env.API_MONETIZE_KEY_SECRET}", minKeySecretLen)
		}
		a.KeySecret = v
	case "admin_api":
		v, err := single(d, p.seen)
		if err != nil {
			return err
		}
		if v != "read_only" && v != "read_write" {
			return d.Errf("admin_api: expected read_only or read_write, got '%s'", v)
		}
		a.AdminAPI = v
	case "upgrade_url":
		v, err := single(d, p.seen)
		if err != nil {
			return err
		}
		if err := checkUpgradeURL(v); err != nil {
			return d.Errf("upgrade_url '%s': %v", v, err)
		}
		a.UpgradeURL = v
	case "rate_limit_headers":
		v, err := single(d, p.seen)
		if err != nil {
			return err
		}
		if _, err := parseHeaderSet(v); err != nil {
			return d.Err(err.Error())
		}
		a.RateLimitHeaders = v
	case "currency":
		v, err := single(d, p.seen)
		if err != nil {
			return err
		}
		code, err := metering.ParseCurrency(v)
		if err != nil {
			return d.Errf("currency: expected a three-letter code such as usd or eur, got '%s'", v)
		}
		a.Currency = code
	case "bill_on":
		args, err := onceArgs(d, p.seen)
		if err != nil {
			return err
		}
		billOn, err := parseBillOn(args)
		if err != nil {
			return d.Err(err.Error())
		}
		a.BillOn = billOn
	case "usage_cost_header":
		args, err := onceArgs(d, p.seen)
		if err != nil {
			return err
		}
		if err := p.usageCostHeader(args); err != nil {
			return d.Err(err.Error())
		}
	case "thresholds":
		args, err := onceArgs(d, p.seen)
		if err != nil {
			return err
		}
		ts, err := parseThresholds(args)
		if err != nil {
			return d.Err(err.Error())
		}
		a.Thresholds = ts
	case "auth_failures":
		args, err := onceArgs(d, p.seen)
		if err != nil {
			return err
		}
		if len(args) == 1 && args[0] == "off" {
			a.AuthFailures = &AuthFailureLimit{Off: true}
			break
		}
		rate, err := parseRate(args)
		if err != nil {
			return d.Errf("auth_failures: expected 'off' or a rate of failures per client address; %v", err)
		}
		a.AuthFailures = &AuthFailureLimit{Rate: rate}
		if _, err := newAuthGuard(a.AuthFailures); err != nil {
			return d.Err(err.Error())
		}
	case "tier":
		return p.tier(d)
	case "meter":
		return p.meter(d)
	case "customer":
		return p.customer(d)
	case "key":
		return p.key(d)
	case "stripe":
		return p.stripe(d)
	case "notify":
		return p.notify(d)
	case "idempotency":
		return p.idempotency(d)
	default:
		return d.Errf("unrecognized api_monetize option '%s'; expected one of redis, redis_cluster, redis_wait_replicas, redis_prefix, store_path, store_timeout, store_flush_interval, key_secret, admin_api, upgrade_url, rate_limit_headers, currency, bill_on, usage_cost_header, thresholds, idempotency, auth_failures, meter, tier, customer, key, stripe, notify", name)
	}
	return nil
}

// usageCostHeader parses the arguments "<Header-Name> [max <units>]" of
// usage_cost_header.
func (p *appParser) usageCostHeader(args []string) error {
	const usage = "usage_cost_header: expected '<Header-Name> [max <units>]', as in 'usage_cost_header X-Usage-Cost max 1000'"
	if len(args) != 1 && len(args) != 3 {
		return errors.New(usage)
	}
	name := args[0]
	if err := checkCostHeader(name); err != nil {
		return err
	}
	if len(args) == 3 {
		if args[1] != "max" {
			return fmt.Errorf("usage_cost_header %s: unexpected '%s'; only 'max <units>' may follow the header name", name, args[1])
		}
		limit, err := metering.ParseUnits(args[2])
		if err != nil || limit == 0 {
			return fmt.Errorf("usage_cost_header %s: max must be a whole number of units ≥ 1, got '%s'", name, args[2])
		}
		p.app.MaxUsageCost = limit
	}
	p.app.UsageCostHeader = name
	return nil
}

// minKeySecretLen is the shortest literal key_secret accepted; the app
// applies the same bound once placeholders are replaced.
const minKeySecretLen = 16

// tier parses `tier <name> { ... }`.
func (p *appParser) tier(d *caddyfile.Dispenser) error {
	if !d.NextArg() {
		return d.Err("tier: expected a name, as in 'tier pro { ... }'")
	}
	name, tok := d.Val(), d.Token()
	if err := checkName(name); err != nil {
		return d.Errf("tier '%s': %v", name, err)
	}
	if d.NextArg() {
		return d.Errf("tier %s: unexpected '%s'; a tier's settings go in a { } block", name, d.Val())
	}
	if prev, dup := p.tiers[name]; dup {
		return d.Errf("tier '%s' is defined twice (first at %s)", name, position(prev))
	}
	p.tiers[name] = tok

	t := Tier{Name: name}
	seen := make(map[string]caddyfile.Token)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		if err := tierOption(d, &t, seen); err != nil {
			return err
		}
	}
	if err := t.checkQuota(); err != nil {
		return blame(err, seen, tok)
	}
	for _, tm := range t.Meters {
		p.tierMeters[name+"\x00"+tm.Meter] = seen["meter "+tm.Meter]
	}
	for _, gap := range excludeGaps(t.Exclude) {
		caddy.Log().Named("caddyfile.api_monetize").Warn(excludeGapAdvice(t.Name, gap), zap.String("file", tok.File), zap.Int("line", tok.Line))
	}
	p.app.Tiers = append(p.app.Tiers, t)
	return nil
}

// tierOption parses one line of a tier block; the cursor is on the option
// name.
func tierOption(d *caddyfile.Dispenser, t *Tier, seen map[string]caddyfile.Token) error {
	opt := d.Val()
	switch opt {
	case "endpoints", "exclude":
		args, err := lineArgs(d)
		if err != nil {
			return err
		}
		if len(args) == 0 {
			return d.Errf("%s: expected at least one path pattern, such as /v1/*", opt)
		}
		for _, pat := range args {
			if err := checkPathPattern(pat); err != nil {
				return d.Errf("%s: %v", opt, err)
			}
		}
		if opt == "endpoints" {
			t.Endpoints = append(t.Endpoints, args...)
		} else {
			t.Exclude = append(t.Exclude, args...)
		}
		return nil
	case "features":
		args, err := lineArgs(d)
		if err != nil {
			return err
		}
		if len(args) == 0 {
			return d.Errf("tier %s: features: expected at least one feature name, as in 'features bulk_export priority_routing'", t.Name)
		}
		for _, f := range args {
			if err := checkFeature(t.Name, t.Features, f); err != nil {
				return d.Err(err.Error())
			}
			t.Features = append(t.Features, f)
		}
		return nil
	case "meter":
		return parseTierMeter(d, t, seen)
	}

	if err := once(d, seen); err != nil {
		return fmt.Errorf("tier %s: %w", t.Name, err)
	}
	switch opt {
	case "price":
		v, err := oneArg(d)
		if err != nil {
			return err
		}
		price, err := parsePrice(v)
		if err != nil {
			return d.Errf("price '%s': %v", v, err)
		}
		t.Price = price
	case "included":
		v, err := oneArg(d)
		if err != nil {
			return err
		}
		inc, err := parseIncluded(v)
		if err != nil {
			return d.Errf("included '%s': %v", v, err)
		}
		t.Included = inc
	case "rate":
		args, err := lineArgs(d)
		if err != nil {
			return err
		}
		rate, err := parseRate(args)
		if err != nil {
			return d.Errf("rate '%s': %v", strings.Join(args, " "), err)
		}
		t.Rate = rate
	case "support":
		v, err := oneArg(d)
		if err != nil {
			return err
		}
		t.Support = v
	case "sla":
		v, err := oneArg(d)
		if err != nil {
			return err
		}
		if err := checkSLA(v); err != nil {
			return d.Errf("sla '%s': %v", v, err)
		}
		t.SLA = v
	case "on_store_error":
		v, err := oneArg(d)
		if err != nil {
			return err
		}
		switch v {
		case storeErrorLocal, storeErrorAllow, storeErrorDeny:
		default:
			return d.Errf("on_store_error: expected local, allow or deny, got '%s'", v)
		}
		t.OnStoreError = v
	case "over_quota":
		args, err := lineArgs(d)
		if err != nil {
			return err
		}
		oq, err := metering.ParseOverQuota(args)
		if err != nil {
			return d.Errf("tier %s: %v", t.Name, err)
		}
		t.OverQuota = &OverQuota{Mode: oq.Mode, PriceMicros: oq.PriceMicros}
		if p := oq.Throttle; p != nil {
			t.OverQuota.Throttle = rateOf(*p)
		}
	case "period":
		args, err := lineArgs(d)
		if err != nil {
			return err
		}
		rule, err := metering.ParsePeriodRule(args)
		if err != nil {
			return d.Errf("tier %s: %v", t.Name, err)
		}
		t.Period = &Period{Anniversary: rule.Anniversary}
		if len(args) == 2 {
			t.Period.Zone = args[1] // as written; checked by ParsePeriodRule
		}
	case "thresholds":
		args, err := lineArgs(d)
		if err != nil {
			return err
		}
		ts, err := parseThresholds(args)
		if err != nil {
			return d.Errf("tier %s: %v", t.Name, err)
		}
		t.Thresholds = ts
	default:
		return d.Errf("tier %s: unrecognized option '%s'; expected one of price, included, over_quota, period, thresholds, rate, endpoints, exclude, features, meter, support, sla, on_store_error", t.Name, opt)
	}
	return nil
}

// customer parses `customer <id> tier <tier> [stripe <cus_id>] [email
// <address>] [anchor <YYYY-MM-DD>]`, options in any order.
func (p *appParser) customer(d *caddyfile.Dispenser) error {
	if !d.NextArg() {
		return d.Err("customer: expected an id, as in 'customer acme tier pro'")
	}
	id, tok := d.Val(), d.Token()
	if err := checkName(id); err != nil {
		return d.Errf("customer '%s': %v", id, err)
	}
	if prev, dup := p.customers[id]; dup {
		return d.Errf("customer '%s' is declared twice (first at %s)", id, position(prev))
	}
	p.customers[id] = tok

	c := CustomerConfig{ID: id}
	seen := make(map[string]caddyfile.Token)
	for d.NextArg() {
		opt := d.Val()
		if err := once(d, seen); err != nil {
			return fmt.Errorf("customer %s: %w", id, err)
		}
		if !d.NextArg() {
			return d.Errf("customer %s: '%s' needs a value", id, opt)
		}
		v := d.Val()
		switch opt {
		case "tier":
			c.Tier = v
			p.customerTiers = append(p.customerTiers, reference{name: v, tok: d.Token()})
		case "stripe":
			if err := checkStripeCustomerID(v); err != nil {
				return d.Errf("customer %s: stripe: %v, got '%s'", id, err, v)
			}
			c.StripeCustomerID = v
		case "email":
			if err := checkEmail(v); err != nil {
				return d.Errf("customer %s: email: %v, got '%s'", id, err, v)
			}
			c.Email = v
		case "anchor":
			if _, err := time.Parse(time.DateOnly, v); err != nil {
				return d.Errf("customer %s: anchor expects a date written YYYY-MM-DD, got '%s'", id, v)
			}
			c.Anchor = v
		default:
			return d.Errf("customer %s: unrecognized option '%s'; expected tier, stripe, email or anchor", id, opt)
		}
	}
	if err := noBlock(d, "customer"); err != nil {
		return err
	}
	if c.Tier == "" {
		return d.Errf("customer %s: missing 'tier <name>', as in 'customer %s tier pro'", id, id)
	}
	p.app.Customers = append(p.app.Customers, c)
	return nil
}

// key parses `key <key> <customer>`. The key is never echoed in errors.
func (p *appParser) key(d *caddyfile.Dispenser) error {
	args, err := lineArgs(d)
	if err != nil {
		return err
	}
	if len(args) != 2 && len(args) != 4 {
		return d.Errf("key: expected 'key <key> <customer id> [expires <RFC 3339 date>]', got %d arguments", len(args))
	}
	key, customer := args[0], args[1]
	expires := ""
	if len(args) == 4 {
		if args[2] != "expires" {
			return d.Errf("key of customer %s: unexpected '%s'; only 'expires <RFC 3339 date>' may follow the customer id", customer, args[2])
		}
		if _, err := parseKeyExpiry(args[3]); err != nil {
			return d.Errf("key of customer %s: %v", customer, err)
		}
		expires = args[3]
	}
	if !hasPlaceholder(key) {
		if err := apikey.Check(key); err != nil {
			return d.Errf("key of customer %s: not a usable API key: it needs at least %d characters, and one starting with %s must carry a valid checksum; better, use a placeholder such as {env.ACME_KEY}", customer, apikey.MinLength, apikey.Prefix)
		}
	}
	if prev, dup := p.keys[key]; dup {
		return d.Errf("key of customer %s: the same key is declared twice (first at %s)", customer, position(prev))
	}
	p.keys[key] = d.Token()
	p.keyCustomers = append(p.keyCustomers, reference{name: customer, tok: d.Token()})
	p.app.Keys = append(p.app.Keys, KeyConfig{Key: key, Customer: customer, Expires: expires})
	return nil
}

// check verifies the references between tiers, customers and keys once the
// whole block is read.
func (p *appParser) check() error {
	if len(p.tiers) == 0 {
		return errAt(p.start, "api_monetize: no tier defined; add at least one 'tier <name> { ... }'")
	}
	if err := p.checkMeters(); err != nil {
		return err
	}
	if err := p.app.validate(); err != nil {
		return blame(err, p.seen, p.start)
	}
	for _, r := range p.customerTiers {
		if _, ok := p.tiers[r.name]; !ok {
			return errAt(r.tok, "unknown tier '%s'; declared tiers: %s", r.name, names(p.tiers))
		}
	}
	for _, r := range p.keyCustomers {
		if _, ok := p.customers[r.name]; !ok {
			return errAt(r.tok, "key for undeclared customer '%s'; add 'customer %s tier <tier>'", r.name, r.name)
		}
	}
	return nil
}

// lineArgs returns the remaining arguments of the current option and
// refuses a block after them: none of the options parsed with it takes one.
func lineArgs(d *caddyfile.Dispenser) ([]string, error) {
	opt := d.Val()
	args := d.RemainingArgs()
	return args, noBlock(d, opt)
}

// onceArgs reads the arguments of an option that may be given once.
func onceArgs(d *caddyfile.Dispenser, seen map[string]caddyfile.Token) ([]string, error) {
	if err := once(d, seen); err != nil {
		return nil, err
	}
	return lineArgs(d)
}

// single reads an option that may be given once, with one value.
func single(d *caddyfile.Dispenser, seen map[string]caddyfile.Token) (string, error) {
	if err := once(d, seen); err != nil {
		return "", err
	}
	return oneArg(d)
}

// oneArg returns the single argument of the current option.
func oneArg(d *caddyfile.Dispenser) (string, error) {
	opt := d.Val()
	args, err := lineArgs(d)
	if err != nil {
		return "", err
	}
	if len(args) != 1 {
		return "", d.Errf("%s: expected exactly one value, got %d", opt, len(args))
	}
	return args[0], nil
}

// noBlock fails if a { } block follows the arguments of opt, which have
// all been read.
func noBlock(d *caddyfile.Dispenser, opt string) error {
	if d.NextLine() {
		d.Prev()
		return nil
	}
	// Anything left on the line is not an argument: a block opening.
	if d.Next() {
		return d.Errf("unexpected block after '%s': this option takes no block", opt)
	}
	return nil
}

// once records the option under the cursor and fails if it was seen before.
func once(d *caddyfile.Dispenser, seen map[string]caddyfile.Token) error {
	opt := d.Val()
	if prev, dup := seen[opt]; dup {
		return d.Errf("'%s' is given twice (first at %s)", opt, position(prev))
	}
	seen[opt] = d.Token()
	return nil
}

// errAt builds an error located at tok, worded like Dispenser.Errf.
func errAt(tok caddyfile.Token, format string, args ...any) error {
	d := caddyfile.NewDispenser([]caddyfile.Token{tok})
	d.Next()
	return d.Errf(format, args...)
}

// blame returns err at the line of the option it names (a *fieldError
// whose option is in seen), else at the line of tok.
func blame(err error, seen map[string]caddyfile.Token, tok caddyfile.Token) error {
	var fe *fieldError
	if errors.As(err, &fe) {
		if at, ok := seen[fe.Option]; ok {
			tok = at
		}
	}
	return errAt(tok, "%s", err.Error())
}

// position is "file:line" of tok.
func position(tok caddyfile.Token) string {
	return tok.File + ":" + strconv.Itoa(tok.Line)
}

// names lists the keys of m, sorted, for error messages.
func names(m map[string]caddyfile.Token) string {
	if len(m) == 0 {
		return "none"
	}
	return strings.Join(slices.Sorted(maps.Keys(m)), ", ")
}

// hasPlaceholder reports whether s holds a {placeholder}, whose value is
// only known when the config is loaded.
func hasPlaceholder(s string) bool {
	return strings.Contains(s, "{") && strings.Contains(s, "}")
}

// validHeaderName reports whether s is an RFC 9110 field name (a token).
func validHeaderName(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' {
			continue
		}
		if !strings.ContainsRune("!#$%&'*+-.^_`|~", rune(c)) {
			return false
		}
	}
	return true
}

// parsePrice parses "0", "custom" or "<amount>/<month|year>". A zero
// amount returns nil: the tier is free.
func parsePrice(s string) (*Price, error) {
	if s == "custom" {
		return &Price{Custom: true}, nil
	}
	amount, interval, hasInterval := strings.Cut(s, "/")
	micros, err := metering.ParseMicros(amount)
	if err != nil {
		return nil, err
	}
	if hasInterval && interval != "month" && interval != "year" {
		return nil, fmt.Errorf("the interval must be month or year, as in 49.00/month, got '%s'", interval)
	}
	if micros == 0 {
		return nil, nil
	}
	if !hasInterval {
		return nil, fmt.Errorf("expected an interval, as in %s/month or %s/year (or 'price 0', 'price custom')", amount, amount)
	}
	return &Price{AmountMicros: micros, Interval: interval}, nil
}

// parseIncluded parses "<units>/month".
func parseIncluded(s string) (*Included, error) {
	n, interval, ok := strings.Cut(s, "/")
	units, err := metering.ParseUnits(n)
	if err != nil {
		return nil, errors.New("expected a whole number of units per month, as in 50000/month")
	}
	if !ok || interval != "month" {
		return nil, fmt.Errorf("included units are counted per month; write %s/month", n)
	}
	return &Included{Units: units, Interval: "month"}, nil
}

// parseRate parses the arguments of rate, "<n>/<window> [burst <b>]",
// with metering.ParseRateArgs, the grammar over_quota throttle uses too.
func parseRate(args []string) (*Rate, error) {
	p, rest, err := metering.ParseRateArgs(args)
	if err != nil {
		return nil, err
	}
	if len(rest) > 0 {
		return nil, fmt.Errorf("unexpected '%s'; only 'burst <units>' may follow the rate", rest[0])
	}
	return rateOf(p), nil
}

// rateOf is the config form of a parsed rate policy.
func rateOf(p limiter.Policy) *Rate {
	return &Rate{Limit: p.Limit, Window: caddy.Duration(p.Period), Burst: p.Burst}
}

// parseThresholds parses the arguments of thresholds: distinct whole
// percentages from 1 to metering.MaxThreshold in ascending order, or "off",
// which returns an empty, non-nil slice. metering.ParseThresholds, which the
// app uses too, decides what is valid; the written order is checked here so
// that the Caddyfile reads as it is applied.
func parseThresholds(args []string) ([]int, error) {
	if len(args) > 1 && slices.Contains(args, "off") {
		return nil, errors.New("thresholds: off stands alone; it turns thresholds off")
	}
	ts, err := metering.ParseThresholds(args)
	if err != nil || len(ts) == 0 { // invalid, or off
		return ts, err
	}
	for i, a := range args {
		if v, _ := metering.ParseThresholds([]string{a}); len(v) != 1 || v[0] != ts[i] {
			return nil, fmt.Errorf("thresholds: write the percentages in ascending order, as in 'thresholds %s'", joinInts(ts))
		}
	}
	return ts, nil
}

// joinInts writes ns separated by spaces.
func joinInts(ns []int) string {
	s := make([]string, len(ns))
	for i, n := range ns {
		s[i] = strconv.Itoa(n)
	}
	return strings.Join(s, " ")
}

// parseBillOn parses the arguments of bill_on with metering.ParseBillOn,
// which the app uses too, and refuses tokens that repeat or that a class
// on the same line already covers. Classes are returned in lower case.
func parseBillOn(args []string) ([]string, error) {
	if len(args) == 0 {
		return nil, errors.New("bill_on: expected status classes 1xx to 5xx or status codes 100 to 599, as in 'bill_on 2xx 3xx'")
	}
	out := make([]string, len(args))
	for i, a := range args {
		if _, err := metering.ParseBillOn([]string{a}); err != nil {
			return nil, fmt.Errorf("bill_on: '%s' is neither a status class 1xx to 5xx nor a status code 100 to 599", a)
		}
		out[i] = strings.ToLower(a)
	}
	for i, a := range out {
		if slices.Contains(out[:i], a) {
			return nil, fmt.Errorf("bill_on: '%s' is listed twice", a)
		}
		if class := a[:1] + "xx"; a != class && slices.Contains(out, class) {
			return nil, fmt.Errorf("bill_on: %s is already billable as part of %s", a, class)
		}
	}
	return out, nil
}

// Interface guards
var (
	_ caddyfile.Unmarshaler = (*App)(nil)
)
