// Package redisstore is the store.Store on Redis, shared by several Caddy
// instances: customers, API key hashes, the key secret and the GCRA
// rate-limit state live in one Redis (6.2 or later), and changes are
// announced on a pub/sub channel.
//
// Every call is bounded by Options.OpTimeout (dial, socket reads and writes
// and the whole call), failures trip a circuit breaker, and both timeouts
// and an open breaker produce errors wrapping store.ErrUnavailable, so a
// request never waits on an unreachable Redis for longer than OpTimeout.
// A call this process could not send in time (local saturation) is not a
// failure: it wraps store.ErrBusy, and a metering script may wait up to
// OverloadWait more for this process while Redis keeps answering (see
// batcher).
//
// Keys, under Options.KeyPrefix (P):
//
//	P{<subject>}:u:<period> the period's hash: usage counters, hours, the
//	                       GCRA state and replay windows (see meter.go)
//	P{<subject>}:rl        GCRA state carried into the next period, while
//	                       it reaches past the period's end
//	Psecret                the key secret
//	Pcust:<id>             customer JSON
//	Pcustomers             sorted set of customer ids (score 0: ordered by id)
//	Pkey:<hash>            key JSON
//	Pkeyid:<id>            key id -> key hash
//	Pcustkeys:{<customer>} sorted set of a customer's key hashes, scored by creation µs
//	Pchanges               pub/sub channel: one message per customer or key change
//	Pactive:<hour>         set of the subjects metered in the UTC hour (see hours.go)
//	Plate                  sorted set of the subjects metered after their hour (hours.go)
//	Pkeyexp                sorted set of active key hashes by expiry (expiry.go)
//	Pinstances             sorted set of live instance ids, scored by the end of their
//	                       heartbeat's ttl (ms, Redis clock; see Heartbeat)
//
// On the request path only the metering scripts run, on keys hash-tagged
// per subject (and, when a threshold is crossed, the global outbox index),
// over connections of their own (see batch.go and resp.go); everything
// else goes through go-redis.
// The metadata operations touch several keys in one transaction and
// assume they live on one node: on a Redis Cluster (Options.Cluster) those
// keys share a hash tag, and the metering scripts go to the master owning
// the subject's slot (see cluster.go for the layout there).
package redisstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// Defaults for Options.
const (
	// DefaultKeyPrefix is the default Options.KeyPrefix.
	DefaultKeyPrefix = "am:"
	// DefaultOpTimeout is the default Options.OpTimeout.
	DefaultOpTimeout = 100 * time.Millisecond
	// DefaultBreakerFailures is the default Options.BreakerFailures.
	DefaultBreakerFailures = 5
	// DefaultBreakerCooldown is the default Options.BreakerCooldown.
	DefaultBreakerCooldown = time.Second
	// OverloadWait bounds how much longer than OpTimeout (or the caller's
	// deadline) a metering script may wait while Redis keeps answering
	// and only this process is saturated: queued for a pipeline, or its
	// reply received but not yet read (see batcher). OpTimeout when
	// larger. Past it the call fails wrapping store.ErrBusy.
	OverloadWait = time.Second
)

// Options configures New.
type Options struct {
	// URL locates Redis: redis://[user:password@]host[:port][/db],
	// rediss:// for TLS or unix://[user:password@]/path?db=N for a Unix
	// socket, as parsed by go-redis's ParseURL. Timeout and
	// retry parameters in the URL are overridden by OpTimeout.
	URL string
	// KeyPrefix starts every Redis key and the change channel
	// (DefaultKeyPrefix when empty).
	KeyPrefix string
	// OpTimeout bounds every call, including connecting, reading and
	// writing (DefaultOpTimeout when zero). Commands are not retried: a
	// rate-limit script that timed out may have run.
	OpTimeout time.Duration
	// BreakerFailures is how many consecutive failed calls open the circuit
	// breaker (DefaultBreakerFailures when zero).
	BreakerFailures int
	// BreakerCooldown is how long the open breaker fails calls at once
	// before letting one probe through (DefaultBreakerCooldown when zero).
	BreakerCooldown time.Duration
	// Cluster makes URL the seed list of a Redis Cluster (Redis 7+ or
	// Valkey) in go-redis's cluster URL form,
	// redis://[user:password@]host:port?addr=host2:port2&addr=host3:port3
	// (rediss:// for TLS), as parsed by go-redis's ParseClusterURL. Keys are
	// then laid out by hash slot (see cluster.go).
	Cluster bool
	// WaitReplicas, when positive, makes every pipeline of metering
	// scripts end with WAIT WaitReplicas WaitTimeout on its connection: a
	// reservation is answered once that many replicas have it, or
	// WaitTimeout passed (then it is answered anyway, and counted by
	// Unreplicated). It narrows what a failover can lose (Redis
	// replication is asynchronous) for one replica round trip per
	// pipeline; it is not a guarantee.
	WaitReplicas int
	// WaitTimeout bounds WAIT (OpTimeout/4 when zero); it must be below
	// OpTimeout.
	WaitTimeout time.Duration

	// dial replaces the network dialer (tests count connection attempts).
	dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// overloadWait replaces OverloadWait (tests).
	overloadWait time.Duration
}

