package stripereport

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"github.com/stripe/stripe-go/v86"
)

// Catalog sync: the tiers become Stripe objects that are found again on
// the next run, so a run over an unchanged configuration creates nothing.
//
//   - one Meter per configuration, found by its event name (sum of the
//     payload's "value", customers mapped by "stripe_customer_id");
//   - per tier, a Product found by metadata api_monetize_tier=<tier>;
//   - a flat, licensed base Price with lookup key am_<tier>_base (not for
//     free or custom prices);
//   - a metered Price on the meter with lookup key am_<tier>_usage, for
//     tiers that bill overage: graduated tiers, the included units at 0,
//     then the overage price per unit;
//   - for every other meter (docs/meters.md), one Meter found by its own
//     event name, and per tier billing that meter's overage a metered
//     Price on it with lookup key am_<tier>_<meter>_usage, built alike.
//
// Prices are immutable: a Price whose amount, tiers, interval, currency,
// meter or product differs is replaced by a new Price that takes over the
// lookup key (transfer_lookup_key). Nothing is archived or deactivated.

// TierMetadataKey is the Product metadata key that names the tier a
// Product belongs to.
const TierMetadataKey = "api_monetize_tier"

// usageInterval is the interval of metered prices: included units renew
// monthly.
const usageInterval = "month"

// CatalogTier is one tier as the catalog sync sees it. Amounts are in
// millionths of the currency's major unit (49.00 = 49000000).
type CatalogTier struct {
	// Name is the tier's name.
	Name string
	// BaseMicros is the flat base price per Interval; 0 (and not Custom)
	// means free: no base Price.
	BaseMicros int64
	// Interval is the base price's interval, "month" or "year".
	Interval string
	// Custom marks a negotiated price: no base Price is created.
	Custom bool
	// IncludedUnits is the number of units per month the metered Price
	// charges 0 for.
	IncludedUnits int64
	// OverageMicros is the price of one unit beyond IncludedUnits; 0 means
	// the tier has no metered Price.
	OverageMicros int64
	// Meters are the tier's quotas of other meters than the default one
	// that bill overage; each gets a metered Price on its meter.
	Meters []CatalogTierMeter
}

// CatalogTierMeter is a tier's billed quota of another meter.
type CatalogTierMeter struct {
	// Meter names one of the Catalog's Meters.
	Meter string
	// IncludedUnits is the number of the meter's units per month the
	// metered Price charges 0 for.
	IncludedUnits int64
	// OverageMicros is the price of one unit beyond IncludedUnits (> 0).
	OverageMicros int64
}

// CatalogMeter is another meter than the default one and its event name.
type CatalogMeter struct {
	// Name is the meter's name.
	Name string
	// Event is its Stripe event name.
	Event string
}

// Catalog is what the sync makes exist in Stripe.
type Catalog struct {
	// Currency is the lower-case ISO 4217 code of every price.
	Currency string
	// Meter is the default meter's event name (the reporter's meter events).
	Meter string
	// Meters are the other meters, each a Billing Meter of its own.
	Meters []CatalogMeter
	// Tiers are the tiers, in order.
	Tiers []CatalogTier
}

// ActionKind is what one planned step does.
type ActionKind int

const (
	// CreateMeter creates the meter.
	CreateMeter ActionKind = iota
	// CreateProduct creates a tier's product.
	CreateProduct
	// CreatePrice creates a price whose lookup key is not in use.
	CreatePrice
	// ReplacePrice creates a new price and moves the lookup key to it from
	// the price that differs.
	ReplacePrice
)

// Action is one planned step.
type Action struct {
	// Kind is what the step does.
	Kind ActionKind
	// Tier is the tier the step is for (empty for a meter).
	Tier string
	// Meter is the event name of the meter a CreateMeter step creates.
	Meter string
	// LookupKey is the price's lookup key (prices only).
	LookupKey string
	// Replaces is the id of the price whose lookup key moves (ReplacePrice).
	Replaces string
	// Why says what differs from the price being replaced (ReplacePrice).
	Why string
	// Description is a one-line human description of the step.
	Description string

	price priceSpec
}

