package redisstore

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// Watch timings. They bound background work, not requests.
const (
	// watchSubscribeTimeout bounds subscribing and its confirmation.
	watchSubscribeTimeout = 5 * time.Second
	// watchPingInterval is how long a silent subscription waits before
	// pinging; a second silent interval means the connection is dead.
	watchPingInterval = 15 * time.Second
	// Backoff between re-subscription attempts.
	watchMinBackoff = 100 * time.Millisecond
	watchMaxBackoff = 5 * time.Second
)

// Watch implements store.Store. It subscribes to the change channel, on
// which every instance sharing the Redis announces its changes, and calls
// onChange for each message. It also calls onChange after every successful
// (re-)subscription, since changes may have been missed while it was not
// subscribed. After a connection error it re-subscribes with exponential
// backoff. It returns nil when ctx is done or the Store is closed.
func (s *Store) Watch(ctx context.Context, onChange func()) error {
	return s.WatchChanges(ctx, onChange, onChange)
}

var _ store.ResyncWatcher = (*Store)(nil)

// WatchChanges implements store.ResyncWatcher: Watch, calling onResync
// instead of onChange after a successful (re-)subscription.
func (s *Store) WatchChanges(ctx context.Context, onChange, onResync func()) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(s.life, cancel)
	defer stop()

	backoff := watchMinBackoff
	for {
		if s.watchOnce(ctx, onChange, onResync) {
			backoff = watchMinBackoff
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		backoff = min(2*backoff, watchMaxBackoff)
	}
}

// watchOnce subscribes and delivers changes until the subscription fails or
// ctx is done. It reports whether the subscription was established.
//
// In a cluster the subscription is sharded (SSUBSCRIBE, Redis 7+): it is
// held by the master owning the channel's slot, and only that shard
// carries the change messages. When that master fails, or the slot moves
// (Redis then ends the subscription with SUNSUBSCRIBE), the subscription
// ends: the cluster map is reloaded and the next attempt subscribes on the
// slot's new master, then resyncs. A cluster without sharded Pub/Sub
// (Redis 6) is watched over classic Pub/Sub, which it forwards to every
// node.
func (s *Store) watchOnce(ctx context.Context, onChange, onResync func()) (subscribed bool) {
	sharded := s.cluster != nil && !s.cluster.classic.Load()
	var ps *redis.PubSub
	if sharded {
		ps = s.cluster.client.SSubscribe(ctx)
	} else {
		ps = s.client.Subscribe(ctx)
	}
	defer ps.Close()
	// Reading does not watch ctx; closing the subscription interrupts it.
	stop := context.AfterFunc(ctx, func() { _ = ps.Close() })
	defer stop()
	if s.cluster != nil {
		// Whatever ends this subscription (its master failed, its slot
		// moved), the next one asks the map anew.
		defer func() {
			if ctx.Err() == nil {
				s.cluster.client.ReloadState(ctx)
			}
		}()
	}

	if err := s.subscribe(ctx, ps, sharded); err != nil {
		if sharded && unknownCommand(err) {
			s.cluster.classic.Store(true)
		}
		return false
	}
	onResync()
	pinged := false
	for {
		msg, err := ps.ReceiveTimeout(ctx, watchPingInterval)
		if err != nil {
			var ne net.Error
			if pinged || !errors.As(err, &ne) || !ne.Timeout() {
				return true
			}
			if ps.Ping(ctx) != nil {
				return true
			}
			pinged = true
			continue
		}
		pinged = false
		switch m := msg.(type) {
		case *redis.Message:
			onChange()
		case *redis.Subscription:
			if m.Kind == "sunsubscribe" || m.Kind == "unsubscribe" {
				return true // the slot moved: subscribe again
			}
		}
	}
}

// subscribe subscribes ps to the change channel (sharded: with
// SSUBSCRIBE) and waits for Redis to confirm.
func (s *Store) subscribe(ctx context.Context, ps *redis.PubSub, sharded bool) error {
	sctx, cancel := context.WithTimeout(ctx, watchSubscribeTimeout)
	defer cancel()
	kind := "subscribe"
	var err error
	if sharded {
		kind = "ssubscribe"
		err = ps.SSubscribe(sctx, s.changesChannel())
	} else {
		err = ps.Subscribe(sctx, s.changesChannel())
	}
	if err != nil {
		return err
	}
	msg, err := ps.ReceiveTimeout(sctx, watchSubscribeTimeout)
	if err != nil {
		return err
	}
	if sub, ok := msg.(*redis.Subscription); !ok || sub.Kind != kind {
		return fmt.Errorf("redisstore: unexpected reply %v to %s", msg, strings.ToUpper(kind))
	}
	return nil
}

// unknownCommand reports Redis refusing a command it does not know (a
// Redis before 7 asked for sharded Pub/Sub).
func unknownCommand(err error) bool {
	return isReply(err) && strings.HasPrefix(err.Error(), "ERR unknown command")
}
