// Package spool keeps usage records (store.Reservation and
// store.Settlement values) in local files while the shared store cannot be
// reached, or while the outcome of a store call is unknown, and replays them
// into the store once it answers.
//
// # Layout
//
// The path given to Open is a directory (created 0700, with its missing
// parents) holding numbered segment files (0600), a progress file and a lock
// file. Appends go to the newest segment, the active one. Replay first seals
// the active segment by starting a new one, so that appends go on while it
// works, then applies the sealed segments oldest first and deletes each once
// it is applied. Open never appends to a segment left by an earlier process:
// it seals them all and starts a new one, so a torn tail is never followed by
// new records.
//
// Each record is one frame: the payload's length (4 bytes, little endian),
// its CRC-32C (4 bytes) and the payload, the record as JSON. A frame that is
// incomplete, of an impossible length or fails its checksum ends its
// segment: only the tail of a write cut short by a crash looks like that,
// never an acknowledged append.
//
// # Durability
//
// Append returns once the record is written to the active segment by one
// write(2) (O_APPEND). The record is then in the operating system's page
// cache: it survives the death of the process (kill -9, a panic, the OOM
// killer) but not necessarily a power loss or a kernel crash. With
// Options.Sync, Append also fsyncs the segment before it returns, which
// survives a power loss on disks that honour flushes, at the price of a disk
// flush per append (see BenchmarkAppendParallel).
//
// Replay applies each record with Replay set, so the store applies it at
// most once per (Subject, Origin, Seq). After each applied record it writes
// how far it got into the progress file (one pwrite into one of two
// alternating checksummed slots), and fsyncs that file when it returns
// and, with Options.Sync, every SyncEvery records. A Replay that stops (a
// store error, a cancelled context, Close, or the process dying) and is
// started again, from the same Spool or from one opened afresh on the same
// path, skips the records already applied: the only record sent again
// after the process died is the one whose store call was in flight. After
// a power loss, more can be sent again (up to SyncEvery+1 with
// Options.Sync; without it, those applied since the last Replay returned).
// The store's (Origin, Seq) check makes records sent again harmless.
//
// # Bounds
//
// The segments together never exceed Options.MaxBytes (DefaultMaxBytes);
// beyond it Append returns ErrFull and the record is not kept: the caller
// should log it and count it as lost usage. Space is given back when Replay
// deletes an applied segment.
//
// A Spool is safe for concurrent use: Append from any number of goroutines,
// Replay from one at a time (concurrent calls wait for each other). Only one
// Spool may have a path open at a time, across processes too on systems with
// flock(2); Open fails with ErrLocked otherwise. Several Caddy apps in one
// process (a config reload) must share one Spool.
package spool

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// DefaultMaxBytes is the default Options.MaxBytes: 1 GiB.
const DefaultMaxBytes int64 = 1 << 30

// SyncEvery is how many applied records Replay lets pass between fsyncs of
// its progress with Options.Sync. It is half of store.SeqWindow, so the
// records a power loss makes Replay send again stay among the sequence
// numbers the store remembers.
const SyncEvery = store.SeqWindow / 2

// Errors returned by Spool methods.
var (
	// ErrFull is returned by Append when the record would take the spool
	// beyond Options.MaxBytes. The record is not kept.
	ErrFull = errors.New("spool: full")
	// ErrClosed is returned by methods called on (or interrupted by) Close.
	ErrClosed = errors.New("spool: closed")
	// ErrInvalidRecord is returned by Append for a record that does not
	// hold exactly one of Reservation and Settlement, or that lacks the
	// Subject, Origin and Seq (≥ 1) its replay is deduplicated by.
	ErrInvalidRecord = errors.New("spool: invalid record")
	// ErrLocked is returned by Open when another Spool has the path open.
	ErrLocked = errors.New("spool: path is in use by another Spool")
)

// Record is one spooled usage record: exactly one field is set.
type Record struct {
	// Reservation is a reservation to replay with store.Meter.Reserve.
	Reservation *store.Reservation `json:"reservation,omitempty"`
	// Settlement is a settlement to replay with store.Meter.Settle.
	Settlement *store.Settlement `json:"settlement,omitempty"`
}

