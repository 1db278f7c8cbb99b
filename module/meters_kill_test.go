package module

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// killBody is the body every response of the kill test carries: 64 bytes,
// well within net/http's write buffer, so a client has it complete only
// once the handler returned (after the settlement).
var killBody = strings.Repeat("k", 64)

// killUpstream reports tokens: /v1/kill/<n> in the header, /v1/ktrail/<n>
// as a trailer after a flushed body. It counts what it reported (before
// answering, so a request whose proxy died is counted too) and holds each
// request briefly, so that a kill finds requests in flight.
type killUpstream struct {
	*httptest.Server
	tokens, requests atomic.Int64
}

func newKillUpstream(t *testing.T) *killUpstream {
	u := &killUpstream{}
	u.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n, err := strconv.ParseInt(r.URL.Path[strings.LastIndexByte(r.URL.Path, '/')+1:], 10, 64)
		if err != nil {
			http.Error(w, "bad path", http.StatusBadRequest)
			return
		}
		time.Sleep(2 * time.Millisecond)
		u.tokens.Add(n)
		u.requests.Add(1)
		if strings.HasPrefix(r.URL.Path, "/v1/ktrail/") {
			w.Header().Set("Trailer", "X-Tokens-Used")
			fmt.Fprint(w, killBody)
			w.(http.Flusher).Flush()
			w.Header().Set("X-Tokens-Used", strconv.FormatInt(n, 10))
			return
		}
		w.Header().Set("X-Tokens-Used", strconv.FormatInt(n, 10))
		fmt.Fprint(w, killBody)
	}))
	t.Cleanup(u.Close)
	return u
}

// metersKillCaddyfile is one instance of a three-instance deployment on
// one Redis with a tokens meter (a trusted upstream's header) and a
// response-bytes meter, billed beyond their included units: nothing
// refuses a request.
func metersKillCaddyfile(prefix, upstream string) func(adminPort, httpPort int) string {
	return func(adminPort, httpPort int) string {
		return fmt.Sprintf(`{
	admin localhost:%d
	http_port %d
	grace_period 1s
	api_monetize {
		redis %s
		redis_prefix %s
		store_timeout 2s
		key_secret multi-instance-secret-0123
		meter tokens {
			source header X-Tokens-Used max 1000
		}
		meter bytes {
			source response_bytes
		}
		tier billed {
			meter tokens {
				included 500/month
				over_quota bill 0.01
			}
			meter bytes {
				included 1000/month
				over_quota bill 0.001
			}
		}
		customer beta tier billed
		key %s beta
	}
}

:%d {
	api_monetize
	reverse_proxy %s
}
`, adminPort, httpPort, testRedisURL, prefix, sharedKeyB, httpPort, strings.TrimPrefix(upstream, "http://"))
	}
}

