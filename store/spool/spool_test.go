// The tests need flock(2) (TestLocked) and POSIX signals (the crash tests).

//go:build linux || darwin || freebsd || netbsd || openbsd || dragonfly

package spool

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/apimonetize/caddy-api-monetize/limiter"
	"github.com/apimonetize/caddy-api-monetize/store"
	"github.com/apimonetize/caddy-api-monetize/store/redisstore"
)

// --- records ---------------------------------------------------------------

// periodEnd is the end of the test quota's period: tomorrow, so that the
// Redis keys get a sane expiry (the tests delete them anyway).
var periodEnd = time.Now().Add(24 * time.Hour).Truncate(time.Second).UTC()

func quota() store.Quota {
	return store.Quota{
		PeriodID:  "20260101T000000Z",
		PeriodEnd: periodEnd,
		HourID:    "20260101T100000Z",
		Mode:      store.QuotaMeter,
	}
}

func reservation(subject, origin string, seq, cost int64) Record {
	return Record{Reservation: &store.Reservation{
		Subject: subject,
		Rate:    limiter.Policy{Limit: 100, Period: time.Minute},
		Cost:    cost,
		Quota:   quota(),
		Origin:  origin,
		Seq:     seq,
	}}
}

func settlement(subject, origin string, seq, reserved, actual int64) Record {
	return Record{Settlement: &store.Settlement{
		Subject:  subject,
		Quota:    quota(),
		Reserved: reserved,
		Actual:   actual,
		Origin:   origin,
		Seq:      seq,
	}}
}

// The records are made with Replay unset: Replay sets it.

// mixed returns reservations of three subjects by one origin, with dense
// sequence numbers per subject, and some settlements: every 4th
// reservation is released (not billable) and every 7th is settled at a
// higher cost, each a few records after its reservation.
func mixed(reservations int) []Record {
	var out, later []Record
	seqs := map[string]int64{}
	for i := range reservations {
		subject := "c" + strconv.Itoa(i%3)
		seqs[subject]++
		seq, cost := seqs[subject], int64(1+i%4)
		out = append(out, reservation(subject, "o1", seq, cost))
		switch {
		case i%4 == 3:
			later = append(later, settlement(subject, "o1", seq, cost, 0))
		case i%7 == 6:
			later = append(later, settlement(subject, "o1", seq, cost, cost+2))
		}
		if i%3 == 2 {
			out = append(out, later...)
			later = nil
		}
	}
	return append(out, later...)
}

// expectedUsage is what the records add up to per subject.
func expectedUsage(recs []Record) map[string]store.Counters {
	want := map[string]store.Counters{}
	for _, r := range recs {
		if r.Reservation != nil {
			c := want[r.Reservation.Subject]
			c.Billed += r.Reservation.Cost
			c.Requests++
			want[r.Reservation.Subject] = c
			continue
		}
		st := r.Settlement
		c := want[st.Subject]
		c.Billed += st.Actual - st.Reserved
		if st.Actual == 0 {
			c.Requests--
		}
		want[st.Subject] = c
	}
	return want
}

// call is one store call: a reservation or a settlement of a key.
type call struct {
	key
	settle bool
}

type key struct {
	subject, origin string
	seq             int64
}

func callOf(r Record) call {
	if r.Reservation != nil {
		return call{key{r.Reservation.Subject, r.Reservation.Origin, r.Reservation.Seq}, false}
	}
	return call{key{r.Settlement.Subject, r.Settlement.Origin, r.Settlement.Seq}, true}
}

func callsOf(recs []Record) []call {
	out := make([]call, len(recs))
	for i, r := range recs {
		out[i] = callOf(r)
	}
	return out
}

// --- a store.Meter that deduplicates replays like the contract says -------

var errStoreDown = fmt.Errorf("fake: %w", store.ErrUnavailable)

type failMode int

const (
	failDown    failMode = iota // the call fails, nothing applied
	failUnknown                 // the call is applied but reports an error (a timeout after sending)
	failCancel                  // the caller's context is cancelled during the call
)

// fakeMeter applies a Replay at most once per (Subject, Origin, Seq), and a
// replayed settlement only when its reservation was applied and not yet
// settled. It records every call and every application.
type fakeMeter struct {
	mu        sync.Mutex
	reserved  map[key]bool
	settled   map[key]bool
	calls     []call // every call, in order
	applied   []call // the calls applied, in order
	notReplay int    // calls without Replay set

	budget int // calls left before failing; negative: never fail
	mode   failMode
	cancel context.CancelFunc
	onCall func(n int) // runs at the start of the n-th call (1-based)
}

func newFake() *fakeMeter {
	return &fakeMeter{reserved: map[key]bool{}, settled: map[key]bool{}, budget: -1}
}

// failAfter lets n more calls succeed, then fails the following ones.
func (f *fakeMeter) failAfter(n int, mode failMode, cancel context.CancelFunc) {
	f.mu.Lock()
	f.budget, f.mode, f.cancel = n, mode, cancel
	f.mu.Unlock()
}

