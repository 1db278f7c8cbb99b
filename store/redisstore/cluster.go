package redisstore

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// Redis Cluster (Options.Cluster). The key layout differs from a single
// Redis only where a single Redis relied on keys of different slots being
// on one node:
//
//   - A subject's metering keys (P{<s>}:…, see meter.go) are already
//     hash-tagged by subject: a reservation or settlement is one EVALSHA
//     on the master that owns the subject's slot. Each master has its own
//     pipelined script client (a batcher and a circuit breaker); a call is
//     routed by go-redis's slot map, and MOVED, ASK and TRYAGAIN replies
//     (the script did not run: nothing can be counted twice) are retried
//     on the node named, within the call's deadline.
//   - The outbox subjects index is split in outboxBuckets sorted sets,
//     P{ob:<NN>}:outbox:subjects, NN = FNV-1a(subject) mod outboxBuckets,
//     written after the script that crossed the threshold (see
//     Store.indexOutbox); a write that failed is repaired by a SCAN of every
//     master's outboxes (at most hourly, and at once after a failure seen by
//     this process).
//   - The catalogue (customers, keys and their indexes, key uses, the key
//     secret), the records, the leases, the seed marker and the instances
//     set are spread over 64 buckets (see buckets.go).
//   - Changes are announced after they are written (see publish).
//
// The key prefix must not contain '{' or '}', which would change the hash
// tags.

// Cluster client settings.
const (
	// clusterReloadInterval is how often go-redis reloads the cluster map
	// without being told to (its default of 60s kept it dialling a dead
	// master for a minute after a failover).
	clusterReloadInterval = 2 * time.Second
	// clusterMaxRedirects bounds the MOVED/ASK redirections of one call;
	// TRYAGAIN is retried until the call's deadline.
	clusterMaxRedirects = 8
	// clusterRetryBackoff is the wait before retrying a TRYAGAIN reply
	// (a slot being migrated with the subject's keys split).
	clusterRetryBackoff = 5 * time.Millisecond
	// outboxBuckets is how many sorted sets index the subjects with
	// threshold events in a cluster.
	outboxBuckets = 64
	// outboxReconcileEvery bounds how long an outbox whose index write
	// failed (the script counted, the index write after it did not) can go
	// unlisted by ThresholdEvents.
	outboxReconcileEvery = time.Hour
	// outboxReconcileRetry is the least time between reconciliations
	// while one is due (a failed index write or reconciliation).
	outboxReconcileRetry = time.Minute
	// outboxReconcileTimeout bounds one reconciliation.
	outboxReconcileTimeout = 30 * time.Second
)

// clusterState is a cluster Store's routing of metering scripts: one shard
// (batcher and breaker) per master address.
type clusterState struct {
	client   *redis.ClusterClient
	opts     *redis.ClusterOptions
	window   time.Duration
	grace    time.Duration
	failures int
	cooldown time.Duration
	// setWait applies Options.WaitReplicas to a new shard's batcher.
	setWait func(*batcher)

	mu     sync.RWMutex
	shards map[string]*shard // by address
	closed bool

	// redirects and retries count the MOVED/ASK redirections followed and
	// the TRYAGAIN replies retried by metering scripts.
	redirects, retries atomic.Int64

	// reconcileDue is set when an outbox index write failed.
	reconcileDue atomic.Bool
	// reconciledAt is when the outbox index was last reconciled (Unix ns).
	reconciledAt atomic.Int64
	// classic is set once the cluster refused sharded Pub/Sub (Redis
	// before 7): changes then go over classic Pub/Sub.
	classic atomic.Bool
}

// shard is one master's metering script client.
type shard struct {
	addr    string
	scripts *batcher
	breaker *breaker
}

