package module

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/apimonetize/caddy-api-monetize/store/redisstore"
)

// redisCommands counts the commands the Redis on port ran, leaving out
// INFO (the test's own reads).
func redisCommands(t *testing.T, rdb *redis.Client) int64 {
	t.Helper()
	info, err := rdb.Info(context.Background(), "commandstats").Result()
	if err != nil {
		t.Fatal(err)
	}
	var n int64
	for _, line := range strings.Split(info, "\n") {
		name, rest, ok := strings.Cut(strings.TrimPrefix(strings.TrimSpace(line), "cmdstat_"), ":calls=")
		if !ok || name == "info" {
			continue
		}
		v, _, _ := strings.Cut(rest, ",")
		c, _ := strconv.ParseInt(v, 10, 64)
		n += c
	}
	return n
}

// waitChecks waits until resyncLoop made n more due checks.
func waitChecks(t *testing.T, n int64) {
	t.Helper()
	want := resyncChecks.Load() + n
	waitUntil(t, 20*time.Second, fmt.Sprintf("%d re-sync checks", n), func() bool { return resyncChecks.Load() >= want })
}

// resyncCommands runs Caddy with customers configured customers on a
// private Redis, and returns the Redis commands per periodic re-sync
// check once the configuration is stored. It then removes the stored
// configuration hash and checks that the next check writes everything
// again.
func resyncCommands(t *testing.T, customers int) float64 {
	port := freePort(t)
	startRedis(t, port)
	url := fmt.Sprintf("redis://127.0.0.1:%d/0", port)
	var extra strings.Builder
	for i := range customers {
		fmt.Fprintf(&extra, "customer c%04d tier pro\n", i)
	}
	extra.WriteString("key resync-key-0123456789abcdef c0000\n")
	newTester(t, testConfig{storeLine: "redis " + url, extra: extra.String()})
	rdb := redis.NewClient(&redis.Options{Addr: fmt.Sprintf("127.0.0.1:%d", port)})
	defer rdb.Close()

	waitChecks(t, 3) // the first due check after the start's sync
	const checks = 20
	before := redisCommands(t, rdb)
	c0 := resyncChecks.Load()
	waitChecks(t, checks)
	per := float64(redisCommands(t, rdb)-before) / float64(resyncChecks.Load()-c0)

	// Without the hash, the next check writes the configuration again.
	st, err := redisstore.New(redisstore.Options{URL: url, KeyPrefix: "am:"})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	ctx := context.Background()
	if err := st.DeleteRecord(ctx, recordKindConfigSync, "hash"); err != nil {
		t.Fatal(err)
	}
	written := redisCommands(t, rdb)
	waitUntil(t, 20*time.Second, "the configuration hash stored again", func() bool {
		_, err := st.GetRecord(ctx, recordKindConfigSync, "hash")
		return err == nil
	})
	if d := redisCommands(t, rdb) - written; d < int64(customers) {
		t.Fatalf("%d commands after the hash was removed, want the %d customers written again", d, customers)
	}
	return per
}

// TestConfigResyncReadsAHash: a periodic re-sync of an unchanged
// configuration reads the store's configuration hash instead of writing
// every configured customer: its Redis commands do not grow with the
// configured customers (20 against 2,000). Without the hash, it writes
// everything again.
func TestConfigResyncReadsAHash(t *testing.T) {
	defer configResyncInterval.Store(configResyncInterval.Load())
	configResyncInterval.Store(int64(20 * time.Millisecond))
	few := resyncCommands(t, 20)
	many := resyncCommands(t, 2000)
	t.Logf("Redis commands per re-sync check: %.1f with 20 configured customers, %.1f with 2,000", few, many)
	if many > few*1.5+5 {
		t.Fatalf("a re-sync check ran %.1f commands with 2,000 customers and %.1f with 20: it grows with customers", many, few)
	}
}
