// Package module holds the api_monetize Caddy modules: the app (shared
// state, store, background work), the HTTP handler that enforces keys, tiers
// and rate limits, the admin API, and their Caddyfile parsing.
package module

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/apimonetize/caddy-api-monetize/apikey"
	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/store"
)

func init() {
	caddy.RegisterModule(new(App))
}

// App is the api_monetize app. It owns the store, the tier catalog and the
// customer/key registry shared by every api_monetize handler, and runs the
// background work. Configure it with the api_monetize global option.
type App struct {
	// Redis is the URL of a Redis server shared by every Caddy instance
	// (redis://[user:password@]host:port/db, rediss:// for TLS,
	// unix:///path/redis.sock?db=N for a local Unix socket). Empty means the
	// embedded store in Caddy's data directory.
	Redis string `json:"redis,omitempty"`
	// RedisCluster is, instead of Redis, the seed URL of a Redis Cluster
	// (Redis 7+ or Valkey) shared by every Caddy instance, in go-redis's
	// cluster form: redis://[user:password@]host:port?addr=host2:port2&addr=host3:port3
	// (rediss:// for TLS). See docs/redis-cluster.md.
	RedisCluster string `json:"redis_cluster,omitempty"`
	// RedisWaitReplicas, when positive, makes the Redis store answer a
	// metering call only once that many replicas have it (WAIT, up to a
	// quarter of store_timeout, then it answers anyway): it narrows what a
	// failover can lose. Default 0 (Redis's asynchronous replication). A
	// change applies at the next start. See docs/redis-cluster.md.
	RedisWaitReplicas int `json:"redis_wait_replicas,omitempty"`
	// RedisPrefix is prepended to every Redis key, so several deployments
	// can share one Redis. Default: "am:".
	RedisPrefix string `json:"redis_prefix,omitempty"`
	// StorePath is the embedded store's file. Default:
	// <Caddy data dir>/api_monetize/store.db.
	StorePath string `json:"store_path,omitempty"`
	// StoreFlushInterval is how often the embedded store writes metered
	// usage from its write-ahead log into the store file, with one disk
	// sync. A process crash loses nothing; a machine crash can lose about
	// this much usage. Default: 1s.
	StoreFlushInterval caddy.Duration `json:"store_flush_interval,omitempty"`
	// StoreTimeout bounds every store call made while serving a request.
	// Default: 100ms.
	StoreTimeout caddy.Duration `json:"store_timeout,omitempty"`
	// KeySecret is the HMAC secret API keys are hashed with; use a
	// placeholder such as {env.API_MONETIZE_KEY_SECRET}. When empty, a
	// secret is generated once and kept in the store, so every instance
	// sharing the store agrees.
	KeySecret string `json:"key_secret,omitempty"`
	// AdminAPI is "read_only" (default) or "read_write". The admin API on
	// Caddy's admin endpoint only creates customers, changes tiers, issues
	// and revokes keys when this is "read_write".
	AdminAPI string `json:"admin_api,omitempty"`
	// UpgradeURL is where 403 and 429 responses tell callers to upgrade
	// their plan.
	UpgradeURL string `json:"upgrade_url,omitempty"`
	// RateLimitHeaders chooses the rate-limit headers sent to identified
	// callers: "both" (default) sends RateLimit-Policy and RateLimit (the
	// IETF draft) and X-RateLimit-Limit, -Remaining and -Reset; "ietf" the
	// first two, "legacy" the last three, "none" neither. Retry-After on
	// 429 and 503 responses is always sent.
	RateLimitHeaders string `json:"rate_limit_headers,omitempty"`
	// Currency is the ISO 4217 code prices are in (lower case). Default:
	// "usd".
	Currency string `json:"currency,omitempty"`
	// BillOn lists the response classes ("2xx") and codes ("404") that are
	// billable. Default: 2xx and 3xx. Anything else, a proxy error or a
	// client gone before the status, releases the reserved cost.
	BillOn []string `json:"bill_on,omitempty"`
	// UsageCostHeader names a response header a trusted upstream sets to
	// the request's real cost in units; it replaces the reserved cost and is
	// removed before the response reaches the client.
	UsageCostHeader string `json:"usage_cost_header,omitempty"`
	// MaxUsageCost caps the value of UsageCostHeader. Default: 1000000.
	MaxUsageCost int64 `json:"max_usage_cost,omitempty"`
	// Thresholds are the percentages of a tier's included units whose
	// crossing is recorded once per customer and period. Default: 80 100
	// 120.
	Thresholds []int `json:"thresholds,omitzero"`
	// Idempotency is how the Idempotency-Key request header is honoured.
	// Nil: the defaults (a 24h window, 3 unbilled repeats).
	Idempotency *IdempotencyConfig `json:"idempotency,omitempty"`
	// AuthFailures throttles failed authentications per client address.
	// Nil: 20 failures per minute per address.
	AuthFailures *AuthFailureLimit `json:"auth_failures,omitempty"`
	// Stripe connects the app to Stripe (usage reporting, catalog sync,
	// subscription webhooks). Nil: no Stripe.
	Stripe *StripeConfig `json:"stripe,omitempty"`
	// Notify delivers quota threshold notifications. Nil: none (crossings
	// are still recorded and listed by the admin API).
	Notify *NotifyConfig `json:"notify,omitempty"`
	// Meters are the meters besides the default one (the request's cost
	// units): tokens a trusted upstream reports, request or response
	// bytes. Each is counted for every tier; a tier's Meters give it
	// included units and an over-quota behaviour. See docs/meters.md.
	Meters []MeterConfig `json:"meters,omitempty"`
	// Tiers are the plans customers can be on, in the order they are
	// offered.
	Tiers []Tier `json:"tiers,omitempty"`
	// Customers are upserted into the store at start.
	Customers []CustomerConfig `json:"customers,omitempty"`
	// Keys are upserted into the store at start.
	Keys []KeyConfig `json:"keys,omitempty"`

	billOn       metering.BillOn
	headers      headerSet
	maxUsageCost int64
	// costHeader is UsageCostHeader in canonical form.
	costHeader  string
	idempotency idempotency
	tiers       []*tierRuntime
	meters      []*meterRuntime // nil without meters
	tierByName  map[string]*tierRuntime
	shared      *shared
	sharedKey   string
	keyHasher   *apikey.Hasher // for the configured secret; nil when the store keeps one
	authGuard   *authGuard     // nil when auth_failures is off
	timeout     time.Duration
	logger      *zap.Logger

	// tasks are the background loops (Stripe reporter, notifier) Start runs
	// until Stop; each returns when its context is done.
	tasks []func(ctx context.Context)
	// stripeRun reaches the running Stripe reporter; nil without Stripe.
	stripeRun *stripeRunner

	// identityWanted is set when an api_monetize_usage handler or an
	// api_monetize_feature matcher uses this
	// app: the api_monetize handler then leaves the caller it authenticated
	// in the request's variables (see setIdentity).
	identityWanted atomic.Bool

	ready chan struct{} // closed when Start has upserted the configuration
	// removedKeysRevoked is set once keys dropped from the configuration
	// have been revoked.
	removedKeysRevoked bool
	// syncedHash is the hash of the configured customers and keys this app
	// last stored (configsync.go); empty before.
	syncedHash string
	bgCancel   context.CancelFunc
	bgWG       sync.WaitGroup
	// releaseRedisLog stops routing go-redis's log lines to this app's
	// logger (see redisLogs); nil when the app does not use Redis.
	releaseRedisLog func()
}