// newCluster is New for a Redis Cluster.
func newCluster(o Options) (*Store, error) {
	co, err := redis.ParseClusterURL(o.URL)
	if err != nil {
		var uerr *url.Error
		if errors.As(err, &uerr) {
			err = uerr.Err
		}
		return nil, fmt.Errorf("redisstore: invalid Redis Cluster URL: %w", err)
	}
	if err := o.defaults(); err != nil {
		return nil, err
	}
	if strings.ContainsAny(o.KeyPrefix, "{}") {
		return nil, errors.New("redisstore: a Redis Cluster key prefix must not contain '{' or '}'")
	}
	co.DialTimeout = o.OpTimeout
	co.ReadTimeout = o.OpTimeout
	co.WriteTimeout = o.OpTimeout
	co.PoolTimeout = o.OpTimeout
	co.ContextTimeoutEnabled = true
	co.MaxRetries = -1
	co.MaxRedirects = clusterMaxRedirects
	co.DialerRetries = 1
	co.DisableIdentity = true
	co.PipelinePoolSize = -1
	co.ClusterStateReloadInterval = clusterReloadInterval
	co.MaintNotificationsConfig = &maintnotifications.Config{Mode: maintnotifications.ModeDisabled}
	if o.dial != nil {
		co.Dialer = o.dial
	}
	co.NewClient = func(opt *redis.Options) *redis.Client {
		c := redis.NewClient(opt)
		c.AddHook(attemptHook{})
		return c
	}
	client := redis.NewClusterClient(co)
	life, end := context.WithCancel(context.Background())
	return &Store{
		client: client,
		cluster: &clusterState{
			client: client, opts: co,
			window: o.OpTimeout, grace: max(o.OpTimeout, o.overloadWait),
			failures: o.BreakerFailures, cooldown: o.BreakerCooldown,
			setWait: o.setWait,
			shards:  map[string]*shard{},
		},
		prefix:    o.KeyPrefix,
		opTimeout: o.OpTimeout,
		breaker:   newBreaker(o.BreakerFailures, o.BreakerCooldown),
		life:      life,
		end:       end,
	}, nil
}

