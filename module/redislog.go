package module

import (
	"context"
	"fmt"
	"strings"
	"sync"

	"github.com/caddyserver/caddy/v2"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// go-redis writes its own log lines (a failed dial, a bad pub/sub
// connection) to stderr through one process-wide logger. redisLogs
// replaces it, once, with a logger that forwards every line to Caddy's
// logger: the logger of the most recently started app that uses Redis,
// or Caddy's default logger while none runs. Apps register at Start and
// unregister at Stop, so during a reload the lines go to the new config's
// logger, and an app that stopped is never written to.
var redisLogs redisLogRouter

// redisLogRouter is the process-wide go-redis logger; see redisLogs.
type redisLogRouter struct {
	install sync.Once
	mu      sync.Mutex
	// active are the loggers of the running apps, in start order.
	active []*zap.Logger
}

// use routes go-redis's log lines to logger until the returned function is
// called.
func (r *redisLogRouter) use(logger *zap.Logger) (release func()) {
	r.install.Do(func() { redis.SetLogger(r) })
	logger = logger.Named("redis")
	r.mu.Lock()
	r.active = append(r.active, logger)
	r.mu.Unlock()
	return sync.OnceFunc(func() {
		r.mu.Lock()
		defer r.mu.Unlock()
		for i, l := range r.active {
			if l == logger {
				r.active = append(r.active[:i], r.active[i+1:]...)
				break
			}
		}
	})
}

// current is the logger go-redis's lines go to.
func (r *redisLogRouter) current() *zap.Logger {
	r.mu.Lock()
	defer r.mu.Unlock()
	if n := len(r.active); n > 0 {
		return r.active[n-1]
	}
	return caddy.Log().Named("api_monetize.redis")
}

// Printf implements go-redis's logging interface. go-redis logs failures
// and anomalies only, so every line is a warning.
func (r *redisLogRouter) Printf(_ context.Context, format string, v ...any) {
	msg := strings.TrimPrefix(fmt.Sprintf(format, v...), "redis: ")
	r.current().Warn(msg)
}
