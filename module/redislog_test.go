package module

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// TestRedisLogRouting makes go-redis log (a dial to a closed port) and
// checks where the line goes: to the logger of the app started last, back
// to the previous one when that app stops, and never to a stopped app's
// logger. (go-redis's logger is process-wide, and a reload runs two apps.)
func TestRedisLogRouting(t *testing.T) {
	port := freePort(t) // nothing listens on it
	rdb := redis.NewClient(&redis.Options{Addr: fmt.Sprintf("127.0.0.1:%d", port), MaxRetries: -1, DialerRetries: 1, PoolSize: 100})
	defer rdb.Close()
	dialFails := func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		if err := rdb.Ping(ctx).Err(); err == nil {
			t.Fatal("a Ping to a closed port succeeded")
		}
	}
	newLogger := func() (*zap.Logger, *observer.ObservedLogs) {
		core, logs := observer.New(zap.DebugLevel)
		return zap.New(core), logs
	}
	dialLines := func(logs *observer.ObservedLogs) int {
		n := 0
		for _, e := range logs.TakeAll() {
			if strings.Contains(e.Message, "failed to dial") && e.LoggerName == "redis" && e.Level == zap.WarnLevel {
				n++
			}
		}
		return n
	}

	oldLogger, oldLogs := newLogger()
	releaseOld := redisLogs.use(oldLogger)
	dialFails()
	if n := dialLines(oldLogs); n != 1 {
		t.Fatalf("the running app's logger got %d go-redis dial lines, want 1", n)
	}

	newAppLogger, newLogs := newLogger()
	releaseNew := redisLogs.use(newAppLogger) // a reload starts the new app
	dialFails()
	if o, n := dialLines(oldLogs), dialLines(newLogs); o != 0 || n != 1 {
		t.Fatalf("during a reload: old app's logger got %d lines, new one %d; want 0 and 1", o, n)
	}
	releaseOld() // the old app stops
	dialFails()
	if o, n := dialLines(oldLogs), dialLines(newLogs); o != 0 || n != 1 {
		t.Fatalf("after the old app stopped: %d and %d lines; want 0 and 1", o, n)
	}
	releaseNew()
	releaseNew() // idempotent
	dialFails()
	if o, n := dialLines(oldLogs), dialLines(newLogs); o != 0 || n != 0 {
		t.Fatalf("with no app running, stopped apps' loggers got %d and %d lines", o, n)
	}
}
