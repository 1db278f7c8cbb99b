package redisstore

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
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
// A lane that frees up while calls are pending is handed to the caller of
// the oldest one, which leads next; callers whose calls are in flight only
// wait for their replies.
const (
	// maxLanes is how many pipelines of metering scripts may be in flight
	// at once (each on its own connection).
	maxLanes = 2
	// maxBatch bounds the calls sent in one pipeline.
	maxBatch = 128
)

// errSendTimeout fails a call whose deadline passed before a lane was free
// to send it, and OverloadWait more while Redis kept answering: it was
// never sent. It is local saturation, not a Redis failure (see
// Store.finish).
var errSendTimeout = errors.New("redisstore: timed out waiting to send")

// errQueuedBehindStall fails a call whose deadline passed before a lane was
// free to send it while Redis was overdue: it was never sent, and Redis is
// what it waited for.
var errQueuedBehindStall = errors.New("redisstore: not sent: Redis did not answer the pipelines before it")

// scriptCall is one metering script call.
type scriptCall struct {
	script *luaScript
	args   *command
	// deadline bounds the call: its pipeline ends by then, and it is not
	// sent after it.
	deadline time.Time
	// asking sends ASKING before the call (a cluster's ASK redirection:
	// the slot is being imported by this node).
	asking bool

	// taken is set when a leader takes the call: from then on it is sent
	// (or fails) whatever its caller does.
	taken atomic.Bool
	// Once done is closed, the call has its reply, or err: not sent, an
	// I/O error (the call may have run) or an error reply.
	reply []int64
	err   error
	done  chan struct{}
	// handoff receives the lane this call's caller is to lead with; handed
	// (guarded by the batcher's mu) is set when one is sent.
	handoff chan *lane
	handed  bool
}

// lane is a pipeline lane: its connection, dialed on first use and again
// after an I/O error.
type lane struct{ conn *conn }

// batcher groups concurrent script calls into pipelines.
//
// A call's deadline bounds its wait for Redis. Unless Redis is overdue (the
// last pipeline failed for want of it: no reply by its deadline, or an I/O
// error; or the circuit breaker counts a failed call), a call that is
// still queued at its deadline, or whose reply arrived but was not read by
// then, is local saturation (this process had no CPU or lane for it): it
// is still sent, or read, within grace more (OverloadWait); past that it
// fails with errSendTimeout. A call still queued at its deadline while
// Redis is overdue fails with errQueuedBehindStall. (A call queued behind
// pipelines in flight is in the next pipeline sent, and those in flight
// end by their deadlines, which are before its own, or a quarter of window
// after it for a call sent late; so at the start of a stall a call waits
// at most about that much past its deadline.)
type batcher struct {
	dialer *dialer
	lanes  chan *lane // the lanes not in use: free only while no pending call waits for one
	closed atomic.Bool
	// drops counts connections dropped after an I/O error.
	drops atomic.Int64
	// window is OpTimeout: what a pipeline gets for its replies at least
	// while Redis keeps answering.
	window time.Duration
	// grace is the bounded extra wait of local saturation (OverloadWait).
	grace time.Duration
	// failing reports failed calls counted by the circuit breaker.
	failing func() bool
	// failedLast is set when the last pipeline to end failed for want
	// of Redis (an I/O error or a timeout), cleared by one answered.
	failedLast atomic.Bool
	// wait, when set, is a WAIT command sent after each pipeline's calls
	// (see Options.WaitReplicas); unreplicated counts the pipelines whose
	// WAIT returned before enough replicas acknowledged them.
	wait         []byte
	waitReplicas int64
	unreplicated atomic.Int64

	mu      sync.Mutex
	pending []*scriptCall // guarded by mu: calls not yet taken, oldest first
}

// release gives l, free again, to the caller of the oldest pending call
// not handed a lane yet, or back to the free lanes.
func (b *batcher) release(l *lane) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, c := range b.pending {
		if !c.handed {
			c.handed = true
			c.handoff <- l
			return
		}
	}
	b.lanes <- l
}

func newBatcher(d *dialer, window, grace time.Duration) *batcher {
	b := &batcher{dialer: d, lanes: make(chan *lane, maxLanes), window: window, grace: grace}
	for range maxLanes {
		b.lanes <- &lane{}
	}
	return b
}

