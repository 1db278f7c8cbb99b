package boltstore

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// The write-ahead log is a series of segment files next to the bbolt file,
// named "<store file>.wal.<id>" with a 16-digit hexadecimal id that grows
// with every new segment. Each segment is a sequence of frames:
//
//	length  uint32, little endian: the payload's length
//	crc     uint32, little endian: CRC-32C of the four length bytes and the payload
//	payload one record (see appendRecord)
//
// A frame that is cut short, has a length of 0 or above maxRecordSize, or
// whose checksum does not match ends the segment: it is what a process
// killed in the middle of a write (or a machine that lost unwritten pages)
// leaves behind, and nothing is ever appended after it, because a segment
// is only written by the process that created it.

// Where it can (Linux), the segment being written is preallocated on disk,
// segmentSize bytes, and mapped into memory: appending a frame is a copy
// into the mapping, with no system call. A process killed after the copy
// loses nothing, as with write(2) (the pages are the file's, in the page
// cache, and the kernel writes them back); a machine that stops before
// writeback loses the same unsynced tail either way. The preallocated,
// unwritten rest of the segment reads as zeros, a frame of length 0, so it
// ends the segment's replay like a torn frame; a segment is truncated to
// its frames when it is closed. Where the file cannot be preallocated or
// mapped, frames are written with write(2).

// segmentSize is the disk space a mapped segment reserves: a segment
// holding that much is replaced by a new one. It is far above a frame's
// largest size (frameHeader + maxRecordSize).
const segmentSize = 4 << 20

// frameHeader is the size of a frame's length and checksum.
const frameHeader = 8

// maxRecordSize bounds a record's payload; anything larger is corruption.
const maxRecordSize = 1 << 20

// walSuffix separates the store file's name from a segment id.
const walSuffix = ".wal."

var crcTable = crc32.MakeTable(crc32.Castagnoli)

// delta is one WAL record: a change to one subject's metering state, as it
// was applied in memory. Counters are differences (already clamped so that
// no counter goes below zero), so replaying a record repeats exactly what
// the live process did, without deciding anything again.
type delta struct {
	subject, periodID, hourID string
	// periodEnd is the period's end in microseconds since the epoch.
	periodEnd int64
	// billed, overage and requests change the period's and the hour's
	// counters.
	billed, overage, requests int64
	// idemOp is idemNone, idemPut (remember idemKey until idemExp, in
	// microseconds, without a fingerprint: records written before
	// fingerprints), idemSet (remember idemKey until idemExp with
	// fingerprint idemFP and idemRepeats repeats) or idemDelete (forget
	// idemKey).
	idemOp      byte
	idemKey     string
	idemExp     int64
	idemFP      string
	idemRepeats int64
	// crossed are the thresholds this change crossed, each a new outbox
	// entry.
	crossed []crossing
	// meters are the changes to the subject's other meters in the period
	// and hour (nil for none: then the record is a recordDelta, as before
	// meters existed).
	meters []meterDelta
}

// meterDelta is the change of one meter other than the default one: its
// counters' differences and the thresholds it crossed.
type meterDelta struct {
	meter                     string
	billed, overage, requests int64
	crossed                   []crossing
}

// Idempotency-key operations of a delta.
const (
	idemNone byte = iota
	idemPut
	idemDelete
	idemSet
)

// crossing is a threshold crossed: its percentage, the used and included
// units when it was crossed, and when (microseconds since the epoch).
type crossing struct {
	threshold          int64
	used, included, at int64
}

// Record types, the payload's first byte. A recordDelta is a delta without
// meters (the only type written before meters existed, and still the one
// written for a change without them); a recordDeltaMeters is the same
// followed by its meters.
const (
	recordDelta       byte = 1
	recordDeltaMeters byte = 2
)