// Plan is the list of steps that make Stripe match a Catalog.
type Plan struct {
	// Actions are the steps, in the order they are applied.
	Actions []Action

	catalog  Catalog
	meterIDs map[string]string // event name → existing meter id; absent until created
	products map[string]string // tier → existing product id
}

// priceSpec is the desired shape of one Price. Amounts are
// unit_amount_decimal strings in the currency's minor unit.
type priceSpec struct {
	tier      string
	lookupKey string
	interval  string
	metered   bool
	// event is the event name of a metered price's meter.
	event string
	// amount is the per-unit amount (per_unit billing scheme).
	amount string
	// tiered: graduated tiers, the first included units at 0, then amount.
	tiered   bool
	included int64
}

// The objects as Stripe returns them; decoded here rather than into
// stripe-go's types, which hold decimal amounts as float64.
type (
	listPage[T any] struct {
		stripe.APIResource
		Data    []T  `json:"data"`
		HasMore bool `json:"has_more"`
	}
	stripeProduct struct {
		ID       string            `json:"id"`
		Active   bool              `json:"active"`
		Created  int64             `json:"created"`
		Metadata map[string]string `json:"metadata"`
	}
	stripeMeter struct {
		ID                 string `json:"id"`
		Status             string `json:"status"`
		EventName          string `json:"event_name"`
		DefaultAggregation struct {
			Formula string `json:"formula"`
		} `json:"default_aggregation"`
		CustomerMapping struct {
			Type            string `json:"type"`
			EventPayloadKey string `json:"event_payload_key"`
		} `json:"customer_mapping"`
		ValueSettings struct {
			EventPayloadKey string `json:"event_payload_key"`
		} `json:"value_settings"`
	}
	stripePrice struct {
		ID                string  `json:"id"`
		Active            bool    `json:"active"`
		Currency          string  `json:"currency"`
		Product           string  `json:"product"`
		LookupKey         string  `json:"lookup_key"`
		BillingScheme     string  `json:"billing_scheme"`
		TiersMode         string  `json:"tiers_mode"`
		UnitAmount        *int64  `json:"unit_amount"`
		UnitAmountDecimal *string `json:"unit_amount_decimal"`
		Recurring         *struct {
			Interval      string `json:"interval"`
			IntervalCount int64  `json:"interval_count"`
			UsageType     string `json:"usage_type"`
			Meter         string `json:"meter"`
		} `json:"recurring"`
		Tiers []struct {
			UpTo              *int64  `json:"up_to"`
			UnitAmount        *int64  `json:"unit_amount"`
			UnitAmountDecimal *string `json:"unit_amount_decimal"`
			FlatAmount        *int64  `json:"flat_amount"`
			FlatAmountDecimal *string `json:"flat_amount_decimal"`
		} `json:"tiers"`
	}
)

