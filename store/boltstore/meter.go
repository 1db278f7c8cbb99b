package boltstore

import (
	"bytes"
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"
	"sync"
	"syscall"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/apimonetize/caddy-api-monetize/internal/faultinject"
	"github.com/apimonetize/caddy-api-monetize/limiter"
	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/store"
)

// Metering (store.Meter) on the embedded store.
//
// Every reservation and settlement is decided and applied in memory under
// one mutex, and the change it made is appended to the write-ahead log
// (wal.go) with a single write(2) on an O_APPEND file before the call
// returns, without fsync. The data is then in the operating system's page
// cache, which a killed process (kill -9, a panic, an OOM kill) does not
// lose: after a crash of Caddy alone, every reservation that returned is in
// the log. A checkpoint, every flush interval (DefaultFlushInterval) and on
// Close, writes the changed state into bbolt in one transaction, which bbolt
// fsyncs, together with the id of the last log segment it covers, and then
// deletes the covered segments. Open loads bbolt and replays the segments
// after that id. A machine crash (power loss, kernel panic) can lose what
// was logged since the last checkpoint that reached the disk: about one
// flush interval of usage, plus whatever the kernel had not yet written.
//
// Why the mutex is held across write(2): records are deltas, so the
// counters they carry commute and any order would replay to the same
// totals. But a subject's idempotency keys do not commute (a release
// forgets a key that a retry then stores again; replayed in the other order
// the key would be forgotten and the next retry billed twice), and the log
// must never hold a record whose change was not applied, or the reverse.
// Writing under the same mutex that orders the in-memory changes keeps the
// log in exactly that order, lets a failed write be truncated away at a
// known offset, and lets a checkpoint switch segments at an exact point: a
// snapshot taken under the mutex covers precisely the segments closed at
// the same moment, so coverage is tracked per segment and no per-record
// sequence number is needed. The write goes to the page cache (about a
// microsecond); Linux serialises appends to one file anyway.
//
// What lives in memory: the totals and crossed thresholds of every period
// still kept (one small entry per subject and period), the idempotency keys
// of the last IdempotencyWindow, the threshold outbox, and the hourly ledger
// changes since the last checkpoint. Hourly totals live in bbolt only; Usage
// adds the pending changes to them.
//
// Rate-limit state stays in the store's limiter.Local (not durable); the
// throttle rate of a throttle quota uses the same per-subject
// state as the tier's rate, so a switch carries owed units over. A
// reservation that passed its rate limit but could not be logged returns an
// error and has spent that rate budget.
//
// The embedded store belongs to a single Caddy process and has no spool, so
// nothing is ever replayed into it: Replay reservations and settlements are
// applied as given (never denied, without rate limiting), and Origin and Seq
// are not tracked.

// DefaultFlushInterval is how often the metering state is checkpointed into
// bbolt by default.
const DefaultFlushInterval = time.Second

// pruneEvery is the shortest time between two scans for periods past their
// retention.
const pruneEvery = time.Minute

// Bucket names of the metering state.
var (
	// usagePeriods: periodKey -> encodePeriod (totals, end, crossed).
	bucketUsagePeriods = []byte("usage_periods")
	// usageHours: periodKey followed by the hour id -> encodeCounters.
	bucketUsageHours = []byte("usage_hours")
	// usageMeterPeriods: periodKey followed by the string-encoded name of
	// a meter other than the default one -> encodeMeterPeriod (totals,
	// crossed). The period's end is its usage_periods record's.
	bucketUsageMeterPeriods = []byte("usage_meter_periods")
	// usageMeterHours: periodKey, the string-encoded meter name, then the
	// hour id -> encodeCounters.
	bucketUsageMeterHours = []byte("usage_meter_hours")
	// usageIdempotency: string-encoded subject followed by the key ->
	// expiry, 8 bytes big endian, microseconds since the epoch, then (not
	// in records written before fingerprints) the repeats as a varint and
	// the fingerprint.
	bucketUsageIdem = []byte("usage_idempotency")
	// usageThresholds: the outbox, 8-byte big-endian sequence ->
	// store.ThresholdEvent as JSON.
	bucketUsageEvents = []byte("usage_thresholds")

	// metaWALCovered (in bucketMeta): the id, 8 bytes big endian, of the
	// last log segment whose records the checkpoint contains.
	metaWALCovered = []byte("wal_covered")
)

var _ store.Meter = (*Store)(nil)

// WithFlushInterval sets how often the metering state is checkpointed into
// bbolt (DefaultFlushInterval by default): the most usage a machine crash
// can lose, while a checkpoint costs one fsync. It must be positive.
func WithFlushInterval(d time.Duration) Option {
	return func(o *options) { o.flushInterval = d }
}

// WithFlushErrorHandler sets a function called with the error of every
// background checkpoint that fails (a full or failing disk). Usage stays
// safe in the write-ahead log meanwhile, which grows until a checkpoint
// succeeds. It is called from the checkpoint goroutine.
func WithFlushErrorHandler(fn func(error)) Option {
	return func(o *options) { o.onFlushError = fn }
}

type periodKey struct{ subject, period string }

type idemKey struct{ subject, key string }

// periodState is a period's totals, its end (microseconds since the epoch)
// and the thresholds crossed so far, ascending: the default meter's, and
// those of the period's other meters.
type periodState struct {
	store.Counters
	end     int64
	crossed []int
	meters  []meterState
}

// meterState is the totals and crossed thresholds (ascending) of one meter
// other than the default one in a period.
type meterState struct {
	name string
	store.Counters
	crossed []int
}

// meter returns the state of the meter named name, nil when it has none.
func (p *periodState) meter(name string) *meterState {
	if p == nil {
		return nil
	}
	for i := range p.meters {
		if p.meters[i].name == name {
			return &p.meters[i]
		}
	}
	return nil
}

// clone is a deep copy of p.
func (p *periodState) clone() periodState {
	c := periodState{Counters: p.Counters, end: p.end, crossed: slices.Clone(p.crossed)}
	if len(p.meters) > 0 {
		c.meters = make([]meterState, len(p.meters))
		for i, ms := range p.meters {
			c.meters[i] = meterState{name: ms.name, Counters: ms.Counters, crossed: slices.Clone(ms.crossed)}
		}
	}
	return c
}

// meterHour identifies one hour of one meter (other than the default) in
// a period's pending ledger changes.
type meterHour struct{ meter, hour string }

// idemRecord is a remembered idempotency key: its expiry (microseconds),
// the fingerprint of the request that stored it ("" for records written
// before fingerprints: never matched) and how many repeats were
// Duplicates.
type idemRecord struct {
	exp     int64
	fp      string
	repeats int64
}

