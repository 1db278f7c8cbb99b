package redisstore

import (
	"context"
	"errors"
	"syscall"
	"testing"

	"github.com/redis/go-redis/v9"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// TestAfterFailedAttempts: a cluster call that ran out of time between
// attempts that could not reach their node is unavailable, while one that
// only waited for a pool connection (local saturation), or whose attempts
// were answered, stays "not sent" (busy).
func TestAfterFailedAttempts(t *testing.T) {
	refused := syscall.ECONNREFUSED
	for _, tc := range []struct {
		name  string
		tried []error
		err   error
		busy  bool
	}{
		{"dial refused, then the deadline in go-redis's backoff", []error{refused}, context.DeadlineExceeded, false},
		{"only a pool wait", []error{context.DeadlineExceeded}, context.DeadlineExceeded, true},
		{"pool timeout", []error{redis.ErrPoolTimeout}, redis.ErrPoolTimeout, true},
		{"an answered attempt (MOVED), then the deadline", []error{redis.Nil}, context.DeadlineExceeded, true},
		{"no attempt recorded", nil, context.DeadlineExceeded, true},
	} {
		_, a := withAttempts(context.Background())
		for _, e := range tc.tried {
			a.note(e)
		}
		err := finishOn(newBreaker(5, 0), context.Background(), false, afterFailedAttempts(tc.err, a))
		if errors.Is(err, store.ErrBusy) != tc.busy || !errors.Is(err, store.ErrUnavailable) {
			t.Errorf("%s: %v, want busy %v (and unavailable)", tc.name, err, tc.busy)
		}
	}
}
