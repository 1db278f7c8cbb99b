// Package stripedouble is a small stateful stand-in for the parts of the
// Stripe API the plugin uses, for tests only. stripe-mock validates request
// shapes but keeps no state; this double keeps state: meter events with
// identifier dedupe (Stripe's "An event already exists with identifier"
// refusal), injected faults (429, 500, a response that never comes, an
// event accepted but its response lost), recorded events, products, prices
// found by lookup key, meters, subscriptions, Checkout Sessions (open,
// complete or expired; expiring one that is not open is refused, as
// Stripe does) and idempotency keys (a repeat gets the first answer, a
// request while another with the same key is in progress gets 409).
package stripedouble

import (
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"net/http/httptest"
	"sort"
	"strconv"
	"strings"
	"sync"
)

// Fault is what the double does with one meter event request instead of
// answering normally.
type Fault int

const (
	// None answers normally.
	None Fault = iota
	// RateLimit answers 429 rate_limit without recording.
	RateLimit
	// ServerError answers 500 api_error without recording.
	ServerError
	// Hang never answers (until the client gives up) and records nothing.
	Hang
	// AcceptThenHang records the event, then never answers: the client
	// cannot know it was accepted.
	AcceptThenHang
	// AcceptThen500 records the event, then answers 500.
	AcceptThen500
)

// Event is a meter event the double accepted.
type Event struct {
	EventName  string
	Identifier string
	Customer   string
	Value      int64
	Timestamp  int64
}

// Double is the stateful Stripe stand-in. Create it with New; its URL is
// the api_base to configure.
type Double struct {
	*httptest.Server

	mu       sync.Mutex
	faults   []Fault
	events   []Event
	idents   map[string]bool
	requests map[string]int // "METHOD /path" → count
	// Products, prices and meters by id; prices also by lookup key.
	products map[string]map[string]any
	prices   map[string]map[string]any
	meters   map[string]map[string]any
	subs     map[string]map[string]any
	seq      int
	// subSeq orders subscriptions by creation ("created").
	subSeq int64
	// Creates counts objects created, by kind.
	creates map[string]int
	// sessions are the Checkout and Billing Portal sessions created, as
	// their form parameters, in order.
	checkouts, portals []map[string]string
	// idempotent holds, by Idempotency-Key, the parameters and the answer
	// of the session request first made with it.
	idempotent map[string]idempotentAnswer
	// canceled are the subscriptions canceled through the API, in order.
	canceled []string
	// sessionObjs are the Checkout Sessions by id, as answered.
	sessionObjs map[string]map[string]any
	// inFlight holds the idempotency keys of requests being handled.
	inFlight map[string]bool
	// hold, when set, holds the next Checkout Session request (after it
	// is marked in flight) until release is closed.
	hold *checkoutHold
	// expired are the Checkout Sessions expired through the API, in order.
	expired []string
}

// checkoutHold holds one Checkout Session request in flight.
type checkoutHold struct {
	held, release chan struct{}
}

// idempotentAnswer is what Stripe remembers of a request made with an
// Idempotency-Key.
type idempotentAnswer struct {
	params map[string]string
	answer map[string]any
}

// New starts a double; stop it with Close.
func New() *Double {
	d := &Double{
		idents: make(map[string]bool), requests: make(map[string]int),
		products: make(map[string]map[string]any), prices: make(map[string]map[string]any),
		meters: make(map[string]map[string]any), subs: make(map[string]map[string]any),
		creates: make(map[string]int), idempotent: make(map[string]idempotentAnswer),
		sessionObjs: make(map[string]map[string]any), inFlight: make(map[string]bool),
	}
	d.Server = httptest.NewServer(http.HandlerFunc(d.serve))
	return d
}

// Fail queues faults applied to the next meter event requests, in order.
func (d *Double) Fail(f ...Fault) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.faults = append(d.faults, f...)
}

// Events returns the accepted meter events, in order.
func (d *Double) Events() []Event {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]Event(nil), d.events...)
}

// Requests returns how many requests were made to "METHOD /path".
func (d *Double) Requests(route string) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.requests[route]
}

// Creates returns how many objects of kind ("product", "price", "meter")
// were created.
func (d *Double) Creates(kind string) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.creates[kind]
}