// start accounts for a call and decides whether it fails and, if it
// does, whether it is applied anyway.
func (f *fakeMeter) start(ctx context.Context, c call, replay bool) (apply bool, err error) {
	f.mu.Lock()
	f.calls = append(f.calls, c)
	n := len(f.calls)
	if !replay {
		f.notReplay++
	}
	fail := f.budget == 0
	if f.budget > 0 {
		f.budget--
	}
	mode, cancel, hook := f.mode, f.cancel, f.onCall
	f.mu.Unlock()
	if hook != nil {
		hook(n)
	}
	if fail {
		switch mode {
		case failCancel:
			cancel()
		case failUnknown:
			return true, errStoreDown
		default:
			return false, errStoreDown
		}
	}
	if err := ctx.Err(); err != nil {
		return false, err
	}
	return true, nil
}

// apply applies c unless it was already applied.
func (f *fakeMeter) apply(c call) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !c.settle {
		if !f.reserved[c.key] {
			f.reserved[c.key] = true
			f.applied = append(f.applied, c)
		}
		return
	}
	if f.reserved[c.key] && !f.settled[c.key] {
		f.settled[c.key] = true
		f.applied = append(f.applied, c)
	}
}

func (f *fakeMeter) Reserve(ctx context.Context, r store.Reservation) (store.Reserved, error) {
	c := call{key{r.Subject, r.Origin, r.Seq}, false}
	apply, err := f.start(ctx, c, r.Replay)
	if apply {
		f.apply(c)
	}
	return store.Reserved{Allowed: err == nil}, err
}

func (f *fakeMeter) Settle(ctx context.Context, s store.Settlement) error {
	c := call{key{s.Subject, s.Origin, s.Seq}, true}
	apply, err := f.start(ctx, c, s.Replay)
	if apply {
		f.apply(c)
	}
	return err
}

func (f *fakeMeter) Usage(context.Context, string, string) (store.PeriodUsage, error) {
	return store.PeriodUsage{}, errors.New("fake: not implemented")
}

func (f *fakeMeter) ThresholdEvents(context.Context, string) ([]store.ThresholdEvent, error) {
	return nil, errors.New("fake: not implemented")
}

// callCount returns how many times c was sent.
func (f *fakeMeter) callCount(c call) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, x := range f.calls {
		if x == c {
			n++
		}
	}
	return n
}

func (f *fakeMeter) appliedCalls() []call {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.applied)
}

// --- helpers -----------------------------------------------------------------

func openSpool(t testing.TB, dir string, o Options) *Spool {
	t.Helper()
	s, err := OpenWith(dir, o)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func appendAll(t testing.TB, s *Spool, recs []Record) {
	t.Helper()
	for i, r := range recs {
		if err := s.Append(r); err != nil {
			t.Fatalf("Append #%d: %v", i, err)
		}
	}
}

// segFiles returns the segment file names in dir, oldest first.
func segFiles(t *testing.T, dir string) []string {
	t.Helper()
	names, err := filepath.Glob(filepath.Join(dir, "*"+segSuffix))
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(names)
	return names
}

func appendBytes(t *testing.T, name string, b []byte) {
	t.Helper()
	f, err := os.OpenFile(name, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write(b); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// --- tests -------------------------------------------------------------------

func TestAppendReplayInOrder(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, "data", "caddy", "spool")
	s := openSpool(t, dir, Options{})
	if s.Pending() || s.Len() != 0 {
		t.Fatalf("new spool: Pending %v, Len %d", s.Pending(), s.Len())
	}
	recs := mixed(100)
	appendAll(t, s, recs)
	if !s.Pending() || s.Len() != len(recs) {
		t.Fatalf("after %d appends: Pending %v, Len %d", len(recs), s.Pending(), s.Len())
	}

	f := newFake()
	n, err := s.Replay(context.Background(), f)
	if err != nil || n != len(recs) {
		t.Fatalf("Replay = %d, %v; want %d, nil", n, err, len(recs))
	}
	if got, want := f.appliedCalls(), callsOf(recs); !slices.Equal(got, want) {
		t.Fatalf("applied %v\nwant %v", got, want)
	}
	if len(f.calls) != len(recs) || f.notReplay != 0 {
		t.Fatalf("%d calls (%d without Replay set), want %d replays", len(f.calls), f.notReplay, len(recs))
	}
	if s.Pending() || s.Len() != 0 {
		t.Fatalf("after Replay: Pending %v, Len %d", s.Pending(), s.Len())
	}
	if s.Size() != int64(len(segHeader)) {
		t.Errorf("Size after Replay = %d, want only the empty active segment (%d)", s.Size(), len(segHeader))
	}
	if n, err := s.Replay(context.Background(), f); n != 0 || err != nil {
		t.Errorf("second Replay = %d, %v; want 0, nil", n, err)
	}

	// Only the empty active segment is left, and everything is private.
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
		fi, err := e.Info()
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %v, want 0600", e.Name(), fi.Mode().Perm())
		}
	}
	if len(names) != 3 || len(segFiles(t, dir)) != 1 {
		t.Errorf("files after Replay: %v, want lock, progress and one segment", names)
	}
	for _, d := range []string{filepath.Join(root, "data"), filepath.Join(root, "data", "caddy"), dir} {
		fi, err := os.Stat(d)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o700 {
			t.Errorf("%s has mode %v, want 0700", d, fi.Mode().Perm())
		}
	}
}

