package module

import (
	"errors"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// Decisions recorded by caddy_api_monetize_requests_total.
const (
	decisionAllowed      = "allowed"
	decisionRateLimited  = "rate_limited"
	decisionForbidden    = "forbidden"
	decisionUnauthorized = "unauthorized"
	// decisionAuthThrottled: answered 429 because the client address made
	// too many failed authentications (auth_failures).
	decisionAuthThrottled = "auth_throttled"
	// decisionDegraded: admitted while the store was unavailable
	// (on_store_error local or allow).
	decisionDegraded = "degraded_allowed"
	// decisionUnavailable: answered 503 because the store was unavailable.
	decisionUnavailable = "store_unavailable"
	// decisionOverloaded: answered 503 because this process could not send
	// the store call in time (its own queue or connection pool was
	// saturated); nothing was decided without the store.
	decisionOverloaded = "overloaded"
)

// metrics are created once per process and registered into every config's
// registry, so series continue across reloads. Labels are bounded: tier
// and decision, never key or customer.
type metrics struct {
	requests    *prometheus.CounterVec
	units       *prometheus.CounterVec
	storeErrors *prometheus.CounterVec
	spooled     prometheus.Counter
	replayed    prometheus.Counter
	lostUsage   prometheus.Counter
	// ignoredUsage counts meter header values that were not whole numbers
	// ≥ 0, by tier and meter (meter names come from the configuration).
	ignoredUsage *prometheus.CounterVec
	// meterUnits counts the units of the meters other than the default
	// one, by tier and meter.
	meterUnits *prometheus.CounterVec
	// liveInstances is how many instances the shared store last counted.
	liveInstances prometheus.Gauge
}

var (
	globalMetrics     *metrics
	globalMetricsOnce sync.Once
)

func getMetrics() *metrics {
	globalMetricsOnce.Do(func() {
		const ns, sub = "caddy", "api_monetize"
		globalMetrics = &metrics{
			requests: prometheus.NewCounterVec(prometheus.CounterOpts{
				Namespace: ns, Subsystem: sub, Name: "requests_total",
				Help: "Requests seen by the api_monetize handler, by tier and decision.",
			}, []string{"tier", "decision"}),
			units: prometheus.NewCounterVec(prometheus.CounterOpts{
				Namespace: ns, Subsystem: sub, Name: "admitted_units_total",
				Help: "Cost units admitted by the rate limiter, by tier.",
			}, []string{"tier"}),
			storeErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
				Namespace: ns, Subsystem: sub, Name: "store_errors_total",
				Help: "Store calls that failed while serving requests, by operation.",
			}, []string{"operation"}),
			spooled: prometheus.NewCounter(prometheus.CounterOpts{
				Namespace: ns, Subsystem: sub, Name: "spooled_records_total",
				Help: "Usage records kept locally while the store was unavailable (the spool; memory for the embedded store).",
			}),
			replayed: prometheus.NewCounter(prometheus.CounterOpts{
				Namespace: ns, Subsystem: sub, Name: "replayed_records_total",
				Help: "Usage records kept locally and replayed into the store.",
			}),
			lostUsage: prometheus.NewCounter(prometheus.CounterOpts{
				Namespace: ns, Subsystem: sub, Name: "lost_usage_records_total",
				Help: "Usage records that could be neither stored nor kept for replay (spool or in-memory buffer full, or kept in memory when Caddy stopped).",
			}),
			ignoredUsage: prometheus.NewCounterVec(prometheus.CounterOpts{
				Namespace: ns, Subsystem: sub, Name: "ignored_usage_values_total",
				Help: "Meter header values a trusted upstream sent that were not whole numbers of at least 0, ignored (the meter kept its reserved amount), by tier and meter.",
			}, []string{"tier", "meter"}),
			meterUnits: prometheus.NewCounterVec(prometheus.CounterOpts{
				Namespace: ns, Subsystem: sub, Name: "meter_units_total",
				Help: "Units counted for the meters other than the default one (tokens, bytes), by tier and meter: each admitted request's final amount once its response is known (0 for a response outside bill_on). The default meter's cost units are in admitted_units_total.",
			}, []string{"tier", "meter"}),
			liveInstances: prometheus.NewGauge(prometheus.GaugeOpts{
				Namespace: ns, Subsystem: sub, Name: "live_instances",
				Help: "Instances sharing the Redis store at its last heartbeat; each takes this share of a budget while Redis is unreachable.",
			}),
		}
	})
	return globalMetrics
}

// registerMetrics registers the process-wide collectors into reg (a new
// registry per config load). A nil registry is tolerated.
func registerMetrics(reg prometheus.Registerer) error {
	if reg == nil {
		return nil
	}
	m := getMetrics()
	for _, c := range []prometheus.Collector{m.requests, m.units, m.storeErrors, m.spooled, m.replayed, m.lostUsage, m.ignoredUsage, m.meterUnits, m.liveInstances} {
		if err := reg.Register(c); err != nil {
			var already prometheus.AlreadyRegisteredError
			if !errors.As(err, &already) {
				return err
			}
		}
	}
	return nil
}

// tierMetrics are one tier's counters, resolved once so the request path
// does no label lookups.
type tierMetrics struct {
	allowed, rateLimited, forbidden, degraded, unavailable, overloaded prometheus.Counter
	units                                                              prometheus.Counter
}

func newTierMetrics(tier string) tierMetrics {
	m := getMetrics()
	return tierMetrics{
		allowed:     m.requests.WithLabelValues(tier, decisionAllowed),
		rateLimited: m.requests.WithLabelValues(tier, decisionRateLimited),
		forbidden:   m.requests.WithLabelValues(tier, decisionForbidden),
		degraded:    m.requests.WithLabelValues(tier, decisionDegraded),
		unavailable: m.requests.WithLabelValues(tier, decisionUnavailable),
		overloaded:  m.requests.WithLabelValues(tier, decisionOverloaded),
		units:       m.units.WithLabelValues(tier),
	}
}
