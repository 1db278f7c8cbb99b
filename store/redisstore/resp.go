package redisstore

import (
	"bufio"
	"context"
	"crypto/sha1"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// The metering scripts go out on connections of their own, written and
// read here in RESP2 without go-redis's command objects: a script call is
// encoded once, straight from the reservation, into the bytes sent, and its
// reply (an integer or an array of integers) is parsed without allocating
// per element. On a busy gateway that is most of the client's CPU per
// request. Everything else (records, keys, usage) uses go-redis.

// luaScript is a script and its SHA-1, for EVALSHA.
type luaScript struct {
	src string
	sha string
}

func newLuaScript(src string) *luaScript {
	h := sha1.Sum([]byte(src))
	return &luaScript{src: src, sha: hex.EncodeToString(h[:])}
}

// replyError is an error reply from Redis. It satisfies go-redis's
// redis.Error, so finish classifies it like go-redis's own replies.
type replyError string

func (e replyError) Error() string { return string(e) }

// RedisError marks e as a Redis error reply (see redis.Error).
func (replyError) RedisError() {}

// noScript reports whether err is Redis's answer to an EVALSHA of a script
// it does not have: the script did not run.
func noScript(err error) bool {
	r, ok := err.(replyError) // as read: never wrapped
	return ok && strings.HasPrefix(string(r), "NOSCRIPT")
}

// command is a RESP array of bulk strings being encoded: the arguments of
// a metering script call after EVALSHA and the SHA (numkeys, keys, args).
type command struct {
	b []byte // the encoded arguments
	n int    // how many
}

// str appends the argument a+b (two parts, to save a concatenation).
func (c *command) str(a, b string) { c.b = appendBulk(c.b, a, b); c.n++ }

// bytes appends the argument b.
func (c *command) bytes(b []byte) { c.b = appendBulk(c.b, b, nil); c.n++ }

// appendBulk appends the RESP bulk string a+b to w.
func appendBulk[T string | []byte](w []byte, a, b T) []byte {
	w = append(w, '$')
	w = strconv.AppendInt(w, int64(len(a)+len(b)), 10)
	w = append(w, '\r', '\n')
	w = append(w, a...)
	w = append(w, b...)
	return append(w, '\r', '\n')
}

// ints appends one argument holding vs as little-endian int64s, 8 bytes
// each, which a script reads with struct.unpack('<i8...').
func (c *command) ints(vs []int64) {
	c.b = append(c.b, '$')
	c.b = strconv.AppendInt(c.b, int64(8*len(vs)), 10)
	c.b = append(c.b, '\r', '\n')
	for _, v := range vs {
		c.b = binary.LittleEndian.AppendUint64(c.b, uint64(v))
	}
	c.b = append(c.b, '\r', '\n')
	c.n++
}

// int appends the argument v in decimal.
func (c *command) int(v int64) {
	var d [20]byte
	c.bytes(strconv.AppendInt(d[:0], v, 10))
}

// appendCall appends to w the call of script with args: EVALSHA, or EVAL
// (which also loads the script) when eval is set.
func appendCall(w []byte, script *luaScript, args *command, eval bool) []byte {
	w = appendArray(w, args.n+2)
	if eval {
		w = append(w, "$4\r\nEVAL\r\n$"...)
		w = strconv.AppendInt(w, int64(len(script.src)), 10)
		w = append(w, '\r', '\n')
		w = append(w, script.src...)
	} else {
		w = append(w, "$7\r\nEVALSHA\r\n$40\r\n"...)
		w = append(w, script.sha...)
	}
	w = append(w, '\r', '\n')
	return append(w, args.b...)
}

// appendArray appends the header of a RESP array of n elements.
func appendArray(w []byte, n int) []byte {
	w = append(w, '*')
	w = strconv.AppendInt(w, int64(n), 10)
	return append(w, '\r', '\n')
}

// conn is a connection for metering scripts.
type conn struct {
	nc   net.Conn
	r    *bufio.Reader
	w    []byte          // the pipeline being written
	raw  syscall.RawConn // nc's descriptor, to check an idle connection; nil for TLS
	used time.Time       // when the last pipeline on nc ended
	// drops is the batcher's count of connections dropped after an I/O
	// error, as of the last pipeline on nc.
	drops int64
	// grace is how long past a read deadline a reply already received is
	// still read (see graceReader).
	grace time.Duration
}

// graceReader reads c's socket. A read that fails at its deadline while
// the socket holds a reply (or the server's close) is retried with the
// deadline moved grace ahead: Redis answered in time, and only this
// process was too busy to read it. That is local saturation, not a Redis
// failure, and the answer is not thrown away (its calls ran). A socket
// with nothing to read fails at the deadline as before, so a stalled Redis
// still fails the pipeline by it. Over TLS (no descriptor to peek at) the
// deadline is kept.
type graceReader struct{ c *conn }

func (g graceReader) Read(p []byte) (int, error) {
	n, err := g.c.nc.Read(p)
	if n == 0 && errors.Is(err, os.ErrDeadlineExceeded) && g.c.grace > 0 && g.c.raw != nil {
		// The peek needs a deadline in the future (the descriptor refuses
		// a read past it); it is put back when nothing arrived.
		if g.c.nc.SetReadDeadline(time.Now().Add(g.c.grace)) == nil {
			if peekClosed(g.c.raw) {
				return g.c.nc.Read(p)
			}
			_ = g.c.nc.SetReadDeadline(time.Now())
		}
	}
	return n, err
}

// dialer opens connections for metering scripts the way go-redis opens
// its own: its Dialer (TLS included), then AUTH and SELECT when the URL
// asks for them.
type dialer struct {
	dial               func(ctx context.Context, network, addr string) (net.Conn, error)
	network, addr      string
	username, password string
	db                 int
}

// idleCheck is how long a connection may sit idle before it is checked
// for a close by the server (a restart) before use.
const idleCheck = time.Second

// open returns a connection ready for scripts, with deadline set, by
// deadline. Its replies may be read up to grace past a read deadline when
// they had arrived (see graceReader).
func (d *dialer) open(deadline time.Time, grace time.Duration) (*conn, error) {
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	nc, err := d.dial(ctx, d.network, d.addr)
	if err != nil {
		return nil, err
	}
	c := &conn{nc: nc, grace: grace}
	if sc, ok := nc.(syscall.Conn); ok {
		c.raw, _ = sc.SyscallConn()
	}
	c.r = bufio.NewReaderSize(graceReader{c}, 4096)
	// The handshake: AUTH and SELECT as the URL asks, one reply each.
	var hs []byte
	replies := 0
	if d.password != "" {
		var auth command
		auth.str("AUTH", "")
		if d.username != "" {
			auth.str(d.username, "")
		}
		auth.str(d.password, "")
		hs = append(appendArray(hs, auth.n), auth.b...)
		replies++
	}
	if d.db != 0 {
		var sel command
		sel.str("SELECT", "")
		sel.int(int64(d.db))
		hs = append(appendArray(hs, sel.n), sel.b...)
		replies++
	}
	err = nc.SetDeadline(deadline)
	if err == nil && replies > 0 {
		_, err = nc.Write(hs)
		for range replies {
			if err != nil {
				break
			}
			var line []byte
			if line, err = c.line(); err == nil && line[0] != '+' {
				// Refused credentials or database: Redis is unusable.
				err = fmt.Errorf("connection handshake: %s", line)
			}
		}
	}
	if err != nil {
		_ = nc.Close()
		return nil, err
	}
	return c, nil
}

// stale reports whether the server closed c (or sent what nobody asked
// for) while it sat idle, or since another connection failed (drops is
// the batcher's count of those: a Redis restart ends them all).
// Connections that cannot be checked are taken as alive.
func (c *conn) stale(drops int64) bool {
	if c.raw == nil || (drops == c.drops && time.Since(c.used) < idleCheck) {
		return false
	}
	return peekClosed(c.raw)
}

// read reads one reply: the integers of an integer or an array of
// integers, or reply, the error reply or an unexpected reply (which is
// consumed whole). err is an I/O or protocol error: the connection is then
// unusable.
func (c *conn) read() (vals []int64, reply, err error) {
	line, err := c.line()
	if err != nil {
		return nil, nil, err
	}
	switch line[0] {
	case ':':
		n, err := parseInt(line[1:])
		if err != nil {
			return nil, nil, err
		}
		return []int64{n}, nil, nil
	case '-':
		return nil, replyError(line[1:]), nil
	case '*':
		n, err := parseInt(line[1:])
		if err != nil {
			return nil, nil, err
		}
		if n < 0 {
			return nil, permanent{errors.New("redisstore: script returned nil")}, nil
		}
		// The count is the peer's word: it sizes nothing up front beyond
		// what a script returns (a huge count would panic in make, or
		// take the memory before a single element arrived).
		vals = make([]int64, 0, min(n, maxPreallocReply))
		for range n {
			line, err := c.line()
			if err != nil {
				return nil, nil, err
			}
			if line[0] != ':' {
				if err := c.skip(line); err != nil {
					return nil, nil, err
				}
				reply = permanent{fmt.Errorf("redisstore: script returned a %q element, want integers", line[0])}
				continue
			}
			v, err := parseInt(line[1:])
			if err != nil {
				return nil, nil, err
			}
			vals = append(vals, v)
		}
		if reply != nil {
			return nil, reply, nil
		}
		return vals, nil, nil
	default:
		if err := c.skip(line); err != nil {
			return nil, nil, err
		}
		return nil, permanent{fmt.Errorf("redisstore: script returned a %q reply, want integers", line[0])}, nil
	}
}

// maxPreallocReply is the most integers read preallocates room for.
const maxPreallocReply = 16

// line reads one line of the reply stream, without its CRLF.
func (c *conn) line() ([]byte, error) {
	line, err := c.r.ReadSlice('\n')
	if err != nil {
		return nil, err
	}
	if len(line) < 3 || line[len(line)-2] != '\r' {
		return nil, fmt.Errorf("redisstore: malformed reply line %q", line)
	}
	return line[:len(line)-2], nil
}

// skip consumes the rest of the reply whose first line is line.
func (c *conn) skip(line []byte) error {
	switch line[0] {
	case '$':
		n, err := parseInt(line[1:])
		if err != nil || n < 0 {
			return err
		}
		_, err = c.r.Discard(int(n) + 2)
		return err
	case '*':
		n, err := parseInt(line[1:])
		if err != nil {
			return err
		}
		for range n {
			l, err := c.line()
			if err != nil {
				return err
			}
			if err := c.skip(l); err != nil {
				return err
			}
		}
		return nil
	case ':', '+', '-':
		return nil
	}
	return fmt.Errorf("redisstore: unknown reply type %q", line[0])
}

// parseInt reads a reply's decimal number.
func parseInt(b []byte) (int64, error) {
	neg := len(b) > 0 && b[0] == '-'
	if neg {
		b = b[1:]
	}
	if len(b) == 0 || len(b) > 18 {
		return 0, fmt.Errorf("redisstore: malformed reply number %q", b)
	}
	var n int64
	for _, ch := range b {
		if ch < '0' || ch > '9' {
			return 0, fmt.Errorf("redisstore: malformed reply number %q", b)
		}
		n = n*10 + int64(ch-'0')
	}
	if neg {
		n = -n
	}
	return n, nil
}