// validate checks the catalog before anything is sent.
func (c Catalog) validate() error {
	if len(c.Currency) != 3 || strings.ToLower(c.Currency) != c.Currency {
		return fmt.Errorf("currency must be a lower-case three-letter code, got %q", c.Currency)
	}
	if c.Meter == "" || len(c.Meter) > 100 {
		return errors.New("the meter event name must have 1 to 100 characters")
	}
	events, meters := map[string]bool{c.Meter: true}, map[string]bool{}
	for _, m := range c.Meters {
		switch {
		case m.Name == "" || meters[m.Name]:
			return fmt.Errorf("meter %q: a meter needs a name, once", m.Name)
		case m.Event == "" || len(m.Event) > 100:
			return fmt.Errorf("meter %q: the event name must have 1 to 100 characters", m.Name)
		case events[m.Event]:
			return fmt.Errorf("meter %q: event name %q is used by another meter", m.Name, m.Event)
		}
		events[m.Event], meters[m.Name] = true, true
	}
	keys := map[string]string{}
	for _, t := range c.Tiers {
		for _, k := range c.lookupKeys(t) {
			if other, dup := keys[k]; dup {
				return fmt.Errorf("the price lookup key %s of %s is also that of %s: rename a tier or a meter", k, t.Name, other)
			}
			keys[k] = t.Name
		}
		for _, m := range t.Meters {
			if !meters[m.Meter] {
				return fmt.Errorf("tier %q: meter %q is not in the catalog's meters", t.Name, m.Meter)
			}
			if m.IncludedUnits < 0 || m.OverageMicros <= 0 {
				return fmt.Errorf("tier %q meter %q: included units must not be negative and the overage price must be positive", t.Name, m.Meter)
			}
		}
	}
	seen := map[string]bool{}
	for _, t := range c.Tiers {
		switch {
		case t.Name == "":
			return errors.New("a tier has no name")
		case seen[t.Name]:
			return fmt.Errorf("tier %q appears twice", t.Name)
		case t.BaseMicros < 0 || t.OverageMicros < 0 || t.IncludedUnits < 0:
			return fmt.Errorf("tier %q: amounts and included units must not be negative", t.Name)
		case t.BaseMicros > 0 && !t.Custom && t.Interval != "month" && t.Interval != "year":
			return fmt.Errorf("tier %q: the base price interval must be month or year, got %q", t.Name, t.Interval)
		}
		for _, k := range c.lookupKeys(t) {
			if len(k) > 200 {
				return fmt.Errorf("tier %q: the name is too long for a Stripe lookup key (%s)", t.Name, k)
			}
		}
		seen[t.Name] = true
	}
	return nil
}

// lookupKeys are the lookup keys tier t's prices may have.
func (c Catalog) lookupKeys(t CatalogTier) []string {
	keys := []string{BaseLookupKey(t.Name), UsageLookupKey(t.Name)}
	for _, m := range t.Meters {
		keys = append(keys, MeterUsageLookupKey(t.Name, m.Meter))
	}
	return keys
}

// event is the event name of the meter named name.
func (c Catalog) event(name string) string {
	for _, m := range c.Meters {
		if m.Name == name {
			return m.Event
		}
	}
	return ""
}

// desiredPrices returns the prices tier t needs.
func (c Catalog) desiredPrices(t CatalogTier) []priceSpec {
	var out []priceSpec
	if !t.Custom && t.BaseMicros > 0 {
		out = append(out, priceSpec{
			tier: t.Name, lookupKey: BaseLookupKey(t.Name), interval: t.Interval,
			amount: MinorUnitDecimal(t.BaseMicros, c.Currency),
		})
	}
	if t.OverageMicros > 0 {
		out = append(out, priceSpec{
			tier: t.Name, lookupKey: UsageLookupKey(t.Name), interval: usageInterval, metered: true, event: c.Meter,
			amount: MinorUnitDecimal(t.OverageMicros, c.Currency),
			// Stripe's tiers need a positive up_to: without included units
			// the price is a plain per-unit price.
			tiered: t.IncludedUnits > 0, included: t.IncludedUnits,
		})
	}
	for _, m := range t.Meters {
		out = append(out, priceSpec{
			tier: t.Name, lookupKey: MeterUsageLookupKey(t.Name, m.Meter), interval: usageInterval, metered: true, event: c.event(m.Meter),
			amount: MinorUnitDecimal(m.OverageMicros, c.Currency),
			tiered: m.IncludedUnits > 0, included: m.IncludedUnits,
		})
	}
	return out
}

