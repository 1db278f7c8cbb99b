package stripereport

import (
	"context"
	"errors"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// memStore is an in-memory Store for the reporter's tests: customers, an
// hourly ledger, records and leases, with a settable clock for lease
// expiry and an injectable failure of the next mark write.
type memStore struct {
	mu        sync.Mutex
	customers []store.Customer
	usage     map[string]map[string]int64 // customer|period → hour → billed
	records   map[string]store.Record     // kind|id
	leases    map[string]lease
	clock     func() time.Time
	// failPuts makes the next n PutRecord calls of KindSent fail.
	failPuts int
}

type lease struct {
	holder string
	until  time.Time
}

func newMemStore(clock func() time.Time) *memStore {
	return &memStore{
		usage:   make(map[string]map[string]int64),
		records: make(map[string]store.Record),
		leases:  make(map[string]lease),
		clock:   clock,
	}
}

func (m *memStore) addUsage(customer, period, hour string, units int64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	k := customer + "|" + period
	if m.usage[k] == nil {
		m.usage[k] = make(map[string]int64)
	}
	m.usage[k][hour] += units
}

// addMeterUsage adds units to an hour of another meter than the default.
func (m *memStore) addMeterUsage(customer, period, meter, hour string, units int64) {
	m.addUsage(customer, period+"|"+meter, hour, units)
}

func (m *memStore) ListCustomers(context.Context) ([]store.Customer, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]store.Customer(nil), m.customers...), nil
}

func (m *memStore) Usage(_ context.Context, subject, periodID string) (store.PeriodUsage, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	u := store.PeriodUsage{PeriodID: periodID}
	for h, v := range m.usage[subject+"|"+periodID] {
		u.Hours = append(u.Hours, store.HourUsage{HourID: h, Counters: store.Counters{Billed: v, Requests: v}})
		u.Billed += v
	}
	sort.Slice(u.Hours, func(i, j int) bool { return u.Hours[i].HourID < u.Hours[j].HourID })
	for k, hours := range m.usage {
		meter, ok := strings.CutPrefix(k, subject+"|"+periodID+"|")
		if !ok {
			continue
		}
		mu := store.MeterUsage{Meter: meter}
		for h, v := range hours {
			mu.Hours = append(mu.Hours, store.HourUsage{HourID: h, Counters: store.Counters{Billed: v, Requests: 1}})
			mu.Billed += v
		}
		sort.Slice(mu.Hours, func(i, j int) bool { return mu.Hours[i].HourID < mu.Hours[j].HourID })
		u.Meters = append(u.Meters, mu)
	}
	sort.Slice(u.Meters, func(i, j int) bool { return u.Meters[i].Meter < u.Meters[j].Meter })
	return u, nil
}

var errInjected = errors.New("injected store failure")

func (m *memStore) PutRecord(_ context.Context, r store.Record, onlyIfAbsent bool) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if r.Kind == KindSent && m.failPuts > 0 {
		m.failPuts--
		return false, errInjected
	}
	k := r.Kind + "|" + r.ID
	if old, ok := m.records[k]; ok && onlyIfAbsent && (old.Expires.IsZero() || m.clock().Before(old.Expires)) {
		return false, nil
	}
	m.records[k] = r
	return true, nil
}

func (m *memStore) GetRecord(_ context.Context, kind, id string) (store.Record, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	r, ok := m.records[kind+"|"+id]
	if !ok || (!r.Expires.IsZero() && !m.clock().Before(r.Expires)) {
		return store.Record{}, store.ErrNotFound
	}
	return r, nil
}

func (m *memStore) ListRecords(_ context.Context, kind, prefix string) ([]store.Record, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []store.Record
	for _, r := range m.records {
		if r.Kind == kind && strings.HasPrefix(r.ID, prefix) && (r.Expires.IsZero() || m.clock().Before(r.Expires)) {
			out = append(out, r)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

func (m *memStore) DeleteRecord(_ context.Context, kind, id string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.records, kind+"|"+id)
	return nil
}

func (m *memStore) TryLease(_ context.Context, name, holder string, ttl time.Duration) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.clock()
	if l, ok := m.leases[name]; ok && l.holder != holder && now.Before(l.until) {
		return false, nil
	}
	m.leases[name] = lease{holder: holder, until: now.Add(ttl)}
	return true, nil
}

func (m *memStore) ReleaseLease(_ context.Context, name, holder string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if l, ok := m.leases[name]; ok && l.holder == holder {
		delete(m.leases, name)
	}
	return nil
}