// TestReplayResumes interrupts Replay twice on one Spool and once more by
// closing it, then finishes from a Spool opened afresh: every record is
// applied exactly once, in order, and only the record whose call failed is
// ever sent twice (the others are skipped by offset).
func TestReplayResumes(t *testing.T) {
	for _, tc := range []struct {
		name string
		mode failMode
		want error
	}{
		{"store down", failDown, errStoreDown},
		{"unknown outcome", failUnknown, errStoreDown},
		{"context cancelled", failCancel, context.Canceled},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s := openSpool(t, dir, Options{})
			recs := mixed(150)
			appendAll(t, s, recs)
			f := newFake()
			// Stops after 37 records, then after 37+50.
			stops := []int{37, 87}
			prev := 0
			for _, stop := range stops {
				ctx, cancel := context.WithCancel(context.Background())
				f.failAfter(stop-prev, tc.mode, cancel)
				n, err := s.Replay(ctx, f)
				cancel()
				if !errors.Is(err, tc.want) || n != stop-prev {
					t.Fatalf("Replay = %d, %v; want %d, %v", n, err, stop-prev, tc.want)
				}
				if s.Len() != len(recs)-stop || !s.Pending() {
					t.Fatalf("Len after %d applied = %d, want %d", stop, s.Len(), len(recs)-stop)
				}
				prev = stop
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}

			s2 := openSpool(t, dir, Options{})
			if s2.Len() != len(recs)-prev {
				t.Fatalf("reopened: Len = %d, want %d", s2.Len(), len(recs)-prev)
			}
			f.failAfter(-1, failDown, nil)
			n, err := s2.Replay(context.Background(), f)
			if err != nil || n != len(recs)-prev {
				t.Fatalf("final Replay = %d, %v; want %d, nil", n, err, len(recs)-prev)
			}
			if got, want := f.appliedCalls(), callsOf(recs); !slices.Equal(got, want) {
				t.Fatalf("applied %v\nwant %v", got, want)
			}
			for i, r := range recs {
				want := 1
				if slices.Contains(stops, i) {
					want = 2 // the failed call, sent again
				}
				if got := f.callCount(callOf(r)); got != want {
					t.Errorf("record %d (%v) sent %d times, want %d", i, callOf(r), got, want)
				}
			}
			if s2.Len() != 0 || len(segFiles(t, dir)) != 1 {
				t.Errorf("after the final Replay: Len %d, segments %v", s2.Len(), segFiles(t, dir))
			}
		})
	}
}

func TestTornTail(t *testing.T) {
	valid := encodeFrame([]byte(`{"x":1}`))
	badCRC := slices.Clone(valid)
	badCRC[len(badCRC)-1] ^= 0xff
	for _, tc := range []struct {
		name string
		tail []byte
	}{
		{"partial frame header", valid[:3]},
		{"partial payload", valid[:len(valid)-2]},
		{"checksum mismatch", badCRC},
		{"zero-filled", make([]byte, 4096)},
		{"impossible length", []byte{0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0, 1, 2}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s := openSpool(t, dir, Options{})
			recs := mixed(10)
			appendAll(t, s, recs)
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			segs := segFiles(t, dir)
			appendBytes(t, segs[len(segs)-1], tc.tail)

			s2 := openSpool(t, dir, Options{})
			if s2.Len() != len(recs) {
				t.Fatalf("reopened: Len = %d, want %d", s2.Len(), len(recs))
			}
			more := []Record{reservation("c9", "o2", 1, 5), reservation("c9", "o2", 2, 5)}
			appendAll(t, s2, more)
			f := newFake()
			n, err := s2.Replay(context.Background(), f)
			all := append(slices.Clone(recs), more...)
			if err != nil || n != len(all) {
				t.Fatalf("Replay = %d, %v; want %d, nil", n, err, len(all))
			}
			if got := f.appliedCalls(); !slices.Equal(got, callsOf(all)) {
				t.Fatalf("applied %v\nwant %v", got, callsOf(all))
			}
		})
	}
}