// Store is a store.Store on Redis. It is safe for concurrent use.
type Store struct {
	// client is a *redis.Client, or a *redis.ClusterClient with Cluster.
	client redis.UniversalClient
	prefix string
	// cluster is set with Options.Cluster; nil on a single Redis.
	cluster   *clusterState
	opTimeout time.Duration
	breaker   *breaker
	// scripts sends the metering scripts (single Redis; in a cluster,
	// cluster.shards has one batcher per master).
	scripts *batcher
	// hourMemo and bg are the hour index's writes (see hours.go): those
	// made, and the goroutines making them.
	hourMemo hourMemo
	bg       sync.WaitGroup
	// late are the subjects with a late increment in flight (hours.go).
	lateMu sync.Mutex
	late   map[string]*lateState
	// expiryBuilt is set once the key expiry index holds every key
	// (expiry.go).
	expiryBuilt atomic.Bool

	// life is cancelled by Close, ending every Watch.
	life      context.Context
	end       context.CancelFunc
	closeOnce sync.Once
	closeErr  error
}

var _ store.Store = (*Store)(nil)

// New returns a Store for o. It does no I/O: the first call connects.
func New(o Options) (*Store, error) {
	if o.URL == "" {
		return nil, errors.New("redisstore: no Redis URL")
	}
	if o.Cluster {
		return newCluster(o)
	}
	ro, err := redis.ParseURL(o.URL)
	if err != nil {
		// The URL may hold a password: never repeat it.
		var uerr *url.Error
		if errors.As(err, &uerr) {
			err = uerr.Err
		}
		return nil, fmt.Errorf("redisstore: invalid Redis URL: %w", err)
	}
	if err := o.defaults(); err != nil {
		return nil, err
	}

	ro.DialTimeout = o.OpTimeout
	ro.ReadTimeout = o.OpTimeout
	ro.WriteTimeout = o.OpTimeout
	ro.PoolTimeout = o.OpTimeout
	ro.ContextTimeoutEnabled = true
	// A retried rate-limit script could be spent twice, and a retry would
	// not fit in the time budget anyway.
	ro.MaxRetries = -1
	ro.DialerRetries = 1
	// Keep the connection handshake to HELLO (and AUTH/SELECT when set).
	ro.DisableIdentity = true
	// Pipelines share the main pool: a separate pipeline pool would dial
	// again on the main pool when it cannot connect, doubling the attempts
	// of an outage.
	ro.PipelinePoolSize = -1
	ro.MaintNotificationsConfig = &maintnotifications.Config{Mode: maintnotifications.ModeDisabled}
	if o.dial != nil {
		ro.Dialer = o.dial
	}
	life, end := context.WithCancel(context.Background())
	client := redis.NewClient(ro)
	co := client.Options() // with go-redis's default dialer filled in
	brk := newBreaker(o.BreakerFailures, o.BreakerCooldown)
	s := &Store{
		client: client,
		scripts: newBatcher(&dialer{
			dial: co.Dialer, network: co.Network, addr: co.Addr,
			username: co.Username, password: co.Password, db: co.DB,
		}, o.OpTimeout, max(o.OpTimeout, o.overloadWait)),
		prefix:    o.KeyPrefix,
		opTimeout: o.OpTimeout,
		breaker:   brk,
		life:      life,
		end:       end,
	}
	s.scripts.failing = brk.failing
	o.setWait(s.scripts)
	return s, nil
}

