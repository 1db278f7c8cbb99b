package storetest

import (
	"testing"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// voided sends the void of r (store.VoidOf) through c.
func voided(t *testing.T, c *meterClient, r store.Reservation) {
	t.Helper()
	if err := c.m.Settle(t.Context(), store.VoidOf(r)); err != nil {
		t.Fatalf("Settle(void of %s seq %d): %v", r.Origin, r.Seq, err)
	}
}

// testVoid checks store.Settlement.Void: a reservation whose reply was
// lost and whose request was refused is counted by nobody, whether it ran
// before its void, after it, or never, and however often the void is
// replayed.
func testVoid(t *testing.T, clients func(t *testing.T) (ca, cb *meterClient)) {
	cur, _ := periods()
	t.Run("OriginalRanFirst", func(t *testing.T) {
		ca, cb := clients(t)
		q := quota(cur, store.QuotaBill, 5)
		// A first reservation: 3 units (5 included, no overage) and 10
		// bytes (6 included, 4 overage).
		_, out := ca.mwant(mres("acme", q, 3, mq("bytes", store.QuotaBill, 10, 6)), true, 10, 4)
		if out.Used != 3 || out.Overage != 0 {
			t.Fatalf("first reservation: %+v", out)
		}
		ca.want(res("acme", q, 4), true, 7, 2)
		r2, out2 := ca.mwant(withKey(mres("acme", q, 1, mq("bytes", store.QuotaBill, 5, 6)), "k"), true, 15, 5)
		if out2.Used != 8 || out2.Overage != 1 {
			t.Fatalf("lost reservation: %+v", out2)
		}
		// Its reply was lost; the request was refused, and its void is
		// replayed (twice: the spool may be replayed again).
		for range 2 {
			voided(t, cb, r2)
			ca.usageWant("acme", cur.ID(), store.Counters{Billed: 7, Overage: 2, Requests: 2})
			ca.meterWant("acme", cur.ID(), "bytes", store.Counters{Billed: 10, Overage: 4, Requests: 1})
		}
		// A replay of the original counts nothing; its key is forgotten,
		// so a retry is billed.
		if _, o := cb.reserve(replayed(r2)); !o.Duplicate {
			t.Fatalf("replay of a voided reservation: %+v; want a Duplicate", o)
		}
		if _, o := ca.want(withKey(res("acme", q, 1), "k"), true, 8, 1); o.Duplicate {
			t.Error("retry after a void was a duplicate")
		}
	})
	t.Run("DuplicateServedKeepsIt", func(t *testing.T) {
		ca, cb := clients(t)
		q := quota(cur, store.QuotaBill, 100)
		// The lost reservation ran; its request was refused, and the
		// client's retry with the same key was served as its duplicate:
		// the reservation pays for that retry and stays counted.
		r, _ := ca.want(withKey(res("acme", q, 3), "k"), true, 3, 0)
		if _, o := cb.want(withKey(res("acme", q, 3), "k"), true, 3, 0); !o.Duplicate {
			t.Fatalf("retry: %+v; want a Duplicate", o)
		}
		voided(t, cb, r)
		voided(t, cb, r)
		ca.usageWant("acme", cur.ID(), store.Counters{Billed: 3, Requests: 1})
	})
	t.Run("NothingLeft", func(t *testing.T) {
		ca, cb := clients(t)
		q := quota(cur, store.QuotaBill, 2)
		r, _ := ca.want(res("acme", q, 5), true, 5, 3)
		voided(t, cb, r)
		if u := ca.usage("acme", cur.ID()); u.Counters != (store.Counters{}) || len(u.Hours) != 0 {
			t.Fatalf("ledger after voiding the only reservation: %+v; want nothing", u)
		}
	})
	t.Run("VoidBeforeOriginal", func(t *testing.T) {
		ca, cb := clients(t)
		q := quota(cur, store.QuotaBill, 100)
		ca.want(res("acme", q, 2), true, 2, 0)
		// Sent, not yet run (Redis stalled): voided first.
		r := mres("acme", q, 4, mq("bytes", store.QuotaMeter, 7, 0))
		r.Origin, r.Seq = ca.origin, ca.nextSeq("acme")
		voided(t, cb, r)
		voided(t, cb, r)
		ca.usageWant("acme", cur.ID(), store.Counters{Billed: 2, Requests: 1})
		// The original runs late: it counts nothing.
		if _, o := cb.reserve(r); !o.Allowed || !o.Duplicate || o.Used != 2 {
			t.Fatalf("original run after its void: %+v; want a Duplicate counting nothing", o)
		}
		if _, o := cb.reserve(replayed(r)); !o.Duplicate {
			t.Fatalf("replay after its void: %+v; want a Duplicate", o)
		}
		voided(t, cb, r)
		ca.usageWant("acme", cur.ID(), store.Counters{Billed: 2, Requests: 1})
		ca.meterWant("acme", cur.ID(), "bytes", store.Counters{})
		// Later reservations of the origin are counted as usual.
		ca.want(res("acme", q, 1), true, 3, 0)
	})
	t.Run("SettledNotVoided", func(t *testing.T) {
		ca, cb := clients(t)
		q := quota(cur, store.QuotaBill, 100)
		r, out := ca.want(res("acme", q, 5), true, 5, 0)
		ca.settle(r, out, 3)
		voided(t, cb, r)
		ca.usageWant("acme", cur.ID(), store.Counters{Billed: 3, Requests: 1})
	})
}
