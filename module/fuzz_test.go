package module

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/apimonetize/caddy-api-monetize/metering"
)

// positioned is where a Caddyfile error must point: the file and line.
var positioned = regexp.MustCompile(`Testfile:\d+`)

// dispenser tokenizes input as a file named Testfile, or reports false
// when the Caddyfile lexer refuses it (Caddy stops there, before any
// parser of ours runs). caddyfile.NewTestDispenser would exit the process
// on such input.
func dispenser(input string) (*caddyfile.Dispenser, bool) {
	tokens, err := caddyfile.Tokenize([]byte(input), "Testfile")
	if err != nil {
		return nil, false
	}
	return caddyfile.NewDispenser(tokens), true
}

// startsWith reports whether input tokenizes and its first token is name:
// Caddy calls a parser on its own option or directive only.
func startsWith(input, name string) bool {
	d, ok := dispenser(input)
	return ok && d.Next() && d.Val() == name
}

// parseGlobal runs the api_monetize global option's parser on input as
// Caddy does, returning the app it built.
func parseGlobal(input string) (*App, error) {
	d, _ := dispenser(input)
	app := new(App)
	err := app.UnmarshalCaddyfile(d)
	return app, err
}

// checkAccepted asserts what an accepted api_monetize option promises:
// its JSON survives a round trip unchanged, and the app's own validation
// (the one a JSON configuration gets at Provision) accepts the tiers and
// metering options too, so the Caddyfile never accepts what Provision
// would refuse.
func checkAccepted(t *testing.T, input string, app *App) {
	t.Helper()
	b, err := json.Marshal(app)
	if err != nil {
		t.Fatalf("%q: accepted, but its JSON fails: %v", input, err)
	}
	var back App
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatalf("%q: accepted, but its JSON does not decode: %v\n%s", input, err, b)
	}
	if b2, _ := json.Marshal(&back); string(b2) != string(b) {
		t.Fatalf("%q: the JSON changes in a round trip:\n%s\n%s", input, b, b2)
	}
	if _, err := newAuthGuard(back.AuthFailures); err != nil {
		t.Fatalf("%q: the Caddyfile accepted an auth_failures Provision refuses: %v", input, err)
	}
	if len(back.Tiers) == 0 {
		return // Provision refuses an app without tiers, with a clear error
	}
	if err := back.checkMeters(); err != nil {
		t.Fatalf("%q: the Caddyfile accepted meters Provision refuses: %v", input, err)
	}
	if err := back.compileMetering(); err != nil {
		t.Fatalf("%q: the Caddyfile accepted what Provision refuses: %v", input, err)
	}
	if err := back.compileTiers(); err != nil {
		t.Fatalf("%q: the Caddyfile accepted tiers Provision refuses: %v", input, err)
	}
}

// FuzzParseApp fuzzes the whole api_monetize global option. Properties:
// no panic; a refusal names the line; an acceptance round-trips through
// JSON and passes the app's own validation.
func FuzzParseApp(f *testing.F) {
	for _, name := range []string{"quickstart", "redis"} {
		if b, err := os.ReadFile(filepath.Join("..", "caddyfile-examples", name, "Caddyfile")); err == nil {
			s := string(b)
			if i := strings.Index(s, "api_monetize {"); i >= 0 {
				f.Add(s[i:]) // the global option and what follows
			}
		}
	}
	f.Add("api_monetize {\n\ttier free {\n\t\trate 10/min\n\t}\n}")
	f.Add("api_monetize {\n\tcurrency eur\n\tbill_on 2xx 404\n\tthresholds 50 90\n\tauth_failures 5/min burst 2\n\ttier pro {\n\t\tprice 49.00/month\n\t\tincluded 1000/month\n\t\tover_quota throttle 1/hour burst 2 bill 0.001\n\t\tperiod anniversary\n\t}\n\tcustomer acme tier pro stripe cus_X email a@b.example anchor 2026-01-31\n\tkey {env.K} acme\n}")
	f.Add("api_monetize {\n\ttier t {\n\t\tover_quota bill 0.000001\n\t\tincluded 1/month\n\t}\n\tusage_cost_header X-Cost max 9\n}")
	f.Add("api_monetize {\n\tauth_failures 1/d burst 9223372036854775807\n\ttier t\n}")
	f.Fuzz(func(t *testing.T, input string) {
		if !startsWith(input, "api_monetize") {
			return
		}
		app, err := parseGlobal(input)
		if err != nil {
			if !positioned.MatchString(err.Error()) {
				t.Fatalf("%q: error without a position: %v", input, err)
			}
			return
		}
		checkAccepted(t, input, app)
	})
}

