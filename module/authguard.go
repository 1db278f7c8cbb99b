package module

import (
	"fmt"
	"hash/maphash"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/apimonetize/caddy-api-monetize/limiter"
)

// AuthFailureLimit throttles failed authentications per client address: a
// request that presents a malformed, unknown or revoked API key is a
// failure. Once an address has spent its failures, requests from it whose
// key this process has not seen valid get 429 without a store lookup, so a
// key scanner cannot drive the store's load; keys that were accepted
// before keep working from the same address (customers behind one NAT as
// the scanner are not locked out by it).
type AuthFailureLimit struct {
	// Off disables the throttle.
	Off bool `json:"off,omitempty"`
	// Rate is how many failures an address may make per window, in runs
	// of at most Burst. Default: 20/min.
	Rate *Rate `json:"rate,omitempty"`
}

// defaultAuthFailureRate is the default AuthFailureLimit rate.
var defaultAuthFailureRate = limiter.Policy{Limit: 20, Period: time.Minute}

const (
	// authGuardRows and authGuardSlots size the failure table: each address
	// is counted in one slot of each row (a count-min sketch of GCRA TATs),
	// so the table is a fixed 2 x 32768 x 8 bytes, whatever the number of
	// addresses; an address is throttled only when every row says so, and
	// two addresses share a budget only when they collide in every row.
	authGuardRows  = 2
	authGuardSlots = 1 << 15
	// authGuardValidShards and authGuardValidPerShard bound the set of
	// keys (digests) seen valid: at most 64 x 1024 entries; a full shard
	// is emptied.
	authGuardValidShards   = 64
	authGuardValidPerShard = 1024
)

// authGuard is the in-process failed-authentication throttle of one app.
type authGuard struct {
	policy limiter.Policy
	seeds  [authGuardRows]maphash.Seed
	rows   [authGuardRows][]atomic.Int64 // TATs, microseconds since the epoch

	valid [authGuardValidShards]validShard
}

type validShard struct {
	mu   sync.RWMutex
	keys map[digest]struct{}
	_    [40]byte // keeps neighbouring shards' locks on different cache lines
}

// newAuthGuard returns the guard for cfg, or nil when the throttle is off.
func newAuthGuard(cfg *AuthFailureLimit) (*authGuard, error) {
	p := defaultAuthFailureRate
	if cfg != nil {
		if cfg.Off {
			return nil, nil
		}
		if r := cfg.Rate; r != nil {
			p = limiter.Policy{Limit: r.Limit, Period: time.Duration(r.Window), Burst: r.Burst}
			if !p.Valid() || p.Burst < 0 {
				return nil, fmt.Errorf("auth_failures: the rate must be a positive number of failures per positive window with a non-negative burst")
			}
		}
	}
	g := &authGuard{policy: p}
	for i := range g.rows {
		g.seeds[i] = maphash.MakeSeed()
		g.rows[i] = make([]atomic.Int64, authGuardSlots)
	}
	for i := range g.valid {
		g.valid[i].keys = make(map[digest]struct{})
	}
	return g, nil
}

// clientAddress is who a request comes from, for the throttle: Caddy's
// client IP (which honours the server's trusted_proxies, never a header a
// client could set on its own), or the connection's address outside a
// Caddy server. IPv6 addresses count per /64, since one host can use a
// whole /64. Requests without an IP address (a Unix socket) share the zero
// address.
func clientAddress(r *http.Request) netip.Addr {
	ip, _ := caddyhttp.GetVar(r.Context(), caddyhttp.ClientIPVarKey).(string)
	if ip == "" {
		ip = r.RemoteAddr
		if host, _, err := net.SplitHostPort(ip); err == nil {
			ip = host
		}
	}
	addr, err := netip.ParseAddr(ip)
	if err != nil {
		return netip.Addr{}
	}
	addr = addr.Unmap().WithZone("")
	if addr.Is6() {
		prefix, _ := addr.Prefix(64)
		return prefix.Addr()
	}
	return addr
}

// slot is address's TAT in row i.
func (g *authGuard) slot(i int, address netip.Addr) *atomic.Int64 {
	return &g.rows[i][maphash.Comparable(g.seeds[i], address)%authGuardSlots]
}

// throttled reports whether address has spent its failures at now, and
// then how long until it may fail again.
func (g *authGuard) throttled(address netip.Addr, now time.Time) (bool, time.Duration) {
	us := now.UnixMicro()
	var wait time.Duration
	for i := range g.rows {
		_, d := g.policy.Decide(g.slot(i, address).Load(), us, 1)
		if d.Allowed {
			return false, 0
		}
		if i == 0 || d.RetryAfter < wait {
			wait = d.RetryAfter
		}
	}
	return true, wait
}

// failed counts one failed authentication of address at now.
func (g *authGuard) failed(address netip.Addr, now time.Time) {
	us := now.UnixMicro()
	for i := range g.rows {
		s := g.slot(i, address)
		for {
			tat := s.Load()
			next, d := g.policy.Decide(tat, us, 1)
			if !d.Allowed || s.CompareAndSwap(tat, next) {
				break
			}
		}
	}
}

// knownValid reports whether the key with this digest was accepted since
// it was last refused.
func (g *authGuard) knownValid(sum digest) bool {
	s := &g.valid[sum[0]%authGuardValidShards]
	s.mu.RLock()
	_, ok := s.keys[sum]
	s.mu.RUnlock()
	return ok
}

// accepted records that the key with this digest was accepted.
func (g *authGuard) accepted(sum digest) {
	s := &g.valid[sum[0]%authGuardValidShards]
	s.mu.Lock()
	if len(s.keys) >= authGuardValidPerShard {
		s.keys = make(map[digest]struct{})
	}
	s.keys[sum] = struct{}{}
	s.mu.Unlock()
}

// refused forgets a key that was refused (revoked, or its customer gone).
func (g *authGuard) refused(sum digest) {
	s := &g.valid[sum[0]%authGuardValidShards]
	s.mu.Lock()
	delete(s.keys, sum)
	s.mu.Unlock()
}
