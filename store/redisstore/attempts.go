package redisstore

import (
	"context"
	"fmt"
	"net"
	"sync"

	"github.com/redis/go-redis/v9"
)

// In a cluster, go-redis retries a command whose node could not be reached
// (a dead master, until the map names its successor), sleeping between
// attempts; a call whose deadline passes in that sleep fails with the bare
// context error, which alone would read as "never sent" (store.ErrBusy,
// local saturation). Each node client of a cluster Store carries
// attemptHook, which notes the last failed attempt of a call in the call's
// context (attempts), so that finish classifies the call as unavailable.

// attemptsKey is the context key of a call's *attempts.
type attemptsKey struct{}

// attempts records the last connection-level failure among a call's
// attempts. Safe for concurrent use (a pipeline runs on several nodes at
// once).
type attempts struct {
	mu   sync.Mutex
	last error
}

func (a *attempts) note(err error) {
	if err == nil || isReply(err) || notSent(err) {
		return // answered (the node is up), or not sent (saturation here)
	}
	a.mu.Lock()
	a.last = err
	a.mu.Unlock()
}

func (a *attempts) failed() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.last
}

// withAttempts returns ctx carrying a fresh attempts record.
func withAttempts(ctx context.Context) (context.Context, *attempts) {
	a := &attempts{}
	return context.WithValue(ctx, attemptsKey{}, a), a
}

// afterFailedAttempts returns err, unless err says the call was never sent
// while one of its attempts did fail to reach its node: then an error
// (not notSent) naming that failure.
func afterFailedAttempts(err error, a *attempts) error {
	if a == nil || err == nil || !notSent(err) {
		return err
	}
	if last := a.failed(); last != nil {
		return fmt.Errorf("no node answered by the deadline: %w (the last attempt: %w)", context.DeadlineExceeded, last)
	}
	return err
}

// attemptHook notes the failed attempts of node clients (see attempts).
type attemptHook struct{}

var _ redis.Hook = attemptHook{}

// DialHook implements redis.Hook.
func (attemptHook) DialHook(next redis.DialHook) redis.DialHook {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := next(ctx, network, addr)
		if a, ok := ctx.Value(attemptsKey{}).(*attempts); ok {
			a.note(err)
		}
		return c, err
	}
}

// ProcessHook implements redis.Hook.
func (attemptHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		if a, ok := ctx.Value(attemptsKey{}).(*attempts); ok {
			a.note(err)
		}
		return err
	}
}

// ProcessPipelineHook implements redis.Hook.
func (attemptHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		err := next(ctx, cmds)
		if a, ok := ctx.Value(attemptsKey{}).(*attempts); ok {
			a.note(err)
		}
		return err
	}
}