// encode is the bbolt value of the record.
func (r idemRecord) encode() []byte {
	b := binary.BigEndian.AppendUint64(nil, uint64(r.exp))
	b = binary.AppendVarint(b, r.repeats)
	return append(b, r.fp...)
}

// decodeIdemRecord decodes a bbolt value: 8 bytes of expiry (a record
// written before fingerprints), or the expiry, repeats and fingerprint.
func decodeIdemRecord(v []byte) (idemRecord, bool) {
	if len(v) < 8 {
		return idemRecord{}, false
	}
	rec := idemRecord{exp: int64(binary.BigEndian.Uint64(v))}
	if len(v) == 8 {
		return rec, true
	}
	n, k := binary.Varint(v[8:])
	if k <= 0 || n < 0 {
		return idemRecord{}, false
	}
	rec.repeats, rec.fp = n, string(v[8+k:])
	return rec, true
}

// idemExpiry is an entry of the idempotency-key expiry queue.
type idemExpiry struct {
	k   idemKey
	exp int64
}

// meter is the metering state of a Store.
type meter struct {
	db           *bolt.DB
	path         string
	rates        *limiter.Local
	clock        func() time.Time
	onFlushError func(error)

	// flushMu is held by a checkpoint from its snapshot to the end of its
	// transaction, and shared by Usage, which so never sees a change both
	// in memory and in bbolt.
	flushMu sync.RWMutex

	// mu orders every change and its log record.
	mu      sync.Mutex
	closed  bool
	periods map[periodKey]*periodState
	// hours holds the hourly ledger changes since the last checkpoint,
	// and meterHours those of the other meters.
	hours      map[periodKey]map[string]*store.Counters
	meterHours map[periodKey]map[meterHour]*store.Counters
	idem       map[idemKey]idemRecord
	// idemQueue lists idempotency keys in the order they were stored,
	// from idemHead on; entries whose key has since been forgotten or
	// stored again are skipped when they come up.
	idemQueue []idemExpiry
	idemHead  int
	// events is the outbox, oldest first; unsaved are those not yet
	// written to bbolt.
	events, unsaved []store.ThresholdEvent
	// dirtyPeriods and dirtyIdem are the keys changed since the last
	// checkpoint; pruned are the periods removed from memory since then.
	dirtyPeriods map[periodKey]struct{}
	dirtyIdem    map[idemKey]struct{}
	pruned       []periodKey
	// nextPrune is when the earliest period kept passes its retention;
	// lastPrune is when periods were last scanned (microseconds).
	nextPrune, lastPrune int64

	// seg is the segment being written, segID its id and segSize its
	// length (of the frames written, in a mapped segment); segBroken is set
	// when a failed write could not be undone. segMem is seg mapped into
	// memory, nil when frames are written with write(2); mapSize is the
	// size a segment is mapped with, 0 for none.
	seg       *os.File
	segID     uint64
	segSize   int64
	segBroken bool
	segMem    []byte
	mapSize   int
	// oldSegs are closed segments, to delete once a checkpoint covering
	// them has committed.
	oldSegs []uint64
	buf     []byte

	stop, done chan struct{}
}

// openMeter loads the metering state of db (whose file is path), replays
// the write-ahead log, checkpoints the result and starts the checkpoint
// goroutine.
func openMeter(db *bolt.DB, path string, rates *limiter.Local, o options) (*meter, error) {
	m := &meter{
		db:           db,
		path:         path,
		rates:        rates,
		clock:        o.clock,
		onFlushError: o.onFlushError,
		periods:      make(map[periodKey]*periodState),
		hours:        make(map[periodKey]map[string]*store.Counters),
		meterHours:   make(map[periodKey]map[meterHour]*store.Counters),
		idem:         make(map[idemKey]idemRecord),
		dirtyPeriods: make(map[periodKey]struct{}),
		dirtyIdem:    make(map[idemKey]struct{}),
		nextPrune:    1<<63 - 1,
		stop:         make(chan struct{}),
		done:         make(chan struct{}),
		mapSize:      o.segmentSize,
	}
	if m.clock == nil {
		m.clock = time.Now
	}
	covered, err := m.load()
	if err != nil {
		return nil, err
	}
	ids, err := listSegments(path)
	if err != nil {
		return nil, fmt.Errorf("boltstore: write-ahead log: %w", err)
	}
	m.segID = covered
	for _, id := range ids {
		m.segID = max(m.segID, id)
		if id <= covered {
			// Contained in the checkpoint; left over from a crash
			// between the checkpoint's commit and the deletion.
			if err := removeSegment(path, id); err != nil {
				return nil, fmt.Errorf("boltstore: write-ahead log: %w", err)
			}
			continue
		}
		if _, err := readSegment(segmentPath(path, id), m.apply); err != nil {
			return nil, fmt.Errorf("boltstore: replay write-ahead log: %w", err)
		}
		m.oldSegs = append(m.oldSegs, id)
	}
	m.segID++
	if m.seg, m.segMem, err = m.newSegment(m.segID); err != nil {
		return nil, fmt.Errorf("boltstore: write-ahead log: %w", err)
	}
	if err := m.checkpoint(); err != nil {
		_ = m.closeSegment()
		return nil, err
	}
	go m.loop(o.flushInterval)
	return m, nil
}

// load reads the checkpointed state from bbolt and returns the id of the
// last segment it covers.
func (m *meter) load() (uint64, error) {
	var covered uint64
	now := m.clock().UnixMicro()
	err := m.db.Update(func(tx *bolt.Tx) error {
		for _, name := range [][]byte{bucketUsagePeriods, bucketUsageHours, bucketUsageIdem, bucketUsageEvents, bucketUsageMeterPeriods, bucketUsageMeterHours} {
			if _, err := tx.CreateBucketIfNotExists(name); err != nil {
				return err
			}
		}
		if v := tx.Bucket(bucketMeta).Get(metaWALCovered); len(v) == 8 {
			covered = binary.BigEndian.Uint64(v)
		}
		err := tx.Bucket(bucketUsagePeriods).ForEach(func(k, v []byte) error {
			pk, ok := decodePeriodKey(k)
			p, ok2 := decodePeriod(v)
			if !ok || !ok2 {
				return decodeErr("usage period", string(k), errCorrupt)
			}
			m.periods[pk] = p
			m.nextPrune = min(m.nextPrune, p.end+store.Retention.Microseconds())
			return nil
		})
		if err != nil {
			return err
		}
		err = tx.Bucket(bucketUsageMeterPeriods).ForEach(func(k, v []byte) error {
			r := decoder{b: k}
			pk := periodKey{r.string(), r.string()}
			name := r.string()
			ms, ok := decodeMeterPeriod(v)
			if r.err != nil || len(r.b) != 0 || !ok {
				return decodeErr("usage meter period", string(k), errCorrupt)
			}
			ms.name = name
			p := m.periods[pk]
			if p == nil { // not written without its period: only by hand
				p = &periodState{}
				m.periods[pk] = p
				m.nextPrune = min(m.nextPrune, store.Retention.Microseconds())
			}
			p.meters = append(p.meters, ms)
			return nil
		})
		if err != nil {
			return err
		}
		err = tx.Bucket(bucketUsageIdem).ForEach(func(k, v []byte) error {
			r := decoder{b: k}
			subject := r.string()
			rec, ok := decodeIdemRecord(v)
			if r.err != nil || !ok {
				return decodeErr("idempotency key", string(k), errCorrupt)
			}
			ik := idemKey{subject, string(r.b)}
			if rec.exp <= now {
				m.dirtyIdem[ik] = struct{}{} // deleted by the first checkpoint
				return nil
			}
			m.idem[ik] = rec
			m.idemQueue = append(m.idemQueue, idemExpiry{ik, rec.exp})
			return nil
		})
		if err != nil {
			return err
		}
		return tx.Bucket(bucketUsageEvents).ForEach(func(k, v []byte) error {
			var e store.ThresholdEvent
			if err := json.Unmarshal(v, &e); err != nil {
				return decodeErr("threshold event", fmt.Sprintf("%x", k), err)
			}
			m.events = append(m.events, e)
			return nil
		})
	})
	if err != nil {
		return 0, fmt.Errorf("boltstore: load metering state: %w", err)
	}
	slices.SortStableFunc(m.idemQueue, func(a, b idemExpiry) int { return cmp.Compare(a.exp, b.exp) })
	return covered, nil
}