// validate checks that exactly one field is set and that its replay can be
// deduplicated.
func (r Record) validate() error {
	var subject, origin string
	var seq int64
	switch {
	case r.Reservation != nil && r.Settlement == nil:
		subject, origin, seq = r.Reservation.Subject, r.Reservation.Origin, r.Reservation.Seq
	case r.Settlement != nil && r.Reservation == nil:
		subject, origin, seq = r.Settlement.Subject, r.Settlement.Origin, r.Settlement.Seq
	default:
		return ErrInvalidRecord
	}
	if subject == "" || origin == "" || seq < 1 {
		return ErrInvalidRecord
	}
	return nil
}

// Options configures OpenWith.
type Options struct {
	// MaxBytes bounds the total size of the segment files
	// (DefaultMaxBytes when zero or negative).
	MaxBytes int64
	// Sync makes Append fsync the segment before it returns, so that an
	// acknowledged record survives a power loss and not only the death of
	// the process, and makes Replay fsync its progress every SyncEvery
	// records. Off by default.
	Sync bool
}

// File names inside the spool directory.
const (
	segSuffix    = ".seg"
	progressName = "progress"
	lockName     = "lock"
)

// segHeader starts every segment file; it names the format version. The
// payload of a frame is the JSON of a Record, so store.Reservation and
// store.Settlement's field names and types are part of the format:
// changing one needs a new version here (and a way to read the old one).
// (Settlement.Void was added, omitted when false, without one: a reader
// that ignores it replays a void as a replayed release to 0, which takes
// back a reservation that ran and only lacks the mark for one that did
// not.)
var segHeader = []byte("apimonetize-spool 1\n")

// Framing.
const (
	frameHeaderLen = 8
	// maxPayload bounds a frame's payload: a larger length can only be
	// garbage (a record is a few hundred bytes).
	maxPayload = 1 << 20
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Spool is an append-only local queue of usage records. See the package
// documentation.
type Spool struct {
	dir  string
	opts Options
	lock *os.File

	// rw guards the active segment's file against being swapped (rotate)
	// or closed (Close): Append holds it shared, rotate and Close hold it
	// exclusively.
	rw     sync.RWMutex
	active *os.File // nil once closed

	// mu serialises writes to the active segment and guards the fields
	// below it.
	mu         sync.Mutex
	activeSize int64 // bytes in the active segment, header included
	activeRecs int64 // records in the active segment
	broken     error // a failed write could not be undone; cleared by rotate

	size    atomic.Int64 // bytes of all segment files
	pending atomic.Int64 // records not yet applied
	skipped atomic.Int64
	closing atomic.Bool

	// replayMu serialises Replay and Close, and guards the fields below
	// it.
	replayMu  sync.Mutex
	activeSeg uint64
	sealed    []uint64 // sealed segments, oldest first
	progress  *os.File
	pos       position // how far Replay got
	gen       uint64   // generation of the progress slot last written
	unsynced  int      // progress writes since the last fsync
}

// position is a point in the spool: every record before offset off of
// segment seg, and every record of older segments, has been applied.
type position struct {
	seg uint64
	off int64
}

// Open opens the spool at path (a directory) with default Options.
func Open(path string) (*Spool, error) {
	return OpenWith(path, Options{})
}

// OpenWith opens the spool at path (a directory, created 0700 with its
// missing parents), recovers what an earlier process left (counting its
// records, ignoring torn tails) and starts a new active segment.
func OpenWith(path string, o Options) (*Spool, error) {
	if o.MaxBytes <= 0 {
		o.MaxBytes = DefaultMaxBytes
	}
	if err := os.MkdirAll(path, 0o700); err != nil {
		return nil, fmt.Errorf("spool: %w", err)
	}
	lock, err := lockDir(filepath.Join(path, lockName))
	if err != nil {
		return nil, err
	}
	s := &Spool{dir: path, opts: o, lock: lock}
	if err := s.recover(); err != nil {
		if s.progress != nil {
			s.progress.Close()
		}
		lock.Close()
		return nil, err
	}
	return s, nil
}

// recover reads the progress, counts the records of the existing segments,
// seals them and creates the active segment.
func (s *Spool) recover() error {
	var err error
	s.progress, err = os.OpenFile(filepath.Join(s.dir, progressName), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("spool: %w", err)
	}
	s.pos, s.gen, err = readProgress(s.progress)
	if err != nil {
		return err
	}
	segs, err := s.listSegments()
	if err != nil {
		return err
	}
	last := s.pos.seg
	for _, seg := range segs {
		last = max(last, seg)
		start := int64(0)
		if seg == s.pos.seg {
			start = s.pos.off
		}
		var n, size int64
		if seg >= s.pos.seg {
			n, size, err = s.countSegment(seg, start)
			if err != nil {
				return err
			}
		}
		if n == 0 {
			// Applied by an earlier Replay that could not delete it, or
			// empty.
			if err := os.Remove(s.segPath(seg)); err != nil {
				return fmt.Errorf("spool: %w", err)
			}
			continue
		}
		s.sealed = append(s.sealed, seg)
		s.pending.Add(n)
		s.size.Add(size)
	}
	f, err := s.createSegment(last + 1)
	if err != nil {
		return err
	}
	s.active, s.activeSeg, s.activeSize = f, last+1, int64(len(segHeader))
	s.size.Add(int64(len(segHeader)))
	return nil
}

// listSegments returns the numbers of the segment files, ascending.
func (s *Spool) listSegments() ([]uint64, error) {
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("spool: %w", err)
	}
	var segs []uint64
	for _, e := range entries {
		name, ok := strings.CutSuffix(e.Name(), segSuffix)
		if !ok {
			continue
		}
		seg, err := strconv.ParseUint(name, 10, 64)
		if err != nil || segName(seg) != e.Name() {
			continue
		}
		segs = append(segs, seg)
	}
	slices.Sort(segs)
	return segs, nil
}

