package spool

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// FuzzSpoolRecover fuzzes what a restart reads back from disk: a segment
// (after its header) and the progress file, as a crash or a damaged disk
// may have left them. Properties: no panic; Replay sends only valid
// records, each marked Replay, at most as many as Len counted; after it
// Len is 0; and a reopened spool replays nothing again (its progress was
// kept), so no usage is applied twice.
func FuzzSpoolRecover(f *testing.F) {
	seedDir := filepath.Join(f.TempDir(), "seed")
	s, err := Open(seedDir)
	if err != nil {
		f.Fatal(err)
	}
	for i, rec := range []Record{
		{Reservation: &store.Reservation{Subject: "acme", Origin: "o1", Seq: 1, Cost: 3}},
		{Settlement: &store.Settlement{Subject: "acme", Origin: "o1", Seq: 1}},
		{Reservation: &store.Reservation{Subject: "bigco", Origin: "o1", Seq: 2, Cost: 1}},
		{Reservation: &store.Reservation{Subject: "acme", Origin: "o1", Seq: 3, Cost: 1, Meters: []store.MeterReservation{{Meter: "tokens", Mode: store.QuotaBill, Included: 10}}}},
		{Settlement: &store.Settlement{Subject: "acme", Origin: "o1", Seq: 3, Reserved: 1, Actual: 1, Meters: []store.MeterSettlement{{Meter: "tokens", Actual: 7}}}},
	} {
		if err := s.Append(rec); err != nil {
			f.Fatalf("seed record %d: %v", i, err)
		}
	}
	if err := s.Close(); err != nil {
		f.Fatal(err)
	}
	segs, _ := filepath.Glob(filepath.Join(seedDir, "*"+segSuffix))
	for _, seg := range segs {
		b, _ := os.ReadFile(seg)
		progress, _ := os.ReadFile(filepath.Join(seedDir, progressName))
		if len(b) > len(segHeader) {
			f.Add(b[len(segHeader):], progress)
			f.Add(b[len(segHeader):], []byte(nil))
			f.Add(b[len(segHeader):len(b)-5], []byte(nil))
		}
	}
	f.Add([]byte(`{}`), []byte(nil))
	f.Add(encodeFrame([]byte(`{"reservation":{"Subject":"x","Origin":"o","Seq":1},"settlement":{"Subject":"x","Origin":"o","Seq":1}}`)), []byte(nil))
	f.Fuzz(func(t *testing.T, segment, progress []byte) {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, segName(1)), append(append([]byte(nil), segHeader...), segment...), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, progressName), progress, 0o600); err != nil {
			t.Fatal(err)
		}
		s, err := Open(dir)
		if err != nil {
			return // refused with an error: nothing replayed
		}
		pending := s.Len()
		m := newFake()
		applied, err := s.Replay(context.Background(), m)
		if err != nil {
			t.Fatalf("replay into a store that never fails: %v", err)
		}
		if applied != len(m.calls) || applied > pending || pending < 0 {
			t.Fatalf("Len %d before Replay, %d applied, %d store calls", pending, applied, len(m.calls))
		}
		if m.notReplay != 0 {
			t.Fatalf("%d records sent without Replay set", m.notReplay)
		}
		for _, c := range m.calls {
			if c.subject == "" || c.origin == "" || c.seq < 1 {
				t.Fatalf("an invalid record was sent: %+v", c)
			}
		}
		if s.Len() != 0 {
			t.Fatalf("Len %d after Replay", s.Len())
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		s2, err := Open(dir)
		if err != nil {
			t.Fatalf("reopening after a replay: %v", err)
		}
		defer s2.Close()
		m2 := newFake()
		if n, err := s2.Replay(context.Background(), m2); n != 0 || err != nil || len(m2.calls) != 0 {
			t.Fatalf("a reopened spool replayed %d records again (%d calls), %v", n, len(m2.calls), err)
		}
	})
}