// loop checkpoints every interval until close.
func (m *meter) loop(interval time.Duration) {
	defer close(m.done)
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-m.stop:
			return
		case <-t.C:
			if err := m.checkpoint(); err != nil && m.onFlushError != nil {
				m.onFlushError(err)
			}
		}
	}
}

// close stops the checkpoint goroutine, refuses further changes, writes a
// last checkpoint and closes the log. With that checkpoint committed, no
// segment is left behind.
func (m *meter) close() error {
	close(m.stop)
	<-m.done
	m.mu.Lock()
	m.closed = true
	m.mu.Unlock()
	err := m.checkpoint()
	if cerr := m.closeSegment(); err == nil {
		err = cerr
	}
	if err == nil {
		// The checkpoint left the current segment empty and covered.
		err = removeSegment(m.path, m.segID)
	}
	return err
}

// errClosed is returned by metering calls after Close.
var errClosed = fmt.Errorf("%w: boltstore: store is closed", store.ErrUnavailable)

// Reserve implements store.Meter.
func (s *Store) Reserve(_ context.Context, r store.Reservation) (store.Reserved, error) {
	return s.meter.reserve(r)
}

// Settle implements store.Meter.
//
// A void (store.Settlement.Void) is ignored: an error of this store's
// Reserve means nothing was counted, so it never leaves an outcome
// unknown, and nothing is voided.
func (s *Store) Settle(_ context.Context, st store.Settlement) error {
	if st.Void {
		return nil
	}
	return s.meter.settle(st)
}

// Usage implements store.Meter.
func (s *Store) Usage(_ context.Context, subject, periodID string) (store.PeriodUsage, error) {
	return s.meter.usage(subject, periodID)
}

// ThresholdEvents implements store.Meter.
func (s *Store) ThresholdEvents(_ context.Context, subject string) ([]store.ThresholdEvent, error) {
	return s.meter.thresholdEvents(subject)
}

// Size limits of the ids a change carries. bbolt refuses keys above 32 KiB,
// and a key it refuses would fail every later checkpoint.
const (
	maxSubjectLen = 1024
	maxTimeIDLen  = 64
	// maxIdemKeyLen is the longest idempotency key kept as given; longer
	// ones are kept as their SHA-256 (see idemID).
	maxIdemKeyLen = 64
)

// checkChange validates the subject and the parts of q a change needs.
func checkChange(subject string, q store.Quota) error {
	switch q.Mode {
	case store.QuotaMeter, store.QuotaBlock, store.QuotaBill, store.QuotaThrottle:
	default:
		return fmt.Errorf("boltstore: unknown quota mode %q", q.Mode)
	}
	switch {
	case q.PeriodID == "" || q.HourID == "":
		return errors.New("boltstore: quota needs a period id and an hour id")
	case len(q.PeriodID) > maxTimeIDLen || len(q.HourID) > maxTimeIDLen:
		return errors.New("boltstore: period or hour id too long")
	case len(subject) > maxSubjectLen:
		return fmt.Errorf("boltstore: subject longer than %d bytes", maxSubjectLen)
	}
	return nil
}

// idemID is how an idempotency key is kept: as given when short, else as
// a NUL byte (which an HTTP header cannot contain) followed by its
// SHA-256, so that a client's key costs bounded memory and disk.
func idemID(key string) string {
	if len(key) <= maxIdemKeyLen {
		return key
	}
	sum := sha256.Sum256([]byte(key))
	return "\x00" + string(sum[:])
}