// countSegment counts the records of a segment from offset start (0 for
// its beginning) and returns them with the file's size.
func (s *Spool) countSegment(seg uint64, start int64) (n, size int64, err error) {
	r, err := openSegment(s.segPath(seg), start)
	if err != nil {
		return 0, 0, err
	}
	defer r.f.Close()
	for {
		_, _, err := r.next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return 0, 0, err
		}
		n++
	}
	fi, err := r.f.Stat()
	if err != nil {
		return 0, 0, fmt.Errorf("spool: %w", err)
	}
	return n, fi.Size(), nil
}

func segName(seg uint64) string { return fmt.Sprintf("%020d%s", seg, segSuffix) }

func (s *Spool) segPath(seg uint64) string { return filepath.Join(s.dir, segName(seg)) }

// createSegment creates segment seg with its header and makes its name
// durable, so that records fsynced into it (Options.Sync) are found after a
// power loss.
func (s *Spool) createSegment(seg uint64) (*os.File, error) {
	name := s.segPath(seg)
	f, err := os.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("spool: %w", err)
	}
	_, err = f.Write(segHeader)
	if err == nil {
		err = f.Sync()
	}
	if err == nil {
		err = syncDir(s.dir)
	}
	if err != nil {
		f.Close()
		os.Remove(name)
		return nil, fmt.Errorf("spool: create segment: %w", err)
	}
	return f, nil
}