// defaults fills in o's zero values and checks the ranges.
func (o *Options) defaults() error {
	if o.KeyPrefix == "" {
		o.KeyPrefix = DefaultKeyPrefix
	}
	if o.OpTimeout == 0 {
		o.OpTimeout = DefaultOpTimeout
	}
	if o.BreakerFailures == 0 {
		o.BreakerFailures = DefaultBreakerFailures
	}
	if o.BreakerCooldown == 0 {
		o.BreakerCooldown = DefaultBreakerCooldown
	}
	if o.overloadWait == 0 {
		o.overloadWait = OverloadWait
	}
	if o.OpTimeout < 0 || o.BreakerFailures < 0 || o.BreakerFailures > math.MaxInt32 || o.BreakerCooldown < 0 {
		return errors.New("redisstore: negative timeout or cooldown, or breaker threshold out of range")
	}
	if o.WaitTimeout == 0 {
		o.WaitTimeout = o.OpTimeout / 4
	}
	if o.WaitReplicas < 0 || o.WaitTimeout < 0 || o.WaitTimeout >= o.OpTimeout {
		return errors.New("redisstore: negative WaitReplicas, or WaitTimeout not below OpTimeout")
	}
	return nil
}

// setWait makes b end its pipelines with WAIT as o asks.
func (o *Options) setWait(b *batcher) {
	if o.WaitReplicas > 0 {
		b.wait, b.waitReplicas = waitCommand(o.WaitReplicas, o.WaitTimeout), int64(o.WaitReplicas)
	}
}

// Unreplicated counts the pipelines of metering scripts whose WAIT (see
// Options.WaitReplicas) returned before enough replicas acknowledged
// them.
func (s *Store) Unreplicated() int64 {
	if s.cluster == nil {
		return s.scripts.unreplicated.Load()
	}
	s.cluster.mu.RLock()
	defer s.cluster.mu.RUnlock()
	var n int64
	for _, sh := range s.cluster.shards {
		n += sh.scripts.unreplicated.Load()
	}
	return n
}

// Close implements store.Store: it ends every Watch and closes the Redis
// client. Closing again does nothing.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		s.end()
		s.bg.Wait()
		if s.cluster != nil {
			s.cluster.close()
		} else {
			s.scripts.close()
		}
		s.closeErr = s.client.Close()
	})
	return s.closeErr
}

// The catalogue's keys: in a cluster they are spread over buckets (see
// buckets.go); on a single Redis the tags are empty.
func (s *Store) secretKey() string        { return s.prefix + s.tagAt(0) + "secret" }
func (s *Store) custKey(id string) string { return s.prefix + s.tagOf(id) + "cust:" + id }

// customersKey is bucket b's customer index (the one index on a single
// Redis); customersKeyOf is the one listing customer id.
func (s *Store) customersKey(b int) string       { return s.prefix + s.tagAt(b) + "customers" }
func (s *Store) customersKeyOf(id string) string { return s.customersKey(bucketOf(id)) }
func (s *Store) keyKey(hash string) string {
	return s.prefix + s.tagOf(hash) + "key:" + hash
}
func (s *Store) keyIDKey(id string) string { return s.prefix + s.tagOf(id) + "keyid:" + id }
func (s *Store) custKeysKey(id string) string {
	if s.cluster == nil {
		return s.prefix + "custkeys:{" + id + "}"
	}
	return s.prefix + s.tagOf(id) + "custkeys:" + id
}
func (s *Store) changesChannel() string { return s.prefix + "changes" }

// publishIn announces a change of kind what inside a transaction or
// script's pipeline on a single Redis, atomically with the change. In a
// cluster it does nothing: the change is announced by publishAfter once
// written (the channel is not in the change's slot).
func (s *Store) publishIn(ctx context.Context, p redis.Pipeliner, what string) {
	if s.cluster == nil {
		p.Publish(ctx, s.changesChannel(), what)
	}
}

// publishAfter announces a change of kind what that was just written, in a
// cluster (on a single Redis, publishIn did).
func (s *Store) publishAfter(ctx context.Context, what string) error {
	if s.cluster == nil {
		return nil
	}
	return s.cluster.publish(ctx, s.changesChannel(), what)
}