func (m *meter) reserve(r store.Reservation) (store.Reserved, error) {
	q := r.Quota
	if r.Cost < 0 {
		return store.Reserved{}, fmt.Errorf("boltstore: negative cost %d", r.Cost)
	}
	if err := checkChange(r.Subject, q); err != nil {
		return store.Reserved{}, err
	}
	if err := store.CheckMeters(r.Meters); err != nil {
		return store.Reserved{}, fmt.Errorf("boltstore: %w", err)
	}
	r.IdempotencyKey = idemID(r.IdempotencyKey)
	if len(r.IdempotencyFingerprint) > store.MaxIdempotencyFingerprintLen {
		return store.Reserved{}, fmt.Errorf("boltstore: idempotency fingerprint longer than %d bytes", store.MaxIdempotencyFingerprintLen)
	}

	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return store.Reserved{}, errClosed
	}
	// Read under mu, so that the outbox and the idempotency keys' expiry
	// queue are in time order.
	us := m.clock().UnixMicro()
	pk := periodKey{r.Subject, q.PeriodID}
	p := m.periods[pk]
	var used int64
	if p != nil {
		used = p.Billed
	}
	var adm store.Admission
	var meterUsed []int64
	res := store.Reserved{Used: used}
	if len(r.Meters) == 0 {
		adm = r.Admit(used)
	} else {
		var buf [store.MaxMeters]int64 // CheckMeters bounds the count
		meterUsed = buf[:len(r.Meters)]
		res.Meters = make([]store.MeterReserved, len(r.Meters))
		for i, mr := range r.Meters {
			if ms := p.meter(mr.Meter); ms != nil {
				meterUsed[i] = ms.Billed
			}
			res.Meters[i] = store.MeterReserved{
				Used:      meterUsed[i],
				Throttled: mr.Mode == store.QuotaThrottle && meterUsed[i] >= mr.Included,
			}
		}
		adm = r.AdmitMeters(used, meterUsed)
	}
	policy := adm.Policy
	res.Throttled = adm.Throttled
	// report fills in the applicable rate's state without spending it.
	report := func() {
		if policy.Limit != 0 {
			res.Rate = m.rates.Admit(r.Subject, policy, 0, us)
		}
	}
	if r.Cost == 0 && len(r.Meters) == 0 {
		report()
		res.Allowed = true
		return res, nil
	}
	// A repeat of a held key is decided like any reservation; it is a
	// Duplicate only when it repeats the same request within the bound.
	ik := idemKey{r.Subject, r.IdempotencyKey}
	rec, held := m.idem[ik]
	held = held && r.IdempotencyKey != "" && rec.exp > us
	duplicate := held && rec.fp != "" && rec.fp == r.IdempotencyFingerprint && rec.repeats < r.IdempotencyRepeats
	if adm.QuotaExceeded {
		report()
		res.QuotaExceeded, res.QuotaExceededMeter = true, adm.QuotaExceededMeter
		return res, nil
	}
	if !r.Replay && policy.Limit != 0 {
		res.Rate = m.rates.Admit(r.Subject, policy, adm.Units, us)
		if !res.Rate.Allowed {
			return res, nil
		}
	}
	if duplicate {
		rec.repeats++
		d := delta{
			subject: r.Subject, periodID: q.PeriodID, periodEnd: q.PeriodEnd.UnixMicro(), hourID: q.HourID,
			idemOp: idemSet, idemKey: r.IdempotencyKey, idemExp: rec.exp, idemFP: rec.fp, idemRepeats: rec.repeats,
		}
		if err := m.log(&d); err != nil {
			return store.Reserved{}, err
		}
		m.apply(&d)
		res.Allowed, res.Duplicate = true, true
		return res, nil
	}
	d := delta{
		subject:   r.Subject,
		periodID:  q.PeriodID,
		periodEnd: q.PeriodEnd.UnixMicro(),
		hourID:    q.HourID,
		billed:    r.Cost,
	}
	if r.Cost > 0 { // a zero Cost with meters leaves the default meter alone
		d.requests = 1
	}
	if q.Mode != store.QuotaMeter {
		d.overage = metering.Overage(used, r.Cost, q.Included)
		d.crossed = newCrossings(p, used, used+r.Cost, q, us)
	}
	if len(r.Meters) > 0 {
		d.meters = make([]meterDelta, 0, len(r.Meters))
	}
	for i, mr := range r.Meters {
		if mr.Amount == 0 {
			continue
		}
		u := meterUsed[i]
		md := meterDelta{meter: mr.Meter, billed: mr.Amount, requests: 1}
		if mr.Mode != store.QuotaMeter {
			md.overage = metering.Overage(u, mr.Amount, mr.Included)
			md.crossed = newMeterCrossings(p.meter(mr.Meter), u, u+mr.Amount, mr, us)
		}
		d.meters = append(d.meters, md)
		out := &res.Meters[i]
		out.Used, out.Overage = u+mr.Amount, md.overage
		for _, c := range md.crossed {
			out.Crossed = append(out.Crossed, int(c.threshold))
		}
	}
	if r.IdempotencyKey != "" && !held {
		d.idemOp, d.idemKey, d.idemExp = idemSet, r.IdempotencyKey, us+r.IdempotencyTTL().Microseconds()
		d.idemFP = r.IdempotencyFingerprint
	}
	if err := m.log(&d); err != nil {
		return store.Reserved{}, err
	}
	m.apply(&d)
	res.Allowed = true
	res.Used = used + r.Cost
	res.Overage = d.overage
	for _, c := range d.crossed {
		res.Crossed = append(res.Crossed, int(c.threshold))
	}
	return res, nil
}

// reached returns the thresholds usage reaches at usedAfter when it grows
// from usedBefore: every threshold reached, not only those passed on the
// way, so that one reached while it was not checked (earlier usage in a
// period counted under a quota without thresholds, or with fewer included
// units, before a tier change) is crossed at the next growth, as the
// contract says (crossed when reached and not crossed before in the
// period) and as redisstore does. The caller skips those already crossed.
func reached(usedBefore, usedAfter, included int64, thresholds []int) []int {
	if usedAfter <= usedBefore {
		return nil
	}
	return metering.Crossed(0, usedAfter, included, thresholds)
}

// newMeterCrossings returns the thresholds of mr that going from
// usedBefore to usedAfter crosses and that ms has not crossed yet.
func newMeterCrossings(ms *meterState, usedBefore, usedAfter int64, mr store.MeterReservation, at int64) []crossing {
	var out []crossing
	for _, t := range reached(usedBefore, usedAfter, mr.Included, mr.Thresholds) {
		if ms != nil && slices.Contains(ms.crossed, t) {
			continue
		}
		out = append(out, crossing{threshold: int64(t), used: usedAfter, included: mr.Included, at: at})
	}
	return out
}

// newCrossings returns the thresholds of q that going from usedBefore to
// usedAfter crosses and that p has not crossed yet.
func newCrossings(p *periodState, usedBefore, usedAfter int64, q store.Quota, at int64) []crossing {
	var out []crossing
	for _, t := range reached(usedBefore, usedAfter, q.Included, q.Thresholds) {
		if p != nil && slices.Contains(p.crossed, t) {
			continue
		}
		out = append(out, crossing{threshold: int64(t), used: usedAfter, included: q.Included, at: at})
	}
	return out
}