// Append writes rec to the spool with one write(2) and returns once it is
// there (see the package documentation for what that survives). It returns
// ErrFull, without keeping rec, when rec would take the spool beyond
// Options.MaxBytes. Safe for concurrent use, also with Replay.
func (s *Spool) Append(rec Record) error {
	if err := rec.validate(); err != nil {
		return err
	}
	payload, err := json.Marshal(rec)
	if err != nil {
		return fmt.Errorf("spool: %w", err)
	}
	if len(payload) > maxPayload {
		return ErrInvalidRecord
	}
	frame := encodeFrame(payload)

	s.rw.RLock()
	defer s.rw.RUnlock()
	f := s.active
	if f == nil {
		return ErrClosed
	}
	s.mu.Lock()
	if s.broken != nil {
		s.mu.Unlock()
		return s.broken
	}
	if s.size.Load()+int64(len(frame)) > s.opts.MaxBytes {
		s.mu.Unlock()
		return ErrFull
	}
	if _, err := f.Write(frame); err != nil {
		// Take a partial frame back, so that later records are not
		// hidden behind it.
		if terr := f.Truncate(s.activeSize); terr != nil {
			s.broken = fmt.Errorf("spool: a failed append could not be undone (%v): appends fail until the next Replay", terr)
		}
		s.mu.Unlock()
		return fmt.Errorf("spool: append: %w", err)
	}
	s.activeSize += int64(len(frame))
	s.activeRecs++
	s.size.Add(int64(len(frame)))
	s.pending.Add(1)
	s.mu.Unlock()
	if s.opts.Sync {
		if err := f.Sync(); err != nil {
			return fmt.Errorf("spool: append: fsync: %w", err)
		}
	}
	return nil
}

// encodeFrame frames a payload: length, CRC-32C, payload.
func encodeFrame(payload []byte) []byte {
	frame := make([]byte, frameHeaderLen+len(payload))
	binary.LittleEndian.PutUint32(frame[0:4], uint32(len(payload)))
	binary.LittleEndian.PutUint32(frame[4:8], crc32.Checksum(payload, castagnoli))
	copy(frame[frameHeaderLen:], payload)
	return frame
}

// Len returns the number of records not yet applied by Replay. It is one
// atomic load.
func (s *Spool) Len() int { return int(s.pending.Load()) }

// Pending reports whether records wait to be replayed. It is one atomic
// load, cheap enough for the request path.
func (s *Spool) Pending() bool { return s.pending.Load() > 0 }

// Size returns the total size of the segment files in bytes, which Append
// keeps within Options.MaxBytes.
func (s *Spool) Size() int64 { return s.size.Load() }

// Skipped returns how many records Replay dropped because they passed
// their checksum but did not decode to a valid Record (written by an
// incompatible version, or a bug). They are not counted as applied.
func (s *Spool) Skipped() int64 { return s.skipped.Load() }

// Replay applies the pending records to m in the order they were appended,
// each with Replay set (Reserve for a reservation, whose outcome is
// ignored: the request was already served; Settle for a settlement), and
// returns how many it applied. Records appended while it runs are applied
// too: it returns nil once the spool is empty. It stops at the first error
// of m (the store is still unreachable, or the context is done) and returns
// it; the next call, on this Spool or on one opened afresh on the same path
// after a crash, resumes with the record that failed. A record that the
// store rejects for good therefore blocks the spool: the caller should log
// Replay's errors.
func (s *Spool) Replay(ctx context.Context, m store.Meter) (applied int, err error) {
	s.replayMu.Lock()
	defer s.replayMu.Unlock()
	if s.closing.Load() {
		return 0, ErrClosed
	}
	defer func() {
		if serr := s.syncProgress(); serr != nil && err == nil {
			err = serr
		}
	}()
	for {
		if err := s.rotate(); err != nil {
			return applied, err
		}
		if len(s.sealed) == 0 {
			return applied, nil
		}
		for len(s.sealed) > 0 {
			seg := s.sealed[0]
			n, err := s.replaySegment(ctx, m, seg)
			applied += n
			if err != nil {
				return applied, err
			}
			size, err := fileSize(s.segPath(seg))
			if err != nil {
				return applied, err
			}
			if err := os.Remove(s.segPath(seg)); err != nil {
				return applied, fmt.Errorf("spool: %w", err)
			}
			s.size.Add(-size)
			s.sealed = s.sealed[1:]
		}
	}
}