// shardAt returns the shard of the master at addr, creating it.
func (c *clusterState) shardAt(addr string) *shard {
	c.mu.RLock()
	sh := c.shards[addr]
	c.mu.RUnlock()
	if sh != nil {
		return sh
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if sh := c.shards[addr]; sh != nil {
		return sh
	}
	dial := c.opts.Dialer
	if dial == nil {
		dial = redis.NewDialer(&redis.Options{DialTimeout: c.window, TLSConfig: c.opts.TLSConfig})
	}
	brk := newBreaker(c.failures, c.cooldown)
	sh = &shard{
		addr: addr,
		scripts: newBatcher(&dialer{
			dial: dial, network: "tcp", addr: addr,
			username: c.opts.Username, password: c.opts.Password,
		}, c.window, c.grace),
		breaker: brk,
	}
	sh.scripts.failing = brk.failing
	c.setWait(sh.scripts)
	if c.closed {
		sh.scripts.close()
	}
	c.shards[addr] = sh
	return sh
}

// shardFor returns the shard of the master that owns key's slot in
// go-redis's cluster map.
func (c *clusterState) shardFor(ctx context.Context, key string) (*shard, error) {
	node, err := c.client.MasterForKey(ctx, key)
	if err != nil {
		return nil, err
	}
	return c.shardAt(node.Options().Addr), nil
}

// close closes every shard's connections.
func (c *clusterState) close() {
	c.mu.Lock()
	c.closed = true
	list := make([]*shard, 0, len(c.shards))
	for _, sh := range c.shards {
		list = append(list, sh)
	}
	c.mu.Unlock()
	for _, sh := range list {
		sh.scripts.close()
	}
}

// redirection parses a MOVED or ASK error reply: the node to send the
// call to.
func redirection(err error) (addr string, ask, ok bool) {
	r, isReply := err.(replyError) // as read: never wrapped
	if !isReply {
		return "", false, false
	}
	msg := string(r)
	switch {
	case strings.HasPrefix(msg, "MOVED "):
	case strings.HasPrefix(msg, "ASK "):
		ask = true
	default:
		return "", false, false
	}
	f := strings.Fields(msg)
	if len(f) != 3 {
		return "", false, false
	}
	addr = f[2]
	if strings.HasPrefix(addr, ":") {
		// No host: the node's own address (cluster-announce-ip unset).
		return "", false, false
	}
	return addr, ask, true
}

// tryAgain reports a TRYAGAIN reply: the slot is being migrated and the
// call's keys are split between two nodes; the script did not run.
func tryAgain(err error) bool {
	r, ok := err.(replyError)
	return ok && strings.HasPrefix(string(r), "TRYAGAIN")
}

// runCluster is run in a cluster: on the master owning key's slot, under
// its breaker, following redirections and retrying TRYAGAIN (none of
// which ran the script) until the call's deadline.
func (s *Store) runCluster(ctx context.Context, key string, script *luaScript, args *command) ([]int64, error) {
	deadline := time.Now().Add(s.opTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	rctx := ctx
	if d, ok := ctx.Deadline(); !ok || d.After(deadline) {
		// Bounds the first load of the cluster map (a request's context
		// usually has its deadline already: no allocation then).
		var cancel context.CancelFunc
		rctx, cancel = context.WithDeadline(ctx, deadline)
		defer cancel()
	}
	sh, err := s.cluster.shardFor(rctx, key)
	if err != nil {
		// No cluster map: no master could be asked for it.
		return nil, fmt.Errorf("redisstore: %w: cluster map: %w", store.ErrUnavailable, err)
	}
	ask, redirects := false, 0
	for {
		probe, err := sh.breaker.allow()
		if err != nil {
			return nil, fmt.Errorf("%w (master %s)", err, sh.addr)
		}
		call := &scriptCall{script: script, args: args, deadline: deadline, asking: ask}
		var reply []int64
		if err = sh.scripts.do(ctx, call); err == nil {
			// Done: its fields are this goroutine's (not so after an
			// error, when it may still be in flight).
			reply, err = call.reply, call.err
		}
		late := !time.Now().Before(deadline) || ctx.Err() != nil
		if addr, isAsk, ok := redirection(err); ok && !late && redirects < clusterMaxRedirects {
			redirects++
			s.cluster.redirects.Add(1)
			sh.breaker.done(probe, healthy)
			if !isAsk {
				s.cluster.client.ReloadState(ctx)
			}
			sh, ask = s.cluster.shardAt(addr), isAsk
			continue
		}
		if tryAgain(err) && !late {
			s.cluster.retries.Add(1)
			sh.breaker.done(probe, healthy)
			t := time.NewTimer(min(clusterRetryBackoff, time.Until(deadline)))
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
			}
			continue // to the same node, with ASKING again if it had it
		}
		if _, _, ok := redirection(err); ok || tryAgain(err) {
			// Still redirected, or the slot still split, at the deadline:
			// unavailable for this call, but the master answered, so its
			// breaker (which all its other customers share) stays closed.
			sh.breaker.done(probe, healthy)
			return nil, fmt.Errorf("redisstore: %w: %w", store.ErrUnavailable, err)
		}
		if err != nil && !isReply(err) {
			// The master may be gone (a failover): have the map reloaded.
			s.cluster.client.ReloadState(ctx)
		}
		return reply, finishOn(sh.breaker, ctx, probe, err)
	}
}

// outboxBucket is the bucket of subject's outbox in the index.
func outboxBucket(subject string) int {
	h := fnv.New32a()
	_, _ = h.Write([]byte(subject))
	return int(h.Sum32() % outboxBuckets)
}

func (s *Store) outboxBucketKey(bucket int) string {
	return s.prefix + "{ob:" + strconv.Itoa(bucket) + "}:outbox:subjects"
}

// indexOutboxScript adds ARGV[1] to the outbox subjects index KEYS[1]
// until ARGV[2] (Unix s), drops expired members and keeps the index until
// its newest member expires.
var indexOutboxScript = redis.NewScript(`
local t = redis.call('TIME')
local now = tonumber(t[1])
redis.call('ZADD', KEYS[1], 'GT', ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', t[1])
local left = tonumber(ARGV[2]) - now
if redis.call('TTL', KEYS[1]) < left then redis.call('EXPIREAT', KEYS[1], ARGV[2]) end
return 0
`)

// indexOutbox lists subject in its outbox bucket after a script crossed a
// threshold of q. A failure does not fail the request (it was counted, and
// the event is in the subject's outbox): it makes the next ThresholdEvents
// of this process reconcile the index.
func (s *Store) indexOutbox(ctx context.Context, subject string, q store.Quota) {
	expiry := q.PeriodEnd.Add(store.Retention).Unix()
	err := s.call(ctx, func(ctx context.Context) error {
		return indexOutboxScript.Run(ctx, s.client, []string{s.outboxBucketKey(outboxBucket(subject))}, subject, expiry).Err()
	})
	if err != nil {
		s.cluster.reconcileDue.Store(true)
	}
}

// maybeReconcileOutboxes reconciles the outbox index when due: hourly, or
// after an index write of this process failed (then at most once per
// outboxReconcileRetry). It has its own time bound (a SCAN of every
// master), and a failure leaves it due.
func (s *Store) maybeReconcileOutboxes(ctx context.Context) {
	c := s.cluster
	since := time.Since(time.Unix(0, c.reconciledAt.Load()))
	if since < outboxReconcileEvery && (!c.reconcileDue.Load() || since < outboxReconcileRetry) {
		return
	}
	c.reconciledAt.Store(time.Now().UnixNano())
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), outboxReconcileTimeout)
	defer cancel()
	if err := s.reconcileOutboxes(ctx); err != nil {
		c.reconcileDue.Store(true)
	}
}