// close closes the lanes' connections once their pipelines in flight
// end; calls after it fail with redis.ErrClosed.
func (b *batcher) close() {
	b.closed.Store(true)
	held := make([]*lane, 0, maxLanes)
	for range maxLanes {
		l := <-b.lanes
		if l.conn != nil {
			_ = l.conn.nc.Close()
			l.conn = nil
		}
		held = append(held, l)
	}
	// Through release: a call that arrived meanwhile waits to be handed a
	// lane (and then fails with ErrClosed).
	for _, l := range held {
		b.release(l)
	}
}

// do sends c and waits until it is done, or ctx ends (it then returns
// ctx's error: if c had not been taken by then it is never sent, and the
// error also wraps errSendTimeout; if it had, it may still run). c is done by its deadline without a timer of its
// own: a lane frees up when a pipeline in flight ends, by the deadline of
// calls queued before c, and the pipeline c goes in ends by c's deadline.
// Its caller leads when it finds a lane free or is handed one; otherwise
// (another caller took c) the reply ends its wait.
func (b *batcher) do(ctx context.Context, c *scriptCall) error {
	c.done = make(chan struct{})
	c.handoff = make(chan *lane, 1)
	b.mu.Lock()
	b.pending = append(b.pending, c)
	var free *lane
	select {
	case free = <-b.lanes:
	default:
	}
	b.mu.Unlock()
	if free != nil {
		b.lead(free)
		b.release(free)
	}
	for {
		select {
		case <-c.done:
			return nil
		case l := <-c.handoff:
			b.lead(l)
			b.release(l)
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) && b.saturated(c, time.Now()) {
				// Not a Redis stall: wait for the call to be sent and
				// answered, by its deadline plus grace (see batcher).
				ctx = context.WithoutCancel(ctx)
				continue
			}
			b.mu.Lock()
			sent := c.taken.Load()
			if !sent {
				b.pending = slices.DeleteFunc(b.pending, func(p *scriptCall) bool { return p == c })
			}
			b.mu.Unlock()
			if sent && errors.Is(ctx.Err(), context.DeadlineExceeded) {
				// Taken meanwhile: its pipeline ends by its deadline.
				ctx = context.WithoutCancel(ctx)
				continue
			}
			// A lane handed to c and not taken yet goes to the next caller.
			select {
			case l := <-c.handoff:
				b.release(l)
			default:
			}
			if !sent {
				if !b.answering() {
					return fmt.Errorf("%w: %w", errQueuedBehindStall, ctx.Err())
				}
				return fmt.Errorf("%w: %w", errSendTimeout, ctx.Err())
			}
			return fmt.Errorf("waiting for the reply: %w", ctx.Err())
		}
	}
}

// answering reports whether Redis is not overdue: the last pipeline to
// end was answered (or none ended yet), and no other call failed for want
// of Redis since the last that succeeded (the circuit breaker's count).
func (b *batcher) answering() bool {
	return !b.failedLast.Load() && (b.failing == nil || !b.failing())
}

// saturated reports whether c, at or past its deadline at now, waits on
// this process rather than on Redis: it was taken (its pipeline ends by
// its deadline, plus grace only for replies that arrived), or Redis keeps
// answering and the deadline plus grace has not passed.
func (b *batcher) saturated(c *scriptCall, now time.Time) bool {
	if c.taken.Load() {
		return true
	}
	return b.answering() && now.Before(c.deadline.Add(b.grace))
}

// sendBy is the deadline of c's pipeline if c is sent at now, or why it
// is not sent. A pipeline ends by its calls' deadlines. While Redis keeps
// answering, a call closer to its deadline than a quarter of window, or
// past it (until its deadline plus grace, then errSendTimeout), still gets
// that quarter from now: a call a saturated process sends late must not
// fail the whole pipeline, and the replies of a pipeline are read by
// graceReader as long as they arrive. Otherwise a call past its deadline
// is not sent (errQueuedBehindStall).
func (b *batcher) sendBy(c *scriptCall, now time.Time) (time.Time, error) {
	soon := now.Add(b.window / 4)
	switch {
	case !c.deadline.Before(soon):
		return c.deadline, nil
	case !b.answering() && now.Before(c.deadline):
		return c.deadline, nil
	case !b.answering():
		return time.Time{}, errQueuedBehindStall
	case !now.Before(c.deadline.Add(b.grace)):
		return time.Time{}, errSendTimeout
	}
	return soon, nil
}

