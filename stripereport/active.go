package stripereport

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/store"
)

// Finding the customers to report. A store with an hour index
// (store.HourIndex) names the subjects metered in each hour, so a tick
// reads the customers metered in the hours that closed since the last
// tick, those metered late (after their hour) and those with a failed
// hour, instead of every customer: its work does not grow with idle
// customers. The cursor record says up to which
// hour that was done. A full pass over every customer runs when there is
// no cursor (the first tick, or a store that forgot it), when the cursor
// is older than the index keeps, and every FullPassEvery, for customers
// the index missed (an index write lost to a crash, a Stripe id linked
// after the customer's hours closed). A store without the index gets a
// full pass every tick.

// KindCursor is the record kind of the reporter's cursor (id "hours").
const KindCursor = "stripe_cursor"

// FullPassEvery is how often the reporter reads every customer although
// the store has an hour index.
const FullPassEvery = 24 * time.Hour

// cursor is the content of the KindCursor record.
type cursor struct {
	// Next is the first hour (metering.TimeID) not handled: every
	// customer indexed in an earlier hour was handled by a completed
	// tick, and its closed hours sent, marked or recorded as failed.
	Next string `json:"next"`
	// Full is when the last full pass completed.
	Full time.Time `json:"full"`
}

// indexedStore is a Store with an hour index.
type indexedStore interface {
	store.HourIndex
	GetCustomer(ctx context.Context, id string) (store.Customer, error)
}

// customers returns the customers a tick reports, and commit, to call
// once the tick handled every one of them.
func (r *Reporter) customers(ctx context.Context) ([]store.Customer, func(context.Context) error, error) {
	full := func(ctx context.Context) ([]store.Customer, error) {
		cs, err := r.Store.ListCustomers(ctx)
		if err != nil {
			return nil, fmt.Errorf("listing customers: %w", err)
		}
		return cs, nil
	}
	idx, ok := r.Store.(indexedStore)
	if !ok {
		cs, err := full(ctx)
		return cs, func(context.Context) error { return nil }, err
	}
	now := r.now()
	// end is the first hour not closed at now.
	end := now.Add(-r.SettleGrace - time.Hour).UTC().Truncate(time.Hour).Add(time.Hour)
	var cur cursor
	rec, err := r.Store.GetRecord(ctx, KindCursor, "hours")
	switch {
	case errors.Is(err, store.ErrNotFound):
	case err != nil:
		return nil, nil, fmt.Errorf("reading the reporter's cursor: %w", err)
	default:
		_ = json.Unmarshal(rec.Data, &cur) // unreadable: a full pass
	}
	next, perr := metering.ParseTimeID(cur.Next)
	// Late subjects are read before any usage, so the usage read has
	// their late calls.
	late, err := idx.LateSubjects(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("listing the customers metered late: %w", err)
	}
	commit := func(full time.Time) func(context.Context) error {
		return func(ctx context.Context) error {
			if !next.After(end) { // else another reporter's clock went further
				data, _ := json.Marshal(cursor{Next: metering.TimeID(end), Full: full})
				if _, err := r.Store.PutRecord(ctx, store.Record{Kind: KindCursor, ID: "hours", Data: data}, false); err != nil {
					return err
				}
			}
			return idx.DoneLate(ctx, late)
		}
	}
	if perr != nil || cur.Full.IsZero() || now.Sub(cur.Full) >= FullPassEvery ||
		now.Sub(next) > store.HourIndexRetention-2*24*time.Hour {
		cs, err := full(ctx)
		return cs, commit(now), err
	}
	ids := make(map[string]bool)
	for h := next; h.Before(end); h = h.Add(time.Hour) {
		subs, err := idx.HourSubjects(ctx, metering.TimeID(h))
		if err != nil {
			return nil, nil, fmt.Errorf("listing the customers metered in %s: %w", metering.TimeID(h), err)
		}
		for _, s := range subs {
			ids[s] = true
		}
	}
	for _, l := range late {
		ids[l.Subject] = true
	}
	failed, err := r.Store.ListRecords(ctx, KindFailed, "")
	if err != nil {
		return nil, nil, fmt.Errorf("listing failed Stripe hours: %w", err)
	}
	for _, f := range failed {
		id, _, _ := strings.Cut(f.ID, "|")
		ids[id] = true
	}
	var cs []store.Customer
	for _, id := range slices.Sorted(maps.Keys(ids)) {
		c, err := idx.GetCustomer(ctx, id)
		if errors.Is(err, store.ErrNotFound) {
			continue
		}
		if err != nil {
			return nil, nil, fmt.Errorf("reading customer %q: %w", id, err)
		}
		cs = append(cs, c)
	}
	return cs, commit(cur.Full), nil
}
