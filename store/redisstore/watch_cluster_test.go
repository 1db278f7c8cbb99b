package redisstore

import (
	"context"
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