// FuzzTierOption fuzzes one line of a tier block (price, included, rate,
// over_quota, period, thresholds, endpoints...), where the fuzzer's
// mutations count most. Same properties as FuzzParseApp.
func FuzzTierOption(f *testing.F) {
	for _, line := range []string{
		"price 49.00/month", "price 0", "price custom", "price 1200/year", "price 0.000001/month",
		"included 50000/month", "rate 100/min", "rate 1000/min burst 200", "rate 1/d", "rate 9223372036854775807/s",
		"over_quota block", "over_quota bill 0.002", "over_quota throttle 10/hour", "over_quota throttle 10/hour burst 5 bill 0.5",
		"period calendar Europe/Paris", "period anniversary", "thresholds 50 80 100", "thresholds off",
		"endpoints /v1/* /v2/x", "exclude /v1/admin /v1/admin/*", "on_store_error deny", "sla 99.9%", "support email",
	} {
		f.Add(line)
	}
	f.Fuzz(func(t *testing.T, line string) {
		input := "api_monetize {\n\ttier t {\n\t\tincluded 100/month\n\t\trate 50/min\n\t\t" + line + "\n\t}\n}"
		if !startsWith(input, "api_monetize") {
			return
		}
		app, err := parseGlobal(input)
		if err != nil {
			if !positioned.MatchString(err.Error()) {
				t.Fatalf("%q: error without a position: %v", line, err)
			}
			return
		}
		checkAccepted(t, input, app)
	})
}

// FuzzMeterBlocks fuzzes one line of a global meter block and one line of
// a tier's meter block (source, stripe, included, over_quota,
// thresholds). Same properties as FuzzParseApp.
func FuzzMeterBlocks(f *testing.F) {
	for _, lines := range [][2]string{
		{"source header X-Tokens-Used max 100000", "included 2000000/month"},
		{"source request_bytes", "over_quota bill 0.000010"},
		{"source response_bytes max 1048576", "over_quota throttle 10/hour burst 5 bill 0.5"},
		{"source cost", "thresholds 50 80 100"},
		{"stripe ai_tokens", "thresholds off"},
		{"source header X_Bad max 1", "over_quota block"},
	} {
		f.Add(lines[0], lines[1])
	}
	f.Fuzz(func(t *testing.T, global, tier string) {
		input := "api_monetize {\n\tmeter m {\n\t\tsource header X-M max 9\n\t\t" + global +
			"\n\t}\n\ttier t {\n\t\trate 50/min\n\t\tmeter m {\n\t\t\tincluded 100/month\n\t\t\t" + tier + "\n\t\t}\n\t}\n}"
		if !startsWith(input, "api_monetize") {
			return
		}
		app, err := parseGlobal(input)
		if err != nil {
			if !positioned.MatchString(err.Error()) {
				t.Fatalf("%q / %q: error without a position: %v", global, tier, err)
			}
			return
		}
		checkAccepted(t, input, app)
	})
}

// FuzzMoney fuzzes the money parser behind prices and overage prices.
// Properties: an accepted amount is non-negative and formats back to a
// string that parses to the same micro-units (the shortest form is a fixed
// point); the tier's price parser agrees with it on the amount.
func FuzzMoney(f *testing.F) {
	for _, s := range []string{"0", "49.00", "0.002", "0.000001", "9223372036854.775807", "9223372036854.775808", "1.", ".5", "-1", "1e3", "1,000", "00012.3400", "１"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		m, err := metering.ParseMicros(s)
		if err != nil {
			return
		}
		if m < 0 {
			t.Fatalf("%q parsed to a negative amount %d", s, m)
		}
		formatted := metering.FormatMicros(m)
		back, err := metering.ParseMicros(formatted)
		if err != nil || back != m {
			t.Fatalf("%q = %d formats as %q, which parses to %d, %v", s, m, formatted, back, err)
		}
		if again := metering.FormatMicros(back); again != formatted {
			t.Fatalf("%q: the shortest form is not stable: %q then %q", s, formatted, again)
		}
		price, err := parsePrice(s + "/month")
		if err != nil {
			t.Fatalf("%q parses as an amount but not as a price: %v", s, err)
		}
		if want := (m == 0); (price == nil) != want {
			t.Fatalf("%q/month: price %+v, want nil only for zero", s, price)
		}
		if price != nil && (price.AmountMicros != m || price.Interval != "month") {
			t.Fatalf("%q/month: price %+v, want %d micros a month", s, price, m)
		}
	})
}

