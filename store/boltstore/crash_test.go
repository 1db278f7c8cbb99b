package boltstore

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// crashChildEnv names the store file TestCrashChild works on; unset, that
// test does nothing.
const crashChildEnv = "BOLTSTORE_CRASH_CHILD_STORE"

// Crash test parameters: the child's reservations and quota.
const (
	crashWorkers  = 4
	crashMaxCost  = 5
	crashIncluded = 10_000
)

// crashQuota is the quota the child reserves against: the current month,
// bill mode, with thresholds.
func crashQuota() store.Quota {
	q := thisMonth()
	q.Included = crashIncluded
	return q
}

// TestCrashChild is the process TestKillNineLosesNothing kills: it reserves
// as fast as it can from several goroutines, with checkpoints every
// millisecond, and prints "ack <cost>" after each reservation returned.
func TestCrashChild(t *testing.T) {
	path := os.Getenv(crashChildEnv)
	if path == "" {
		t.Skip("runs only as the child of TestKillNineLosesNothing")
	}
	s, err := Open(path, WithFlushInterval(time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	q := crashQuota()
	deadline := time.Now().Add(time.Minute) // in case nobody kills us
	var wg sync.WaitGroup
	for w := range crashWorkers {
		wg.Go(func() {
			line := make([]byte, 0, 16)
			for i := 0; time.Now().Before(deadline); i++ {
				r := store.Reservation{Subject: "acme", Cost: int64(1 + i%crashMaxCost), Quota: q}
				if i%4 == 0 {
					r.IdempotencyKey = fmt.Sprintf("w%d-%d", w, i)
				}
				out, err := s.Reserve(context.Background(), r)
				if err != nil || !out.Allowed {
					fmt.Fprintf(os.Stderr, "Reserve: %+v, %v\n", out, err)
					os.Exit(3)
				}
				line = strconv.AppendInt(append(line[:0], "ack "...), r.Cost, 10)
				if _, err := os.Stdout.Write(append(line, '\n')); err != nil {
					os.Exit(4)
				}
			}
		})
	}
	wg.Wait()
}

// TestKillNineLosesNothing runs TestCrashChild in a child process, kills
// it with SIGKILL after a number of acknowledged reservations, and checks
// the reopened store: every acknowledged unit is billed, nothing beyond
// what the checkpoint and the log hold (so nothing twice), and each
// threshold reached is in the outbox exactly once.
func TestKillNineLosesNothing(t *testing.T) {
	if testing.Short() {
		t.Skip("starts child processes")
	}
	for _, killAfter := range []int{1, 300, 2800, 3500, 6000, 15000} {
		t.Run(fmt.Sprint("after", killAfter), func(t *testing.T) {
			crashOnce(t, killAfter)
		})
	}
}

func crashOnce(t *testing.T, killAfter int) {
	path := filepath.Join(t.TempDir(), "store.db")
	cmd := exec.CommandContext(t.Context(), os.Args[0], "-test.run=^TestCrashChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), crashChildEnv+"="+path)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var acked, ackedUnits int64
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		cost, ok := strings.CutPrefix(sc.Text(), "ack ")
		n, err := strconv.ParseInt(cost, 10, 64)
		if !ok || err != nil {
			continue // test framework output
		}
		acked++
		ackedUnits += n
		if acked == int64(killAfter) {
			if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
		}
	}
	err = cmd.Wait()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("child ended with %v, not killed by SIGKILL (after %d acks); stderr:\n%s", err, acked, stderr.String())
	}

	q := crashQuota()
	onDisk := diskState(t, path, q)
	s := openTemp(t, path, noFlush)
	u := mustUsage(t, s, "acme", q)
	t.Logf("killed after %d acks: %d acknowledged units, %d billed (%d checkpointed, %d in %d log records)",
		acked, ackedUnits, u.Billed, onDisk.checkpointed.Billed, onDisk.logged.Billed, onDisk.records)
	if u.Billed < ackedUnits {
		t.Errorf("billed %d units, but the child acknowledged %d: acknowledged reservations were lost", u.Billed, ackedUnits)
	}
	if inFlight := int64(crashWorkers * crashMaxCost); u.Billed > ackedUnits+inFlight {
		t.Errorf("billed %d units, more than the %d acknowledged plus %d in flight", u.Billed, ackedUnits, inFlight)
	}
	want := store.Counters{
		Billed:   onDisk.checkpointed.Billed + onDisk.logged.Billed,
		Overage:  onDisk.checkpointed.Overage + onDisk.logged.Overage,
		Requests: onDisk.checkpointed.Requests + onDisk.records,
	}
	if u.Counters != want {
		t.Errorf("recovered %+v, but checkpoint plus log hold %+v", u.Counters, want)
	}
	if wantOver := max(0, u.Billed-crashIncluded); u.Overage != wantOver {
		t.Errorf("overage %d of %d billed on %d included, want %d", u.Overage, u.Billed, crashIncluded, wantOver)
	}
	evs := mustEvents(t, s, "acme")
	var crossed []int
	for _, e := range evs {
		crossed = append(crossed, e.Threshold)
	}
	var reached []int
	for _, th := range q.Thresholds {
		if u.Billed*100 >= int64(th)*crashIncluded {
			reached = append(reached, th)
		}
	}
	if fmt.Sprint(crossed) != fmt.Sprint(reached) {
		t.Errorf("threshold events %v at %d units, want %v, once each", crossed, u.Billed, reached)
	}
}

// onDisk is what a killed process left: the checkpointed counters of one
// period, and the records of the log segments after the checkpoint.
type onDisk struct {
	checkpointed, logged store.Counters
	records              int64
}

// diskState reads the store file and its log directly, as the child left
// them.
func diskState(t *testing.T, path string, q store.Quota) onDisk {
	t.Helper()
	var d onDisk
	var covered uint64
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	err = db.View(func(tx *bolt.Tx) error {
		if v := tx.Bucket(bucketMeta).Get(metaWALCovered); len(v) == 8 {
			covered = binary.BigEndian.Uint64(v)
		}
		if v := tx.Bucket(bucketUsagePeriods).Get(encodePeriodKey(periodKey{"acme", q.PeriodID})); v != nil {
			p, ok := decodePeriod(v)
			if !ok {
				return errCorrupt
			}
			d.checkpointed = p.Counters
		}
		return nil
	})
	db.Close()
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range segments(t, path) {
		if id <= covered {
			continue
		}
		_, err := readSegment(segmentPath(path, id), func(r *delta) {
			d.records++
			d.logged.Billed += r.billed
			d.logged.Overage += r.overage
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	return d
}
