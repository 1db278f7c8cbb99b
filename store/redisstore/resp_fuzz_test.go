package redisstore

import (
	"bufio"
	"bytes"
	"errors"
	"strconv"
	"strings"
	"testing"
)

// FuzzReadReply fuzzes the RESP reply reader the metering scripts use:
// Redis (or anything sitting where Redis should be) controls these bytes.
// Properties: no panic and no allocation driven by a length the reply
// claims; an integer or an array of integers round-trips; an error reply
// is returned as a reply, not an I/O error; after a reply that is not
// integers, the reader is positioned at the next reply, so the sentinel
// after it still reads as itself.
func FuzzReadReply(f *testing.F) {
	for _, s := range []string{
		":7\r\n", "*3\r\n:1\r\n:-2\r\n:0\r\n", "-NOSCRIPT No matching script.\r\n",
		"*2\r\n$3\r\nabc\r\n:1\r\n", "$5\r\nhello\r\n", "*-1\r\n", "*0\r\n", "+OK\r\n",
		"*1\r\n*1\r\n*1\r\n:1\r\n", "$-1\r\n", ":99999999999999999999\r\n", "*999999999999999999\r\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, stream []byte) {
		if len(stream) == 0 {
			return // nothing but the sentinel
		}
		const sentinel = ":424242\r\n"
		full := append(append([]byte(nil), stream...), sentinel...)
		c := &conn{r: bufio.NewReader(bytes.NewReader(full))}
		vals, reply, err := c.read()
		if err != nil {
			return // a protocol or I/O error: the connection is dropped
		}
		if reply == nil {
			// Integers: they must be what the stream wrote.
			var want bytes.Buffer
			if len(vals) == 1 && stream[0] == ':' {
				want.WriteString(":" + strconv.FormatInt(vals[0], 10) + "\r\n")
			} else {
				want.WriteString("*" + strconv.Itoa(len(vals)) + "\r\n")
				for _, v := range vals {
					want.WriteString(":" + strconv.FormatInt(v, 10) + "\r\n")
				}
			}
			// (An unterminated array takes the sentinel as its element.)
			if !sameReply(full, want.Bytes()) {
				t.Fatalf("%q read as %v, which writes %q", stream, vals, want.Bytes())
			}
		} else if vals != nil {
			t.Fatalf("%q: both integers %v and reply %v", stream, vals, reply)
		}
		var re replyError
		if stream[0] == '-' && !errors.As(reply, &re) {
			t.Fatalf("%q: an error reply read as %v", stream, reply)
		}
		// The reply was consumed whole: what follows is the next reply
		// (when the stream held exactly one reply, the sentinel).
		if n := bytes.Count(stream, []byte("\r\n")); n == replyLines(stream) && bytes.HasSuffix(stream, []byte("\r\n")) {
			next, r2, err := c.read()
			if err != nil || r2 != nil || len(next) != 1 || next[0] != 424242 {
				t.Fatalf("%q: the next reply reads as %v %v %v", stream, next, r2, err)
			}
		}
	})
}

// sameReply compares a reply as read with its canonical form, allowing
// the number forms parseInt accepts (leading zeros, "-0").
func sameReply(got, want []byte) bool {
	g, w := strings.Split(string(got), "\r\n"), strings.Split(string(want), "\r\n")
	if len(g) < len(w) {
		return false
	}
	for i := range w {
		if w[i] == "" {
			continue
		}
		if g[i] == "" || g[i][0] != w[i][0] {
			return false
		}
		a, errA := strconv.ParseInt(g[i][1:], 10, 64)
		b, errB := strconv.ParseInt(w[i][1:], 10, 64)
		if errA != nil || errB != nil || a != b {
			return false
		}
	}
	return true
}

// replyLines is how many lines the first reply of stream takes when it is
// well formed (integers, simple strings, errors, bulk strings and arrays of
// them), or -1.
func replyLines(stream []byte) int {
	lines := strings.Split(string(stream), "\r\n")
	n, ok := countReply(lines, 0)
	if !ok {
		return -1
	}
	return n
}

func countReply(lines []string, i int) (int, bool) {
	if i >= len(lines) || lines[i] == "" || strings.ContainsAny(lines[i], "\r\n") {
		return 0, false
	}
	switch lines[i][0] {
	case ':', '+', '-':
		return 1, true
	case '$':
		n, err := strconv.Atoi(lines[i][1:])
		if err != nil || n < -1 {
			return 0, false
		}
		if n == -1 {
			return 1, true
		}
		if i+1 >= len(lines) || len(lines[i+1]) != n {
			return 0, false
		}
		return 2, true
	case '*':
		n, err := strconv.Atoi(lines[i][1:])
		if err != nil || n > 1000 {
			return 0, false
		}
		total := 1
		for range n {
			k, ok := countReply(lines, i+total)
			if !ok {
				return 0, false
			}
			total += k
		}
		return total, true
	}
	return 0, false
}

// TestReadReplyHugeCount is the crash FuzzReadReply found: an array reply
// claiming 10^18 elements made read panic in make (which would take the
// whole Caddy process down) before reading any. Now it reads what arrives
// and fails on the stream's end like any truncated reply.
func TestReadReplyHugeCount(t *testing.T) {
	c := &conn{r: bufio.NewReader(strings.NewReader("*999999999999999999\r\n:1\r\n"))}
	if _, _, err := c.read(); err == nil {
		t.Fatal("a truncated array reply read without an error")
	}
}