func (m *meter) settle(s store.Settlement) error {
	q := s.Quota
	if s.Actual < 0 || s.Reserved < 0 || s.Overage < 0 {
		return fmt.Errorf("boltstore: negative settlement %d/%d/%d", s.Actual, s.Reserved, s.Overage)
	}
	if s.Actual == s.Reserved && len(s.Meters) == 0 {
		return nil
	}
	if err := checkChange(s.Subject, q); err != nil {
		return err
	}
	if err := store.CheckMeterSettlements(s.Meters); err != nil {
		return fmt.Errorf("boltstore: %w", err)
	}
	s.IdempotencyKey = idemID(s.IdempotencyKey)

	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return errClosed
	}
	us := m.clock().UnixMicro()
	pk := periodKey{s.Subject, q.PeriodID}
	var cur periodState
	p := m.periods[pk]
	if p != nil {
		cur = *p
	}
	d := delta{subject: s.Subject, periodID: q.PeriodID, periodEnd: q.PeriodEnd.UnixMicro(), hourID: q.HourID}
	switch {
	case s.Actual == s.Reserved:
		// Only other meters change.
	case s.Actual == 0:
		// Not billable: take the whole reservation back, request included.
		d.billed = -min(s.Reserved, cur.Billed)
		d.overage = -overageTaken(s.Overage, s.Reserved, q.Mode, q.Included, cur.Counters)
		d.requests = -min(1, cur.Requests)
		// Forget the key if this request stored it, so a retry is billed.
		if rec, ok := m.idem[idemKey{s.Subject, s.IdempotencyKey}]; ok && s.IdempotencyKey != "" &&
			rec.fp != "" && rec.fp == s.IdempotencyFingerprint {
			d.idemOp, d.idemKey = idemDelete, s.IdempotencyKey
		}
	case s.Actual < s.Reserved:
		// The units given back are the reservation's last ones, so they
		// come out of its overage first.
		back := s.Reserved - s.Actual
		d.billed = -min(back, cur.Billed)
		d.overage = -overageTaken(s.Overage, back, q.Mode, q.Included, cur.Counters)
	default:
		// The extra units come after everything used so far.
		extra := s.Actual - s.Reserved
		d.billed = extra
		if q.Mode != store.QuotaMeter {
			d.overage = metering.Overage(cur.Billed, extra, q.Included)
			d.crossed = newCrossings(p, cur.Billed, cur.Billed+extra, q, us)
		}
	}
	for _, ms := range s.Meters {
		if md, ok := settleMeter(ms, p.meter(ms.Meter), us); ok {
			d.meters = append(d.meters, md)
		}
	}
	if d.billed == 0 && d.overage == 0 && d.requests == 0 && d.idemOp == idemNone && len(d.meters) == 0 {
		return nil
	}
	if err := m.log(&d); err != nil {
		return err
	}
	m.apply(&d)
	return nil
}

// settleMeter is the change settlement ms makes to its meter, whose state
// is cur (nil: none yet), and whether there is one. A meter's request
// counts when its units go from none to some, and is taken back when all
// its reserved units are.
func settleMeter(ms store.MeterSettlement, cur *meterState, at int64) (meterDelta, bool) {
	var c store.Counters
	if cur != nil {
		c = cur.Counters
	}
	md := meterDelta{meter: ms.Meter}
	q := ms.Quota
	switch {
	case ms.Actual == ms.Reserved:
		return md, false
	case ms.Actual < ms.Reserved:
		back := ms.Reserved - ms.Actual
		md.billed = -min(back, c.Billed)
		md.overage = -overageTaken(ms.Overage, back, q.Mode, q.Included, c)
		if ms.Actual == 0 {
			md.requests = -min(1, c.Requests)
		}
	default:
		extra := ms.Actual - ms.Reserved
		md.billed = extra
		if ms.Reserved == 0 {
			md.requests = 1
		}
		if q.Mode != store.QuotaMeter {
			md.overage = metering.Overage(c.Billed, extra, q.Included)
			md.crossed = newMeterCrossings(cur, c.Billed, c.Billed+extra, q, at)
		}
	}
	return md, md.billed != 0 || md.overage != 0 || md.requests != 0
}

// overageTaken is the overage to take back when back units of a
// settlement are released, given the reservation's overage resOver, the
// quota's mode and included units and the counters cur: the reservation's
// own overage first, and as much more as keeps the period's overage no
// larger than its excess over the included units (a reservation made below
// the quota while later ones were counted as overage).
func overageTaken(resOver, back int64, mode string, included int64, cur store.Counters) int64 {
	r := min(resOver, back)
	if mode != store.QuotaMeter {
		excess := max(0, cur.Billed-back-included)
		r = max(r, cur.Overage-excess)
	}
	return max(0, min(r, back, cur.Overage))
}

// log appends d to the current segment: a copy into a mapped segment (a
// new one when it is full), or one write. After a failed write, later
// records go to a new segment. The caller holds mu.
func (m *meter) log(d *delta) error {
	if err := faultinject.DiskWrite(); err != nil {
		return fmt.Errorf("%w: boltstore: write-ahead log: %w", store.ErrUnavailable, err)
	}
	m.buf = appendFrame(m.buf[:0], d)
	if m.segBroken || (m.segMem != nil && m.segSize+int64(len(m.buf)) > int64(len(m.segMem))) {
		if err := m.rotate(); err != nil {
			return fmt.Errorf("%w: boltstore: write-ahead log: %w", store.ErrUnavailable, err)
		}
	}
	if m.segMem != nil {
		if m.segSize+int64(len(m.buf)) > int64(len(m.segMem)) {
			return fmt.Errorf("%w: boltstore: write-ahead log: a %d-byte record does not fit in a segment", store.ErrUnavailable, len(m.buf))
		}
		m.segSize += int64(copy(m.segMem[m.segSize:], m.buf))
		return nil
	}
	n, err := m.seg.Write(m.buf)
	if err == nil {
		m.segSize += int64(n)
		return nil
	}
	// Cut off whatever part of the record reached the file, and continue
	// in a new segment: if the truncation failed too, the torn frame ends
	// this segment's replay, and nothing may come after it. A full disk
	// that took none of the record leaves the segment as it was: it goes
	// on, so that a disk refusing every write does not leave a new file
	// per refused record.
	if n > 0 {
		_ = m.seg.Truncate(m.segSize)
	}
	if n > 0 || !errors.Is(err, syscall.ENOSPC) && !errors.Is(err, syscall.EDQUOT) {
		m.segBroken = true
	}
	return fmt.Errorf("%w: boltstore: write-ahead log: %w", store.ErrUnavailable, err)
}

// rotate closes the current segment and starts the next one. The caller
// holds mu.
func (m *meter) rotate() error {
	f, mem, err := m.newSegment(m.segID + 1)
	if err != nil {
		return err
	}
	_ = m.closeSegment() // written without buffering: nothing is lost
	m.oldSegs = append(m.oldSegs, m.segID)
	m.seg, m.segMem, m.segID, m.segSize, m.segBroken = f, mem, m.segID+1, 0, false
	return nil
}

// newSegment creates segment id and maps it into memory, or, where it
// cannot be preallocated and mapped (or mapSize is 0), leaves it to be
// written with write(2) (mem nil).
func (m *meter) newSegment(id uint64) (f *os.File, mem []byte, err error) {
	if f, err = createSegment(m.path, id); err != nil || m.mapSize == 0 {
		return f, nil, err
	}
	mem, err = mapSegment(f, m.mapSize)
	if err != nil {
		// Give back whatever fallocate reserved: write(2) appends.
		if terr := f.Truncate(0); terr != nil {
			_ = f.Close()
			_ = removeSegment(m.path, id)
			return nil, nil, terr
		}
		return f, nil, nil
	}
	return f, mem, nil
}