// PlanCatalog reads the meter, products and prices from Stripe and returns
// the steps that make them match cat. It creates nothing.
func PlanCatalog(ctx context.Context, sc *stripe.Client, cat Catalog) (*Plan, error) {
	if err := cat.validate(); err != nil {
		return nil, err
	}
	p := &Plan{catalog: cat, products: map[string]string{}, meterIDs: map[string]string{}}

	meters, err := listAll[stripeMeter](ctx, sc, "/v1/billing/meters", url.Values{"status": {"active"}})
	if err != nil {
		return nil, fmt.Errorf("listing meters: %w", err)
	}
	events := []string{cat.Meter}
	for _, m := range cat.Meters {
		events = append(events, m.Event)
	}
	for _, event := range events {
		for _, m := range meters {
			if m.EventName != event || m.Status != "active" {
				continue
			}
			if err := checkMeter(m); err != nil {
				return nil, err
			}
			p.meterIDs[event] = m.ID
			break
		}
		if p.meterIDs[event] == "" {
			p.Actions = append(p.Actions, Action{Kind: CreateMeter, Meter: event, Description: fmt.Sprintf(
				"create meter %q: sum of payload value, customer by payload stripe_customer_id", event)})
		}
	}

	products, err := listAll[stripeProduct](ctx, sc, "/v1/products", url.Values{})
	if err != nil {
		return nil, fmt.Errorf("listing products: %w", err)
	}
	created := map[string]int64{}
	for _, pr := range products {
		tier := pr.Metadata[TierMetadataKey]
		if tier == "" || !pr.Active {
			continue
		}
		// Several products of one tier (made by hand): the oldest wins.
		if id, ok := p.products[tier]; !ok || pr.Created < created[tier] || (pr.Created == created[tier] && pr.ID < id) {
			p.products[tier], created[tier] = pr.ID, pr.Created
		}
	}

	var keys []string
	for _, t := range cat.Tiers {
		keys = append(keys, cat.lookupKeys(t)...)
	}
	existing, err := pricesByLookupKey(ctx, sc, keys)
	if err != nil {
		return nil, fmt.Errorf("listing prices: %w", err)
	}

	for _, t := range cat.Tiers {
		if _, ok := p.products[t.Name]; !ok {
			p.Actions = append(p.Actions, Action{Kind: CreateProduct, Tier: t.Name, Description: fmt.Sprintf(
				"create product %q (metadata %s=%s)", t.Name, TierMetadataKey, t.Name)})
		}
		for _, want := range cat.desiredPrices(t) {
			a := Action{Kind: CreatePrice, Tier: t.Name, LookupKey: want.lookupKey, price: want}
			if have, ok := existing[want.lookupKey]; ok {
				why := p.differs(have, want)
				if why == "" {
					continue
				}
				a.Kind, a.Replaces, a.Why = ReplacePrice, have.ID, why
			}
			a.Description = p.describe(a)
			p.Actions = append(p.Actions, a)
		}
	}
	return p, nil
}

// checkMeter refuses a meter with the right event name but a shape the
// reporter's events do not fit; meters are immutable, so the sync cannot
// fix it.
func checkMeter(m stripeMeter) error {
	var bad []string
	if m.DefaultAggregation.Formula != "sum" {
		bad = append(bad, "aggregation "+m.DefaultAggregation.Formula+" (want sum)")
	}
	if k := m.CustomerMapping.EventPayloadKey; k != "stripe_customer_id" {
		bad = append(bad, "customer payload key "+k+" (want stripe_customer_id)")
	}
	if k := m.ValueSettings.EventPayloadKey; k != "" && k != "value" {
		bad = append(bad, "value payload key "+k+" (want value)")
	}
	if bad == nil {
		return nil
	}
	return fmt.Errorf("meter %s (%s) has %s; Stripe meters cannot be changed: deactivate it in the Dashboard and run the sync again, or configure another meter name",
		m.ID, m.EventName, strings.Join(bad, ", "))
}

