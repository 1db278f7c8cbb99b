package redisstore

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/apimonetize/caddy-api-monetize/internal/rediscluster"
	"github.com/apimonetize/caddy-api-monetize/store"
)

// TestClusterWatchShardedAcrossFailover: in a cluster, an instance watches
// changes over sharded Pub/Sub (a shard subscription on the master owning
// the channel's slot, none classic), and when that master dies and its
// replica takes over, it subscribes again on the new master: a key revoked
// by another instance after the failover reaches it.
func TestClusterWatchShardedAcrossFailover(t *testing.T) {
	c := rediscluster.Start(t, 3, 1)
	prefix := clusterPrefix()
	watcher := openStore(t, Options{URL: c.URL(), Cluster: true, KeyPrefix: prefix, OpTimeout: 500 * time.Millisecond})
	writer := openStore(t, Options{URL: c.URL(), Cluster: true, KeyPrefix: prefix, OpTimeout: 500 * time.Millisecond})
	ctx := t.Context()
	if err := writer.CreateCustomer(ctx, store.Customer{ID: "acme", Tier: "pro"}); err != nil {
		t.Fatal(err)
	}
	if _, err := writer.PutKey(ctx, store.Key{ID: "k1", Hash: "h1", CustomerID: "acme"}); err != nil {
		t.Fatal(err)
	}
	changes, resyncs := make(chan struct{}, 100), make(chan struct{}, 100)
	wctx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = watcher.WatchChanges(wctx,
			func() { changes <- struct{}{} },
			func() { resyncs <- struct{}{} })
	}()
	defer func() { stop(); <-done }()
	wait := func(ch chan struct{}, what string) {
		t.Helper()
		select {
		case <-ch:
		case <-time.After(30 * time.Second):
			t.Fatalf("no %s within 30s", what)
		}
	}
	wait(resyncs, "subscription")

	channel := watcher.changesChannel()
	owner, err := c.MasterFor(ctx, channel)
	if err != nil {
		t.Fatal(err)
	}
	oc := redis.NewClient(&redis.Options{Addr: owner.Addr()})
	shard, err := oc.Do(ctx, "PUBSUB", "SHARDNUMSUB", channel).Slice()
	_ = oc.Close()
	if err != nil || len(shard) != 2 || shard[1] != int64(1) {
		t.Fatalf("PUBSUB SHARDNUMSUB on the channel's master = %v, %v; want 1 subscriber", shard, err)
	}
	for _, n := range c.Masters(ctx) {
		nc := redis.NewClient(&redis.Options{Addr: n.Addr()})
		classic, err := nc.PubSubNumSub(ctx, channel).Result()
		_ = nc.Close()
		if err != nil || classic[channel] != 0 {
			t.Fatalf("classic subscribers of %s on %s: %v, %v; want none", channel, n.Addr(), classic, err)
		}
	}
	if _, err := writer.RevokeKey(ctx, "k1"); err != nil {
		t.Fatal(err)
	}
	wait(changes, "change before the failover")

	owner.Kill()
	wctx2, cancel := context.WithTimeout(ctx, 30*time.Second)
	err = c.WaitFailover(wctx2, owner, channel)
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	wait(resyncs, "subscription on the new master after the failover")
	// A change after the failover reaches the watcher.
	if _, err := writer.PutKey(ctx, store.Key{ID: "k2", Hash: "h2", CustomerID: "acme"}); err != nil {
		t.Fatal(err)
	}
	for {
		select {
		case <-changes:
			return
		case <-resyncs: // a subscription that met the old map, then a good one
		case <-time.After(30 * time.Second):
			t.Fatal("no change delivered after the failover within 30s")
		}
	}
}

// TestClusterRevokeAnnouncedByRetry: in a cluster a change is announced
// after it is written, so the announcement can fail alone (here Redis
// refuses SPUBLISH to the writer's user). The revocation then fails, and
// the admin's retry, which finds the key already revoked, announces it:
// the other instances drop the key at once.
func TestClusterRevokeAnnouncedByRetry(t *testing.T) {
	c := rediscluster.Start(t, 3, 0)
	ctx := t.Context()
	acl := func(rules ...string) {
		t.Helper()
		for _, n := range c.Masters(ctx) {
			nc := redis.NewClient(&redis.Options{Addr: n.Addr()})
			err := nc.Do(ctx, append([]any{"ACL", "SETUSER", "writer", "on", ">pw", "~*", "&*"}, toAny(rules)...)...).Err()
			_ = nc.Close()
			if err != nil {
				t.Fatal(err)
			}
		}
	}
	acl("+@all")
	prefix := clusterPrefix()
	watcher := openCluster(t, c, prefix)
	writer := openStore(t, Options{URL: strings.Replace(c.URL(), "redis://", "redis://writer:pw@", 1), Cluster: true, KeyPrefix: prefix, OpTimeout: contractTimeout})
	if _, err := writer.PutKey(ctx, store.Key{ID: "k1", Hash: "h1", CustomerID: "acme"}); err != nil {
		t.Fatal(err)
	}
	changes := make(chan struct{}, 10)
	resynced := make(chan struct{}, 10)
	wctx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = watcher.WatchChanges(wctx, func() { changes <- struct{}{} }, func() { resynced <- struct{}{} })
	}()
	defer func() { stop(); <-done }()
	<-resynced

	acl("-spublish")
	if _, err := writer.RevokeKey(ctx, "k1"); err == nil {
		t.Fatal("RevokeKey succeeded although its announcement was refused")
	}
	if k, err := watcher.KeyByID(ctx, "k1"); err != nil || k.RevokedAt.IsZero() {
		t.Fatalf("the revocation was not written: %+v, %v", k, err)
	}
	acl("+spublish")
	if _, err := writer.RevokeKey(ctx, "k1"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-changes:
	case <-time.After(10 * time.Second):
		t.Fatal("the retried revocation was not announced")
	}
}

func toAny(s []string) []any {
	out := make([]any, len(s))
	for i, v := range s {
		out[i] = v
	}
	return out
}