// closeSegment closes the current segment; a mapped one is unmapped and
// cut to its frames first (a failed cut leaves zeros, which end its replay
// all the same).
func (m *meter) closeSegment() error {
	if m.segMem != nil {
		_ = unmapSegment(m.segMem)
		m.segMem = nil
		_ = m.seg.Truncate(m.segSize)
	}
	return m.seg.Close()
}

// apply makes the change d in memory, live or during replay. The caller
// holds mu (or is Open, before anyone else can).
func (m *meter) apply(d *delta) {
	pk := periodKey{d.subject, d.periodID}
	p := m.periods[pk]
	if p == nil {
		p = &periodState{end: d.periodEnd}
		m.periods[pk] = p
		m.nextPrune = min(m.nextPrune, p.end+store.Retention.Microseconds())
	}
	p.end = max(p.end, d.periodEnd)
	p.Billed = max(0, p.Billed+d.billed)
	p.Overage = max(0, p.Overage+d.overage)
	p.Requests = max(0, p.Requests+d.requests)
	m.dirtyPeriods[pk] = struct{}{}
	if d.billed != 0 || d.overage != 0 || d.requests != 0 {
		hm := m.hours[pk]
		if hm == nil {
			hm = make(map[string]*store.Counters, 1)
			m.hours[pk] = hm
		}
		c := hm[d.hourID]
		if c == nil {
			c = new(store.Counters)
			hm[d.hourID] = c
		}
		c.Billed += d.billed
		c.Overage += d.overage
		c.Requests += d.requests
	}
	switch d.idemOp {
	case idemPut, idemSet:
		k := idemKey{d.subject, d.idemKey}
		if old, ok := m.idem[k]; !ok || old.exp != d.idemExp {
			m.idemQueue = append(m.idemQueue, idemExpiry{k, d.idemExp})
		}
		m.idem[k] = idemRecord{exp: d.idemExp, fp: d.idemFP, repeats: d.idemRepeats}
		m.dirtyIdem[k] = struct{}{}
	case idemDelete:
		k := idemKey{d.subject, d.idemKey}
		delete(m.idem, k)
		m.dirtyIdem[k] = struct{}{}
	}
	p.crossed = m.applyCrossings(d, "", p.crossed, d.crossed)
	for _, md := range d.meters {
		ms := p.meter(md.meter)
		if ms == nil {
			p.meters = append(p.meters, meterState{name: md.meter})
			ms = &p.meters[len(p.meters)-1]
		}
		ms.Billed = max(0, ms.Billed+md.billed)
		ms.Overage = max(0, ms.Overage+md.overage)
		ms.Requests = max(0, ms.Requests+md.requests)
		if md.billed != 0 || md.overage != 0 || md.requests != 0 {
			hm := m.meterHours[pk]
			if hm == nil {
				hm = make(map[meterHour]*store.Counters, 1)
				m.meterHours[pk] = hm
			}
			k := meterHour{md.meter, d.hourID}
			c := hm[k]
			if c == nil {
				c = new(store.Counters)
				hm[k] = c
			}
			c.Billed += md.billed
			c.Overage += md.overage
			c.Requests += md.requests
		}
		ms.crossed = m.applyCrossings(d, md.meter, ms.crossed, md.crossed)
	}
}

// applyCrossings adds the crossings cs of meter ("" for the default) in
// d's period to crossed, the thresholds crossed so far, writing an outbox
// entry for each not crossed before, and returns crossed.
func (m *meter) applyCrossings(d *delta, meter string, crossed []int, cs []crossing) []int {
	for _, c := range cs {
		t := int(c.threshold)
		if slices.Contains(crossed, t) {
			continue
		}
		crossed = append(crossed, t)
		slices.Sort(crossed)
		e := store.ThresholdEvent{
			ID:        store.ThresholdEventID(d.subject, d.periodID, t, meter),
			Subject:   d.subject,
			PeriodID:  d.periodID,
			Threshold: t,
			Used:      c.used,
			Included:  c.included,
			At:        time.UnixMicro(c.at).UTC(),
			Meter:     meter,
		}
		m.events = append(m.events, e)
		m.unsaved = append(m.unsaved, e)
	}
	return crossed
}

// prune forgets expired idempotency keys and, at most every pruneEvery,
// the periods past their retention, with their hours and outbox entries.
// The caller holds mu.
func (m *meter) prune(now int64) {
	for m.idemHead < len(m.idemQueue) && m.idemQueue[m.idemHead].exp <= now {
		e := m.idemQueue[m.idemHead]
		m.idemQueue[m.idemHead] = idemExpiry{}
		m.idemHead++
		if rec, ok := m.idem[e.k]; ok && rec.exp == e.exp {
			delete(m.idem, e.k)
			m.dirtyIdem[e.k] = struct{}{}
		}
	}
	if m.idemHead > len(m.idemQueue)/2 {
		m.idemQueue = append(m.idemQueue[:0], m.idemQueue[m.idemHead:]...)
		m.idemHead = 0
	}
	if now < m.nextPrune || now-m.lastPrune < pruneEvery.Microseconds() {
		return
	}
	m.lastPrune = now
	retention := store.Retention.Microseconds()
	m.nextPrune = 1<<63 - 1
	gone := make(map[periodKey]bool)
	for pk, p := range m.periods {
		if p.end+retention > now {
			m.nextPrune = min(m.nextPrune, p.end+retention)
			continue
		}
		gone[pk] = true
		delete(m.periods, pk)
		delete(m.hours, pk)
		delete(m.meterHours, pk)
		delete(m.dirtyPeriods, pk)
		m.pruned = append(m.pruned, pk)
	}
	if len(gone) > 0 {
		isGone := func(e store.ThresholdEvent) bool { return gone[periodKey{e.Subject, e.PeriodID}] }
		m.events = slices.DeleteFunc(m.events, isGone)
		m.unsaved = slices.DeleteFunc(m.unsaved, isGone)
	}
}

// snapshot is what one checkpoint writes.
type snapshot struct {
	covered uint64
	deleted []periodKey
	periods map[periodKey]periodState
	hours   map[periodKey]map[string]*store.Counters
	mhours  map[periodKey]map[meterHour]*store.Counters
	idem    map[idemKey]idemRecord // zero: forget the key
	events  []store.ThresholdEvent
	oldSegs []uint64
}