// FuzzKeySources fuzzes the key sources a request is read with: no key
// source, whatever the request carries, leaves a key readable once
// removeKeys ran, and what extractKey returns is trimmed and non-empty.
func FuzzKeySources(f *testing.F) {
	f.Add("k1", "q=1&api_key=k2", "Bearer k3")
	f.Add("", "api%5Fkey=k&api_key=x", "bearer  x ")
	f.Add(" ", "a&&b=%2F", "Basic dXNlcjpwYXNz")
	f.Fuzz(func(t *testing.T, header, rawQuery, authorization string) {
		sources := threeKeySources(t)
		r := testRequest("/v1/x", nil)
		r.URL.RawQuery = rawQuery
		r.RequestURI = "/v1/x?" + rawQuery
		r.Header["Api-Key"] = []string{header}
		r.Header["Authorization"] = []string{authorization}
		if key, _ := extractKey(r, sources); key != "" && key != strings.TrimSpace(key) {
			t.Fatalf("key %q is not trimmed", key)
		}
		removeKeys(r, sources)
		if key, _ := extractKey(r, sources); key != "" {
			t.Fatalf("header %q, query %q, authorization %q: key %q still readable after removeKeys", header, rawQuery, authorization, key)
		}
		if _, ok := r.Header["Authorization"]; ok && isBearer(r.Header.Get("Authorization")) {
			t.Fatalf("a Bearer Authorization is left: %q", r.Header["Authorization"])
		}
		if !reflect.DeepEqual(r.URL.Query()["api_key"], []string(nil)) {
			t.Fatalf("query %q: api_key left in the URL: %q", rawQuery, r.URL.RawQuery)
		}
	})
}

// FuzzParseHandler fuzzes the api_monetize handler directive (cost,
// key_from, forward_key). Properties: a refusal names the line; an
// accepted handler has non-negative costs and key sources that
// checkKeySources (Provision) accepts.
func FuzzParseHandler(f *testing.F) {
	for _, s := range []string{
		"api_monetize", "api_monetize {\n\tcost /v1/ml/* 10\n\tcost /v1/health 0\n}",
		"api_monetize {\n\tkey_from header Api-Key\n\tkey_from query api_key\n\tkey_from bearer\n\tforward_key\n}",
		"api_monetize {\n\tcost * -1\n}", "api_monetize {\n\tkey_from header X_API_KEY\n}",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, input string) {
		if !startsWith(input, "api_monetize") {
			return
		}
		d, _ := dispenser(input)
		h := new(Handler)
		if err := h.UnmarshalCaddyfile(d); err != nil {
			if !positioned.MatchString(err.Error()) {
				t.Fatalf("%q: error without a position: %v", input, err)
			}
			return
		}
		for _, c := range h.Costs {
			if c.Units < 0 {
				t.Fatalf("%q: accepted a negative cost %d", input, c.Units)
			}
		}
		if _, err := checkKeySources(h.KeyFrom); err != nil {
			t.Fatalf("%q: the Caddyfile accepted key sources Provision refuses: %v", input, err)
		}
	})
}

// FuzzSignedRecently fuzzes the Stripe-Signature timestamp check (a
// header any caller sends). Properties: no panic; accepted only when the
// header has a t= and every t= is within the tolerance of now.
func FuzzSignedRecently(f *testing.F) {
	now := time.Unix(1796551519, 0)
	f.Add("t=1796551519,v1=abc")
	f.Add("t=1796551519,t=99999999999,v1=abc")
	f.Add("v1=abc")
	f.Add("t=-9223372036854775808,v1=x")
	f.Add("t=1796551819,v0=x,v1=y")
	f.Fuzz(func(t *testing.T, header string) {
		ok := signedRecently(header, now, 5*time.Minute)
		seen := false
		for part := range strings.SplitSeq(header, ",") {
			v, isT := strings.CutPrefix(part, "t=")
			if !isT {
				continue
			}
			seen = true
			sec, err := strconv.ParseInt(v, 10, 64)
			if ok && (err != nil || sec < now.Unix()-300 || sec > now.Unix()+300) {
				t.Fatalf("%q accepted with t=%s", header, v)
			}
		}
		if ok && !seen {
			t.Fatalf("%q accepted without a timestamp", header)
		}
	})
}