// SetSubscription stores a subscription of customer, with one item per
// price lookup key, in status ("active", "past_due", "canceled", …); a new
// one's "created" is later than that of every subscription set before.
func (d *Double) SetSubscription(id, customer, status string, lookupKeys ...string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	items := []any{}
	for i, k := range lookupKeys {
		items = append(items, map[string]any{
			"id": fmt.Sprintf("si_%s_%d", id, i), "object": "subscription_item",
			"price": map[string]any{"id": "price_" + k, "object": "price", "lookup_key": k},
		})
	}
	created, ok := d.subs[id]["created"]
	if !ok {
		d.subSeq++
		created = d.subSeq
	}
	d.subs[id] = map[string]any{
		"id": id, "object": "subscription", "customer": customer, "status": status, "created": created,
		"items": map[string]any{"object": "list", "data": items},
	}
}

// SetPrice stores an active recurring price with a lookup key; usageType
// is "licensed" or "metered".
func (d *Double) SetPrice(id, lookupKey, usageType string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.prices[id] = map[string]any{
		"id": id, "object": "price", "active": true, "currency": "usd", "lookup_key": lookupKey,
		"recurring": map[string]any{"interval": "month", "interval_count": 1, "usage_type": usageType},
	}
}

// CheckoutSessions returns the parameters of the Checkout Sessions
// created, in order.
func (d *Double) CheckoutSessions() []map[string]string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]map[string]string(nil), d.checkouts...)
}

// PortalSessions returns the parameters of the Billing Portal sessions
// created, in order.
func (d *Double) PortalSessions() []map[string]string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]map[string]string(nil), d.portals...)
}

// Canceled returns the ids of the subscriptions canceled through the
// API, in order.
func (d *Double) Canceled() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]string(nil), d.canceled...)
}

// HoldNextCheckout holds the next Checkout Session request in progress
// until release is called; held is closed once it is. Meanwhile a request
// with the same Idempotency-Key gets Stripe's 409.
func (d *Double) HoldNextCheckout() (held <-chan struct{}, release func()) {
	h := &checkoutHold{held: make(chan struct{}), release: make(chan struct{})}
	d.mu.Lock()
	d.hold = h
	d.mu.Unlock()
	var once sync.Once
	return h.held, func() { once.Do(func() { close(h.release) }) }
}

// CompleteCheckout marks a Checkout Session paid, as Stripe does when
// the customer pays (the webhook event is the test's to send).
func (d *Double) CompleteCheckout(id string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if s, ok := d.sessionObjs[id]; ok {
		s["status"] = "complete"
	}
}

// ExpiredCheckouts returns the ids of the Checkout Sessions expired
// through the API, in order.
func (d *Double) ExpiredCheckouts() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]string(nil), d.expired...)
}

// expireCheckout expires an open Checkout Session; Stripe refuses any
// other with 400.
func (d *Double) expireCheckout(w http.ResponseWriter, id string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	s, ok := d.sessionObjs[id]
	if !ok {
		writeErrorCode(w, http.StatusNotFound, "invalid_request_error", "resource_missing", "No such checkout.session: '"+id+"'")
		return
	}
	if s["status"] != "open" {
		writeError(w, http.StatusBadRequest, "invalid_request_error", fmt.Sprintf("Only Checkout Sessions with a status in [\"open\"] can be expired. This Checkout Session has a status of %q.", s["status"]))
		return
	}
	s["status"] = "expired"
	s["url"] = nil
	d.expired = append(d.expired, id)
	writeJSON(w, s)
}

// session records a Checkout or Billing Portal session and answers with
// its id and a URL on the double. Like Stripe, a request repeating an
// Idempotency-Key gets the first answer again (and creates nothing), or
// 400 idempotency_error when its parameters differ, or 409 while the
// first request with the key is still in progress.
func (d *Double) session(w http.ResponseWriter, r *http.Request, object string, list *[]map[string]string) {
	f := form(r)
	key := r.Header.Get("Idempotency-Key")
	d.mu.Lock()
	defer d.mu.Unlock()
	if key != "" && d.inFlight[object+" "+key] {
		writeErrorCode(w, http.StatusConflict, "idempotency_error", "idempotency_key_in_use",
			"There is currently another in-progress request using this Idempotency Key. Please try again later.")
		return
	}
	if h := d.hold; h != nil && object == "checkout.session" {
		d.hold = nil
		if key != "" {
			d.inFlight[object+" "+key] = true
		}
		d.mu.Unlock()
		close(h.held)
		<-h.release
		d.mu.Lock()
		delete(d.inFlight, object+" "+key)
	}
	if prev, ok := d.idempotent[object+" "+key]; ok && key != "" {
		if !maps.Equal(prev.params, f) {
			writeError(w, http.StatusBadRequest, "idempotency_error", "Keys for idempotent requests can only be used with the same parameters they were first used with.")
			return
		}
		writeJSON(w, prev.answer)
		return
	}
	d.seq++
	id := fmt.Sprintf("cs_%d", d.seq)
	*list = append(*list, f)
	answer := map[string]any{"id": id, "object": object, "url": d.URL + "/pay/" + id,
		"client_reference_id": orNull(f["client_reference_id"]), "customer": orNull(f["customer"]), "mode": orNull(f["mode"])}
	if object == "checkout.session" {
		answer["status"] = "open"
		d.sessionObjs[id] = maps.Clone(answer)
	}
	if key != "" {
		d.idempotent[object+" "+key] = idempotentAnswer{params: f, answer: answer}
	}
	writeJSON(w, answer)
}