// TestMetersInstanceKilledMidLoad: three Caddy processes on one Redis,
// an upstream reporting tokens, one process SIGKILLed under load. After
// it, each meter's ledger holds at least the amounts of the responses the
// clients received complete, no request is counted twice (no meter
// exceeds what the upstream reported or served), and what is lost is at
// most the after-response amounts (tokens, response bytes) of the killed
// process's requests in flight: those the upstream answered but whose
// settlement died with the process.
func TestMetersInstanceKilledMidLoad(t *testing.T) {
	up := newKillUpstream(t)
	cfg := metersKillCaddyfile(redisTestPrefix(t), up.URL)
	var procs [3]*caddyProcess
	for i := range procs {
		procs[i] = launchCaddy(t, fmt.Sprintf("caddy-%d", i+1), cfg)
	}
	for _, p := range procs {
		p.waitServing(t)
	}
	patterns := func(base string) []meterReq { // cost: the tokens the request reports
		ok := []int{http.StatusOK}
		return []meterReq{
			{url: base + "/v1/kill/3", cost: 3, want: ok},
			{url: base + "/v1/kill/11", cost: 11, want: ok},
			{url: base + "/v1/ktrail/50", cost: 50, want: ok},
			{url: base + "/v1/kill/1000", cost: 1000, want: ok},
		}
	}
	const loaders = 6
	client := loadClient(t, 3*loaders)
	killed, survivors := newMeterLoad(), newMeterLoad()
	waitKilled, sentKilled := runMeterLoad(client, killed, loaders, sharedKeyB, patterns(procs[0].base), nil, true)
	stop := make(chan struct{})
	var waitSurvivors [2]func()
	for i, p := range procs[1:] {
		waitSurvivors[i], _ = runMeterLoad(client, survivors, loaders, sharedKeyB, patterns(p.base), stop, false)
	}
	waitUntil(t, 60*time.Second, "the load ran on the instance to kill", func() bool { return sentKilled.Load() >= 300 })
	procs[0].kill(t)
	waitKilled() // each of its loaders stops at its first transport error
	before := up.requests.Load()
	waitUntil(t, 60*time.Second, "the survivors served after the kill", func() bool { return up.requests.Load() >= before+200 })
	close(stop)
	for _, w := range waitSurvivors {
		w()
	}
	killed.check(t, "load on the killed instance")
	survivors.check(t, "load on the survivors")
	if survivors.lostCount > 0 {
		t.Fatalf("%d requests on the survivors got no response", survivors.lostCount)
	}

	okCount, okTokens := killed.okCount+survivors.okCount, killed.okUnits+survivors.okUnits
	v := procs[1].usage(t, "beta")
	tok, byt := meterOf(v, "tokens"), meterOf(v, "bytes")
	served, reported := up.requests.Load(), up.tokens.Load()
	lostTokens, lostBytes := reported-tok.Billed, served*int64(len(killBody))-byt.Billed
	t.Logf("killed after %d requests on it: %d complete responses (%d tokens), %d without a response (%d tokens) on the killed instance; upstream answered %d requests, %d tokens; ledger: %d calls, tokens %d in %d requests, bytes %d in %d requests; lost %d tokens, %d bytes",
		sentKilled.Load(), okCount, okTokens, killed.lostCount, killed.lostUnits, served, reported,
		v.Billed, tok.Billed, tok.Requests, byt.Billed, byt.Requests, lostTokens, lostBytes)

	// Every complete response is in each meter's ledger.
	if tok.Billed < okTokens || tok.Requests < okCount {
		t.Errorf("tokens ledger %d in %d requests; the clients received %d complete responses worth %d tokens", tok.Billed, tok.Requests, okCount, okTokens)
	}
	if byt.Billed < okCount*int64(len(killBody)) || byt.Requests < okCount {
		t.Errorf("bytes ledger %d in %d requests; the clients received %d complete responses of %d bytes", byt.Billed, byt.Requests, okCount, len(killBody))
	}
	// Nothing counted twice: no meter holds more than the upstream
	// reported or served, nor more requests than were sent.
	if lostTokens < 0 || lostBytes < 0 || tok.Requests > served || byt.Requests > served {
		t.Errorf("a request was counted twice: ledger tokens %d in %d requests, bytes %d in %d requests; the upstream reported %d tokens and served %d requests",
			tok.Billed, tok.Requests, byt.Billed, byt.Requests, reported, served)
	}
	if v.Billed < okCount || v.Billed > okCount+killed.lostCount || v.Requests != v.Billed {
		t.Errorf("default meter %d units in %d requests; want %d complete responses plus at most the %d in flight at the kill", v.Billed, v.Requests, okCount, killed.lostCount)
	}
	// What is lost is at most the in-flight requests' after-response amounts.
	if lostTokens > killed.lostUnits || lostBytes > killed.lostCount*int64(len(killBody)) {
		t.Errorf("lost %d tokens and %d bytes; at most the %d requests in flight on the killed instance may lose theirs (%d tokens, %d bytes)",
			lostTokens, lostBytes, killed.lostCount, killed.lostUnits, killed.lostCount*int64(len(killBody)))
	}
}