// scriptChannel is the channel a script announces its change on: none in a
// cluster (publishAfter does).
func (s *Store) scriptChannel() string {
	if s.cluster != nil {
		return ""
	}
	return s.changesChannel()
}

// permanent marks errors raised by the store's own checks (a missing
// record, a conflicting id, a corrupt value). They say nothing about
// whether Redis is available.
type permanent struct{ error }

func (p permanent) Unwrap() error { return p.error }

func notFound(kind, id string) error {
	return permanent{fmt.Errorf("redisstore: %s %q: %w", kind, id, store.ErrNotFound)}
}

func decode(kind, id string, data []byte, v any) error {
	if err := json.Unmarshal(data, v); err != nil {
		return permanent{fmt.Errorf("redisstore: corrupt %s %q: %w", kind, id, err)}
	}
	return nil
}

// now is the time the store records for CreatedAt and RevokedAt: UTC,
// without a monotonic reading, so it equals what is read back.
func now() time.Time { return time.Now().UTC().Round(0) }

// call runs op under the circuit breaker with a context bounded by
// OpTimeout, and classifies its error (see finish).
func (s *Store) call(ctx context.Context, op func(ctx context.Context) error) error {
	probe, err := s.breaker.allow()
	if err != nil {
		return err
	}
	octx, cancel := context.WithTimeout(ctx, s.opTimeout)
	var tried *attempts
	if s.cluster != nil {
		octx, tried = withAttempts(octx)
	}
	err = op(octx)
	cancel()
	return s.finish(ctx, probe, afterFailedAttempts(err, tried))
}

// finish reports a call's outcome to the breaker and returns its error:
// unchanged for the store's own errors, wrapping store.ErrBusy when the
// call was never sent (it waited past its deadline in this process's own
// queue or connection pool: local saturation, which the breaker does not
// count), and wrapping store.ErrUnavailable when Redis was unreachable,
// slow (a call sent and not answered by its deadline, the caller's or
// OpTimeout) or refused service.
func (s *Store) finish(ctx context.Context, probe bool, err error) error {
	return finishOn(s.breaker, ctx, probe, err)
}

// finishOn is finish for a call through brk (in a cluster, a master's
// metering scripts have a breaker of their own).
func finishOn(brk *breaker, ctx context.Context, probe bool, err error) error { //nolint:revive // ctx after the breaker reads best here
	if err == nil {
		brk.done(probe, healthy)
		return nil
	}
	var p permanent
	switch {
	case errors.As(err, &p):
		brk.done(probe, healthy)
		return err
	case errors.Is(ctx.Err(), context.Canceled):
		// The caller gave up: nothing is learned about Redis.
		brk.done(probe, unknown)
		return fmt.Errorf("redisstore: %w", err)
	case errors.Is(err, errQueuedBehindStall):
		// Not sent, but because Redis stopped answering the pipelines
		// before it: unavailable, and already counted by those.
		brk.done(probe, unknown)
		return fmt.Errorf("redisstore: %w: %w: %w", store.ErrUnavailable, store.ErrNotSent, err)
	case notSent(err):
		brk.done(probe, unknown)
		return fmt.Errorf("redisstore: %w: %w", store.ErrBusy, err)
	case isReply(err) && !unavailableReply(err):
		brk.done(probe, healthy)
		return fmt.Errorf("redisstore: %w", err)
	default:
		brk.done(probe, failed)
		return fmt.Errorf("redisstore: %w: %w", store.ErrUnavailable, err)
	}
}

// notSent reports an error of a call that never left this process: a
// metering script still queued at its deadline, or a go-redis call that
// waited past its deadline (or PoolTimeout) for a pool connection. go-redis
// returns the context's own error only from that wait: a call sent and not
// answered in time fails with a socket timeout instead.
func notSent(err error) bool {
	return errors.Is(err, errSendTimeout) || errors.Is(err, redis.ErrPoolTimeout) ||
		err == context.DeadlineExceeded //nolint:errorlint // only the bare context error means "not sent"
}

// isReply reports whether err is an error reply from Redis (as opposed to a
// connection, timeout or client error).
func isReply(err error) bool {
	var r redis.Error
	return errors.As(err, &r)
}

