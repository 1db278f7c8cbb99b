package module

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/store"
)

// IdempotencyConfig is how the Idempotency-Key request header is honoured
// (the idempotency global sub-option). A request that repeats a key is
// authenticated, checked against the tier's endpoints, rate limit and quota
// and spends rate-limit units like any request; it is served without being
// billed again only when it is the same request (customer, method, path
// with query, cost) as the one that stored the key, at most MaxRepeats
// times within Window. Anything else is billed normally.
type IdempotencyConfig struct {
	// Off ignores the Idempotency-Key header: every request is billed.
	Off bool `json:"off,omitempty"`
	// Window is how long a key is remembered after the request that
	// stored it. Default: 24h; at most 30 days.
	Window caddy.Duration `json:"window,omitempty"`
	// MaxRepeats is how many repeats of a key are served without being
	// billed again; later ones are billed. Default: 3; at most 100.
	MaxRepeats int64 `json:"max_repeats,omitempty"`
}

// Bounds and defaults of IdempotencyConfig.
const (
	defaultIdempotencyRepeats = 3
	maxIdempotencyRepeats     = 100
	maxIdempotencyWindow      = 30 * 24 * time.Hour
)

// idempotency is the compiled IdempotencyConfig: repeats 0 means the
// header is ignored.
type idempotency struct {
	repeats int64
	window  time.Duration
}

// compileIdempotency validates the idempotency option (JSON and Caddyfile
// alike) and fills in its defaults.
func compileIdempotency(c *IdempotencyConfig) (idempotency, error) {
	out := idempotency{repeats: defaultIdempotencyRepeats, window: store.IdempotencyWindow}
	if c == nil {
		return out, nil
	}
	if c.Off {
		if c.Window != 0 || c.MaxRepeats != 0 {
			return idempotency{}, fmt.Errorf("idempotency: off takes no window or max_repeats")
		}
		return idempotency{}, nil
	}
	if c.MaxRepeats != 0 {
		if c.MaxRepeats < 0 || c.MaxRepeats > maxIdempotencyRepeats {
			return idempotency{}, fmt.Errorf("idempotency: max_repeats must be between 1 and %d, got %d", maxIdempotencyRepeats, c.MaxRepeats)
		}
		out.repeats = c.MaxRepeats
	}
	if c.Window != 0 {
		w := time.Duration(c.Window)
		if w < time.Second || w > maxIdempotencyWindow {
			return idempotency{}, fmt.Errorf("idempotency: window must be between 1s and %s, got %s", maxIdempotencyWindow, w)
		}
		out.window = w
	}
	return out, nil
}

// apply sets the idempotency fields of res for request r of this cost:
// the key as its digest, and the request's fingerprint. Nothing when the
// request sends no key, costs nothing and counts no other meter (res's
// Meters are set first), or the option is off.
func (i idempotency) apply(res *store.Reservation, r *http.Request, cost int64) {
	k := r.Header.Get("Idempotency-Key")
	if k == "" || cost <= 0 && len(res.Meters) == 0 || i.repeats == 0 {
		return
	}
	sum := sha256.Sum256([]byte(k))
	res.IdempotencyKey = hex.EncodeToString(sum[:16])
	res.IdempotencyFingerprint = requestFingerprint(r, cost)
	res.IdempotencyRepeats, res.IdempotencyWindow = i.repeats, i.window
}

// requestFingerprint identifies what a request is, for idempotency: its
// method, path, query (as sent, once the API key is taken out) and cost.
// The customer is the reservation's subject.
func requestFingerprint(r *http.Request, cost int64) string {
	h := sha256.New()
	h.Write([]byte(r.Method))
	h.Write([]byte{0})
	h.Write([]byte(r.URL.EscapedPath()))
	h.Write([]byte{0})
	h.Write([]byte(r.URL.RawQuery))
	h.Write([]byte{0})
	h.Write(strconv.AppendInt(nil, cost, 10))
	var sum [sha256.Size]byte
	return hex.EncodeToString(h.Sum(sum[:0])[:16])
}

// idempotency parses `idempotency off` or
//
//	idempotency {
//		window <duration>
//		max_repeats <n>
//	}
func (p *appParser) idempotency(d *caddyfile.Dispenser) error {
	if err := once(d, p.seen); err != nil {
		return err
	}
	const usage = "idempotency: expected 'idempotency off' or a block with 'window <duration>' and 'max_repeats <n>'"
	cfg := &IdempotencyConfig{}
	args := d.RemainingArgs()
	switch {
	case len(args) == 1 && args[0] == "off":
		if err := noBlock(d, "idempotency off"); err != nil {
			return err
		}
		cfg.Off = true
	case len(args) > 0:
		return d.Errf("%s, got '%s'", usage, args[0])
	default:
		seen := make(map[string]caddyfile.Token)
		blocks := 0
		for nesting := d.Nesting(); d.NextBlock(nesting); {
			opt := d.Val()
			v, err := single(d, seen)
			if err != nil {
				return err
			}
			switch opt {
			case "window":
				dur, err := caddy.ParseDuration(v)
				if err != nil || dur < time.Second || dur > maxIdempotencyWindow {
					return d.Errf("idempotency: window: expected a duration between 1s and 720h such as 24h, got '%s'", v)
				}
				cfg.Window = caddy.Duration(dur)
			case "max_repeats":
				n, err := metering.ParseUnits(v)
				if err != nil || n < 1 || n > maxIdempotencyRepeats {
					return d.Errf("idempotency: max_repeats: expected a whole number between 1 and %d, got '%s'", maxIdempotencyRepeats, v)
				}
				cfg.MaxRepeats = n
			default:
				return d.Errf("idempotency: unrecognized option '%s'; expected window or max_repeats", opt)
			}
			blocks++
		}
		if blocks == 0 {
			return d.Err(usage)
		}
	}
	p.app.Idempotency = cfg
	return nil
}