// checkpoint writes the changes since the last checkpoint into bbolt in
// one transaction, with the id of the last segment they cover, and then
// deletes the covered segments. On failure nothing is lost: the changes
// stay pending in memory and the segments stay on disk.
func (m *meter) checkpoint() error {
	m.flushMu.Lock()
	defer m.flushMu.Unlock()

	m.mu.Lock()
	if m.segSize > 0 || m.segBroken {
		if err := m.rotate(); err != nil {
			m.mu.Unlock()
			return fmt.Errorf("boltstore: checkpoint: write-ahead log: %w", err)
		}
	}
	m.prune(m.clock().UnixMicro())
	snap := snapshot{
		covered: m.segID - 1,
		deleted: m.pruned,
		periods: make(map[periodKey]periodState, len(m.dirtyPeriods)),
		hours:   m.hours,
		mhours:  m.meterHours,
		idem:    make(map[idemKey]idemRecord, len(m.dirtyIdem)),
		events:  m.unsaved,
		oldSegs: slices.Clone(m.oldSegs),
	}
	for pk := range m.dirtyPeriods {
		p := m.periods[pk]
		snap.periods[pk] = p.clone()
	}
	for k := range m.dirtyIdem {
		snap.idem[k] = m.idem[k]
	}
	m.pruned, m.unsaved = nil, nil
	m.hours = make(map[periodKey]map[string]*store.Counters, len(snap.hours))
	m.meterHours = make(map[periodKey]map[meterHour]*store.Counters, len(snap.mhours))
	m.dirtyPeriods = make(map[periodKey]struct{}, len(snap.periods))
	m.dirtyIdem = make(map[idemKey]struct{}, len(snap.idem))
	m.mu.Unlock()

	if err := m.db.Update(snap.write); err != nil {
		m.restore(&snap)
		return fmt.Errorf("%w: boltstore: checkpoint: %w", store.ErrUnavailable, err)
	}
	m.mu.Lock()
	m.oldSegs = m.oldSegs[len(snap.oldSegs):]
	m.mu.Unlock()
	var errs []error
	for _, id := range snap.oldSegs {
		errs = append(errs, removeSegment(m.path, id))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("boltstore: checkpoint: delete covered log segments (they are skipped on replay): %w", err)
	}
	return nil
}

// restore puts the changes of a snapshot that could not be written back
// into the pending state, merged with what happened since.
func (m *meter) restore(snap *snapshot) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.pruned = append(snap.deleted, m.pruned...)
	for pk := range snap.periods {
		if _, ok := m.periods[pk]; ok {
			m.dirtyPeriods[pk] = struct{}{}
		}
	}
	restoreHours(m.hours, snap.hours, m.periods)
	restoreHours(m.meterHours, snap.mhours, m.periods)
	for k := range snap.idem {
		m.dirtyIdem[k] = struct{}{}
	}
	m.unsaved = append(snap.events, m.unsaved...)
}

// restoreHours adds the hours of a snapshot whose write failed (snap)
// back into the live hours (cur), for the periods still live.
func restoreHours[K comparable](cur, snap map[periodKey]map[K]*store.Counters, periods map[periodKey]*periodState) {
	for pk, hm := range snap {
		if _, ok := periods[pk]; !ok {
			continue // pruned since
		}
		live := cur[pk]
		if live == nil {
			cur[pk] = hm
			continue
		}
		for h, c := range hm {
			if n := live[h]; n != nil {
				n.Billed += c.Billed
				n.Overage += c.Overage
				n.Requests += c.Requests
			} else {
				live[h] = c
			}
		}
	}
}

// write applies the snapshot in a bbolt transaction: deletions first, so a
// period pruned and used again starts from zero.
func (snap *snapshot) write(tx *bolt.Tx) error {
	periods := tx.Bucket(bucketUsagePeriods)
	hours := tx.Bucket(bucketUsageHours)
	events := tx.Bucket(bucketUsageEvents)
	idem := tx.Bucket(bucketUsageIdem)
	meterPeriods := tx.Bucket(bucketUsageMeterPeriods)
	meterHours := tx.Bucket(bucketUsageMeterHours)
	if len(snap.deleted) > 0 {
		gone := make(map[periodKey]bool, len(snap.deleted))
		for _, pk := range snap.deleted {
			gone[pk] = true
			prefix := encodePeriodKey(pk)
			if err := periods.Delete(prefix); err != nil {
				return err
			}
			for _, b := range []*bolt.Bucket{hours, meterPeriods, meterHours} {
				c := b.Cursor()
				for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = c.Seek(prefix) {
					if err := c.Delete(); err != nil {
						return err
					}
				}
			}
		}
		var drop [][]byte
		err := events.ForEach(func(k, v []byte) error {
			var e store.ThresholdEvent
			if json.Unmarshal(v, &e) == nil && gone[periodKey{e.Subject, e.PeriodID}] {
				drop = append(drop, k)
			}
			return nil
		})
		if err != nil {
			return err
		}
		for _, k := range drop {
			if err := events.Delete(k); err != nil {
				return err
			}
		}
	}
	for pk, p := range snap.periods {
		prefix := encodePeriodKey(pk)
		if err := periods.Put(prefix, encodePeriod(&p)); err != nil {
			return err
		}
		for _, ms := range p.meters {
			if err := meterPeriods.Put(appendString(slices.Clip(prefix), ms.name), encodeMeterPeriod(&ms)); err != nil {
				return err
			}
		}
	}
	for pk, hm := range snap.hours {
		prefix := encodePeriodKey(pk)
		for h, d := range hm {
			if err := addHour(hours, append(slices.Clip(prefix), h...), d); err != nil {
				return err
			}
		}
	}
	for pk, hm := range snap.mhours {
		prefix := encodePeriodKey(pk)
		for h, d := range hm {
			if err := addHour(meterHours, append(appendString(slices.Clip(prefix), h.meter), h.hour...), d); err != nil {
				return err
			}
		}
	}
	for k, rec := range snap.idem {
		key := append(appendString(nil, k.subject), k.key...)
		var err error
		if rec.exp == 0 {
			err = idem.Delete(key)
		} else {
			err = idem.Put(key, rec.encode())
		}
		if err != nil {
			return err
		}
	}
	for _, e := range snap.events {
		seq, err := events.NextSequence()
		if err != nil {
			return err
		}
		v, err := json.Marshal(e)
		if err != nil {
			return err
		}
		if err := events.Put(binary.BigEndian.AppendUint64(nil, seq), v); err != nil {
			return err
		}
	}
	return tx.Bucket(bucketMeta).Put(metaWALCovered, binary.BigEndian.AppendUint64(nil, snap.covered))
}

// addHour adds the changes d to the hour counters under key k of bucket b,
// deleting them once all are zero.
func addHour(b *bolt.Bucket, k []byte, d *store.Counters) error {
	var c store.Counters
	if v := b.Get(k); v != nil {
		var ok bool
		if c, ok = decodeCounters(v); !ok {
			return decodeErr("usage hour", string(k), errCorrupt)
		}
	}
	c.Billed = max(0, c.Billed+d.Billed)
	c.Overage = max(0, c.Overage+d.Overage)
	c.Requests = max(0, c.Requests+d.Requests)
	if c == (store.Counters{}) {
		return b.Delete(k)
	}
	return b.Put(k, encodeCounters(nil, c))
}