// rotate seals the active segment if it holds records (or a failed append
// broke it) and starts a new one. Appends wait only for the swap, not for
// the new segment's creation.
func (s *Spool) rotate() error {
	s.mu.Lock()
	need := s.activeRecs > 0 || s.broken != nil
	s.mu.Unlock()
	if !need {
		return nil
	}
	seg := s.activeSeg + 1
	f, err := s.createSegment(seg)
	if err != nil {
		return err
	}
	s.rw.Lock()
	old := s.active
	s.active = f
	s.mu.Lock()
	s.activeSize, s.activeRecs, s.broken = int64(len(segHeader)), 0, nil
	s.mu.Unlock()
	s.rw.Unlock()
	s.size.Add(int64(len(segHeader)))
	s.sealed = append(s.sealed, s.activeSeg)
	s.activeSeg = seg
	if err := old.Close(); err != nil {
		return fmt.Errorf("spool: %w", err)
	}
	return nil
}

// replaySegment applies the records of a sealed segment from the recorded
// position.
func (s *Spool) replaySegment(ctx context.Context, m store.Meter, seg uint64) (int, error) {
	start := int64(0)
	if s.pos.seg == seg {
		start = s.pos.off
	}
	r, err := openSegment(s.segPath(seg), start)
	if err != nil {
		return 0, err
	}
	defer r.f.Close()
	applied := 0
	for {
		if s.closing.Load() {
			return applied, ErrClosed
		}
		if err := ctx.Err(); err != nil {
			return applied, err
		}
		payload, end, err := r.next()
		if err == io.EOF {
			return applied, nil
		}
		if err != nil {
			return applied, err
		}
		var rec Record
		if json.Unmarshal(payload, &rec) != nil || rec.validate() != nil {
			s.skipped.Add(1)
		} else {
			if err := Apply(ctx, m, rec); err != nil {
				return applied, err
			}
			applied++
		}
		s.pending.Add(-1)
		if err := s.advance(position{seg, end}); err != nil {
			return applied, err
		}
	}
}

// Apply sends rec to m as a replay (with Replay set): Reserve for a
// reservation, Settle for a settlement.
func Apply(ctx context.Context, m store.Meter, rec Record) error {
	if rec.Reservation != nil {
		r := *rec.Reservation
		r.Replay = true
		_, err := m.Reserve(ctx, r)
		return err
	}
	st := *rec.Settlement
	st.Replay = true
	return m.Settle(ctx, st)
}

func fileSize(name string) (int64, error) {
	fi, err := os.Stat(name)
	if err != nil {
		return 0, fmt.Errorf("spool: %w", err)
	}
	return fi.Size(), nil
}

// Close stops a running Replay after its current store call (it returns
// ErrClosed), records the replay progress durably and releases the spool.
// Appends still in progress complete first; later ones return ErrClosed.
// Pending records stay on disk for the next Open.
func (s *Spool) Close() error {
	s.closing.Store(true)
	s.replayMu.Lock()
	defer s.replayMu.Unlock()
	s.rw.Lock()
	defer s.rw.Unlock()
	if s.active == nil {
		return nil
	}
	errs := []error{s.active.Close()}
	s.active = nil
	if s.activeRecs == 0 {
		errs = append(errs, os.Remove(s.segPath(s.activeSeg)))
	}
	errs = append(errs, s.syncProgress(), s.progress.Close(), s.lock.Close())
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("spool: close: %w", err)
	}
	return nil
}

// segmentReader reads the frames of one segment.
type segmentReader struct {
	f   *os.File
	br  *bufio.Reader
	off int64
}

// openSegment opens a segment for reading at offset start, or after its
// header when start is 0.
func openSegment(name string, start int64) (*segmentReader, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, fmt.Errorf("spool: %w", err)
	}
	r := &segmentReader{f: f, off: start}
	if start == 0 {
		hdr := make([]byte, len(segHeader))
		n, err := io.ReadFull(f, hdr)
		switch {
		case err == nil && string(hdr) == string(segHeader):
			r.off = int64(len(segHeader))
		case (err == io.EOF || err == io.ErrUnexpectedEOF) && string(hdr[:n]) == string(segHeader[:n]):
			// A segment whose creation a crash cut short: no records.
			r.off = int64(n)
		case err != nil:
			f.Close()
			return nil, fmt.Errorf("spool: %s: %w", name, err)
		default:
			f.Close()
			return nil, fmt.Errorf("spool: %s is not a spool segment of this version", name)
		}
	} else if _, err := f.Seek(start, io.SeekStart); err != nil {
		f.Close()
		return nil, fmt.Errorf("spool: %w", err)
	}
	r.br = bufio.NewReaderSize(f, 64<<10)
	return r, nil
}

