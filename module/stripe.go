package module

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"regexp"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/apimonetize/caddy-api-monetize/store"
	"github.com/apimonetize/caddy-api-monetize/stripereport"
)

// Stripe defaults.
const (
	defaultStripeMeter   = "api_calls"
	defaultReportEvery   = time.Hour
	defaultSettleGrace   = 2 * time.Minute
	defaultPastDueGrace  = 72 * time.Hour
	stripeRequestTimeout = 30 * time.Second
)

// The reporter's lease timing, in nanoseconds; atomic because tests shorten
// them while loops of earlier configs still run.
var (
	// stripeLeaseEvery is how often the reporter takes or renews its lease
	// (and so how soon a waiting instance takes over after a release).
	stripeLeaseEvery = newAtomicDuration(30 * time.Second)
	// stripeLeaseTTL is how long the lease lasts without renewal: an
	// instance that dies holding it hands over after this long.
	stripeLeaseTTL = newAtomicDuration(5 * time.Minute)
)

func newAtomicDuration(d time.Duration) *atomic.Int64 {
	v := new(atomic.Int64)
	v.Store(int64(d))
	return v
}

var (
	stripeSecretPattern  = regexp.MustCompile(`^(sk|rk)_(test|live)_[A-Za-z0-9]+$`)
	webhookSecretPattern = regexp.MustCompile(`^whsec_[A-Za-z0-9+/=_-]+$`)
	// stripeNamespacePattern is what a configured identifier namespace may
	// hold.
	stripeNamespacePattern = regexp.MustCompile(`^[A-Za-z0-9._:/-]{1,100}$`)
)

// stripeSettings is the Stripe configuration with placeholders replaced and
// defaults applied.
type stripeSettings struct {
	secretKey     string
	apiBase       string
	meter         string
	reportEvery   time.Duration
	settleGrace   time.Duration
	namespace     string
	webhookSecret string
	pastDueGrace  time.Duration
	downgradeTo   string
}

// stripeSettings validates the app's Stripe configuration.
func (a *App) stripeSettings() (stripeSettings, error) {
	c := a.Stripe
	repl := caddy.NewReplacer()
	s := stripeSettings{
		secretKey: repl.ReplaceAll(c.SecretKey, ""), apiBase: repl.ReplaceAll(c.APIBase, ""),
		meter: c.Meter, reportEvery: time.Duration(c.ReportEvery), settleGrace: defaultSettleGrace,
		namespace: repl.ReplaceAll(c.Namespace, ""), webhookSecret: repl.ReplaceAll(c.WebhookSecret, ""), pastDueGrace: time.Duration(c.PastDueGrace),
		downgradeTo: c.DowngradeTo,
	}
	if s.secretKey == "" {
		return s, errors.New("stripe: secret_key is required (is STRIPE_SECRET_KEY set?)")
	}
	if !stripeSecretPattern.MatchString(s.secretKey) {
		return s, errors.New("stripe: secret_key must be a Stripe secret or restricted key (sk_test_…, sk_live_…, rk_…)")
	}
	if s.meter == "" {
		s.meter = defaultStripeMeter
	}
	if len(s.meter) > 100 {
		return s, errors.New("stripe: meter event names are at most 100 characters")
	}
	if s.reportEvery == 0 {
		s.reportEvery = defaultReportEvery
	}
	if c.SettleGrace != nil {
		s.settleGrace = time.Duration(*c.SettleGrace) // 0 is zero, not the default
	}
	if s.pastDueGrace == 0 {
		s.pastDueGrace = defaultPastDueGrace
	}
	if s.reportEvery < 0 || s.settleGrace < 0 || s.pastDueGrace < 0 {
		return s, errors.New("stripe: report_every, settle_grace and past_due_grace must not be negative")
	}
	if c.Namespace != "" && !stripeNamespacePattern.MatchString(s.namespace) {
		return s, errors.New("stripe: namespace: expected 1 to 100 letters, digits or . _ : / -")
	}
	if s.webhookSecret != "" && !webhookSecretPattern.MatchString(s.webhookSecret) {
		return s, errors.New("stripe: webhook_secret must be the endpoint's signing secret (whsec_…)")
	}
	if s.downgradeTo != "" {
		if _, ok := a.tierByName[s.downgradeTo]; !ok {
			return s, fmt.Errorf("stripe: downgrade_to: unknown tier %q", s.downgradeTo)
		}
	}
	return s, nil
}