// CaddyModule returns the Caddy module information.
func (*App) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "api_monetize",
		New: func() caddy.Module { return new(App) },
	}
}

// Provision compiles the tiers and obtains the shared store. It does no I/O:
// the store is opened lazily, so `caddy validate` touches nothing.
func (a *App) Provision(ctx caddy.Context) error {
	a.logger = ctx.Logger()
	a.ready = make(chan struct{})
	a.timeout = time.Duration(a.StoreTimeout)
	if a.timeout <= 0 {
		a.timeout = 100 * time.Millisecond
	}
	repl := caddy.NewReplacer()
	if a.KeySecret != "" {
		secret := repl.ReplaceAll(a.KeySecret, "")
		if len(secret) < 16 {
			return fmt.Errorf("key_secret must be at least 16 characters once placeholders are replaced (got %d); unset it to let the store generate one", len(secret))
		}
		a.keyHasher = apikey.NewHasher([]byte(secret))
	}
	switch a.AdminAPI {
	case "", "read_only", "read_write":
	default:
		return fmt.Errorf("admin_api: expected read_only or read_write, got %q", a.AdminAPI)
	}
	headers, err := parseHeaderSet(a.RateLimitHeaders)
	if err != nil {
		return err
	}
	a.headers = headers
	if err := a.validate(); err != nil {
		return err
	}
	if a.authGuard, err = newAuthGuard(a.AuthFailures); err != nil {
		return err
	}
	if err := a.compileMetering(); err != nil {
		return err
	}
	if err := a.compileTiers(); err != nil {
		return err
	}
	if err := a.checkCustomers(repl); err != nil {
		return err
	}
	if err := registerMetrics(ctx.GetMetricsRegistry()); err != nil {
		return err
	}

	redisURL := repl.ReplaceAll(a.Redis, "")
	cluster := a.RedisCluster != ""
	if cluster {
		redisURL = repl.ReplaceAll(a.RedisCluster, "")
		if redisURL == "" {
			return errors.New("redis_cluster: the URL is empty once its placeholders are replaced")
		}
		if err := checkRedisClusterURL(redisURL); err != nil {
			return err
		}
	}
	path := repl.ReplaceAll(a.StorePath, "")
	if redisURL == "" && path == "" {
		path = filepath.Join(caddy.AppDataDir(), "api_monetize", "store.db")
	}
	key, open := storeOpener(storeConfig{
		redisURL: redisURL, redisCluster: cluster, redisPrefix: repl.ReplaceAll(a.RedisPrefix, ""), path: path,
		waitReplicas: a.RedisWaitReplicas,
		timeout:      a.timeout, flushInterval: time.Duration(a.StoreFlushInterval),
	}, a.logger)
	spoolDir := ""
	if redisURL != "" {
		sum := sha256.Sum256([]byte(key))
		spoolDir = filepath.Join(caddy.AppDataDir(), "api_monetize", "spool", hex.EncodeToString(sum[:8]))
	}
	val, _, err := sharedPool.LoadOrNew(key, func() (caddy.Destructor, error) {
		return newShared(open, spoolDir), nil
	})
	if err != nil {
		return err
	}
	a.sharedKey = key
	a.shared = val.(*shared)
	a.tasks = append(a.tasks, a.keyUseLoop)
	if err := a.provisionStripe(ctx); err != nil {
		return err
	}
	return a.provisionNotify(ctx)
}