func (m *meter) usage(subject, periodID string) (store.PeriodUsage, error) {
	u := store.PeriodUsage{PeriodID: periodID}
	m.flushMu.RLock()
	defer m.flushMu.RUnlock()
	pk := periodKey{subject, periodID}
	pending := map[string]store.Counters{}
	var meters []store.MeterUsage
	mpending := map[meterHour]store.Counters{}
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return store.PeriodUsage{}, errClosed
	}
	if p := m.periods[pk]; p != nil {
		u.Counters = p.Counters
		u.Thresholds = slices.Clone(p.crossed)
		for _, ms := range p.meters {
			meters = append(meters, store.MeterUsage{Meter: ms.name, Counters: ms.Counters, Thresholds: slices.Clone(ms.crossed)})
		}
	}
	for h, c := range m.hours[pk] {
		pending[h] = *c
	}
	for h, c := range m.meterHours[pk] {
		mpending[h] = *c
	}
	m.mu.Unlock()

	prefix := encodePeriodKey(pk)
	err := m.db.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketUsageHours).Cursor()
		for k, v := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, v = c.Next() {
			stored, ok := decodeCounters(v)
			if !ok {
				return decodeErr("usage hour", string(k), errCorrupt)
			}
			h := string(k[len(prefix):])
			p := pending[h]
			pending[h] = store.Counters{Billed: p.Billed + stored.Billed, Overage: p.Overage + stored.Overage, Requests: p.Requests + stored.Requests}
		}
		if len(meters) == 0 {
			return nil
		}
		c = tx.Bucket(bucketUsageMeterHours).Cursor()
		for k, v := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, v = c.Next() {
			stored, ok := decodeCounters(v)
			r := decoder{b: k[len(prefix):]}
			h := meterHour{meter: r.string()}
			if !ok || r.err != nil {
				return decodeErr("usage meter hour", string(k), errCorrupt)
			}
			h.hour = string(r.b)
			p := mpending[h]
			mpending[h] = store.Counters{Billed: p.Billed + stored.Billed, Overage: p.Overage + stored.Overage, Requests: p.Requests + stored.Requests}
		}
		return nil
	})
	if err != nil {
		return store.PeriodUsage{}, fmt.Errorf("%w: boltstore: %w", store.ErrUnavailable, err)
	}
	for _, h := range slices.Sorted(maps.Keys(pending)) {
		c := pending[h]
		c = store.Counters{Billed: max(0, c.Billed), Overage: max(0, c.Overage), Requests: max(0, c.Requests)}
		if c != (store.Counters{}) {
			u.Hours = append(u.Hours, store.HourUsage{HourID: h, Counters: c})
		}
	}
	if len(meters) == 0 {
		return u, nil
	}
	slices.SortFunc(meters, func(a, b store.MeterUsage) int { return cmp.Compare(a.Meter, b.Meter) })
	hs := slices.SortedFunc(maps.Keys(mpending), func(a, b meterHour) int {
		return cmp.Or(cmp.Compare(a.meter, b.meter), cmp.Compare(a.hour, b.hour))
	})
	for _, h := range hs {
		c := mpending[h]
		c = store.Counters{Billed: max(0, c.Billed), Overage: max(0, c.Overage), Requests: max(0, c.Requests)}
		i, found := slices.BinarySearchFunc(meters, h.meter, func(mu store.MeterUsage, name string) int { return cmp.Compare(mu.Meter, name) })
		if c != (store.Counters{}) && found {
			meters[i].Hours = append(meters[i].Hours, store.HourUsage{HourID: h.hour, Counters: c})
		}
	}
	for _, mu := range meters {
		if mu.Counters != (store.Counters{}) || len(mu.Thresholds) > 0 || len(mu.Hours) > 0 {
			u.Meters = append(u.Meters, mu)
		}
	}
	return u, nil
}

func (m *meter) thresholdEvents(subject string) ([]store.ThresholdEvent, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, errClosed
	}
	var out []store.ThresholdEvent
	for _, e := range m.events {
		if subject == "" || e.Subject == subject {
			out = append(out, e)
		}
	}
	return out, nil
}

// encodePeriodKey is the bbolt key of a period: subject and period id as
// length-prefixed strings, so one subject's id can never be a prefix of
// another's; an hour's key appends the hour id.
func encodePeriodKey(pk periodKey) []byte {
	return appendString(appendString(nil, pk.subject), pk.period)
}

func decodePeriodKey(k []byte) (periodKey, bool) {
	r := decoder{b: k}
	pk := periodKey{r.string(), r.string()}
	return pk, r.err == nil && len(r.b) == 0
}

// encodePeriod encodes a period's counters, end and crossed thresholds as
// varints.
func encodePeriod(p *periodState) []byte {
	b := encodeCounters(nil, p.Counters)
	b = binary.AppendVarint(b, p.end)
	b = binary.AppendUvarint(b, uint64(len(p.crossed)))
	for _, t := range p.crossed {
		b = binary.AppendVarint(b, int64(t))
	}
	return b
}

func decodePeriod(v []byte) (*periodState, bool) {
	r := decoder{b: v}
	p := &periodState{Counters: store.Counters{Billed: r.varint(), Overage: r.varint(), Requests: r.varint()}, end: r.varint()}
	n := r.uvarint()
	if n > uint64(len(r.b)) {
		return nil, false
	}
	for range n {
		p.crossed = append(p.crossed, int(r.varint()))
	}
	return p, r.err == nil && len(r.b) == 0
}

// encodeMeterPeriod encodes a meter's counters and crossed thresholds as
// varints.
func encodeMeterPeriod(ms *meterState) []byte {
	b := encodeCounters(nil, ms.Counters)
	b = binary.AppendUvarint(b, uint64(len(ms.crossed)))
	for _, t := range ms.crossed {
		b = binary.AppendVarint(b, int64(t))
	}
	return b
}

func decodeMeterPeriod(v []byte) (meterState, bool) {
	r := decoder{b: v}
	ms := meterState{Counters: store.Counters{Billed: r.varint(), Overage: r.varint(), Requests: r.varint()}}
	n := r.uvarint()
	if n > uint64(len(r.b)) {
		return meterState{}, false
	}
	for range n {
		ms.crossed = append(ms.crossed, int(r.varint()))
	}
	return ms, r.err == nil && len(r.b) == 0
}

func encodeCounters(b []byte, c store.Counters) []byte {
	b = binary.AppendVarint(b, c.Billed)
	b = binary.AppendVarint(b, c.Overage)
	return binary.AppendVarint(b, c.Requests)
}

func decodeCounters(v []byte) (store.Counters, bool) {
	r := decoder{b: v}
	c := store.Counters{Billed: r.varint(), Overage: r.varint(), Requests: r.varint()}
	return c, r.err == nil && len(r.b) == 0
}
