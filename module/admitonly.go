package module

import (
	"context"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// admitOnly adapts a store without metering (rate limits only) while the
// stores gain store.Meter. TEMPORARY: removed once both stores implement it.
type admitOnly struct{ store.Store }

func (a admitOnly) Reserve(ctx context.Context, r store.Reservation) (store.Reserved, error) {
	if !r.Rate.Valid() {
		return store.Reserved{Allowed: true}, nil
	}
	d, err := a.Admit(ctx, store.Admission{Subject: r.Subject, Rate: r.Rate, Cost: r.Cost})
	return store.Reserved{Allowed: d.Allowed, Rate: d}, err
}
func (admitOnly) Settle(context.Context, store.Settlement) error { return nil }
func (admitOnly) Usage(context.Context, string, string) (store.PeriodUsage, error) {
	return store.PeriodUsage{}, nil
}
func (admitOnly) ThresholdEvents(context.Context, string) ([]store.ThresholdEvent, error) {
	return nil, nil
}