// compileMetering validates the app-wide metering options.
func (a *App) compileMetering() error {
	if a.Currency != "" {
		if _, err := metering.ParseCurrency(a.Currency); err != nil {
			return err
		}
	}
	if len(a.BillOn) > 0 {
		classes, err := parseBillOn(a.BillOn)
		if err != nil {
			return err
		}
		a.billOn, _ = metering.ParseBillOn(classes) // parseBillOn checked each
	}
	a.maxUsageCost = a.MaxUsageCost
	if a.UsageCostHeader != "" {
		a.costHeader = http.CanonicalHeaderKey(a.UsageCostHeader)
	}
	if a.maxUsageCost <= 0 {
		a.maxUsageCost = 1_000_000
	}
	idem, err := compileIdempotency(a.Idempotency)
	if err != nil {
		return err
	}
	a.idempotency = idem
	if len(a.Thresholds) > 0 {
		if _, err := parseThresholds(intArgs(a.Thresholds)); err != nil {
			return err
		}
	}
	return nil
}

// checkCustomers validates declared customers and keys, resolving key
// placeholders.
func (a *App) checkCustomers(repl *caddy.Replacer) error {
	customers := make(map[string]bool, len(a.Customers))
	for _, c := range a.Customers {
		// Customer ids are parts of store keys and record ids ("|" separates
		// a Stripe mark's customer, meter and hour): the Caddyfile's rule.
		if err := checkName(c.ID); err != nil {
			return fmt.Errorf("customer %q: %v", c.ID, err)
		}
		if _, ok := a.tierByName[c.Tier]; !ok {
			return fmt.Errorf("customer %q: unknown tier %q", c.ID, c.Tier)
		}
		if c.Anchor != "" {
			if _, err := time.Parse(time.DateOnly, c.Anchor); err != nil {
				return fmt.Errorf("customer %q: anchor must be YYYY-MM-DD: %v", c.ID, err)
			}
		}
		if c.StripeCustomerID != "" {
			if err := checkStripeCustomerID(c.StripeCustomerID); err != nil {
				return fmt.Errorf("customer %q: stripe_customer_id: %v", c.ID, err)
			}
		}
		if c.Email != "" {
			if err := checkEmail(c.Email); err != nil {
				return fmt.Errorf("customer %q: email: %v", c.ID, err)
			}
		}
		customers[c.ID] = true
	}
	// owner is the declaration of each resolved key, to refuse one key for
	// two customers (two placeholders whose variables hold the same value):
	// otherwise the last declaration would silently win.
	type declaration struct {
		n        int
		customer string
	}
	owner := make(map[string]declaration, len(a.Keys))
	for i, k := range a.Keys {
		if !customers[k.Customer] {
			return fmt.Errorf("key #%d: unknown customer %q", i+1, k.Customer)
		}
		if _, err := parseKeyExpiry(k.Expires); err != nil {
			return fmt.Errorf("key #%d of customer %q: %v", i+1, k.Customer, err)
		}
		key := repl.ReplaceAll(k.Key, "")
		if err := apikey.Check(key); err != nil {
			return fmt.Errorf("key #%d of customer %q: must be at least %d characters once placeholders are replaced (is its environment variable set?), and a key starting with %q must carry a valid checksum",
				i+1, k.Customer, apikey.MinLength, apikey.Prefix)
		}
		if prev, dup := owner[key]; dup && prev.customer != k.Customer {
			return fmt.Errorf("key #%d of customer %q is the same key as key #%d of customer %q (check their placeholders' values): a key belongs to one customer",
				i+1, k.Customer, prev.n, prev.customer)
		}
		owner[key] = declaration{n: i + 1, customer: k.Customer}
	}
	return nil
}