// differs says how an existing price differs from the desired one, or ""
// when it matches.
func (p *Plan) differs(have stripePrice, want priceSpec) string {
	var d []string
	if !have.Active {
		d = append(d, "archived")
	}
	if have.Currency != p.catalog.Currency {
		d = append(d, "currency "+have.Currency)
	}
	if prod, ok := p.products[want.tier]; !ok || have.Product != prod {
		d = append(d, "product "+have.Product)
	}
	usage := "licensed"
	if want.metered {
		usage = "metered"
	}
	r := have.Recurring
	switch {
	case r == nil:
		d = append(d, "not recurring")
	default:
		if r.Interval != want.interval || (r.IntervalCount != 0 && r.IntervalCount != 1) {
			d = append(d, fmt.Sprintf("interval %d %s", r.IntervalCount, r.Interval))
		}
		if r.UsageType != usage {
			d = append(d, "usage type "+r.UsageType)
		}
		if want.metered && r.Meter != p.meterIDs[want.event] {
			d = append(d, "meter "+orNone(r.Meter))
		}
	}
	if want.tiered {
		ok := have.BillingScheme == "tiered" && have.TiersMode == "graduated" && len(have.Tiers) == 2
		if ok {
			t0, t1 := have.Tiers[0], have.Tiers[1]
			ok = t0.UpTo != nil && *t0.UpTo == want.included && t1.UpTo == nil &&
				amountOf(t0.UnitAmount, t0.UnitAmountDecimal) == "0" &&
				amountOf(t1.UnitAmount, t1.UnitAmountDecimal) == want.amount &&
				zeroOrNone(t0.FlatAmount, t0.FlatAmountDecimal) && zeroOrNone(t1.FlatAmount, t1.FlatAmountDecimal)
		}
		if !ok {
			d = append(d, "tiers")
		}
	} else {
		if have.BillingScheme != "per_unit" {
			d = append(d, "billing scheme "+have.BillingScheme)
		} else if a := amountOf(have.UnitAmount, have.UnitAmountDecimal); a != want.amount {
			d = append(d, "amount "+orNone(a))
		}
	}
	return strings.Join(d, ", ")
}

func (p *Plan) describe(a Action) string {
	s := a.price
	var what string
	if s.metered {
		if s.tiered {
			what = fmt.Sprintf("metered on %q, graduated: first %d units 0, then %s %s (minor units) per unit, per %s",
				s.event, s.included, s.amount, p.catalog.Currency, s.interval)
		} else {
			what = fmt.Sprintf("metered on %q, %s %s (minor units) per unit, per %s", s.event, s.amount, p.catalog.Currency, s.interval)
		}
	} else {
		what = fmt.Sprintf("%s %s (minor units) per %s", s.amount, p.catalog.Currency, s.interval)
	}
	if a.Kind == ReplacePrice {
		return fmt.Sprintf("replace price %s (%s; differs: %s) with a new price: %s", s.lookupKey, a.Replaces, a.Why, what)
	}
	return fmt.Sprintf("create price %s: %s", s.lookupKey, what)
}

// UpToDate reports whether the plan has nothing to do.
func (p *Plan) UpToDate() bool { return len(p.Actions) == 0 }

// Print writes the plan, one step per line, or that the catalog is up to
// date.
func (p *Plan) Print(w io.Writer) {
	if p.UpToDate() {
		fmt.Fprintf(w, "Stripe catalog is up to date (meter %q, %d tiers)\n", p.catalog.Meter, len(p.catalog.Tiers))
		return
	}
	fmt.Fprintf(w, "%d changes:\n", len(p.Actions))
	for _, a := range p.Actions {
		fmt.Fprintf(w, "  %s\n", a.Description)
	}
}

