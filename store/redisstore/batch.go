package redisstore

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

// Metering scripts of concurrent requests share pipelines: each request
// still makes exactly one EVALSHA, but the calls that arrive while others
// are in flight go out in one write and come back in one read. That saves
// a write and a read system call per request on both sides, which on a
// busy gateway costs more than the script itself.
//
// There is no background goroutine: a caller that finds a free lane leads,
// sending every call pending at that moment (its own included) as one
// pipeline, while the callers whose calls it took wait for their results.
const (
	// maxLanes is how many pipelines of metering scripts may be in flight
	// at once (each on its own connection).
	maxLanes = 2
	// maxBatch bounds the calls sent in one pipeline.
	maxBatch = 128
)

// errSendTimeout fails a call whose deadline passed before a lane was free
// to send it: it was never sent.
var errSendTimeout = errors.New("redisstore: timed out waiting to send")

// scriptCall is one metering script call.
type scriptCall struct {
	script *redis.Script
	keys   []string
	args   []any
	// deadline bounds the call: its pipeline ends by then, and it is not
	// sent after it.
	deadline time.Time

	// taken is set when a leader takes the call: from then on it is sent
	// (or fails) whatever its caller does.
	taken atomic.Bool
	// Once done is closed, err is set when the call was not sent, and cmd
	// holds the reply otherwise.
	err  error
	cmd  *redis.Cmd
	done chan struct{}
}

// batcher groups concurrent script calls into pipelines.
type batcher struct {
	client *redis.Client
	lanes  chan struct{} // a token per pipeline in flight

	mu      sync.Mutex
	pending []*scriptCall // guarded by mu: calls not yet taken, oldest first
}

func newBatcher(client *redis.Client) *batcher {
	return &batcher{client: client, lanes: make(chan struct{}, maxLanes)}
}

// do sends c and waits until it is done, or ctx ends (it then returns
// ctx's error: if c had not been taken by then it is never sent; if it
// had, it may still run). c is done by its deadline without a timer of its
// own: a lane frees up when a pipeline in flight ends, by the deadline of
// calls queued before c, and the pipeline c goes in ends by c's deadline.
func (b *batcher) do(ctx context.Context, c *scriptCall) error {
	c.done = make(chan struct{})
	b.mu.Lock()
	b.pending = append(b.pending, c)
	b.mu.Unlock()
	for !c.taken.Load() {
		select {
		case b.lanes <- struct{}{}:
			b.lead()
			<-b.lanes
		case <-ctx.Done():
			b.mu.Lock()
			defer b.mu.Unlock()
			if c.taken.Load() {
				return ctx.Err()
			}
			for i, p := range b.pending {
				if p == c {
					b.pending = append(b.pending[:i], b.pending[i+1:]...)
					break
				}
			}
			return ctx.Err()
		}
	}
	select {
	case <-c.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// lead takes up to maxBatch pending calls, fails those past their
// deadline, sends the others as one pipeline that ends by the earliest of
// their deadlines, and hands every caller its reply. The pipeline is not
// cut short when the leader's own caller goes away: others wait for it.
func (b *batcher) lead() {
	b.mu.Lock()
	n := min(len(b.pending), maxBatch)
	batch := make([]*scriptCall, n)
	copy(batch, b.pending)
	b.pending = append(b.pending[:0], b.pending[n:]...)
	for _, c := range batch {
		c.taken.Store(true)
	}
	b.mu.Unlock()
	now := time.Now()
	var live []*scriptCall
	var first time.Time
	for _, c := range batch {
		if !now.Before(c.deadline) {
			c.err = errSendTimeout
			continue
		}
		if live == nil || c.deadline.Before(first) {
			first = c.deadline
		}
		live = append(live, c)
	}
	if len(live) > 0 {
		ctx, cancel := context.WithDeadline(context.Background(), first)
		b.exec(ctx, live, false)
		cancel()
	}
	for _, c := range batch {
		close(c.done)
	}
}

// exec sends batch as one pipeline of EVALSHA, or of EVAL (which also
// loads the script) for calls that Redis answered NOSCRIPT: those did not
// run, so sending them again counts nothing twice.
func (b *batcher) exec(ctx context.Context, batch []*scriptCall, eval bool) {
	pipe := b.client.Pipeline()
	for _, c := range batch {
		if eval {
			c.cmd = c.script.Eval(ctx, pipe, c.keys, c.args...)
		} else {
			c.cmd = c.script.EvalSha(ctx, pipe, c.keys, c.args...)
		}
	}
	_, _ = pipe.Exec(ctx)
	if eval {
		return
	}
	var unknown []*scriptCall
	for _, c := range batch {
		if redis.HasErrorPrefix(c.cmd.Err(), "NOSCRIPT") {
			unknown = append(unknown, c)
		}
	}
	if len(unknown) > 0 {
		b.exec(ctx, unknown, true)
	}
}