// provisionStripe validates the Stripe configuration and adds the usage
// reporter to the app's background tasks.
func (a *App) provisionStripe(ctx caddy.Context) error {
	if a.Stripe == nil {
		return nil
	}
	s, err := a.stripeSettings()
	if err != nil {
		return err
	}
	if err := registerStripeMetrics(ctx.GetMetricsRegistry()); err != nil {
		return err
	}
	rep := a.newReporter(s)
	run := &stripeRunner{passes: make(chan func(context.Context)), done: make(chan struct{})}
	run.pass = func(ctx context.Context) (stripereport.Result, error) { return a.reportPass(ctx, rep) }
	a.stripeRun = run
	a.tasks = append(a.tasks, func(ctx context.Context) { a.runReporter(ctx, rep, s, run) })
	if s.downgradeTo != "" {
		a.tasks = append(a.tasks, func(ctx context.Context) { a.pastDueLoop(ctx, s) })
	}
	return nil
}

// newReporter builds the usage reporter of this app instance. Its lease
// holder is unique per instance, so the old and the new app of a reload
// never report at the same time.
func (a *App) newReporter(s stripeSettings) *stripereport.Reporter {
	return &stripereport.Reporter{
		Client:      stripereport.NewClient(s.secretKey, s.apiBase, stripeRequestTimeout),
		Meter:       s.meter,
		Meters:      a.meterEvents(),
		Namespace:   s.namespace,
		SettleGrace: s.settleGrace,
		Holder:      hex.EncodeToString(newSecret()[:12]),
		LeaseTTL:    time.Duration(stripeLeaseTTL.Load()),
		Periods:     a.reportPeriods,
		Retry:       stripereport.DefaultRetry,
		MinInterval: 50 * time.Millisecond,
		Logger:      a.logger.Named("stripe"),
	}
}

// meterEvents are the meters reported besides the default one, with
// their Stripe event names.
func (a *App) meterEvents() []stripereport.MeterEvent {
	var out []stripereport.MeterEvent
	for _, m := range a.meters {
		out = append(out, stripereport.MeterEvent{Meter: m.name, Event: m.stripeEvent})
	}
	return out
}

// reportPeriods are the ids of a customer's current and previous periods:
// the previous period's last hours are reported after it ends.
func (a *App) reportPeriods(c store.Customer, now time.Time) []string {
	t := a.tierByName[c.Tier]
	if t == nil {
		return nil // a tier no longer configured: its periods are unknown
	}
	cur := t.periodRule.Period(now, c.BillingAnchor())
	prev := t.periodRule.Period(cur.Start.Add(-time.Second), c.BillingAnchor())
	if prev.Start.Equal(cur.Start) { // before an anniversary anchor
		return []string{cur.ID()}
	}
	return []string{prev.ID(), cur.ID()}
}

// stripeRunner lets the admin API ask the running reporter for a pass
// (POST /api_monetize/stripe/report), so that passes never overlap and the
// pass uses the reporter's own lease.
type stripeRunner struct {
	// passes carries requests for a pass, run in the reporter's loop.
	passes chan func(context.Context)
	// pass runs one pass.
	pass func(context.Context) (stripereport.Result, error)
	// done is closed when the reporter loop has returned.
	done chan struct{}
}

// stripePass is the outcome of one reporter pass.
type stripePass struct {
	res stripereport.Result
	err error
}

// runReporter reports every report_every and renews the lease every
// stripeLeaseEvery; while it does not hold the lease it tries to take it
// (and report) at the shorter of the two. It also runs the passes the admin
// API asks for. On stop it releases the lease so the next instance (the
// new config of a reload) takes over at once.
func (a *App) runReporter(ctx context.Context, rep *stripereport.Reporter, s stripeSettings, run *stripeRunner) {
	defer close(run.done)
	logger := a.logger.Named("stripe")
	leaseEvery := time.Duration(stripeLeaseEvery.Load())
	store.LeasedLoop{
		Lease:   rep.Lease(),
		Records: func() (store.Records, error) { return a.store() },
		Run: func(ctx context.Context) time.Duration {
			res, _ := a.reportPass(ctx, rep)
			if !res.Leader {
				return min(s.reportEvery, leaseEvery)
			}
			return s.reportEvery
		},
		RenewEvery: leaseEvery,
		OnRenewError: func(err error) {
			logger.Warn("could not renew the Stripe reporter lease", zap.Error(err))
		},
		Requests: run.passes,
	}.Loop(ctx)
}

