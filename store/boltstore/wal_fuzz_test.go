package boltstore

import (
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"testing"
)

// walSeeds are record payloads as the store writes them.
func walSeeds() [][]byte {
	return [][]byte{
		appendRecord(nil, &delta{subject: "acme", periodID: "2026-12", periodEnd: 1798761600000000, hourID: "2026-12-06T10", billed: 10, requests: 1}),
		appendRecord(nil, &delta{subject: "c", periodID: "p", hourID: "h", billed: -3, overage: 2, requests: -1, idemOp: idemPut, idemKey: "k", idemExp: 99}),
		appendRecord(nil, &delta{subject: "c", idemOp: idemDelete, idemKey: "k"}),
		appendRecord(nil, &delta{subject: "c", crossed: []crossing{{threshold: 80, used: 800, included: 1000, at: 1}, {threshold: 100, used: 1000, included: 1000, at: 2}}}),
		appendRecord(nil, &delta{subject: "acme", periodID: "p", hourID: "h", billed: 1, requests: 1, meters: []meterDelta{
			{meter: "tokens", billed: 40, requests: 1},
			{meter: "upload", billed: -3, overage: -1, crossed: []crossing{{threshold: 50, used: 500, included: 1000, at: 7}}},
		}}),
		{recordDelta},
		{recordDeltaMeters},
		{},
	}
}

// FuzzWALRecord fuzzes the write-ahead log's record decoder. Properties:
// no panic; a payload that decodes re-encodes to a payload that decodes
// to the same record (encode and decode agree); a payload with bytes
// after its record is refused.
func FuzzWALRecord(f *testing.F) {
	for _, s := range walSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, payload []byte) {
		d, err := decodeRecord(payload)
		if err != nil {
			return
		}
		again := appendRecord(nil, &d)
		d2, err := decodeRecord(again)
		if err != nil || !reflect.DeepEqual(d, d2) {
			t.Fatalf("%x decodes to %+v, which re-encodes to %x, decoding to %+v, %v", payload, d, again, d2, err)
		}
		if _, err := decodeRecord(append(append([]byte(nil), payload...), 0)); err == nil {
			t.Fatalf("%x with a trailing byte decodes", payload)
		}
	})
}

// FuzzWALSegment fuzzes the reading of a segment file, as recovery after
// a crash reads it. Properties: no panic; every record delivered is one
// the encoder can write back; the bytes ignored are the segment's tail;
// a whole frame written after an intact prefix is still delivered when
// nothing damaged precedes it.
func FuzzWALSegment(f *testing.F) {
	var whole []byte
	for _, s := range walSeeds()[:5] {
		d, _ := decodeRecord(s)
		whole = appendFrame(whole, &d)
	}
	f.Add(whole)
	f.Add(whole[:len(whole)-3]) // a torn tail
	f.Add([]byte{0, 0, 0, 0, 0, 0, 0, 0})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4})
	path := filepath.Join(f.TempDir(), "wal.seg")
	f.Fuzz(func(t *testing.T, data []byte) {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		var got []delta
		ignored, err := readSegment(path, func(d *delta) { got = append(got, *d) })
		if err != nil {
			return // a frame with a good checksum that does not decode: reported, not guessed
		}
		if ignored < 0 || ignored > int64(len(data)) {
			t.Fatalf("ignored %d of %d bytes", ignored, len(data))
		}
		// The records delivered are exactly the frames of the prefix.
		var prefix []byte
		for i := range got {
			prefix = appendFrame(prefix, &got[i])
		}
		read := data[:int64(len(data))-ignored]
		if len(prefix) != len(read) {
			// Frames may use non-canonical varints; they must still
			// decode to what was delivered.
			var again []delta
			_, _ = readSegment(path, func(d *delta) { again = append(again, *d) })
			if !reflect.DeepEqual(again, got) {
				t.Fatalf("reading twice differs: %+v then %+v", got, again)
			}
			return
		}
		// Appending a whole frame after the intact prefix delivers it.
		extra := delta{subject: "tail", periodID: "p", hourID: "h", billed: 1, requests: 1}
		if err := os.WriteFile(path, appendFrame(append([]byte(nil), read...), &extra), 0o600); err != nil {
			t.Fatal(err)
		}
		var after []delta
		if _, err := readSegment(path, func(d *delta) { after = append(after, *d) }); err != nil {
			t.Fatal(err)
		}
		if len(after) != len(got)+1 || !reflect.DeepEqual(after[len(got)], extra) {
			t.Fatalf("a frame after the intact prefix %x was not delivered: %+v", read, after)
		}
	})
}

// TestDecodeRecordHugeCount is what FuzzWALRecord found: a record whose
// crossing count is garbage (33 million, in a 9-byte rest) was refused only
// after appending that many empty crossings, a gigabyte, at recovery. It is
// now refused without allocating for the count.
func TestDecodeRecordHugeCount(t *testing.T) {
	payload := []byte("\x01\x01c\x00\x00\x00\x00\x00\x00\x00\xc8\xd0\xe4\x0f\x02\f\x01\xd0\x0f\xd0\x0f\x0f")
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	if _, err := decodeRecord(payload); err == nil {
		t.Fatal("a record with a garbage crossing count decodes")
	}
	runtime.ReadMemStats(&after)
	if n := after.TotalAlloc - before.TotalAlloc; n > 1<<20 {
		t.Errorf("refusing it allocated %d bytes", n)
	}
}