// Start opens the store if needed, starts the shared change watcher, and
// upserts the configured customers and keys. When the store cannot be
// reached, Caddy still starts: handlers apply on_store_error, and the
// upsert is retried in the background until it succeeds.
func (a *App) Start() error {
	bg, cancel := context.WithCancel(context.Background())
	a.bgCancel = cancel
	if a.Redis != "" || a.RedisCluster != "" {
		a.releaseRedisLog = redisLogs.use(a.logger)
	}
	if err := a.shared.start(a.logger); err != nil {
		a.stopRedisLog()
		cancel()
		return err
	}
	err := a.syncConfig(bg)
	close(a.ready)
	if err != nil {
		a.logger.Error("could not store the configured customers and keys; retrying in the background", zap.Error(err))
	}
	a.bgWG.Add(1)
	go a.resyncLoop(bg, err == nil)
	for _, task := range a.tasks {
		a.bgWG.Add(1)
		go func() {
			defer a.bgWG.Done()
			defer recoverLog(a.logger)
			task(bg)
		}()
	}
	return nil
}

// configResyncInterval is how often the configured customers and keys are
// checked, so a store that lost its data (a Redis restarted without
// persistence) gets them back without a reload, as a backstop: such a loss
// is noticed within seedCheckInterval through the seed marker (reseed.go).
// Unchanged customers are not rewritten, and the whole configuration is
// written again only when the store's configuration hash is not this
// app's (see configUnchanged), or every configFullResyncInterval.
// Tests shorten it, so it is atomic.
var configResyncInterval atomic.Int64

func init() { configResyncInterval.Store(int64(time.Minute)) }