// pastDueLoop downgrades customers whose past_due_grace ran out (see
// applyPastDue) every stripeLeaseEvery, until ctx is done. Every instance
// runs it: it is idempotent.
func (a *App) pastDueLoop(ctx context.Context, s stripeSettings) {
	every := time.Duration(stripeLeaseEvery.Load())
	for wait := time.NewTimer(every); ; wait.Reset(every) {
		select {
		case <-ctx.Done():
			wait.Stop()
			return
		case <-wait.C:
		}
		if st, err := a.store(); err == nil {
			a.applyPastDue(ctx, st, s)
		}
	}
}

// reportPass runs one reporter pass when the store is available and
// updates the metrics when this instance led it.
func (a *App) reportPass(ctx context.Context, rep *stripereport.Reporter) (stripereport.Result, error) {
	logger := a.logger.Named("stripe")
	st, err := a.store()
	if err != nil {
		logger.Warn("store not available", zap.Error(err))
		return stripereport.Result{}, err
	}
	rep.Store = st
	res, err := rep.Tick(ctx)
	if res.Leader {
		m := getStripeMetrics()
		m.setUnreported(res, rep.Meters)
		m.events.WithLabelValues(stripereport.StateSent).Add(float64(res.Sent))
		m.events.WithLabelValues(stripereport.StateFailed).Add(float64(res.Failed))
		m.events.WithLabelValues(stripereport.StateTooOld).Add(float64(res.TooOld))
	}
	if err != nil && ctx.Err() == nil {
		logger.Error("reporting usage to Stripe", zap.Error(err))
	}
	return res, err
}

// stripeMetrics are the reporter's process-wide collectors.
type stripeMetrics struct {
	unreported prometheus.Gauge
	// unreportedMeter is unreported split by meter (label meter: cost for
	// the default meter, else the meter's name).
	unreportedMeter *prometheus.GaugeVec
	events          *prometheus.CounterVec
}

// setUnreported sets the unreported gauges from a pass's result: the
// total, and each configured meter's share (0 when it has none); a meter
// no longer configured loses its series.
func (m *stripeMetrics) setUnreported(res stripereport.Result, meters []stripereport.MeterEvent) {
	m.unreported.Set(float64(res.Unreported))
	m.unreportedMeter.Reset()
	m.unreportedMeter.WithLabelValues(store.DefaultMeter).Set(float64(res.UnreportedByMeter[""]))
	for _, me := range meters {
		m.unreportedMeter.WithLabelValues(me.Meter).Set(float64(res.UnreportedByMeter[me.Meter]))
	}
}

var (
	stripeMetricsOnce sync.Once
	stripeMetricsVal  *stripeMetrics
)

func getStripeMetrics() *stripeMetrics {
	stripeMetricsOnce.Do(func() {
		stripeMetricsVal = &stripeMetrics{
			unreported: prometheus.NewGauge(prometheus.GaugeOpts{
				Namespace: "caddy", Subsystem: "api_monetize", Name: "unreported_units",
				Help: "Billed units of closed hours that Stripe has not accepted (failed, left for the next run, too old to send, or settled after the hour was sent), as of the reporter's last run.",
			}),
			unreportedMeter: prometheus.NewGaugeVec(prometheus.GaugeOpts{
				Namespace: "caddy", Subsystem: "api_monetize", Name: "unreported_meter_units",
				Help: "unreported_units by meter (cost: the default meter), as of the reporter's last run.",
			}, []string{"meter"}),
			events: prometheus.NewCounterVec(prometheus.CounterOpts{
				Namespace: "caddy", Subsystem: "api_monetize", Name: "stripe_hours_total",
				Help: "Ledger hours handled by the Stripe reporter, by outcome: sent, failed (retried later) or too_old (never sent).",
			}, []string{"outcome"}),
		}
	})
	return stripeMetricsVal
}

func registerStripeMetrics(reg prometheus.Registerer) error {
	if reg == nil {
		return nil
	}
	m := getStripeMetrics()
	for _, c := range []prometheus.Collector{m.unreported, m.unreportedMeter, m.events} {
		if err := reg.Register(c); err != nil {
			var already prometheus.AlreadyRegisteredError
			if !errors.As(err, &already) {
				return err
			}
		}
	}
	return nil
}
