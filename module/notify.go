package module

import (
	"context"
	"encoding/hex"
	"fmt"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/notify"
	"github.com/apimonetize/caddy-api-monetize/notify/notifier"
	"github.com/apimonetize/caddy-api-monetize/store"
)

// The notifier's timing. Tests shorten them.
var (
	// notifyInterval is how often the notifier looks for new threshold
	// events and due deliveries.
	notifyInterval = 2 * time.Second
	// notifyLeaseTTL is how long the notifier's lease lasts without
	// renewal; an instance that stops without releasing it (a crash) hands
	// over after this long.
	notifyLeaseTTL = 30 * time.Second
	// notifyRetry schedules failed deliveries.
	notifyRetry = notify.DefaultRetry
	// notifyAttemptTimeout bounds one delivery attempt.
	notifyAttemptTimeout = 15 * time.Second
	// notifyStopGrace is how long an attempt in flight may go on once the
	// app stops.
	notifyStopGrace = 2 * time.Second
)

// provisionNotify validates the notification channels and adds the
// notifier to the app's background tasks.
func (a *App) provisionNotify(_ caddy.Context) error {
	if a.Notify == nil {
		return nil
	}
	repl := caddy.NewReplacer()
	n := &notifier.Notifier{
		Holder: hex.EncodeToString(newSecret()[:12]), Logger: a.logger.Named("notify"),
		Webhooks: make(map[string]notify.Webhook),
		Payload:  func(c store.Customer, ev store.ThresholdEvent) []byte { return a.notificationPayload(c, ev).Marshal() },
		LeaseTTL: notifyLeaseTTL, Retry: notifyRetry, AttemptTimeout: notifyAttemptTimeout, StopGrace: notifyStopGrace,
		KeyScanInterval: time.Duration(keyExpiryScanInterval.Load()), Now: clockNow,
	}
	for i, w := range a.Notify.Webhooks {
		u := repl.ReplaceAll(w.URL, "")
		if err := notify.CheckURL(u); err != nil {
			return fmt.Errorf("notify: webhook #%d %q: %v", i+1, u, err)
		}
		key, err := notify.ParseSecret(repl.ReplaceAll(w.Secret, ""))
		if err != nil {
			return fmt.Errorf("notify: webhook %s: secret (is its environment variable set?): %v", u, err)
		}
		ch := notifier.WebhookChannel(u)
		if _, dup := n.Webhooks[ch]; dup {
			return fmt.Errorf("notify: webhook %s is configured twice", u)
		}
		n.Webhooks[ch] = notify.Webhook{URL: u, Key: key}
		n.Channels = append(n.Channels, ch)
	}
	if e := a.Notify.Email; e != nil {
		s := &notify.SMTP{
			Addr: repl.ReplaceAll(e.SMTP, ""), From: repl.ReplaceAll(e.From, ""),
			Username: repl.ReplaceAll(e.Username, ""), Password: repl.ReplaceAll(e.Password, ""),
		}
		if err := notify.CheckSMTP(s.Addr, s.From); err != nil {
			return fmt.Errorf("notify: email: %v", err)
		}
		n.Email = s
	}
	if len(n.Channels) == 0 && n.Email == nil {
		return nil
	}
	loop := store.LeasedLoop{
		Lease:   n.Lease(),
		Records: func() (store.Records, error) { return a.store() },
		Run: func(ctx context.Context) time.Duration {
			if st, err := a.store(); err != nil {
				n.Logger.Warn("store not available", zap.Error(err))
			} else {
				n.Tick(ctx, st)
			}
			return notifyInterval
		},
	}
	a.tasks = append(a.tasks, loop.Loop)
	return nil
}

// notificationPayload builds an event's payload with the customer's
// current tier.
func (a *App) notificationPayload(c store.Customer, ev store.ThresholdEvent) notify.Payload {
	var period notify.Period
	if start, err := metering.ParseTimeID(ev.PeriodID); err == nil {
		period.Start = start
	}
	policy := ""
	if t, ok := a.tierByName[c.Tier]; ok {
		policy = t.quotaMode
		if ev.Meter != "" {
			policy = ""
			for _, tm := range t.meters {
				if tm.name == ev.Meter {
					policy = tm.quota.quotaMode
				}
			}
		}
		if !period.Start.IsZero() {
			period.End = t.periodRule.Period(period.Start, c.BillingAnchor()).End
		}
	}
	p := notify.NewPayload(ev.Subject, c.Tier, period, ev.Used, ev.Included, ev.Threshold, policy, ev.At)
	if ev.Meter != "" {
		p = p.ForMeter(ev.Meter)
	}
	return p
}