// resyncLoop retries a failed initial sync with backoff, then re-asserts
// the configuration every configResyncInterval, and at once when the
// store's seed marker shows it lost its data (checked every
// seedCheckInterval, or signalled by a key lookup), until ctx is done.
func (a *App) resyncLoop(ctx context.Context, synced bool) {
	defer a.bgWG.Done()
	defer recoverLog(a.logger)
	if st, err := a.store(); err == nil {
		a.shared.warnPersistence(ctx, st, a.logger)
	}
	backoff := 100 * time.Millisecond
	lastSync, lastFull := time.Now(), time.Now()
	for {
		wait := min(seedCheckInterval, time.Duration(configResyncInterval.Load()))
		if !synced {
			wait = backoff
			backoff = min(2*backoff, 10*time.Second)
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		case <-a.shared.seed.kick:
			t.Stop()
		}
		due := time.Since(lastSync) >= time.Duration(configResyncInterval.Load())
		if synced && !due {
			st, err := a.store()
			if err != nil {
				continue
			}
			if lost, _ := a.shared.checkSeed(ctx, st); !lost {
				continue
			}
		}
		if synced && due {
			resyncChecks.Add(1)
		}
		// Due, not lost: one read when the store has this configuration.
		if synced && due && time.Since(lastFull) < configFullResyncInterval && a.seedIntact(ctx) && a.configUnchanged(ctx) {
			lastSync = time.Now()
			continue
		}
		err := a.syncConfig(ctx)
		if err == nil {
			lastFull = time.Now()
		}
		switch {
		case err == nil && !synced:
			a.logger.Info("stored the configured customers and keys")
		case err != nil && synced:
			a.logger.Error("could not re-store the configured customers and keys", zap.Error(err))
		}
		synced = err == nil
		if synced {
			lastSync = time.Now()
			backoff = 100 * time.Millisecond
		}
	}
}

// Stop stops the app's background work and waits for it.
func (a *App) Stop() error {
	if a.bgCancel != nil {
		a.bgCancel()
	}
	a.bgWG.Wait()
	a.stopRedisLog()
	return nil
}

// stopRedisLog stops routing go-redis's log lines to this app's logger.
func (a *App) stopRedisLog() {
	if a.releaseRedisLog != nil {
		a.releaseRedisLog()
	}
}

// Cleanup releases the shared store reference. It is safe to call on a
// partially provisioned app.
func (a *App) Cleanup() error {
	if a == nil || a.sharedKey == "" {
		return nil
	}
	_, err := sharedPool.Delete(a.sharedKey)
	a.sharedKey = ""
	return err
}

