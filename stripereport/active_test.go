package stripereport

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/apimonetize/caddy-api-monetize/internal/stripedouble"
	"github.com/apimonetize/caddy-api-monetize/store"
)

// indexedMem is the reporter tests' memStore with an hour index whose
// writes a test can lose, and a count of full listings.
type indexedMem struct {
	*memStore
	mu    sync.Mutex
	index map[string][]string // hour → subjects
	late  map[string]int64    // subject → version
	lists int
}

func (m *indexedMem) HourSubjects(_ context.Context, hourID string) ([]string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.index[hourID]), nil
}

func (m *indexedMem) LateSubjects(context.Context) ([]store.LateSubject, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []store.LateSubject
	for s, v := range m.late {
		out = append(out, store.LateSubject{Subject: s, Version: v})
	}
	return out, nil
}

func (m *indexedMem) DoneLate(_ context.Context, done []store.LateSubject) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, d := range done {
		if m.late[d.Subject] == d.Version {
			delete(m.late, d.Subject)
		}
	}
	return nil
}

func (m *indexedMem) GetCustomer(_ context.Context, id string) (store.Customer, error) {
	cs, _ := m.memStore.ListCustomers(context.Background())
	for _, c := range cs {
		if c.ID == id {
			return c, nil
		}
	}
	return store.Customer{}, store.ErrNotFound
}

func (m *indexedMem) ListCustomers(ctx context.Context) ([]store.Customer, error) {
	m.mu.Lock()
	m.lists++
	m.mu.Unlock()
	return m.memStore.ListCustomers(ctx)
}

// meter adds billed units to customer's hour, and indexes the hour unless
// the index write is lost.
func (m *indexedMem) meter(customer, hour string, units int64, indexed bool) {
	m.addUsage(customer, period, hour, units)
	if indexed {
		m.mu.Lock()
		m.index[hour] = append(m.index[hour], customer)
		m.mu.Unlock()
	}
}

// meterLate adds billed units to customer's hour after the hour closed
// (a spool replayed after an outage).
func (m *indexedMem) meterLate(customer, hour string, units int64) {
	m.addUsage(customer, period, hour, units)
	m.mu.Lock()
	m.late[customer]++
	m.mu.Unlock()
}

func (m *indexedMem) listings() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.lists
}

func newIndexed(f *fixture) (*indexedMem, *Reporter) {
	st := &indexedMem{memStore: f.st, index: make(map[string][]string), late: make(map[string]int64)}
	r := f.reporter("a")
	r.Store = st
	return st, r
}

// TestIndexedTicksReadMeteredCustomers: with an hour index, only the first
// tick lists every customer; later ticks report the customers indexed in
// the hours that closed since. A customer whose index write was lost is
// reported by the next full pass, FullPassEvery later, once.
func TestIndexedTicksReadMeteredCustomers(t *testing.T) {
	f := newFixture(t)
	st, r := newIndexed(f)
	st.meter("acme", f.hour(3), 10, true)
	if res := tick(t, r); res.Sent != 1 || st.listings() != 1 {
		t.Fatalf("first tick: %+v, %d listings; want acme's hour sent by a full pass", res, st.listings())
	}
	st.meter("acme", f.hour(1), 20, true)
	st.meter("beta", f.hour(1), 30, false) // its index write was lost
	f.advance(time.Hour)
	if res := tick(t, r); res.Sent != 1 || res.Hours[0].Customer != "acme" || st.listings() != 1 {
		t.Fatalf("tick after the hour closed: %+v, %d listings; want acme's hour alone, without listing customers", res, st.listings())
	}
	f.advance(10 * time.Minute)
	if res := tick(t, r); res.Sent != 0 || st.listings() != 1 {
		t.Fatalf("tick with no hour closed: %+v, %d listings", res, st.listings())
	}
	f.advance(FullPassEvery)
	if res := tick(t, r); res.Sent != 1 || res.Hours[0].Customer != "beta" || st.listings() != 2 {
		t.Fatalf("tick a day later: %+v, %d listings; want beta's hour sent by a full pass", res, st.listings())
	}
	want := map[string]int64{"cus_ACME|" + f.hour(3): 10, "cus_ACME|" + f.hour(1): 20, "cus_BETA|" + f.hour(1): 30}
	if got := f.sums(); len(got) != len(want) || got["cus_ACME|"+f.hour(1)] != 20 || got["cus_BETA|"+f.hour(1)] != 30 {
		t.Fatalf("Stripe has %v, want %v", got, want)
	}
}

// TestIndexedTickRetriesWhatFailed: a tick that stopped because Stripe
// was unreachable leaves the cursor where it was, so the next tick tries
// the same hours again; every hour reaches Stripe once.
func TestIndexedTickRetriesWhatFailed(t *testing.T) {
	f := newFixture(t)
	st, r := newIndexed(f)
	tick(t, r) // the first full pass: nothing to send
	st.meter("acme", f.hour(1), 20, true)
	st.meter("beta", f.hour(1), 30, true)
	f.advance(time.Hour)
	f.double.Fail(stripedouble.ServerError, stripedouble.ServerError, stripedouble.ServerError, stripedouble.ServerError, stripedouble.ServerError)
	if res := tick(t, r); res.Sent != 0 || res.Failed != 1 {
		t.Fatalf("tick while Stripe fails: %+v", res)
	}
	f.advance(10 * time.Minute)
	if res := tick(t, r); res.Sent != 2 {
		t.Fatalf("tick after Stripe is back: %+v; want both hours sent", res)
	}
	f.advance(time.Hour)
	if res := tick(t, r); res.Sent != 0 || res.Failed != 0 {
		t.Fatalf("tick after: %+v; want nothing sent again", res)
	}
	if got := f.sums(); len(got) != 2 || got["cus_ACME|"+f.hour(1)] != 20 || got["cus_BETA|"+f.hour(1)] != 30 || st.listings() != 1 {
		t.Fatalf("Stripe has %v after %d listings; want each hour once, one listing", got, st.listings())
	}
}

// TestIndexedTickReportsLateUsage: usage metered after its hour closed
// and after the cursor passed it (a spool replayed after an outage) is
// reported by the next tick, once, and the late entry is then removed.
func TestIndexedTickReportsLateUsage(t *testing.T) {
	f := newFixture(t)
	st, r := newIndexed(f)
	tick(t, r) // the first full pass: nothing to send
	st.meterLate("beta", f.hour(3), 9)
	if res := tick(t, r); res.Sent != 1 || res.Hours[0].Customer != "beta" || res.Hours[0].Units != 9 {
		t.Fatalf("tick after the late usage: %+v; want beta's hour sent", res)
	}
	if late, _ := st.LateSubjects(context.Background()); len(late) != 0 {
		t.Fatalf("late subjects left after the tick: %v", late)
	}
	if res := tick(t, r); res.Sent != 0 || st.listings() != 1 {
		t.Fatalf("next tick: %+v, %d listings", res, st.listings())
	}
	if got := f.sums(); len(got) != 1 || got["cus_BETA|"+f.hour(3)] != 9 {
		t.Fatalf("Stripe has %v", got)
	}
}