// outboxSubjects returns the subjects with live outbox entries, from
// every bucket of the index.
func (s *Store) outboxSubjects(ctx context.Context) ([]string, error) {
	now := strconv.FormatInt(time.Now().Unix(), 10)
	cmds := make([]*redis.StringSliceCmd, outboxBuckets)
	if _, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for b := range cmds {
			cmds[b] = p.ZRangeByScore(ctx, s.outboxBucketKey(b), &redis.ZRangeBy{Min: now, Max: "+inf"})
		}
		return nil
	}); err != nil {
		return nil, err
	}
	var subjects []string
	for _, cmd := range cmds {
		subjects = append(subjects, cmd.Val()...)
	}
	return subjects, nil
}

// reconcileOutboxes scans every master for subject outboxes and indexes
// them: the repair of an index write that failed after its script.
func (s *Store) reconcileOutboxes(ctx context.Context) error {
	s.cluster.reconcileDue.Store(false)
	start := s.prefix + "{"
	const end = "}:" + outboxKeySuffix
	var mu sync.Mutex
	found := map[string]string{} // outbox key -> subject
	err := s.cluster.client.ForEachMaster(ctx, func(ctx context.Context, m *redis.Client) error {
		iter := m.Scan(ctx, 0, escapeGlob(start)+"*"+escapeGlob(end), 1000).Iterator()
		for iter.Next(ctx) {
			k := iter.Val()
			if sub, ok := strings.CutPrefix(k, start); ok {
				if sub, ok = strings.CutSuffix(sub, end); ok && sub != "" {
					mu.Lock()
					found[k] = sub
					mu.Unlock()
				}
			}
		}
		return iter.Err()
	})
	if err != nil {
		return err
	}
	for k, sub := range found {
		last, err := s.client.LIndex(ctx, k, -1).Result()
		if errors.Is(err, redis.Nil) {
			continue
		}
		if err != nil {
			return err
		}
		i := strings.LastIndexByte(last, '|')
		exp, perr := strconv.ParseInt(last[i+1:], 10, 64)
		if perr != nil {
			continue
		}
		if err := indexOutboxScript.Run(ctx, s.client, []string{s.outboxBucketKey(outboxBucket(sub))}, sub, exp).Err(); err != nil {
			return err
		}
	}
	return nil
}

// escapeGlob escapes the glob characters of a SCAN MATCH pattern.
func escapeGlob(s string) string {
	var b strings.Builder
	for _, r := range s {
		if strings.ContainsRune(`*?[]\`, r) {
			b.WriteByte('\\')
		}
		b.WriteRune(r)
	}
	return b.String()
}

// publish announces a change on channel: with SPUBLISH, on the shard that
// owns the channel's slot (see Store.WatchChanges), or with PUBLISH on a
// cluster without sharded Pub/Sub (Redis 6).
func (c *clusterState) publish(ctx context.Context, channel, what string) error {
	if !c.classic.Load() {
		err := c.client.SPublish(ctx, channel, what).Err()
		if !unknownCommand(err) {
			return err
		}
		c.classic.Store(true)
	}
	return c.client.Publish(ctx, channel, what).Err()
}