// syncConfig upserts declared customers and keys into the store.
func (a *App) syncConfig(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	st, err := a.shared.open()
	if err != nil {
		return err
	}
	token, err := a.shared.claimSeed(ctx, st)
	if err != nil {
		return fmt.Errorf("claiming the seed marker: %w", err)
	}
	if a.keyHasher == nil {
		if err := a.shared.reassertSecret(ctx, st); err != nil {
			return err
		}
	}
	hasher, err := a.hasher(ctx)
	if err != nil {
		return err
	}
	now := time.Now().UTC()
	sum := sha256.New() // of what is stored, for configUnchanged
	for _, c := range a.Customers {
		fmt.Fprintf(sum, "c\x00%s\x00%s\x00%s\x00%s\x00%s\x00", c.ID, c.Tier, c.StripeCustomerID, c.Email, c.Anchor)
		anchor := time.Time{}
		if c.Anchor != "" {
			anchor, _ = time.Parse(time.DateOnly, c.Anchor) // checked in Provision
		}
		_, err := st.UpsertConfigCustomer(ctx, store.Customer{
			ID: c.ID, Tier: c.Tier, ConfigTier: c.Tier,
			StripeCustomerID: c.StripeCustomerID, Email: c.Email,
			Anchor: anchor, CreatedAt: now,
		})
		if err != nil {
			return fmt.Errorf("storing customer %q: %w", c.ID, err)
		}
	}
	repl := caddy.NewReplacer()
	declared := make(map[string]bool, len(a.Keys))
	for _, k := range a.Keys {
		key := repl.ReplaceAll(k.Key, "")
		hash := hasher.Hash(key)
		declared[hash] = true
		fmt.Fprintf(sum, "k\x00%s\x00%s\x00%s\x00", hash, k.Customer, k.Expires)
		expires, _ := parseKeyExpiry(k.Expires) // checked in Provision
		stored, err := st.PutKey(ctx, store.Key{
			ID: apikey.ID(hash), Hash: hash, CustomerID: k.Customer,
			Prefix: apikey.DisplayPrefix(key), CreatedAt: now, FromConfig: true,
			ExpiresAt: expires, ConfigExpiresAt: expires,
		})
		if err != nil {
			return fmt.Errorf("storing a key of customer %q: %w", k.Customer, err)
		}
		if stored.CreatedAt.Equal(now) {
			a.audit(ctx, st, auditEntry{Actor: actorConfig, Action: auditKeyCreated, KeyID: stored.ID, Customer: stored.CustomerID, ExpiresAt: stored.ExpiresAt})
		}
		if a.authGuard != nil {
			a.authGuard.accepted(hasher.Sum(key)) // never throttled, even from a scanner's address
		}
	}
	if !a.removedKeysRevoked {
		if err := a.revokeUndeclaredKeys(ctx, st, declared); err != nil {
			return err
		}
		// Revoked keys stop working at once here.
		a.invalidateKeys()
		a.removedKeysRevoked = true
	}
	if err := a.shared.confirmSeed(ctx, st, token); err != nil {
		return err
	}
	a.recordConfigSynced(ctx, st, hex.EncodeToString(sum.Sum(nil)))
	return nil
}

// revokeUndeclaredKeys revokes the keys an earlier configuration declared
// and this one no longer does. Only a starting app calls it, so an old
// config still running during a reload never revokes the new config's keys.
func (a *App) revokeUndeclaredKeys(ctx context.Context, st store.Store, declared map[string]bool) error {
	customers, err := st.ListCustomers(ctx)
	if err != nil {
		return fmt.Errorf("listing customers: %w", err)
	}
	for _, c := range customers {
		keys, err := st.ListKeys(ctx, c.ID)
		if err != nil {
			return fmt.Errorf("listing keys of customer %q: %w", c.ID, err)
		}
		for _, k := range keys {
			if k.FromConfig && k.Active() && !declared[k.Hash] {
				if _, err := st.RevokeKey(ctx, k.ID); err != nil {
					return fmt.Errorf("revoking removed key %s: %w", k.ID, err)
				}
				a.audit(ctx, st, auditEntry{Actor: actorConfig, Action: auditKeyRevoked, KeyID: k.ID, Customer: k.CustomerID})
			}
		}
	}
	return nil
}

// hasher hashes keys with the configured secret, or the one kept in the
// store.
func (a *App) hasher(ctx context.Context) (*apikey.Hasher, error) {
	if a.keyHasher != nil {
		return a.keyHasher, nil
	}
	return a.shared.storedHasher(ctx)
}

// store returns the opened store.
func (a *App) store() (store.Store, error) { return a.shared.open() }

// invalidateKeys drops this process's cached key lookups, so that a change
// to a key, a customer or a tier applies to the next request here (other
// processes learn through the store's change notifications).
func (a *App) invalidateKeys() { a.shared.registry.invalidate() }

// waitReady blocks until Start has stored the configuration, at most d. On
// a reload the new handlers may run before the new app started.
func (a *App) waitReady(d time.Duration) {
	select {
	case <-a.ready:
		return
	default:
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-a.ready:
	case <-t.C:
	}
}

func newSecret() []byte {
	b := make([]byte, 32)
	_, _ = rand.Read(b) // never fails since Go 1.24
	return b
}

func recoverLog(logger *zap.Logger) {
	if r := recover(); r != nil {
		logger.Error("background task panicked", zap.Any("panic", r), zap.Stack("stack"))
	}
}

// Interface guards
var (
	_ caddy.App          = (*App)(nil)
	_ caddy.Provisioner  = (*App)(nil)
	_ caddy.CleanerUpper = (*App)(nil)
)