// appendFrame appends d as one frame to buf.
func appendFrame(buf []byte, d *delta) []byte {
	start := len(buf)
	buf = append(buf, make([]byte, frameHeader)...)
	buf = appendRecord(buf, d)
	n := len(buf) - start - frameHeader
	binary.LittleEndian.PutUint32(buf[start:], uint32(n))
	crc := crc32.Update(0, crcTable, buf[start:start+4])
	crc = crc32.Update(crc, crcTable, buf[start+frameHeader:])
	binary.LittleEndian.PutUint32(buf[start+4:], crc)
	return buf
}

// appendRecord appends d's payload: the record type, then strings as a
// uvarint length and bytes, integers as varints.
func appendRecord(b []byte, d *delta) []byte {
	if len(d.meters) > 0 {
		b = append(b, recordDeltaMeters)
	} else {
		b = append(b, recordDelta)
	}
	b = appendString(b, d.subject)
	b = appendString(b, d.periodID)
	b = binary.AppendVarint(b, d.periodEnd)
	b = appendString(b, d.hourID)
	b = binary.AppendVarint(b, d.billed)
	b = binary.AppendVarint(b, d.overage)
	b = binary.AppendVarint(b, d.requests)
	b = append(b, d.idemOp)
	if d.idemOp != idemNone {
		b = appendString(b, d.idemKey)
		b = binary.AppendVarint(b, d.idemExp)
	}
	if d.idemOp == idemSet {
		b = appendString(b, d.idemFP)
		b = binary.AppendVarint(b, d.idemRepeats)
	}
	b = appendCrossings(b, d.crossed)
	if len(d.meters) > 0 {
		b = binary.AppendUvarint(b, uint64(len(d.meters)))
		for _, m := range d.meters {
			b = appendString(b, m.meter)
			b = binary.AppendVarint(b, m.billed)
			b = binary.AppendVarint(b, m.overage)
			b = binary.AppendVarint(b, m.requests)
			b = appendCrossings(b, m.crossed)
		}
	}
	return b
}

// appendCrossings appends a count and the crossings.
func appendCrossings(b []byte, cs []crossing) []byte {
	b = binary.AppendUvarint(b, uint64(len(cs)))
	for _, c := range cs {
		b = binary.AppendVarint(b, c.threshold)
		b = binary.AppendVarint(b, c.used)
		b = binary.AppendVarint(b, c.included)
		b = binary.AppendVarint(b, c.at)
	}
	return b
}

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

// errCorrupt reports a payload that passed its checksum but does not
// decode: a bug or a file from a newer version, not a torn write.
var errCorrupt = errors.New("undecodable write-ahead log record")

// decoder reads a payload; the first failure sticks.
type decoder struct {
	b   []byte
	err error
}

func (r *decoder) fail() {
	if r.err == nil {
		r.err = errCorrupt
	}
	r.b = nil
}

func (r *decoder) byte() byte {
	if len(r.b) == 0 {
		r.fail()
		return 0
	}
	c := r.b[0]
	r.b = r.b[1:]
	return c
}

func (r *decoder) varint() int64 {
	v, n := binary.Varint(r.b)
	if n <= 0 {
		r.fail()
		return 0
	}
	r.b = r.b[n:]
	return v
}

func (r *decoder) uvarint() uint64 {
	v, n := binary.Uvarint(r.b)
	if n <= 0 {
		r.fail()
		return 0
	}
	r.b = r.b[n:]
	return v
}

func (r *decoder) string() string {
	n := r.uvarint()
	if n > uint64(len(r.b)) {
		r.fail()
		return ""
	}
	s := string(r.b[:n])
	r.b = r.b[n:]
	return s
}

// crossings reads a count and the crossings (nil for none).
func (r *decoder) crossings() []crossing {
	n := r.uvarint()
	if n > uint64(len(r.b)) { // each crossing takes at least 4 bytes
		r.fail()
		n = 0 // and decode none: the count is garbage, it must size nothing
	}
	var out []crossing
	for range n {
		out = append(out, crossing{threshold: r.varint(), used: r.varint(), included: r.varint(), at: r.varint()})
	}
	return out
}