// Apply performs the plan's steps in order, writing one line per object
// created to w. It stops at the first error; running the sync again
// continues from what exists.
func (p *Plan) Apply(ctx context.Context, sc *stripe.Client, w io.Writer) error {
	cur := p.catalog.Currency
	for _, a := range p.Actions {
		switch a.Kind {
		case CreateMeter:
			m, err := sc.V1BillingMeters.Create(ctx, &stripe.BillingMeterCreateParams{
				DisplayName:        stripe.String(a.Meter),
				EventName:          stripe.String(a.Meter),
				DefaultAggregation: &stripe.BillingMeterCreateDefaultAggregationParams{Formula: stripe.String("sum")},
				CustomerMapping: &stripe.BillingMeterCreateCustomerMappingParams{
					Type: stripe.String("by_id"), EventPayloadKey: stripe.String("stripe_customer_id"),
				},
				ValueSettings: &stripe.BillingMeterCreateValueSettingsParams{EventPayloadKey: stripe.String("value")},
			})
			if err != nil {
				return fmt.Errorf("creating meter %q: %w", a.Meter, err)
			}
			p.meterIDs[a.Meter] = m.ID
			fmt.Fprintf(w, "created meter %s (%s)\n", m.ID, a.Meter)
		case CreateProduct:
			pr, err := sc.V1Products.Create(ctx, &stripe.ProductCreateParams{
				Name:     stripe.String(a.Tier),
				Metadata: map[string]string{TierMetadataKey: a.Tier},
			})
			if err != nil {
				return fmt.Errorf("creating product %q: %w", a.Tier, err)
			}
			p.products[a.Tier] = pr.ID
			fmt.Fprintf(w, "created product %s (%s)\n", pr.ID, a.Tier)
		case CreatePrice, ReplacePrice:
			s := a.price
			params := &stripe.PriceCreateParams{
				Currency:  stripe.String(cur),
				Product:   stripe.String(p.products[a.Tier]),
				LookupKey: stripe.String(s.lookupKey),
				Recurring: &stripe.PriceCreateRecurringParams{Interval: stripe.String(s.interval)},
				Metadata:  map[string]string{TierMetadataKey: a.Tier},
			}
			if a.Kind == ReplacePrice {
				params.TransferLookupKey = stripe.Bool(true)
			}
			// Decimal amounts go as exact strings: stripe-go's
			// UnitAmountDecimal fields are float64.
			if s.metered {
				params.Recurring.UsageType = stripe.String("metered")
				params.Recurring.Meter = stripe.String(p.meterIDs[s.event])
			} else {
				params.Recurring.UsageType = stripe.String("licensed")
			}
			if s.tiered {
				params.BillingScheme = stripe.String("tiered")
				params.TiersMode = stripe.String("graduated")
				params.Tiers = []*stripe.PriceCreateTierParams{
					{UpTo: stripe.Int64(s.included)},
					{UpToInf: stripe.Bool(true)},
				}
				params.AddExtra("tiers[0][unit_amount_decimal]", "0")
				params.AddExtra("tiers[1][unit_amount_decimal]", s.amount)
			} else {
				params.BillingScheme = stripe.String("per_unit")
				params.AddExtra("unit_amount_decimal", s.amount)
			}
			pr, err := sc.V1Prices.Create(ctx, params)
			if err != nil {
				return fmt.Errorf("creating price %s: %w", s.lookupKey, err)
			}
			if a.Kind == ReplacePrice {
				fmt.Fprintf(w, "created price %s (%s), lookup key moved from %s\n", pr.ID, s.lookupKey, a.Replaces)
			} else {
				fmt.Fprintf(w, "created price %s (%s)\n", pr.ID, s.lookupKey)
			}
		}
	}
	return nil
}

// SyncCatalog plans the catalog, prints the plan to w and, unless dryRun,
// applies it.
func SyncCatalog(ctx context.Context, sc *stripe.Client, cat Catalog, dryRun bool, w io.Writer) (*Plan, error) {
	p, err := PlanCatalog(ctx, sc, cat)
	if err != nil {
		return nil, err
	}
	p.Print(w)
	if p.UpToDate() {
		return p, nil
	}
	if dryRun {
		fmt.Fprintln(w, "dry run: nothing was created")
		return p, nil
	}
	return p, p.Apply(ctx, sc, w)
}

