package redisstore

import (
	"context"
	"encoding/json"
	"os"
	"reflect"
	"testing"
	"time"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// TestSingleMeterLayoutReadUnchanged loads the period hash and outbox that
// the code before meters existed wrote (commit 9f07f54,
// testdata/single-meter.json: two reservations, a third one settled
// above its reservation, through origin o1): the usage and outbox read as
// written, the replay window still holds, and a reservation with meters
// counts on from there.
func TestSingleMeterLayoutReadUnchanged(t *testing.T) {
	raw, err := os.ReadFile("testdata/single-meter.json")
	if err != nil {
		t.Fatal(err)
	}
	var fx struct {
		PeriodHash map[string][]byte `json:"period_hash"`
		Outbox     []string          `json:"outbox"`
	}
	if err := json.Unmarshal(raw, &fx); err != nil {
		t.Fatal(err)
	}
	s := openStore(t, Options{KeyPrefix: newPrefix(t)})
	c := rawClient(t)
	ctx := context.Background()
	const period = "20990101T000000Z"
	for f, v := range fx.PeriodHash {
		if err := c.HSet(ctx, s.periodKey("acme", period), f, v).Err(); err != nil {
			t.Fatal(err)
		}
	}
	for _, e := range fx.Outbox {
		if err := c.RPush(ctx, s.outboxKey("acme"), e).Err(); err != nil {
			t.Fatal(err)
		}
	}
	want := store.PeriodUsage{PeriodID: period, Counters: store.Counters{Billed: 102, Overage: 2, Requests: 3}, Thresholds: []int{80},
		Hours: []store.HourUsage{
			{HourID: "20990101T000000Z", Counters: store.Counters{Billed: 90, Requests: 2}},
			{HourID: "20990101T010000Z", Counters: store.Counters{Billed: 12, Overage: 2, Requests: 1}},
		}}
	wantEvents := []store.ThresholdEvent{{ID: "acme|" + period + "|80", Subject: "acme", PeriodID: period, Threshold: 80,
		Used: 90, Included: 100, At: time.UnixMicro(1796562328129149).UTC()}}
	check := func(want store.PeriodUsage) {
		t.Helper()
		if u, err := s.Usage(ctx, "acme", period); err != nil || !reflect.DeepEqual(u, want) {
			t.Fatalf("usage %+v, %v;\nwant %+v", u, err, want)
		}
		if evs, err := s.ThresholdEvents(ctx, "acme"); err != nil || !reflect.DeepEqual(evs, wantEvents) {
			t.Fatalf("events %+v, %v;\nwant %+v", evs, err, wantEvents)
		}
	}
	check(want)
	q := store.Quota{PeriodID: period, PeriodEnd: time.Date(2099, 2, 1, 0, 0, 0, 0, time.UTC), HourID: "20990101T010000Z",
		Included: 100, Mode: store.QuotaBill, Thresholds: []int{80}}
	upload := []store.MeterReservation{{Meter: "upload", Mode: store.QuotaBill, Included: 100, Amount: 9}}
	// Seq 3 was reserved and settled before: its replay is not applied.
	if out, err := s.Reserve(ctx, store.Reservation{Subject: "acme", Cost: 5, Quota: q, Origin: "o1", Seq: 3, Replay: true, Meters: upload}); err != nil || !out.Duplicate {
		t.Fatalf("replay of a seq reserved by the old code: %+v, %v; want a Duplicate", out, err)
	}
	out, err := s.Reserve(ctx, store.Reservation{Subject: "acme", Cost: 1, Quota: q, Origin: "o1", Seq: 4, Meters: upload})
	if err != nil || out.Used != 103 || out.Overage != 1 || len(out.Crossed) != 0 || out.Meters[0].Used != 9 {
		t.Fatalf("reservation on the old usage: %+v, %v; want default Used 103, Overage 1, upload 9", out, err)
	}
	want.Counters = store.Counters{Billed: 103, Overage: 3, Requests: 4}
	want.Hours[1].Counters = store.Counters{Billed: 13, Overage: 3, Requests: 2}
	want.Meters = []store.MeterUsage{{Meter: "upload", Counters: store.Counters{Billed: 9, Requests: 1},
		Hours: []store.HourUsage{{HourID: "20990101T010000Z", Counters: store.Counters{Billed: 9, Requests: 1}}}}}
	check(want)
}

// TestMetersInThePeriodHash checks where a reservation with meters writes:
// only fields of the period hash (one key, one slot) besides what the
// default meter writes, and the outbox entry of a meter names it.
func TestMetersInThePeriodHash(t *testing.T) {
	prefix := newPrefix(t)
	s := openStore(t, Options{KeyPrefix: prefix})
	c := rawClient(t)
	ctx := context.Background()
	q := blockQuota(100)
	q.Thresholds = nil
	r := store.Reservation{Subject: "acme", Cost: 1, Quota: q, Meters: []store.MeterReservation{
		{Meter: "tokens", Mode: store.QuotaBill, Included: 10, Thresholds: []int{100}},
		{Meter: "upload", Mode: store.QuotaBill, Included: 10, Amount: 3},
	}}
	out, err := s.Reserve(ctx, r)
	if err != nil || !out.Allowed {
		t.Fatalf("Reserve: %+v, %v", out, err)
	}
	if err := s.Settle(ctx, store.Settlement{Subject: "acme", Quota: q, Reserved: 1, Actual: 1,
		Meters: []store.MeterSettlement{{Meter: "tokens", Actual: 12, Quota: r.Meters[0]}}}); err != nil {
		t.Fatal(err)
	}
	keys, err := c.Keys(ctx, prefix+"*").Result()
	if err != nil {
		t.Fatal(err)
	}
	wantKeys := map[string]bool{s.periodKey("acme", q.PeriodID): true, s.outboxKey("acme"): true, s.outboxSubjectsKey(): true}
	for _, k := range keys {
		if !wantKeys[k] {
			t.Errorf("unexpected key %s", k)
		}
	}
	fields, err := c.HKeys(ctx, s.periodKey("acme", q.PeriodID)).Result()
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]bool{"c": true, "h:" + q.HourID: true, "c:tokens": true, "h:" + q.HourID + ":tokens": true,
		"crossed:tokens": true, "c:upload": true, "h:" + q.HourID + ":upload": true}
	if len(fields) != len(want) {
		t.Errorf("period hash fields %v, want %v", fields, want)
	}
	for _, f := range fields {
		if !want[f] {
			t.Errorf("unexpected period hash field %q", f)
		}
	}
	ob, err := c.LRange(ctx, s.outboxKey("acme"), 0, -1).Result()
	if err != nil || len(ob) != 1 || ob[0][:len("@tokens|"+q.PeriodID+"|100|12|10|")] != "@tokens|"+q.PeriodID+"|100|12|10|" {
		t.Errorf("outbox %q, %v; want one tokens entry", ob, err)
	}
}