// TestAppendsDuringReplay appends from many goroutines while Replay runs:
// the records appended while it runs are applied by the same call, and
// none is lost or applied twice.
func TestAppendsDuringReplay(t *testing.T) {
	const writers, each = 8, 1000
	dir := t.TempDir()
	s := openSpool(t, dir, Options{})
	first := mixed(100)
	appendAll(t, s, first)

	f := newFake()
	phase1 := make(chan struct{})
	inReplay := make(chan struct{})
	f.onCall = func(n int) {
		if n == 1 {
			close(inReplay)
			<-phase1 // the writers' first halves go in while Replay is in a store call
		}
	}
	type result struct {
		n   int
		err error
	}
	done := make(chan result)
	go func() {
		n, err := s.Replay(context.Background(), f)
		done <- result{n, err}
	}()
	<-inReplay

	var wg, half sync.WaitGroup
	errs := make(chan error, writers)
	for w := range writers {
		wg.Add(1)
		half.Add(1)
		go func() {
			defer wg.Done()
			origin := "w" + strconv.Itoa(w)
			for i := range each {
				if i == each/2 {
					half.Done()
				}
				if err := s.Append(reservation("c"+strconv.Itoa(w%3), origin, int64(i+1), 1)); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	half.Wait()
	close(phase1)
	r := <-done
	if r.err != nil {
		t.Fatalf("Replay: %v", r.err)
	}
	if min := len(first) + writers*each/2; r.n < min {
		t.Errorf("Replay applied %d records, want at least the %d appended before it returned", r.n, min)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("Append: %v", err)
	}
	n, err := s.Replay(context.Background(), f)
	if err != nil {
		t.Fatal(err)
	}
	total := len(first) + writers*each
	if r.n+n != total || s.Len() != 0 {
		t.Fatalf("applied %d+%d records, Len %d; want %d, 0", r.n, n, s.Len(), total)
	}
	applied := f.appliedCalls()
	if len(applied) != total || len(f.calls) != total {
		t.Fatalf("%d applied, %d calls; want %d each", len(applied), len(f.calls), total)
	}
	// Each writer's records are applied in the order it appended them.
	last := map[string]int64{}
	for _, c := range applied[len(first):] {
		if c.seq != last[c.origin]+1 {
			t.Fatalf("writer %s: seq %d applied after %d", c.origin, c.seq, last[c.origin])
		}
		last[c.origin] = c.seq
	}
}

func TestFull(t *testing.T) {
	dir := t.TempDir()
	const max = 8 << 10
	s := openSpool(t, dir, Options{MaxBytes: max})
	var kept []Record
	var err error
	for i := int64(1); ; i++ {
		r := reservation("c1", "o1", i, 1)
		if err = s.Append(r); err != nil {
			break
		}
		kept = append(kept, r)
	}
	if !errors.Is(err, ErrFull) || len(kept) < 10 {
		t.Fatalf("Append failed with %v after %d records, want ErrFull after some", err, len(kept))
	}
	if s.Size() > max || s.Len() != len(kept) {
		t.Fatalf("Size %d (max %d), Len %d (want %d)", s.Size(), max, s.Len(), len(kept))
	}
	f := newFake()
	if n, err := s.Replay(context.Background(), f); err != nil || n != len(kept) {
		t.Fatalf("Replay = %d, %v; want %d (the refused record is not kept)", n, err, len(kept))
	}
	if err := s.Append(reservation("c1", "o1", int64(len(kept)+1), 1)); err != nil {
		t.Fatalf("Append after Replay freed the spool: %v", err)
	}
}

func TestInvalidRecord(t *testing.T) {
	s := openSpool(t, t.TempDir(), Options{})
	noOrigin := reservation("c1", "", 1, 1)
	noSeq := settlement("c1", "o1", 0, 1, 0)
	noSubject := reservation("", "o1", 1, 1)
	both := Record{Reservation: reservation("c1", "o1", 1, 1).Reservation, Settlement: settlement("c1", "o1", 1, 1, 0).Settlement}
	for _, r := range []Record{{}, both, noOrigin, noSeq, noSubject} {
		if err := s.Append(r); !errors.Is(err, ErrInvalidRecord) {
			t.Errorf("Append(%+v) = %v, want ErrInvalidRecord", r, err)
		}
	}
	if s.Len() != 0 {
		t.Errorf("Len = %d after invalid appends", s.Len())
	}
}

func TestLocked(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Open(dir); !errors.Is(err, ErrLocked) {
		t.Fatalf("second Open = %v, want ErrLocked", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s2, err := Open(dir)
	if err != nil {
		t.Fatalf("Open after Close: %v", err)
	}
	if err := s2.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestCloseStopsReplay closes the Spool while Replay is in a store call:
// Replay stops after that call, and a later Spool resumes after it.
func TestCloseStopsReplay(t *testing.T) {
	dir := t.TempDir()
	s := openSpool(t, dir, Options{})
	recs := mixed(20)
	appendAll(t, s, recs)
	f := newFake()
	closed := make(chan error, 1)
	f.onCall = func(n int) {
		if n == 3 {
			go func() { closed <- s.Close() }()
			for !s.closing.Load() {
				runtime.Gosched()
			}
		}
	}
	n, err := s.Replay(context.Background(), f)
	if !errors.Is(err, ErrClosed) || n != 3 {
		t.Fatalf("Replay = %d, %v; want 3, ErrClosed", n, err)
	}
	if err := <-closed; err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := s.Append(recs[0]); !errors.Is(err, ErrClosed) {
		t.Errorf("Append after Close = %v, want ErrClosed", err)
	}
	if _, err := s.Replay(context.Background(), f); !errors.Is(err, ErrClosed) {
		t.Errorf("Replay after Close = %v, want ErrClosed", err)
	}
	s2 := openSpool(t, dir, Options{})
	f.onCall = nil
	if n, err := s2.Replay(context.Background(), f); err != nil || n != len(recs)-3 {
		t.Fatalf("Replay after reopening = %d, %v; want %d", n, err, len(recs)-3)
	}
	if got := f.appliedCalls(); !slices.Equal(got, callsOf(recs)) {
		t.Fatalf("applied %v\nwant %v", got, callsOf(recs))
	}
}

// TestSkipsUndecodable: a frame with a valid checksum that is not a valid
// record (another version, a bug) is skipped and counted, not replayed
// forever.
func TestSkipsUndecodable(t *testing.T) {
	dir := t.TempDir()
	s := openSpool(t, dir, Options{})
	recs := mixed(3)
	appendAll(t, s, recs[:2])
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	seg := segFiles(t, dir)[0]
	appendBytes(t, seg, encodeFrame([]byte(`{"reservation":{"Subject":"c1"}}`)))
	appendBytes(t, seg, encodeFrame([]byte(`not json`)))
	s2 := openSpool(t, dir, Options{})
	appendAll(t, s2, recs[2:])
	if s2.Len() != len(recs)+2 {
		t.Fatalf("Len = %d, want %d", s2.Len(), len(recs)+2)
	}
	f := newFake()
	n, err := s2.Replay(context.Background(), f)
	if err != nil || n != len(recs) || s2.Skipped() != 2 || s2.Len() != 0 {
		t.Fatalf("Replay = %d, %v, Skipped %d, Len %d; want %d, nil, 2, 0", n, err, s2.Skipped(), s2.Len(), len(recs))
	}
	if got := f.appliedCalls(); !slices.Equal(got, callsOf(recs)) {
		t.Fatalf("applied %v\nwant %v", got, callsOf(recs))
	}
}

// TestProgressSlotLost: when the newest progress slot is unreadable (a
// write torn by a power loss), Replay resumes from the older one and the
// store's deduplication absorbs the record sent again; with no readable
// progress at all, everything is sent again and still applied once.
func TestProgressSlotLost(t *testing.T) {
	for _, both := range []bool{false, true} {
		t.Run(fmt.Sprintf("both=%v", both), func(t *testing.T) {
			dir := t.TempDir()
			s := openSpool(t, dir, Options{})
			recs := mixed(30)
			appendAll(t, s, recs)
			f := newFake()
			f.failAfter(10, failDown, nil)
			if n, err := s.Replay(context.Background(), f); n != 10 || !errors.Is(err, errStoreDown) {
				t.Fatalf("Replay = %d, %v", n, err)
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			pf, err := os.OpenFile(filepath.Join(dir, progressName), os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			_, gen, err := readProgress(pf)
			if err != nil {
				t.Fatal(err)
			}
			slots := []uint64{gen % 2}
			if both {
				slots = append(slots, (gen+1)%2)
			}
			for _, slot := range slots {
				if _, err := pf.WriteAt([]byte("torn"), int64(slot)*slotStride+8); err != nil {
					t.Fatal(err)
				}
			}
			if err := pf.Close(); err != nil {
				t.Fatal(err)
			}

			s2 := openSpool(t, dir, Options{})
			resent := 1
			if both {
				resent = 10
			}
			if s2.Len() != len(recs)-10+resent {
				t.Fatalf("reopened: Len = %d, want %d", s2.Len(), len(recs)-10+resent)
			}
			f.failAfter(-1, failDown, nil)
			if _, err := s2.Replay(context.Background(), f); err != nil {
				t.Fatal(err)
			}
			if got := f.appliedCalls(); !slices.Equal(got, callsOf(recs)) {
				t.Fatalf("applied %v\nwant %v", got, callsOf(recs))
			}
		})
	}
}

// --- child processes -----------------------------------------------------------

// childEnv selects what TestChild does in a re-executed test binary.
const childEnv = "SPOOL_TEST_CHILD"

// TestChild is the body of the child processes of the crash tests; it
// does nothing in a normal run.
func TestChild(t *testing.T) {
	mode := os.Getenv(childEnv)
	if mode == "" {
		t.Skip("only runs as a child process of a crash test")
	}
	dir := os.Getenv("SPOOL_TEST_DIR")
	s, err := Open(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		os.Exit(2)
	}
	switch mode {
	case "append":
		// Append as fast as possible from 4 goroutines, acknowledging each
		// record on stdout once Append returned, until killed.
		for g := range 4 {
			go func() {
				origin := "g" + strconv.Itoa(g)
				for seq := int64(1); ; seq++ {
					if err := s.Append(reservation("c1", origin, seq, 1)); err != nil {
						fmt.Fprintln(os.Stderr, "child: Append:", err)
						os.Exit(2)
					}
					fmt.Fprintf(os.Stdout, "ack %s %d\n", origin, seq)
				}
			}()
		}
		select {}
	case "replay":
		// Replay into the store named by SPOOL_TEST_STORE, logging each
		// call that the store returned from to SPOOL_TEST_LOG; block inside
		// call number SPOOL_TEST_BLOCK after the store applied it, until
		// killed.
		block, _ := strconv.Atoi(os.Getenv("SPOOL_TEST_BLOCK"))
		log, err := os.OpenFile(os.Getenv("SPOOL_TEST_LOG"), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
		if err != nil {
			fmt.Fprintln(os.Stderr, "child:", err)
			os.Exit(2)
		}
		var inner store.Meter = newFake()
		if prefix := os.Getenv("SPOOL_TEST_REDIS_PREFIX"); prefix != "" {
			rs, err := redisstore.New(redisstore.Options{URL: testURL(), KeyPrefix: prefix, OpTimeout: 5 * time.Second})
			if err != nil {
				fmt.Fprintln(os.Stderr, "child:", err)
				os.Exit(2)
			}
			inner = rs
		}
		m := &loggingMeter{Meter: inner, log: log, block: block}
		_, err = s.Replay(context.Background(), m)
		fmt.Fprintln(os.Stderr, "child: Replay returned:", err)
		os.Exit(2)
	}
	os.Exit(2)
}

// loggingMeter forwards to a Meter, logs each call it returned from, and
// blocks forever after its block-th call.
type loggingMeter struct {
	store.Meter
	log   *os.File
	block int
	n     int
}

func (m *loggingMeter) done(c call, err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "child: store:", err)
		os.Exit(2)
	}
	kind := "r"
	if c.settle {
		kind = "s"
	}
	fmt.Fprintf(m.log, "%s %s %s %d\n", kind, c.subject, c.origin, c.seq)
	m.n++
	if m.n == m.block {
		fmt.Println("blocked")
		select {}
	}
}

func (m *loggingMeter) Reserve(ctx context.Context, r store.Reservation) (store.Reserved, error) {
	out, err := m.Meter.Reserve(ctx, r)
	m.done(call{key{r.Subject, r.Origin, r.Seq}, false}, err)
	return out, nil
}

func (m *loggingMeter) Settle(ctx context.Context, s store.Settlement) error {
	err := m.Meter.Settle(ctx, s)
	m.done(call{key{s.Subject, s.Origin, s.Seq}, true}, err)
	return nil
}

// startChild re-executes the test binary as a child in the given mode and
// returns it with its stdout.
func startChild(t *testing.T, mode string, env ...string) (*exec.Cmd, *bufio.Scanner) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), append([]string{childEnv + "=" + mode}, env...)...)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	return cmd, bufio.NewScanner(out)
}

// kill SIGKILLs the child, reads what is left of its stdout with drain
// (Wait closes the pipe), and waits for it.
func kill(t *testing.T, cmd *exec.Cmd, drain func()) {
	t.Helper()
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	drain()
	err := cmd.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("child ended with %v, want killed", err)
	}
}

// TestKilledDuringAppends SIGKILLs a process appending as fast as it can:
// every append it acknowledged is there after reopening, each writer's
// records form an unbroken prefix, and a torn tail is ignored.
func TestKilledDuringAppends(t *testing.T) {
	dir := t.TempDir()
	cmd, out := startChild(t, "append", "SPOOL_TEST_DIR="+dir)
	acked := map[string]int64{}
	count := 0
	read := func() bool {
		if !out.Scan() {
			return false
		}
		var origin string
		var seq int64
		if _, err := fmt.Sscanf(out.Text(), "ack %s %d", &origin, &seq); err != nil {
			t.Fatalf("child said %q", out.Text())
		}
		acked[origin] = max(acked[origin], seq)
		count++
		return true
	}
	for count < 5000 && read() {
	}
	if count < 5000 {
		t.Fatalf("child stopped after %d acknowledgements", count)
	}
	kill(t, cmd, func() {
		for read() { // acknowledgements still in the pipe
		}
	})
	if err := out.Err(); err != nil {
		t.Fatalf("reading the child's acknowledgements: %v", err)
	}
	segs := segFiles(t, dir)
	appendBytes(t, segs[len(segs)-1], encodeFrame([]byte(`{"reservation":{}}`))[:12])

	s := openSpool(t, dir, Options{})
	f := newFake()
	n, err := s.Replay(context.Background(), f)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]int64{}
	for _, c := range f.appliedCalls() {
		if c.seq != got[c.origin]+1 {
			t.Fatalf("writer %s: seq %d after %d", c.origin, c.seq, got[c.origin])
		}
		got[c.origin] = c.seq
	}
	for origin, seq := range acked {
		if got[origin] < seq {
			t.Errorf("writer %s: %d acknowledged, %d in the spool", origin, seq, got[origin])
		}
	}
	t.Logf("%d acknowledged appends, %d records in the spool after SIGKILL", count, n)
}

// testKilledDuringReplay kills a child process inside the store call of
// record block (after the store applied it, before Replay recorded it),
// then finishes the replay from a Spool opened afresh into m, which already
// holds what the child applied.
func testKilledDuringReplay(t *testing.T, recs []Record, block int, childEnv []string, m store.Meter) (resumed int) {
	dir := t.TempDir()
	s := openSpool(t, dir, Options{})
	appendAll(t, s, recs)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	logName := filepath.Join(t.TempDir(), "applied")
	env := append([]string{"SPOOL_TEST_DIR=" + dir, "SPOOL_TEST_LOG=" + logName, "SPOOL_TEST_BLOCK=" + strconv.Itoa(block)}, childEnv...)
	cmd, out := startChild(t, "replay", env...)
	if !out.Scan() || out.Text() != "blocked" {
		t.Fatalf("child said %q, %v", out.Text(), out.Err())
	}
	kill(t, cmd, func() {
		for out.Scan() {
			t.Errorf("child said %q", out.Text())
		}
	})
	logged, err := os.ReadFile(logName)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(logged)), "\n")
	if len(lines) != block {
		t.Fatalf("child applied %d records, want %d", len(lines), block)
	}
	if f, ok := m.(*fakeMeter); ok { // the fake's state died with the child: rebuild it
		for i, line := range lines {
			c := callOf(recs[i])
			kind := "r"
			if c.settle {
				kind = "s"
			}
			if line != fmt.Sprintf("%s %s %s %d", kind, c.subject, c.origin, c.seq) {
				t.Fatalf("child applied %q as record %d, want %v", line, i, c)
			}
			f.apply(c)
		}
	}

	s2 := openSpool(t, dir, Options{})
	if s2.Len() != len(recs)-block+1 {
		t.Fatalf("reopened: Len = %d, want %d (the record in flight is sent again)", s2.Len(), len(recs)-block+1)
	}
	n, err := s2.Replay(context.Background(), m)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestKilledDuringReplay: after a SIGKILL during Replay, a fresh Spool
// resends only the record whose store call was in flight (the progress
// written after each record survives a process kill without an fsync), and
// the store's deduplication applies it once.
func TestKilledDuringReplay(t *testing.T) {
	recs := mixed(100)
	const block = 45
	f := newFake()
	n := testKilledDuringReplay(t, recs, block, nil, f)
	if n != len(recs)-block+1 {
		t.Errorf("resumed Replay sent %d records, want %d", n, len(recs)-block+1)
	}
	if got := f.appliedCalls(); !slices.Equal(got, callsOf(recs)) {
		t.Fatalf("applied %v\nwant %v", got, callsOf(recs))
	}
	if len(f.calls) != len(recs)-block+1 || f.calls[0] != callOf(recs[block-1]) {
		t.Errorf("resumed Replay sent %d calls starting with %v, want %d starting with record %d", len(f.calls), f.calls[0], len(recs)-block+1, block-1)
	}
}

// --- against the Redis store -------------------------------------------------

func testURL() string {
	if u := os.Getenv("REDISSTORE_TEST_URL"); u != "" {
		return u
	}
	return "redis://127.0.0.1:6379/0"
}

// redisPrefix returns a key prefix unique to the test and deletes its keys
// when the test ends; it skips the test when Redis does not answer.
func redisPrefix(t testing.TB) string {
	t.Helper()
	o, err := redis.ParseURL(testURL())
	if err != nil {
		t.Fatal(err)
	}
	c := redis.NewClient(o)
	t.Cleanup(func() { _ = c.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := c.Ping(ctx).Err(); err != nil {
		t.Skipf("no Redis at %s: %v", testURL(), err)
	}
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	prefix := "amtest:" + hex.EncodeToString(b) + ":"
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		keys, err := c.Keys(ctx, prefix+"*").Result()
		if err == nil && len(keys) > 0 {
			err = c.Del(ctx, keys...).Err()
		}
		if err != nil {
			t.Errorf("deleting test keys: %v", err)
		}
	})
	return prefix
}

func openRedis(t testing.TB, prefix string) *redisstore.Store {
	t.Helper()
	rs, err := redisstore.New(redisstore.Options{URL: testURL(), KeyPrefix: prefix, OpTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = rs.Close() })
	return rs
}

// checkUsage compares the Redis ledger with what recs add up to.
func checkUsage(t *testing.T, rs *redisstore.Store, recs []Record) {
	t.Helper()
	for subject, want := range expectedUsage(recs) {
		u, err := rs.Usage(context.Background(), subject, quota().PeriodID)
		if err != nil {
			t.Fatal(err)
		}
		if u.Counters != want {
			t.Errorf("%s: Redis has %+v, want %+v", subject, u.Counters, want)
		}
	}
}

// flakyMeter forwards to a Meter until its budget of calls is spent, then
// fails: either before sending (the store is down) or after the store
// applied the call (its outcome is unknown to the caller).
type flakyMeter struct {
	store.Meter
	budget  int
	applied bool // fail after forwarding
}

func (m *flakyMeter) fail() (forward bool, err error) {
	if m.budget == 0 {
		return m.applied, errStoreDown
	}
	m.budget--
	return true, nil
}

func (m *flakyMeter) Reserve(ctx context.Context, r store.Reservation) (store.Reserved, error) {
	forward, ferr := m.fail()
	var out store.Reserved
	if forward {
		var err error
		if out, err = m.Meter.Reserve(ctx, r); err != nil {
			return out, err
		}
	}
	return out, ferr
}

func (m *flakyMeter) Settle(ctx context.Context, s store.Settlement) error {
	forward, ferr := m.fail()
	if forward {
		if err := m.Meter.Settle(ctx, s); err != nil {
			return err
		}
	}
	return ferr
}

// TestRedisReplayInterrupted replays into the Redis store with a failure
// whose outcome is unknown (the script ran, the caller saw an error), a
// failure before sending, and a restart from a Spool opened afresh: the
// ledger counts every record exactly once.
func TestRedisReplayInterrupted(t *testing.T) {
	rs := openRedis(t, redisPrefix(t))
	dir := t.TempDir()
	s := openSpool(t, dir, Options{})
	recs := mixed(200)
	appendAll(t, s, recs)

	if n, err := s.Replay(context.Background(), &flakyMeter{Meter: rs, budget: 41, applied: true}); n != 41 || !errors.Is(err, errStoreDown) {
		t.Fatalf("Replay = %d, %v; want 41, store down", n, err)
	}
	if n, err := s.Replay(context.Background(), &flakyMeter{Meter: rs, budget: 60}); n != 60 || !errors.Is(err, errStoreDown) {
		t.Fatalf("Replay = %d, %v; want 60, store down", n, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if n, err := s.Replay(ctx, rs); n != 0 || !errors.Is(err, context.Canceled) {
		t.Fatalf("Replay with a cancelled context = %d, %v", n, err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s2 := openSpool(t, dir, Options{})
	if n, err := s2.Replay(context.Background(), rs); err != nil || n != len(recs)-101 {
		t.Fatalf("final Replay = %d, %v; want %d", n, err, len(recs)-101)
	}
	checkUsage(t, rs, recs)
}

// TestRedisKilledDuringReplay: a process SIGKILLed inside a Redis call
// that went through, resumed by a fresh Spool: the ledger counts every
// record exactly once.
func TestRedisKilledDuringReplay(t *testing.T) {
	prefix := redisPrefix(t)
	rs := openRedis(t, prefix)
	recs := mixed(120)
	testKilledDuringReplay(t, recs, 70, []string{"SPOOL_TEST_REDIS_PREFIX=" + prefix}, rs)
	checkUsage(t, rs, recs)
}

// --- benchmarks ----------------------------------------------------------------

// BenchmarkAppendParallel appends a typical reservation from GOMAXPROCS
// goroutines; with sync, each Append also fsyncs.
func BenchmarkAppendParallel(b *testing.B) {
	for _, sync := range []bool{false, true} {
		b.Run(fmt.Sprintf("sync=%v", sync), func(b *testing.B) {
			s := openSpool(b, b.TempDir(), Options{Sync: sync, MaxBytes: 1 << 40})
			rec := reservation("customer-1234", "host-1/4f2a9c", 1, 1)
			rec.Reservation.Quota.Included = 50000
			rec.Reservation.Quota.Mode = store.QuotaBill
			rec.Reservation.Quota.Thresholds = []int{80, 100, 120}
			rec.Reservation.IdempotencyKey = "0123456789abcdef0123456789abcdef"
			b.ReportAllocs()
			b.ResetTimer()
			cpu := cpuTime(b)
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if err := s.Append(rec); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.StopTimer()
			reportCPU(b, cpu)
			b.ReportMetric(float64(s.Size())/float64(b.N), "B/record")
		})
	}
}

// BenchmarkReplay replays b.N records into the fake store (the spool's own
// cost: read, decode, progress; with sync, a progress fsync every SyncEvery
// records) and into the Redis store.
func BenchmarkReplay(b *testing.B) {
	for _, target := range []string{"fake", "fake-sync", "redis"} {
		b.Run(target, func(b *testing.B) {
			var m store.Meter = newFake()
			if target == "redis" {
				m = openRedis(b, redisPrefix(b))
			}
			dir := b.TempDir()
			s := openSpool(b, dir, Options{MaxBytes: 1 << 40})
			seqs := map[string]int64{}
			for i := range b.N {
				subject := "c" + strconv.Itoa(i%100)
				seqs[subject]++
				if err := s.Append(reservation(subject, "o1", seqs[subject], 1)); err != nil {
					b.Fatal(err)
				}
			}
			if err := s.Close(); err != nil {
				b.Fatal(err)
			}
			s = openSpool(b, dir, Options{MaxBytes: 1 << 40, Sync: target == "fake-sync"})
			b.ResetTimer()
			cpu := cpuTime(b)
			n, err := s.Replay(context.Background(), m)
			if err != nil || n != b.N {
				b.Fatalf("Replay = %d, %v", n, err)
			}
			b.StopTimer()
			reportCPU(b, cpu)
		})
	}
}

// cpuTime returns the CPU time (user and system) the process used so far.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// reportCPU reports the process's CPU time per operation since start: on a
// loaded machine it varies less than ns/op.
func reportCPU(b *testing.B, start time.Duration) {
	b.ReportMetric(float64(cpuTime(b)-start)/float64(b.N), "cpu-ns/op")
}
