package spool

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// captureMeter records the reservations and settlements replayed into it.
type captureMeter struct {
	store.Meter
	reservations []store.Reservation
	settlements  []store.Settlement
}

func (m *captureMeter) Reserve(_ context.Context, r store.Reservation) (store.Reserved, error) {
	m.reservations = append(m.reservations, r)
	return store.Reserved{Allowed: true}, nil
}

func (m *captureMeter) Settle(_ context.Context, s store.Settlement) error {
	m.settlements = append(m.settlements, s)
	return nil
}

// TestMetersSpooled checks that a spooled reservation and settlement keep
// their meters.
func TestMetersSpooled(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "spool"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	tokens := store.MeterReservation{Meter: "tokens", Mode: store.QuotaBill, Included: 100, Thresholds: []int{80}}
	r := store.Reservation{Subject: "acme", Origin: "o1", Seq: 1, Cost: 1, Replay: true,
		Meters: []store.MeterReservation{tokens, {Meter: "upload", Amount: 300}}}
	st := store.Settlement{Subject: "acme", Origin: "o1", Seq: 1, Reserved: 1, Actual: 1, Replay: true,
		Meters: []store.MeterSettlement{{Meter: "tokens", Actual: 40, Quota: tokens}}}
	for _, rec := range []Record{{Reservation: &r}, {Settlement: &st}} {
		if err := s.Append(rec); err != nil {
			t.Fatal(err)
		}
	}
	m := &captureMeter{}
	if n, err := s.Replay(context.Background(), m); n != 2 || err != nil {
		t.Fatalf("Replay = %d, %v", n, err)
	}
	if len(m.reservations) != 1 || !reflect.DeepEqual(m.reservations[0], r) || len(m.settlements) != 1 || !reflect.DeepEqual(m.settlements[0], st) {
		t.Errorf("replayed %+v %+v;\nwant %+v %+v", m.reservations, m.settlements, r, st)
	}
}

// TestRecordsWithoutMeters checks the record format against the one
// written before meters existed: a record without meters is written
// without a Meters field (byte for byte what older code wrote), and a
// record older code wrote replays as the default meter only.
func TestRecordsWithoutMeters(t *testing.T) {
	b, err := json.Marshal(Record{Reservation: &store.Reservation{Subject: "acme", Origin: "o1", Seq: 1, Cost: 1}})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(b), "Meters") {
		t.Errorf("a record without meters is written as %s; want no Meters field", b)
	}
	// Records as commit 9f07f54 wrote them.
	old := []string{
		`{"reservation":{"Subject":"acme","Rate":{"Limit":10,"Period":3600000000000,"Burst":0},"Cost":3,"Quota":{"PeriodID":"20261201T000000Z","PeriodEnd":"2027-01-01T00:00:00Z","HourID":"20261206T130000Z","Included":100,"Mode":"bill","Throttle":{"Limit":0,"Period":0,"Burst":0},"Thresholds":[80]},"IdempotencyKey":"","IdempotencyFingerprint":"","IdempotencyRepeats":0,"IdempotencyWindow":0,"Origin":"o1","Seq":1,"Replay":true}}`,
		`{"settlement":{"Subject":"acme","Quota":{"PeriodID":"20261201T000000Z","PeriodEnd":"2027-01-01T00:00:00Z","HourID":"20261206T130000Z","Included":100,"Mode":"bill","Throttle":{"Limit":0,"Period":0,"Burst":0},"Thresholds":[80]},"IdempotencyKey":"","IdempotencyFingerprint":"","Reserved":3,"Overage":0,"Actual":5,"Origin":"o1","Seq":1,"Replay":true}}`,
	}
	dir := t.TempDir()
	seg := append([]byte(nil), segHeader...)
	for _, o := range old {
		seg = append(seg, encodeFrame([]byte(o))...)
	}
	if err := os.WriteFile(filepath.Join(dir, segName(1)), seg, 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	m := &captureMeter{}
	if n, err := s.Replay(context.Background(), m); n != 2 || err != nil {
		t.Fatalf("Replay = %d, %v", n, err)
	}
	if len(m.reservations) != 1 || m.reservations[0].Cost != 3 || m.reservations[0].Meters != nil ||
		len(m.settlements) != 1 || m.settlements[0].Actual != 5 || m.settlements[0].Meters != nil {
		t.Errorf("old records replayed as %+v %+v; want cost 3 and actual 5, no meters", m.reservations, m.settlements)
	}
}