// next returns the next frame's payload and the offset just after it, or
// io.EOF at the end of the segment or at a frame that is torn or corrupt.
func (r *segmentReader) next() (payload []byte, end int64, err error) {
	var hdr [frameHeaderLen]byte
	if _, err := io.ReadFull(r.br, hdr[:]); err != nil {
		return nil, 0, eof(err)
	}
	n := binary.LittleEndian.Uint32(hdr[0:4])
	if n == 0 || n > maxPayload {
		return nil, 0, io.EOF
	}
	payload = make([]byte, n)
	if _, err := io.ReadFull(r.br, payload); err != nil {
		return nil, 0, eof(err)
	}
	if crc32.Checksum(payload, castagnoli) != binary.LittleEndian.Uint32(hdr[4:8]) {
		return nil, 0, io.EOF
	}
	r.off += frameHeaderLen + int64(n)
	return payload, r.off, nil
}

// eof maps a short read to io.EOF (a torn tail) and wraps other errors.
func eof(err error) error {
	if err == io.EOF || err == io.ErrUnexpectedEOF {
		return io.EOF
	}
	return fmt.Errorf("spool: %w", err)
}

// The progress file has two slots, written alternately, so that a write
// torn by a power loss leaves the other one readable. A slot: magic (4
// bytes), generation, segment and offset (8 bytes each, little endian),
// CRC-32C of the preceding 28 bytes. The valid slot with the highest
// generation wins.
const (
	slotLen    = 32
	slotStride = 512 // one slot per disk sector
)

var slotMagic = []byte("amsp")

// readProgress returns the recorded position, or the start of the spool
// when there is none.
func readProgress(f *os.File) (position, uint64, error) {
	var best position
	var bestGen uint64
	for i := range int64(2) {
		var b [slotLen]byte
		if _, err := f.ReadAt(b[:], i*slotStride); err != nil {
			if errors.Is(err, io.EOF) {
				continue
			}
			return position{}, 0, fmt.Errorf("spool: progress: %w", err)
		}
		if string(b[0:4]) != string(slotMagic) ||
			crc32.Checksum(b[:28], castagnoli) != binary.LittleEndian.Uint32(b[28:32]) {
			continue
		}
		gen := binary.LittleEndian.Uint64(b[4:12])
		if gen > bestGen {
			bestGen = gen
			best = position{
				seg: binary.LittleEndian.Uint64(b[12:20]),
				off: int64(binary.LittleEndian.Uint64(b[20:28])),
			}
		}
	}
	return best, bestGen, nil
}

// advance records that every record before p has been applied, fsyncing
// every SyncEvery calls with Options.Sync.
func (s *Spool) advance(p position) error {
	s.gen++
	var b [slotLen]byte
	copy(b[0:4], slotMagic)
	binary.LittleEndian.PutUint64(b[4:12], s.gen)
	binary.LittleEndian.PutUint64(b[12:20], p.seg)
	binary.LittleEndian.PutUint64(b[20:28], uint64(p.off))
	binary.LittleEndian.PutUint32(b[28:32], crc32.Checksum(b[:28], castagnoli))
	if _, err := s.progress.WriteAt(b[:], int64(s.gen%2)*slotStride); err != nil {
		return fmt.Errorf("spool: progress: %w", err)
	}
	s.pos = p
	s.unsynced++
	if s.opts.Sync && s.unsynced >= SyncEvery {
		return s.syncProgress()
	}
	return nil
}

// syncProgress fsyncs the progress file if it changed since the last time.
func (s *Spool) syncProgress() error {
	if s.unsynced == 0 {
		return nil
	}
	if err := s.progress.Sync(); err != nil {
		return fmt.Errorf("spool: progress: %w", err)
	}
	s.unsynced = 0
	return nil
}
