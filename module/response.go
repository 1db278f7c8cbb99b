package module

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// meteredWriter records the final status of a response, so its cost can
// be settled, and takes the upstream's usage-cost header out of the
// response before the client sees it.
type meteredWriter struct {
	caddyhttp.ResponseWriterWrapper
	// status is the final status sent; 0 while none has been.
	status int
	// costHeader is the usage-cost header to read and strip, if any, in
	// canonical form.
	costHeader string
	maxCost    int64
	// reported is the cost the upstream reported, when hasReported.
	reported    int64
	hasReported bool
	// tally counts the request's other meters; nil without meters.
	tally *meterTally
}

func (w *meteredWriter) WriteHeader(code int) {
	if w.status == 0 && (code >= 200 || code == http.StatusSwitchingProtocols) {
		w.status = code
		if w.costHeader != "" {
			h := w.Header()
			if v := h.Get(w.costHeader); v != "" {
				w.reported, w.hasReported = parseUsageCost(v, w.maxCost)
			}
			h.Del(w.costHeader)
			unannounce(h, func(name string) bool { return name == w.costHeader })
		}
		if w.tally != nil {
			w.tally.readHeaders(w.Header())
		}
	}
	w.ResponseWriterWrapper.WriteHeader(code)
}

func (w *meteredWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	n, err := w.ResponseWriterWrapper.Write(b)
	if w.tally != nil {
		w.tally.respBytes += int64(n)
	}
	return n, err
}

// ReadFrom keeps the wrapped writer's fast path without skipping
// WriteHeader.
func (w *meteredWriter) ReadFrom(r io.Reader) (int64, error) {
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	n, err := w.ResponseWriterWrapper.ReadFrom(r)
	if w.tally != nil {
		w.tally.respBytes += n
	}
	return n, err
}

// FlushError sends the header first, so an early flush is recorded.
func (w *meteredWriter) FlushError() error {
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	return http.NewResponseController(w.ResponseWriterWrapper.ResponseWriter).Flush()
}

// Hijack is used by protocol upgrades after a 101 was written.
func (w *meteredWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	return http.NewResponseController(w.ResponseWriterWrapper.ResponseWriter).Hijack()
}

// readCostTrailer reads the usage cost an upstream sent as a trailer,
// after the body (a streamed response knows its cost only then), and
// removes it, so the client never sees it; the handler calls it once the
// next handler returned, before net/http writes the trailers. A value sent
// in the header wins. (The trailer was taken out of the Trailer
// announcement at WriteHeader.)
func (w *meteredWriter) readCostTrailer() {
	if w.costHeader == "" || w.status == 0 {
		return
	}
	h := w.Header()
	for _, k := range [2]string{w.costHeader, http.TrailerPrefix + w.costHeader} {
		vs, ok := h[k]
		if !ok {
			continue
		}
		if len(vs) > 0 && !w.hasReported {
			w.reported, w.hasReported = parseUsageCost(vs[0], w.maxCost)
		}
		delete(h, k)
	}
}

// unannounce removes the header names drop reports (given canonical)
// from h's Trailer announcement, so the client is not told of trailers
// it will not get.
func unannounce(h http.Header, drop func(name string) bool) {
	announced, ok := h["Trailer"]
	if !ok {
		return
	}
	var keep []string
	for _, v := range announced {
		for _, name := range strings.Split(v, ",") {
			name = strings.TrimSpace(name)
			if name != "" && !drop(http.CanonicalHeaderKey(name)) {
				keep = append(keep, name)
			}
		}
	}
	if len(keep) == 0 {
		delete(h, "Trailer")
		return
	}
	h["Trailer"] = []string{strings.Join(keep, ", ")}
}

// parseUsageCost reads an upstream-reported cost: a non-negative decimal
// integer, capped at max. Anything else is ignored.
func parseUsageCost(v string, max int64) (int64, bool) {
	n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
	if err != nil || n < 0 {
		return 0, false
	}
	return min(n, max), true
}