// listSubscriptions lists the subscriptions of the customer parameter
// that are not canceled (Stripe's default status filter).
func (d *Double) listSubscriptions(w http.ResponseWriter, r *http.Request) {
	d.mu.Lock()
	defer d.mu.Unlock()
	ids := make([]string, 0, len(d.subs))
	for id := range d.subs {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	data := []any{}
	for _, id := range ids {
		s := d.subs[id]
		if c := r.Form.Get("customer"); (c == "" || s["customer"] == c) && s["status"] != "canceled" {
			data = append(data, s)
		}
	}
	writeJSON(w, map[string]any{"object": "list", "url": "/v1/subscriptions", "has_more": false, "data": data})
}

// cancelSubscription cancels a subscription at once.
func (d *Double) cancelSubscription(w http.ResponseWriter, id string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	s, ok := d.subs[id]
	if !ok {
		writeErrorCode(w, http.StatusNotFound, "invalid_request_error", "resource_missing", "No such subscription: '"+id+"'")
		return
	}
	s["status"] = "canceled"
	d.canceled = append(d.canceled, id)
	writeJSON(w, s)
}

func (d *Double) serve(w http.ResponseWriter, r *http.Request) {
	if !strings.HasPrefix(r.Header.Get("Authorization"), "Bearer sk_") {
		writeError(w, http.StatusUnauthorized, "invalid_request_error", "Invalid API Key provided")
		return
	}
	if err := r.ParseForm(); err != nil {
		writeError(w, http.StatusBadRequest, "invalid_request_error", err.Error())
		return
	}
	path := r.URL.Path
	d.mu.Lock()
	route := r.Method + " " + path
	for _, prefix := range []string{"/v1/products/", "/v1/subscriptions/", "/v1/prices/", "/v1/checkout/sessions/"} {
		if strings.HasPrefix(path, prefix) {
			route = r.Method + " " + prefix + "{id}"
			if strings.HasSuffix(path, "/expire") {
				route += "/expire"
			}
		}
	}
	d.requests[route]++
	d.mu.Unlock()
	switch {
	case route == "POST /v1/billing/meter_events":
		d.meterEvent(w, r)
	case route == "GET /v1/subscriptions/{id}":
		d.get(w, d.subs, strings.TrimPrefix(path, "/v1/subscriptions/"))
	case route == "GET /v1/subscriptions":
		d.listSubscriptions(w, r)
	case route == "DELETE /v1/subscriptions/{id}":
		d.cancelSubscription(w, strings.TrimPrefix(path, "/v1/subscriptions/"))
	case route == "GET /v1/products/{id}":
		d.get(w, d.products, strings.TrimPrefix(path, "/v1/products/"))
	case route == "GET /v1/products":
		d.list(w, d.products, "/v1/products")
	case route == "POST /v1/products":
		d.createProduct(w, r)
	case route == "POST /v1/products/{id}":
		d.updateProduct(w, r, strings.TrimPrefix(path, "/v1/products/"))
	case route == "GET /v1/prices":
		d.listPrices(w, r)
	case route == "POST /v1/prices":
		d.createPrice(w, r)
	case route == "POST /v1/checkout/sessions":
		d.session(w, r, "checkout.session", &d.checkouts)
	case route == "GET /v1/checkout/sessions/{id}":
		d.get(w, d.sessionObjs, strings.TrimPrefix(path, "/v1/checkout/sessions/"))
	case route == "POST /v1/checkout/sessions/{id}/expire":
		d.expireCheckout(w, strings.TrimSuffix(strings.TrimPrefix(path, "/v1/checkout/sessions/"), "/expire"))
	case route == "POST /v1/billing_portal/sessions":
		d.session(w, r, "billing_portal.session", &d.portals)
	case route == "GET /v1/billing/meters":
		d.list(w, d.meters, "/v1/billing/meters")
	case route == "POST /v1/billing/meters":
		d.createMeter(w, r)
	default:
		writeError(w, http.StatusNotFound, "invalid_request_error", "Unrecognized request URL ("+route+")")
	}
}

func (d *Double) meterEvent(w http.ResponseWriter, r *http.Request) {
	d.mu.Lock()
	fault := None
	if len(d.faults) > 0 {
		fault, d.faults = d.faults[0], d.faults[1:]
	}
	switch fault {
	case RateLimit:
		d.mu.Unlock()
		writeErrorCode(w, http.StatusTooManyRequests, "invalid_request_error", "rate_limit", "Request rate limit exceeded.")
		return
	case ServerError:
		d.mu.Unlock()
		writeError(w, http.StatusInternalServerError, "api_error", "An unknown error occurred")
		return
	case Hang:
		d.mu.Unlock()
		<-r.Context().Done()
		return
	}
	ident := r.PostForm.Get("identifier")
	if d.idents[ident] {
		d.mu.Unlock()
		writeError(w, http.StatusBadRequest, "invalid_request_error", "An event already exists with identifier "+ident+".")
		return
	}
	value, err := strconv.ParseInt(r.PostForm.Get("payload[value]"), 10, 64)
	ts, err2 := strconv.ParseInt(r.PostForm.Get("timestamp"), 10, 64)
	name, cust := r.PostForm.Get("event_name"), r.PostForm.Get("payload[stripe_customer_id]")
	if err != nil || err2 != nil || ident == "" || name == "" || cust == "" {
		d.mu.Unlock()
		writeError(w, http.StatusBadRequest, "invalid_request_error", "missing or invalid event_name, identifier, timestamp, payload[stripe_customer_id] or payload[value]")
		return
	}
	d.idents[ident] = true
	d.events = append(d.events, Event{EventName: name, Identifier: ident, Customer: cust, Value: value, Timestamp: ts})
	d.mu.Unlock()
	switch fault {
	case AcceptThenHang:
		<-r.Context().Done()
		return
	case AcceptThen500:
		writeError(w, http.StatusInternalServerError, "api_error", "An unknown error occurred")
		return
	}
	writeJSON(w, map[string]any{
		"object": "billing.meter_event", "event_name": name, "identifier": ident, "timestamp": ts,
		"payload": map[string]string{"stripe_customer_id": cust, "value": strconv.FormatInt(value, 10)},
	})
}

func (d *Double) get(w http.ResponseWriter, m map[string]map[string]any, id string) {
	d.mu.Lock()
	obj, ok := m[id]
	obj = maps.Clone(obj) // answered after unlocking
	d.mu.Unlock()
	if !ok {
		writeErrorCode(w, http.StatusNotFound, "invalid_request_error", "resource_missing", "No such object: '"+id+"'")
		return
	}
	writeJSON(w, obj)
}

// form returns the request's form fields with a given prefix as a flat
// map (e.g. "metadata[tier]").
func form(r *http.Request) map[string]string {
	out := make(map[string]string, len(r.PostForm))
	for k, v := range r.PostForm {
		out[k] = v[0]
	}
	return out
}

func (d *Double) createProduct(w http.ResponseWriter, r *http.Request) {
	f := form(r)
	d.mu.Lock()
	defer d.mu.Unlock()
	id := f["id"]
	if id == "" {
		d.seq++
		id = fmt.Sprintf("prod_%d", d.seq)
	}
	if _, dup := d.products[id]; dup {
		writeErrorCode(w, http.StatusBadRequest, "invalid_request_error", "resource_already_exists", "Product already exists.")
		return
	}
	d.creates["product"]++
	d.products[id] = map[string]any{"id": id, "object": "product", "name": f["name"], "active": true, "metadata": metadata(f)}
	writeJSON(w, d.products[id])
}

func (d *Double) updateProduct(w http.ResponseWriter, r *http.Request, id string) {
	f := form(r)
	d.mu.Lock()
	defer d.mu.Unlock()
	p, ok := d.products[id]
	if !ok {
		writeErrorCode(w, http.StatusNotFound, "invalid_request_error", "resource_missing", "No such product: '"+id+"'")
		return
	}
	if n, ok := f["name"]; ok {
		p["name"] = n
	}
	d.creates["product_update"]++
	writeJSON(w, p)
}

func metadata(f map[string]string) map[string]string {
	md := map[string]string{}
	for k, v := range f {
		if strings.HasPrefix(k, "metadata[") {
			md[strings.TrimSuffix(strings.TrimPrefix(k, "metadata["), "]")] = v
		}
	}
	return md
}

func (d *Double) createPrice(w http.ResponseWriter, r *http.Request) {
	f := form(r)
	d.mu.Lock()
	defer d.mu.Unlock()
	d.seq++
	id := fmt.Sprintf("price_%d", d.seq)
	key := f["lookup_key"]
	for _, p := range d.prices {
		if key != "" && p["lookup_key"] == key {
			if f["transfer_lookup_key"] != "true" {
				writeError(w, http.StatusBadRequest, "invalid_request_error", "A price with lookup key "+key+" already exists.")
				return
			}
			p["lookup_key"] = nil
		}
	}
	p := map[string]any{
		"id": id, "object": "price", "active": true, "product": f["product"], "currency": f["currency"],
		"lookup_key": key, "billing_scheme": orDefault(f["billing_scheme"], "per_unit"),
		"unit_amount_decimal": orNull(f["unit_amount_decimal"]), "tiers_mode": orNull(f["tiers_mode"]), "metadata": metadata(f),
		"recurring": map[string]any{
			"interval": f["recurring[interval]"], "interval_count": 1,
			"usage_type": orDefault(f["recurring[usage_type]"], "licensed"), "meter": f["recurring[meter]"],
		},
	}
	var tiers []any
	for i := 0; ; i++ {
		upTo, ok := f[fmt.Sprintf("tiers[%d][up_to]", i)]
		if !ok {
			break
		}
		t := map[string]any{"unit_amount_decimal": orNull(f[fmt.Sprintf("tiers[%d][unit_amount_decimal]", i)]), "up_to": nil}
		if upTo != "inf" {
			n, _ := strconv.ParseInt(upTo, 10, 64)
			t["up_to"] = n
		}
		tiers = append(tiers, t)
	}
	if tiers != nil {
		p["tiers"] = tiers
	}
	d.creates["price"]++
	d.prices[id] = p
	writeJSON(w, p)
}

func orDefault(v, def string) string {
	if v == "" {
		return def
	}
	return v
}

// orNull is v, or JSON null when v is empty (as Stripe answers unset
// fields).
func orNull(v string) any {
	if v == "" {
		return nil
	}
	return v
}

func (d *Double) listPrices(w http.ResponseWriter, r *http.Request) {
	keys := map[string]bool{}
	for k, v := range r.Form {
		if strings.HasPrefix(k, "lookup_keys[") {
			keys[v[0]] = true
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	data := []any{}
	ids := make([]string, 0, len(d.prices))
	for id := range d.prices {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		p := d.prices[id]
		if k, _ := p["lookup_key"].(string); k != "" && keys[k] {
			data = append(data, p)
		}
	}
	writeJSON(w, map[string]any{"object": "list", "url": "/v1/prices", "has_more": false, "data": data})
}

func (d *Double) createMeter(w http.ResponseWriter, r *http.Request) {
	f := form(r)
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, m := range d.meters {
		if m["event_name"] == f["event_name"] && m["status"] == "active" {
			writeError(w, http.StatusBadRequest, "invalid_request_error", "An active meter with event_name "+f["event_name"]+" already exists.")
			return
		}
	}
	d.seq++
	id := fmt.Sprintf("mtr_%d", d.seq)
	d.creates["meter"]++
	d.meters[id] = map[string]any{
		"id": id, "object": "billing.meter", "status": "active", "display_name": f["display_name"],
		"event_name":          f["event_name"],
		"default_aggregation": map[string]any{"formula": f["default_aggregation[formula]"]},
		"customer_mapping":    map[string]any{"type": f["customer_mapping[type]"], "event_payload_key": f["customer_mapping[event_payload_key]"]},
		"value_settings":      map[string]any{"event_payload_key": f["value_settings[event_payload_key]"]},
	}
	writeJSON(w, d.meters[id])
}

// list answers a list request with every object of m, in id order, on one
// page.
func (d *Double) list(w http.ResponseWriter, m map[string]map[string]any, url string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	ids := make([]string, 0, len(m))
	for id := range m {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	data := []any{}
	for _, id := range ids {
		data = append(data, m[id])
	}
	writeJSON(w, map[string]any{"object": "list", "url": url, "has_more": false, "data": data})
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, status int, typ, msg string) {
	writeErrorCode(w, status, typ, "", msg)
}

func writeErrorCode(w http.ResponseWriter, status int, typ, code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	e := map[string]any{"type": typ, "message": msg}
	if code != "" {
		e["code"] = code
	}
	_ = json.NewEncoder(w).Encode(map[string]any{"error": e})
}