// unavailableReplies are error-reply prefixes meaning Redis cannot serve
// now (loading, failing over, out of memory, busy with a script, refusing
// clients or credentials).
var unavailableReplies = []string{
	"LOADING", "READONLY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "BUSY",
	"OOM", "NOAUTH", "WRONGPASS", "NOPERM", "NOREPLICAS", "ERR max number of clients",
}

func unavailableReply(err error) bool {
	msg := err.Error()
	for _, prefix := range unavailableReplies {
		if strings.HasPrefix(msg, prefix) {
			return true
		}
	}
	return false
}

// watchRetry runs fn under WATCH keys, re-running it when another client
// changed a watched key before EXEC, until ctx ends.
func (s *Store) watchRetry(ctx context.Context, fn func(tx *redis.Tx) error, keys ...string) error {
	for {
		err := s.client.Watch(ctx, fn, keys...)
		if !errors.Is(err, redis.TxFailedErr) || ctx.Err() != nil {
			return err
		}
	}
}

// keySecretScript stores ARGV[1] under KEYS[1] unless a secret is there,
// and returns the stored secret.
var keySecretScript = redis.NewScript(`
local v = redis.call('GET', KEYS[1])
if v then return v end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
`)

// KeySecret implements store.Store: the first candidate stored by any
// instance wins.
func (s *Store) KeySecret(ctx context.Context, candidate []byte) ([]byte, error) {
	if len(candidate) == 0 {
		return nil, errors.New("redisstore: empty key secret candidate")
	}
	var secret []byte
	err := s.call(ctx, func(ctx context.Context) error {
		v, err := keySecretScript.Run(ctx, s.client, []string{s.secretKey()}, candidate).Text()
		secret = []byte(v)
		return err
	})
	if err != nil {
		return nil, err
	}
	return secret, nil
}

// createCustomerScript stores a customer unless its id exists, indexes it
// and announces the change. KEYS: customer, index. ARGV: JSON, id, channel
// ("": none).
var createCustomerScript = redis.NewScript(`
if not redis.call('SET', KEYS[1], ARGV[1], 'NX') then return 0 end
redis.call('ZADD', KEYS[2], 0, ARGV[2])
if ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[3], 'customer') end
return 1
`)

// CreateCustomer implements store.Store.
func (s *Store) CreateCustomer(ctx context.Context, c store.Customer) error {
	if c.ID == "" {
		return errors.New("redisstore: empty customer id")
	}
	if c.CreatedAt.IsZero() {
		c.CreatedAt = now()
	}
	data, err := json.Marshal(c)
	if err != nil {
		return err
	}
	return s.call(ctx, func(ctx context.Context) error {
		created, err := createCustomerScript.Run(ctx, s.client,
			[]string{s.custKey(c.ID), s.customersKeyOf(c.ID)}, data, c.ID, s.scriptChannel()).Int()
		if err == nil && created == 0 {
			err = permanent{fmt.Errorf("redisstore: customer %q already exists", c.ID)}
		}
		if err != nil {
			return err
		}
		return s.publishAfter(ctx, "customer")
	})
}

// UpsertConfigCustomer implements store.Store. A reload that changes
// nothing writes and announces nothing.
func (s *Store) UpsertConfigCustomer(ctx context.Context, c store.Customer) (store.Customer, error) {
	if c.ID == "" {
		return store.Customer{}, errors.New("redisstore: empty customer id")
	}
	key := s.custKey(c.ID)
	var result store.Customer
	err := s.call(ctx, func(ctx context.Context) error {
		changed := false
		err := s.watchRetry(ctx, func(tx *redis.Tx) error {
			changed = false
			old, err := tx.Get(ctx, key).Bytes()
			if errors.Is(err, redis.Nil) {
				result = c
				if result.CreatedAt.IsZero() {
					result.CreatedAt = now()
				}
				data, err := json.Marshal(result)
				if err != nil {
					return permanent{err}
				}
				_, err = tx.TxPipelined(ctx, func(p redis.Pipeliner) error {
					p.Set(ctx, key, data, 0)
					p.ZAdd(ctx, s.customersKeyOf(c.ID), redis.Z{Member: c.ID})
					s.publishIn(ctx, p, "customer")
					return nil
				})
				changed = err == nil
				return err
			}
			if err != nil {
				return err
			}
			var cur store.Customer
			if err := decode("customer", c.ID, old, &cur); err != nil {
				return err
			}
			cur = cur.MergeConfig(c)
			result = cur
			data, err := json.Marshal(cur)
			if err != nil {
				return permanent{err}
			}
			if string(data) == string(old) {
				return nil
			}
			_, err = tx.TxPipelined(ctx, func(p redis.Pipeliner) error {
				p.Set(ctx, key, data, 0)
				s.publishIn(ctx, p, "customer")
				return nil
			})
			changed = err == nil
			return err
		}, key)
		if err != nil || !changed {
			return err
		}
		return s.publishAfter(ctx, "customer")
	})
	if err != nil {
		return store.Customer{}, err
	}
	return result, nil
}