// listAll reads every page of a Stripe list endpoint.
func listAll[T interface{ id() string }](ctx context.Context, sc *stripe.Client, path string, q url.Values) ([]T, error) {
	var out []T
	q.Set("limit", "100")
	for {
		var page listPage[T]
		if err := sc.V1Prices.B.CallRaw(http.MethodGet, path, sc.V1Prices.Key, []byte(q.Encode()), &stripe.Params{Context: ctx}, &page); err != nil {
			return nil, err
		}
		out = append(out, page.Data...)
		if !page.HasMore || len(page.Data) == 0 {
			return out, nil
		}
		q.Set("starting_after", page.Data[len(page.Data)-1].id())
	}
}

func (p stripeProduct) id() string { return p.ID }
func (m stripeMeter) id() string   { return m.ID }
func (p stripePrice) id() string   { return p.ID }

// pricesByLookupKey returns the prices holding keys, with their tiers.
func pricesByLookupKey(ctx context.Context, sc *stripe.Client, keys []string) (map[string]stripePrice, error) {
	out := map[string]stripePrice{}
	for len(keys) > 0 {
		n := min(len(keys), 10) // Stripe takes at most 10 lookup keys per request
		q := url.Values{"expand[0]": {"data.tiers"}}
		for i, k := range keys[:n] {
			q.Set("lookup_keys["+strconv.Itoa(i)+"]", k)
		}
		keys = keys[n:]
		prices, err := listAll[stripePrice](ctx, sc, "/v1/prices", q)
		if err != nil {
			return nil, err
		}
		for _, pr := range prices {
			if pr.LookupKey != "" {
				out[pr.LookupKey] = pr
			}
		}
	}
	return out, nil
}

// Currencies whose minor unit is not a hundredth, per Stripe's list of
// zero-decimal and three-decimal currencies.
var minorDigits = map[string]int{
	"bif": 0, "clp": 0, "djf": 0, "gnf": 0, "jpy": 0, "kmf": 0, "krw": 0, "mga": 0,
	"pyg": 0, "rwf": 0, "ugx": 0, "vnd": 0, "vuv": 0, "xaf": 0, "xof": 0, "xpf": 0,
	"bhd": 3, "jod": 3, "kwd": 3, "omr": 3, "tnd": 3,
}

// MinorUnitDecimal converts micros (millionths of the currency's major
// unit) into a Stripe unit_amount_decimal string in the currency's minor
// unit, exactly, with integer arithmetic: 49000000 usd → "4900", 2000 usd →
// "0.2", 1000 usd → "0.1", 2000 jpy → "0.002".
func MinorUnitDecimal(micros int64, currency string) string {
	digits, ok := minorDigits[currency]
	if !ok {
		digits = 2
	}
	scale := int64(1)
	for range 6 - digits {
		scale *= 10
	}
	whole, frac := micros/scale, micros%scale
	s := strconv.FormatInt(whole, 10)
	if frac == 0 {
		return s
	}
	f := strconv.FormatInt(frac, 10)
	f = strings.Repeat("0", 6-digits-len(f)) + f
	return s + "." + strings.TrimRight(f, "0")
}

// canonDecimal returns a non-negative decimal string without leading zeros
// in its integer part or trailing zeros in its fraction ("0049.500" →
// "49.5"), or "" when s is not such a decimal.
func canonDecimal(s string) string {
	whole, frac, _ := strings.Cut(s, ".")
	if whole == "" || strings.Trim(whole, "0123456789") != "" || strings.Trim(frac, "0123456789") != "" {
		return ""
	}
	whole = strings.TrimLeft(whole, "0")
	if whole == "" {
		whole = "0"
	}
	if frac = strings.TrimRight(frac, "0"); frac != "" {
		return whole + "." + frac
	}
	return whole
}

// amountOf is a Stripe amount as a canonical decimal string: the decimal
// field when present, else the integer one, else "".
func amountOf(unit *int64, dec *string) string {
	if dec != nil && *dec != "" {
		return canonDecimal(*dec)
	}
	if unit != nil {
		return strconv.FormatInt(*unit, 10)
	}
	return ""
}

func zeroOrNone(unit *int64, dec *string) bool {
	a := amountOf(unit, dec)
	return a == "" || a == "0"
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}
