package notifier

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/notify"
	"github.com/apimonetize/caddy-api-monetize/notify/notifytest"
	"github.com/apimonetize/caddy-api-monetize/store"
	"github.com/apimonetize/caddy-api-monetize/store/boltstore"
)

const testSecret = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY"

// TestNotifierDeliversOnceWithRetry runs two notifiers (two instances) on
// one store: a threshold crossing becomes one notification per channel,
// created with the injected payload, delivered by the lease holder only,
// retried after the receiver's first refusal, and delivered exactly once;
// the other instance sends nothing.
func TestNotifierDeliversOnceWithRetry(t *testing.T) {
	ctx := context.Background()
	st, err := boltstore.Open(filepath.Join(t.TempDir(), "store.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	p := metering.PeriodRule{}.Period(time.Now(), time.Time{})
	q := store.Quota{PeriodID: p.ID(), PeriodEnd: p.End, HourID: metering.TimeID(metering.HourStart(time.Now())), Mode: store.QuotaBill, Included: 10, Thresholds: []int{50}}
	if out, err := st.Reserve(ctx, store.Reservation{Subject: "acme", Cost: 5, Quota: q}); err != nil || len(out.Crossed) != 1 {
		t.Fatalf("reserve: %+v, %v; want the 50%% threshold crossed", out, err)
	}

	rcv := notifytest.NewReceiver(t, testSecret, 1)
	key, err := notify.ParseSecret(testSecret)
	if err != nil {
		t.Fatal(err)
	}
	ch := WebhookChannel(rcv.URL)
	newNotifier := func(holder string) *Notifier {
		return &Notifier{
			Holder: holder, LeaseTTL: time.Hour,
			Webhooks: map[string]notify.Webhook{ch: {URL: rcv.URL, Key: key}}, Channels: []string{ch},
			Payload: func(c store.Customer, ev store.ThresholdEvent) []byte {
				return []byte(`{"customer":"` + ev.Subject + `"}`)
			},
			Retry:          notify.Retry{Base: time.Millisecond, Max: time.Millisecond, GiveUp: time.Hour},
			AttemptTimeout: 5 * time.Second, StopGrace: time.Second, KeyScanInterval: time.Hour,
		}
	}
	a, b := newNotifier("a"), newNotifier("b")
	a.Tick(ctx, st) // takes the lease; the first attempt is refused
	all, err := Load(ctx, st, "")
	if err != nil || len(all) != 1 {
		t.Fatalf("notifications after the first tick: %+v, %v; want one", all, err)
	}
	if nt := all[0]; nt.State != StatePending || nt.Attempts != 1 || nt.LastError == "" || nt.Channel != ch || string(nt.Payload) != `{"customer":"acme"}` {
		t.Fatalf("after a refused attempt: %+v; want pending, 1 attempt, its error, the injected payload", nt)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		b.Tick(ctx, st) // never holds the lease
		a.Tick(ctx, st)
		if all, _ = Load(ctx, st, ""); all[0].State == StateDelivered || time.Now().After(deadline) {
			break
		}
		time.Sleep(2 * time.Millisecond)
	}
	if nt := all[0]; nt.State != StateDelivered || nt.Attempts != 2 || nt.ID != nt.Event.ID+"|"+ch {
		t.Fatalf("after the retry: %+v; want delivered at the second attempt", nt)
	}
	a.Tick(ctx, st)
	b.Tick(ctx, st)
	unique, total := rcv.Accepted()
	if len(unique) != 1 || total != 1 || len(rcv.Requests()) != 2 || len(rcv.Invalid()) != 0 {
		t.Errorf("the receiver accepted %d deliveries (%d unique) of %d requests, %d unverified; want one accepted of two", total, len(unique), len(rcv.Requests()), len(rcv.Invalid()))
	}
}