// GetCustomer implements store.Store.
func (s *Store) GetCustomer(ctx context.Context, id string) (store.Customer, error) {
	var c store.Customer
	if err := s.getJSON(ctx, s.custKey(id), "customer", id, &c); err != nil {
		return store.Customer{}, err
	}
	return c, nil
}

// getJSON reads the JSON document at key into v; a missing key is
// ErrNotFound for (what, id).
func (s *Store) getJSON(ctx context.Context, key, what, id string, v any) error {
	return s.call(ctx, func(ctx context.Context) error {
		data, err := s.client.Get(ctx, key).Bytes()
		if errors.Is(err, redis.Nil) {
			return notFound(what, id)
		}
		if err != nil {
			return err
		}
		return decode(what, id, data, v)
	})
}

// ListCustomers implements store.Store.
func (s *Store) ListCustomers(ctx context.Context) ([]store.Customer, error) {
	var list []store.Customer
	err := s.call(ctx, func(ctx context.Context) error {
		per, err := s.zrangeBuckets(ctx, s.bucketList(), s.customersKey, nil)
		if err != nil {
			return err
		}
		ids := slices.Concat(per...)
		slices.Sort(ids) // the buckets' ids, merged (as one index orders them)
		values, err := s.getAll(ctx, ids, s.custKey)
		if err != nil {
			return err
		}
		list = make([]store.Customer, 0, len(ids))
		for i, data := range values {
			if data == nil {
				continue // removed between the two reads
			}
			var c store.Customer
			if err := decode("customer", ids[i], data, &c); err != nil {
				return err
			}
			list = append(list, c)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return list, nil
}

// getAll reads the values of key(id) for every id in one round trip; a
// missing value is nil.
func (s *Store) getAll(ctx context.Context, ids []string, key func(string) string) ([][]byte, error) {
	if len(ids) == 0 {
		return nil, nil
	}
	cmds := make([]*redis.StringCmd, len(ids))
	_, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, id := range ids {
			cmds[i] = p.Get(ctx, key(id))
		}
		return nil
	})
	if err != nil && !errors.Is(err, redis.Nil) {
		return nil, err
	}
	values := make([][]byte, len(ids))
	for i, cmd := range cmds {
		data, err := cmd.Bytes()
		switch {
		case errors.Is(err, redis.Nil):
		case err != nil:
			return nil, err
		default:
			values[i] = data
		}
	}
	return values, nil
}

// SetTier implements store.Store.
func (s *Store) SetTier(ctx context.Context, id, tier string) (store.Customer, error) {
	key := s.custKey(id)
	var c store.Customer
	err := s.call(ctx, func(ctx context.Context) error {
		err := s.watchRetry(ctx, func(tx *redis.Tx) error {
			old, err := tx.Get(ctx, key).Bytes()
			if errors.Is(err, redis.Nil) {
				return notFound("customer", id)
			}
			if err != nil {
				return err
			}
			c = store.Customer{}
			if err := decode("customer", id, old, &c); err != nil {
				return err
			}
			c.Tier = tier
			data, err := json.Marshal(c)
			if err != nil {
				return permanent{err}
			}
			_, err = tx.TxPipelined(ctx, func(p redis.Pipeliner) error {
				p.Set(ctx, key, data, 0)
				s.publishIn(ctx, p, "customer")
				return nil
			})
			return err
		}, key)
		if err != nil {
			return err
		}
		return s.publishAfter(ctx, "customer")
	})
	if err != nil {
		return store.Customer{}, err
	}
	return c, nil
}

// PutKey implements store.Store.
func (s *Store) PutKey(ctx context.Context, k store.Key) (store.Key, error) {
	if k.ID == "" || k.Hash == "" || k.CustomerID == "" {
		return store.Key{}, errors.New("redisstore: key needs an id, a hash and a customer id")
	}
	if s.cluster != nil {
		return s.putKeyCluster(ctx, k)
	}
	in := k
	keyKey, idKey := s.keyKey(k.Hash), s.keyIDKey(k.ID)
	err := s.call(ctx, func(ctx context.Context) error {
		return s.watchRetry(ctx, func(tx *redis.Tx) error {
			k = in
			var oldHash, oldKey *redis.StringCmd
			_, err := tx.Pipelined(ctx, func(p redis.Pipeliner) error {
				oldHash = p.Get(ctx, idKey)
				oldKey = p.Get(ctx, keyKey)
				return nil
			})
			if err != nil && !errors.Is(err, redis.Nil) {
				return err
			}
			switch h, err := oldHash.Result(); {
			case err == nil && h != k.Hash:
				return permanent{fmt.Errorf("redisstore: key id %q already belongs to another key", k.ID)}
			case err != nil && !errors.Is(err, redis.Nil):
				return err
			}
			var old *store.Key
			if k, old, err = mergeStoredKey(k, oldKey); err != nil {
				return err
			}
			data, err := json.Marshal(k)
			if err != nil {
				return permanent{err}
			}
			_, err = tx.TxPipelined(ctx, func(p redis.Pipeliner) error {
				p.Set(ctx, keyKey, data, 0)
				p.Set(ctx, idKey, k.Hash, 0)
				if old != nil && old.ID != k.ID {
					p.Del(ctx, s.keyIDKey(old.ID))
				}
				if old != nil && old.CustomerID != k.CustomerID {
					p.ZRem(ctx, s.custKeysKey(old.CustomerID), k.Hash)
				}
				p.ZAdd(ctx, s.custKeysKey(k.CustomerID), redis.Z{Score: float64(k.CreatedAt.UnixMicro()), Member: k.Hash})
				s.indexExpiry(ctx, p, k)
				p.Publish(ctx, s.changesChannel(), "key")
				return nil
			})
			return err
		}, keyKey, idKey)
	})
	if err != nil {
		return store.Key{}, err
	}
	return k, nil
}

// KeyByHash implements store.Store.
func (s *Store) KeyByHash(ctx context.Context, hash string) (store.Key, error) {
	var k store.Key
	if err := s.getJSON(ctx, s.keyKey(hash), "key", hash, &k); err != nil {
		return store.Key{}, err
	}
	return k, nil
}

// ListKeys implements store.Store: a customer's keys ordered by creation
// time, then id. An unknown customer has no keys.
func (s *Store) ListKeys(ctx context.Context, customerID string) ([]store.Key, error) {
	var list []store.Key
	err := s.call(ctx, func(ctx context.Context) error {
		hashes, err := s.client.ZRange(ctx, s.custKeysKey(customerID), 0, -1).Result()
		if err != nil {
			return err
		}
		values, err := s.getAll(ctx, hashes, s.keyKey)
		if err != nil {
			return err
		}
		list = make([]store.Key, 0, len(hashes))
		for i, data := range values {
			if data == nil {
				continue
			}
			var k store.Key
			if err := decode("key", hashes[i], data, &k); err != nil {
				return err
			}
			if k.CustomerID != customerID {
				continue // moved to another customer, its index not yet updated (cluster)
			}
			list = append(list, k)
		}
		return s.fillLastUsed(ctx, list)
	})
	if err != nil {
		return nil, err
	}
	slices.SortFunc(list, func(a, b store.Key) int {
		if c := a.CreatedAt.Compare(b.CreatedAt); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	return list, nil
}

// RevokeKey implements store.Store. Revoking a revoked key changes nothing.
func (s *Store) RevokeKey(ctx context.Context, keyID string) (store.Key, error) {
	return s.modifyKey(ctx, keyID, func(k *store.Key) bool {
		if !k.RevokedAt.IsZero() {
			return false
		}
		k.RevokedAt = now()
		return true
	})
}