// lead takes up to maxBatch pending calls, fails those past their
// deadline, sends the others on l as one pipeline that ends by the
// earliest of their deadlines, and hands every caller its reply. The
// pipeline is not cut short when the leader's own caller goes away: others
// wait for it.
func (b *batcher) lead(l *lane) {
	b.mu.Lock()
	n := min(len(b.pending), maxBatch)
	batch := make([]*scriptCall, n)
	copy(batch, b.pending)
	b.pending = append(b.pending[:0], b.pending[n:]...)
	// A lane handed to a caller whose call this pipeline takes is not
	// needed by it any more: it goes to the next one.
	var spare []*lane
	for _, c := range batch {
		c.taken.Store(true)
		if c.handed {
			select {
			case h := <-c.handoff:
				spare = append(spare, h)
			default: // its caller has it already, and leads with it
			}
		}
	}
	b.mu.Unlock()
	for _, h := range spare {
		b.release(h)
	}
	now := time.Now()
	live := batch[:0:0]
	var first time.Time
	for _, c := range batch {
		by, err := b.sendBy(c, now)
		if err != nil {
			c.err = err
			continue
		}
		if len(live) == 0 || by.Before(first) {
			first = by
		}
		live = append(live, c)
	}
	if len(live) > 0 {
		b.exec(l, live, first)
	}
	for _, c := range batch {
		close(c.done)
	}
}

// exec sends batch on l as one pipeline of EVALSHA, then, for the calls
// that Redis answered NOSCRIPT (which did not run, so sending them again
// counts nothing twice), one of EVAL, which also loads the script.
func (b *batcher) exec(l *lane, batch []*scriptCall, deadline time.Time) {
	if b.closed.Load() {
		fail(batch, redis.ErrClosed)
		return
	}
	// The deadline goes on first: the check reads the socket, and the last
	// pipeline's deadline has passed.
	if l.conn != nil && (l.conn.nc.SetDeadline(deadline) != nil || l.conn.stale(b.drops.Load())) {
		b.drop(l)
	}
	drops := b.drops.Load()
	if l.conn == nil {
		c, err := b.dialer.open(deadline, b.grace)
		if err != nil {
			b.failedLast.Store(true)
			fail(batch, err)
			return
		}
		l.conn = c
	}
	c := l.conn
	for eval := false; len(batch) > 0; eval = true {
		c.w = c.w[:0]
		for _, call := range batch {
			if call.asking {
				c.w = append(c.w, askingCommand...)
			}
			c.w = appendCall(c.w, call.script, call.args, eval)
		}
		c.w = append(c.w, b.wait...)
		if n, err := c.nc.Write(c.w); err != nil {
			b.drop(l)
			if n == 0 && errors.Is(err, os.ErrDeadlineExceeded) {
				// Nothing left: the deadline passed before this
				// process got to write (saturation, not Redis).
				fail(batch, fmt.Errorf("%w: %w", errSendTimeout, err))
				return
			}
			b.failedLast.Store(true)
			fail(batch, err)
			return
		}
		unknown := batch[:0:0]
		for i, call := range batch {
			var err error
			if call.asking {
				// ASKING's own reply (+OK): what matters is the call's.
				_, _, err = c.read()
			}
			var vals []int64
			var reply error
			if err == nil {
				vals, reply, err = c.read()
			}
			if err != nil {
				b.failedLast.Store(true)
				b.drop(l)
				fail(batch[i:], err)
				return
			}
			if !eval && noScript(reply) {
				unknown = append(unknown, call)
				continue
			}
			call.reply, call.err = vals, reply
		}
		if b.wait != nil {
			// The calls are answered (they ran): WAIT only tells whether
			// a replica has them. A connection lost now is dropped.
			acked, _, err := c.read()
			if err != nil {
				b.drop(l)
				return
			}
			if len(acked) != 1 || acked[0] < b.waitReplicas {
				b.unreplicated.Add(1)
			}
		}
		batch = unknown
	}
	b.failedLast.Store(false)
	c.used, c.drops = time.Now(), drops
}

// drop closes l's connection, found closed or after an I/O error (replies
// of a pipeline cut short would otherwise answer the next one), and has
// the other lanes check theirs before their next pipeline.
func (b *batcher) drop(l *lane) {
	b.drops.Add(1)
	_ = l.conn.nc.Close()
	l.conn = nil
}

// waitCommand is WAIT replicas timeout in RESP.
func waitCommand(replicas int, timeout time.Duration) []byte {
	var c command
	c.str("WAIT", "")
	c.int(int64(replicas))
	c.int(max(1, timeout.Milliseconds()))
	return append(appendArray(nil, c.n), c.b...)
}

// askingCommand is ASKING in RESP.
const askingCommand = "*1\r\n$6\r\nASKING\r\n"

func fail(calls []*scriptCall, err error) {
	for _, c := range calls {
		c.err = err
	}
}