// decodeRecord decodes one payload.
func decodeRecord(p []byte) (delta, error) {
	r := decoder{b: p}
	var d delta
	tag := r.byte()
	if tag != recordDelta && tag != recordDeltaMeters {
		return delta{}, errCorrupt
	}
	d.subject = r.string()
	d.periodID = r.string()
	d.periodEnd = r.varint()
	d.hourID = r.string()
	d.billed = r.varint()
	d.overage = r.varint()
	d.requests = r.varint()
	d.idemOp = r.byte()
	switch d.idemOp {
	case idemNone:
	case idemPut, idemDelete:
		d.idemKey = r.string()
		d.idemExp = r.varint()
	case idemSet:
		d.idemKey = r.string()
		d.idemExp = r.varint()
		d.idemFP = r.string()
		d.idemRepeats = r.varint()
	default:
		r.fail()
	}
	d.crossed = r.crossings()
	if tag == recordDeltaMeters {
		n := r.uvarint()
		if n == 0 || n > uint64(len(r.b)) { // each meter takes at least 5 bytes
			r.fail()
			n = 0
		}
		for range n {
			m := meterDelta{meter: r.string(), billed: r.varint(), overage: r.varint(), requests: r.varint()}
			m.crossed = r.crossings()
			d.meters = append(d.meters, m)
		}
	}
	if r.err == nil && len(r.b) != 0 {
		r.fail()
	}
	return d, r.err
}

// readSegment calls fn for every intact record of the segment file, in
// order. It stops at the first torn or damaged frame and returns how many
// bytes it ignored from there on.
func readSegment(path string, fn func(*delta)) (ignored int64, err error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	off := 0
	for len(data)-off >= frameHeader {
		n := int(binary.LittleEndian.Uint32(data[off:]))
		if n == 0 || n > maxRecordSize || len(data)-off-frameHeader < n {
			break
		}
		crc := crc32.Update(0, crcTable, data[off:off+4])
		crc = crc32.Update(crc, crcTable, data[off+frameHeader:off+frameHeader+n])
		if crc != binary.LittleEndian.Uint32(data[off+4:]) {
			break
		}
		d, err := decodeRecord(data[off+frameHeader : off+frameHeader+n])
		if err != nil {
			return 0, fmt.Errorf("%s at offset %d: %w", path, off, err)
		}
		fn(&d)
		off += frameHeader + n
	}
	return int64(len(data) - off), nil
}

// segmentPath is the file of segment id of the store file at path.
func segmentPath(path string, id uint64) string {
	return fmt.Sprintf("%s%s%016x", path, walSuffix, id)
}

// listSegments returns the ids of the store file's segments, ascending.
func listSegments(path string) ([]uint64, error) {
	entries, err := os.ReadDir(filepath.Dir(path))
	if err != nil {
		return nil, err
	}
	prefix := filepath.Base(path) + walSuffix
	var ids []uint64
	for _, e := range entries {
		name, ok := strings.CutPrefix(e.Name(), prefix)
		if !ok || len(name) != 16 || !e.Type().IsRegular() {
			continue
		}
		id, err := strconv.ParseUint(name, 16, 64)
		if err != nil {
			continue
		}
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids, nil
}

// createSegment creates the empty segment id for appending. Writes go to
// the end of the file whatever happened before (O_APPEND), so a failed
// write that was truncated away leaves no gap. It is opened for reading
// too, which a shared writable mapping needs.
func createSegment(path string, id uint64) (*os.File, error) {
	return os.OpenFile(segmentPath(path, id), os.O_RDWR|os.O_CREATE|os.O_EXCL|os.O_APPEND, 0o600)
}

// removeSegment deletes segment id; a segment already gone is no error.
func removeSegment(path string, id uint64) error {
	err := os.Remove(segmentPath(path, id))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}
