package redisstore

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// TestScriptsAuthAndSelect checks that the metering scripts' own
// connections log in as the URL's user and use its database, and that
// refused credentials make the store unavailable (not an error reply a
// caller would take for a script failure).
func TestScriptsAuthAndSelect(t *testing.T) {
	c := rawClient(t)
	ctx := context.Background()
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	user, pass := "amtest-"+hex.EncodeToString(b[:4]), hex.EncodeToString(b)
	prefix := newPrefix(t)
	if err := c.Do(ctx, "ACL", "SETUSER", user, "on", ">"+pass, "~"+prefix+"*", "+@all").Err(); err != nil {
		t.Skipf("this Redis has no ACL users: %v", err)
	}
	t.Cleanup(func() { c.Do(context.Background(), "ACL", "DELUSER", user) })
	u, err := url.Parse(testURL())
	if err != nil {
		t.Fatal(err)
	}
	u.User = url.UserPassword(user, pass)
	u.Path = "/3"

	s := openStore(t, Options{URL: u.String(), KeyPrefix: prefix})
	q := testQuota(store.QuotaBill, 10)
	if _, err := s.Reserve(ctx, store.Reservation{Subject: "acme", Cost: 2, Quota: q}); err != nil {
		t.Fatalf("Reserve as %s on database 3: %v", user, err)
	}
	conn := c.Conn()
	defer conn.Close()
	if err := conn.Select(ctx, 3).Err(); err != nil {
		t.Fatal(err)
	}
	if got, err := conn.HGet(ctx, s.periodKey("acme", q.PeriodID), "c").Result(); err != nil {
		t.Errorf("period counters in database 3: %v", err)
	} else if c, err := counters(map[string]string{"c": got}); err != nil || c.Billed != 2 {
		t.Errorf("billed units in database 3 = %+v, %v; want 2", c, err)
	}

	u.User = url.UserPassword(user, "wrong-"+pass)
	bad := openStore(t, Options{URL: u.String(), KeyPrefix: prefix})
	if _, err := bad.Reserve(ctx, store.Reservation{Subject: "acme", Cost: 1, Quota: q}); !errors.Is(err, store.ErrUnavailable) {
		t.Errorf("Reserve with a wrong password: %v, want ErrUnavailable", err)
	}
}

// TestScriptConnectionKilled checks that metering connections closed by
// the server (a restart) are replaced: a connection idle for longer than
// idleCheck is checked before use; a busy one fails the one pipeline it
// carries (as unavailable, counting nothing) and is dialed again, and
// every other lane then checks its own before use.
func TestScriptConnectionKilled(t *testing.T) {
	s := openStore(t, Options{KeyPrefix: newPrefix(t)})
	ctx := context.Background()
	q := testQuota(store.QuotaBill, 100)
	counted := int64(0)
	reserve := func() error {
		_, err := s.Reserve(ctx, store.Reservation{Subject: "acme", Cost: 1, Quota: q})
		if err == nil {
			counted++
		}
		return err
	}
	// hold takes a lane out of use until put back (at the latest when the
	// test ends, before the store closes).
	hold := func() (put func()) {
		l := <-s.scripts.lanes
		var once sync.Once
		put = func() { once.Do(func() { s.scripts.release(l) }) }
		t.Cleanup(put)
		return put
	}
	// lanes runs f on every lane not held, all taken at once.
	lanes := func(f func(*lane)) {
		var free []*lane
		for len(free) < maxLanes {
			select {
			case l := <-s.scripts.lanes:
				free = append(free, l)
				continue
			default:
			}
			break
		}
		for _, l := range free {
			f(l)
			s.scripts.release(l)
		}
	}
	// restart has the server close every metering connection; busy leaves
	// them as if just used, idle as if unused for longer than idleCheck.
	restart := func(busy bool) {
		t.Helper()
		lanes(func(l *lane) {
			if l.conn == nil {
				return
			}
			if err := rawClient(t).ClientKillByFilter(ctx, "ADDR", l.conn.nc.LocalAddr().String()).Err(); err != nil {
				t.Fatalf("CLIENT KILL: %v", err)
			}
			l.conn.used = time.Now()
			if !busy {
				l.conn.used = l.conn.used.Add(-2 * idleCheck)
			}
		})
	}
	usage := func() int64 {
		t.Helper()
		u, err := s.Usage(ctx, "acme", q.PeriodID)
		if err != nil {
			t.Fatal(err)
		}
		return u.Counters.Billed
	}

	// One lane.
	put := hold()
	if err := reserve(); err != nil {
		t.Fatal(err)
	}
	restart(false)
	if err := reserve(); err != nil {
		t.Fatalf("Reserve on an idle connection the server closed: %v, want it checked and replaced", err)
	}
	restart(true)
	if err := reserve(); !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("Reserve on a busy connection the server closed: %v, want ErrUnavailable", err)
	}
	if err := reserve(); err != nil {
		t.Fatalf("Reserve after a failed pipeline: %v, want a new connection", err)
	}
	// Both lanes connected, both connections closed while busy: one call
	// fails, and no other does.
	put2 := hold()
	put()
	if err := reserve(); err != nil {
		t.Fatal(err)
	}
	put2()
	restart(true)
	failed := 0
	for range 2 * maxLanes {
		if err := reserve(); err != nil {
			if !errors.Is(err, store.ErrUnavailable) {
				t.Fatal(err)
			}
			failed++
		}
	}
	if failed != 1 {
		t.Errorf("%d calls failed after every connection was closed, want 1 (the rest check theirs)", failed)
	}
	if got := usage(); got != counted {
		t.Errorf("%d units counted, want %d (a failed pipeline counts nothing)", got, counted)
	}
}

