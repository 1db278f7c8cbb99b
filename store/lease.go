package store

import (
	"context"
	"time"
)

// Lease is a lease in a store's records (Records.TryLease): the work it
// guards is done by one holder at a time.
type Lease struct {
	// Name names the lease.
	Name string
	// Holder identifies this holder; unique per instance and config, so
	// the old and the new app of a reload never both hold it.
	Holder string
	// TTL is how long the lease lasts without renewal: a holder that dies
	// holding it hands over after this long.
	TTL time.Duration
}

// Renew takes or renews the lease and reports whether Holder holds it.
func (l Lease) Renew(ctx context.Context, rec Records) (bool, error) {
	return rec.TryLease(ctx, l.Name, l.Holder, l.TTL)
}

// leaseReleaseTimeout bounds the release of a lease at stop.
const leaseReleaseTimeout = 5 * time.Second

// LeasedLoop is the loop of a background task that one instance at a time
// does under a lease: the notifier and the Stripe reporter run one.
type LeasedLoop struct {
	// Lease is the task's lease.
	Lease Lease
	// Records returns the store holding the lease, or why it is not
	// available now.
	Records func() (Records, error)
	// Run does one round of the task (taking or renewing the lease as it
	// needs) and returns how long to wait before the next.
	Run func(ctx context.Context) time.Duration
	// RenewEvery, when positive, renews the lease this often between
	// rounds, for a task whose rounds are further apart than its lease
	// lasts; OnRenewError (optional) is told why a renewal failed.
	RenewEvery   time.Duration
	OnRenewError func(error)
	// Requests are rounds asked for between the scheduled ones (optional).
	// Each is called in the loop, so that rounds never overlap.
	Requests <-chan func(ctx context.Context)
}

// Loop runs a round at once and then as Run asks, until ctx is done; then
// it releases the lease, so that the next holder (the new config of a
// reload) takes over at once instead of after TTL.
func (l LeasedLoop) Loop(ctx context.Context) {
	next := time.NewTimer(0)
	defer next.Stop()
	var renew <-chan time.Time
	if l.RenewEvery > 0 {
		t := time.NewTicker(l.RenewEvery)
		defer t.Stop()
		renew = t.C
	}
	for {
		select {
		case <-ctx.Done():
			if rec, err := l.Records(); err == nil {
				rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), leaseReleaseTimeout)
				_ = rec.ReleaseLease(rctx, l.Lease.Name, l.Lease.Holder)
				cancel()
			}
			return
		case <-next.C:
			next.Reset(l.Run(ctx))
		case req := <-l.Requests:
			req(ctx)
		case <-renew:
			rec, err := l.Records()
			if err == nil {
				_, err = l.Lease.Renew(ctx, rec)
			}
			if err != nil && ctx.Err() == nil && l.OnRenewError != nil {
				l.OnRenewError(err)
			}
		}
	}
}