// TestIdleConnectionKept checks that the check of an idle metering
// connection keeps a healthy one: no new dial after an idle spell.
func TestIdleConnectionKept(t *testing.T) {
	var dials atomic.Int64
	var d net.Dialer
	s := openStore(t, Options{KeyPrefix: newPrefix(t), dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
		dials.Add(1)
		return d.DialContext(ctx, network, addr) // a *net.TCPConn: checkable
	}})
	ctx := context.Background()
	q := testQuota(store.QuotaBill, 100)
	held := <-s.scripts.lanes // one lane, so every call uses the same connection
	t.Cleanup(func() { s.scripts.release(held) })
	for i := range 3 {
		if _, err := s.Reserve(ctx, store.Reservation{Subject: "acme", Cost: 1, Quota: q}); err != nil {
			t.Fatal(err)
		}
		// As if idle for longer than idleCheck, long past the deadline of the
		// last pipeline.
		l := <-s.scripts.lanes
		l.conn.used = l.conn.used.Add(-2 * idleCheck)
		if err := l.conn.nc.SetDeadline(time.Now().Add(-time.Second)); err != nil {
			t.Fatal(err)
		}
		s.scripts.release(l)
		// The metering connection's dials: not those of go-redis's pool,
		// which the background index writes use (hours.go).
		s.bg.Wait()
		if n := dials.Load() - int64(s.client.PoolStats().Misses); n != 1 {
			t.Fatalf("after %d idle spells: %d dials, want 1 (the healthy connection kept)", i+1, n)
		}
	}
}

// TestReadReply checks the reply reader on every RESP2 type a script
// reply can take, and that an unexpected reply is consumed whole, so the
// next reply still parses.
func TestReadReply(t *testing.T) {
	stream := strings.Join([]string{
		":7",
		"*3", ":1", ":-2", ":0",
		"-NOSCRIPT No matching script.",
		"*2", "$3", "abc", ":1", // an unexpected element
		"$5", "hello", // an unexpected type
		"*-1",
		"*0",
		"+OK",
		":42",
	}, "\r\n") + "\r\n"
	c := &conn{r: bufio.NewReader(strings.NewReader(stream))}
	want := []string{
		"[7] <nil>",
		"[1 -2 0] <nil>",
		"[] NOSCRIPT No matching script.",
		`[] redisstore: script returned a '$' element, want integers`,
		`[] redisstore: script returned a '$' reply, want integers`,
		"[] redisstore: script returned nil",
		"[] <nil>",
		`[] redisstore: script returned a '+' reply, want integers`,
		"[42] <nil>",
	}
	for i, w := range want {
		vals, reply, err := c.read()
		if err != nil {
			t.Fatalf("reply %d: I/O error %v", i, err)
		}
		if got := fmt.Sprint(vals, " ", reply); strings.ReplaceAll(got, "  ", " ") != w {
			t.Errorf("reply %d = %q, want %q", i, got, w)
		}
	}
	if _, _, err := c.read(); err == nil {
		t.Error("read past the end of the stream succeeded")
	}
	if !noScript(replyError("NOSCRIPT No matching script.")) || noScript(replyError("ERR x")) {
		t.Error("noScript does not tell NOSCRIPT from other replies")
	}
	if !isReply(replyError("ERR x")) {
		t.Error("a replyError is not a Redis error reply for finish")
	}
}

// TestCommandEncoding pins the RESP encoding of a script call.
func TestCommandEncoding(t *testing.T) {
	var c command
	c.int(1)
	c.str("k{", "a}")
	c.bytes([]byte("80,100"))
	c.int(-5)
	c.ints([]int64{1, -2}) // little-endian int64s, as struct.unpack('<i8i8') reads them
	s := &luaScript{src: "return 1", sha: strings.Repeat("e", 40)}
	got := string(appendCall(nil, s, &c, false)) + string(appendCall(nil, s, &c, true))
	args := "$1\r\n1\r\n$4\r\nk{a}\r\n$6\r\n80,100\r\n$2\r\n-5\r\n" +
		"$16\r\n\x01\x00\x00\x00\x00\x00\x00\x00\xfe\xff\xff\xff\xff\xff\xff\xff\r\n"
	want := "*7\r\n$7\r\nEVALSHA\r\n$40\r\n" + strings.Repeat("e", 40) + "\r\n" + args +
		"*7\r\n$4\r\nEVAL\r\n$8\r\nreturn 1\r\n" + args
	if got != want {
		t.Errorf("encoded %q, want %q", got, want)
	}
	if newLuaScript("return 1").sha != "e0e1f9fabfc9d4800c877a703b823ac0578ff8db" {
		t.Error("luaScript SHA-1 differs from Redis's")
	}
}
