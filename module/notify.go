package module

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/notify"
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

const (
	// recordKindNotification is the store record kind of notifications;
	// their ids are "<event id>|<channel>".
	recordKindNotification = "notification"
	// notifierLease is the name of the lease the sending instance holds.
	notifierLease = "notifier"
	// channelEmail names the email channel; webhook channels are
	// "webhook:<8 hex digits of the URL's SHA-256>".
	channelEmail = "email"
)

// Delivery states of a notification.
const (
	statePending   = "pending"
	stateDelivered = "delivered"
	stateDead      = "dead"
)

// notification is the stored state of one (threshold event, channel).
type notification struct {
	// ID is "<event id>|<channel>": the webhook-id of every attempt.
	ID string `json:"id"`
	// Channel is "email" or "webhook:<hash>".
	Channel string `json:"channel"`
	// Target is the webhook URL or the email address.
	Target string `json:"target"`
	// Event is the threshold event notified. For other types only its ID,
	// Subject (the customer) and At are set.
	Event store.ThresholdEvent `json:"event"`
	// Type is empty for a threshold notification, else the payload's type
	// (notify.KeyExpiringType).
	Type string `json:"type,omitempty"`
	// Payload is the JSON body, fixed when the notification is created so
	// that every attempt sends the same bytes.
	Payload json.RawMessage `json:"payload"`
	// State is pending, delivered or dead.
	State string `json:"state"`
	// Attempts counts delivery attempts since creation or the last
	// replay.
	Attempts    int       `json:"attempts"`
	CreatedAt   time.Time `json:"created_at"`
	FirstTry    time.Time `json:"first_attempt_at,omitzero"`
	LastTry     time.Time `json:"last_attempt_at,omitzero"`
	NextTry     time.Time `json:"next_attempt_at,omitzero"`
	DeliveredAt time.Time `json:"delivered_at,omitzero"`
	LastError   string    `json:"last_error,omitempty"`
}

// notifier turns threshold events into notifications and delivers them.
// One runs per app; the lease lets one instance at a time work.
type notifier struct {
	app      *App
	holder   string
	webhooks map[string]notify.Webhook // by channel
	channels []string                  // webhook channels in configuration order
	email    *notify.SMTP
	logger   *zap.Logger

	// created are the event ids whose notifications exist, so that only
	// new events are written.
	mu      sync.Mutex
	created map[string]bool
	// keyScan announces keys about to expire (see keyexpiry.go).
	keyScan keyExpiryScan
}

// provisionNotify validates the notification channels and adds the
// notifier to the app's background tasks.
func (a *App) provisionNotify(_ caddy.Context) error {
	if a.Notify == nil {
		return nil
	}
	repl := caddy.NewReplacer()
	n := &notifier{
		app: a, holder: hex.EncodeToString(newSecret()[:12]), logger: a.logger.Named("notify"),
		webhooks: make(map[string]notify.Webhook), created: make(map[string]bool),
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
		ch := webhookChannel(u)
		if _, dup := n.webhooks[ch]; dup {
			return fmt.Errorf("notify: webhook %s is configured twice", u)
		}
		n.webhooks[ch] = notify.Webhook{URL: u, Key: key}
		n.channels = append(n.channels, ch)
	}
	if e := a.Notify.Email; e != nil {
		s := &notify.SMTP{
			Addr: repl.ReplaceAll(e.SMTP, ""), From: repl.ReplaceAll(e.From, ""),
			Username: repl.ReplaceAll(e.Username, ""), Password: repl.ReplaceAll(e.Password, ""),
		}
		if err := notify.CheckSMTP(s.Addr, s.From); err != nil {
			return fmt.Errorf("notify: email: %v", err)
		}
		n.email = s
	}
	if len(n.channels) == 0 && n.email == nil {
		return nil
	}
	a.tasks = append(a.tasks, n.run)
	return nil
}

// webhookChannel names a webhook's channel after its URL, so that a
// notification keeps its channel across reloads that reorder webhooks.
func webhookChannel(url string) string {
	sum := sha256.Sum256([]byte(url))
	return "webhook:" + hex.EncodeToString(sum[:4])
}

// run works every notifyInterval until ctx is done, then gives up the
// lease so that the next instance (the new config of a reload) takes over
// at once.
func (n *notifier) run(ctx context.Context) {
	t := time.NewTicker(notifyInterval)
	defer t.Stop()
	for {
		n.tick(ctx)
		select {
		case <-ctx.Done():
			if st, err := n.app.store(); err == nil {
				rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
				_ = st.ReleaseLease(rctx, notifierLease, n.holder)
				cancel()
			}
			return
		case <-t.C:
		}
	}
}

// tick takes or renews the lease, creates the notifications of new
// threshold events and delivers those that are due.
func (n *notifier) tick(ctx context.Context) {
	st, err := n.app.store()
	if err != nil {
		n.logger.Warn("store not available", zap.Error(err))
		return
	}
	if ok, err := st.TryLease(ctx, notifierLease, n.holder, notifyLeaseTTL); err != nil || !ok {
		if err != nil && ctx.Err() == nil {
			n.logger.Warn("could not take the notifier lease", zap.Error(err))
		}
		return
	}
	if err := n.createAll(ctx, st); err != nil && ctx.Err() == nil {
		n.logger.Error("could not create notifications", zap.Error(err))
	}
	if err := n.announceExpiringKeys(ctx, st); err != nil && ctx.Err() == nil {
		n.logger.Error("could not create key expiry notifications", zap.Error(err))
	}
	if err := n.deliverDue(ctx, st); err != nil && ctx.Err() == nil {
		n.logger.Error("could not deliver notifications", zap.Error(err))
	}
}

// createAll writes one notification per channel for every threshold event
// not yet seen. PutRecord with onlyIfAbsent makes creation exactly once,
// whichever instance sees the event first.
func (n *notifier) createAll(ctx context.Context, st store.Store) error {
	events, err := st.ThresholdEvents(ctx, "")
	if err != nil {
		return err
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	current := make(map[string]bool, len(events))
	for _, ev := range events {
		current[ev.ID] = true
		if n.created[ev.ID] {
			continue
		}
		if err := n.create(ctx, st, ev); err != nil {
			return fmt.Errorf("event %s: %w", ev.ID, err)
		}
		n.created[ev.ID] = true
	}
	// Forget events the store pruned.
	for id := range n.created {
		if !current[id] {
			delete(n.created, id)
		}
	}
	return nil
}

// create writes the notifications of one event.
func (n *notifier) create(ctx context.Context, st store.Store, ev store.ThresholdEvent) error {
	c, err := st.GetCustomer(ctx, ev.Subject)
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		return err
	}
	return n.write(ctx, st, c, ev, "", n.app.notificationPayload(c, ev).Marshal())
}

// write stores one notification of an event per channel: every webhook,
// and email when the customer has an address. typ is "" for threshold
// events, else the payload's type.
func (n *notifier) write(ctx context.Context, st store.Store, c store.Customer, ev store.ThresholdEvent, typ string, payload []byte) error {
	now := time.Now().UTC()
	targets := make(map[string]string, len(n.channels)+1)
	chans := slices.Clone(n.channels)
	for _, ch := range n.channels {
		targets[ch] = n.webhooks[ch].URL
	}
	if n.email != nil && c.Email != "" {
		chans = append(chans, channelEmail)
		targets[channelEmail] = c.Email
	}
	for _, ch := range chans {
		nt := notification{
			ID: ev.ID + "|" + ch, Channel: ch, Target: targets[ch], Event: ev, Type: typ, Payload: payload,
			State: statePending, CreatedAt: now, NextTry: now,
		}
		if _, err := putNotification(ctx, st, nt, true); err != nil {
			return err
		}
	}
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
		if !period.Start.IsZero() {
			period.End = t.periodRule.Period(period.Start, c.BillingAnchor()).End
		}
	}
	return notify.NewPayload(ev.Subject, c.Tier, period, ev.Used, ev.Included, ev.Threshold, policy, ev.At)
}

// deliverDue attempts the due pending notifications, each channel in its
// own goroutine so that a slow receiver delays only its own channel. Per
// customer and channel, notifications go out in order (oldest event, then
// lowest threshold first): while one waits for a retry, later ones wait
// too.
func (n *notifier) deliverDue(ctx context.Context, rec store.Records) error {
	all, err := loadNotifications(ctx, rec, "")
	if err != nil {
		return err
	}
	slices.SortStableFunc(all, func(a, b notification) int {
		if c := a.Event.At.Compare(b.Event.At); c != 0 {
			return c
		}
		return a.Event.Threshold - b.Event.Threshold
	})
	byChannel := make(map[string][]notification)
	for _, nt := range all {
		if nt.State == statePending {
			byChannel[nt.Channel] = append(byChannel[nt.Channel], nt)
		}
	}
	var wg sync.WaitGroup
	errs := make(chan error, len(byChannel))
	for _, queue := range byChannel {
		wg.Go(func() {
			defer recoverLog(n.logger)
			errs <- n.deliverChannel(ctx, rec, queue)
		})
	}
	wg.Wait()
	close(errs)
	var joined []error
	for err := range errs {
		joined = append(joined, err)
	}
	return errors.Join(joined...)
}

// deliverChannel attempts a channel's due notifications in order.
func (n *notifier) deliverChannel(ctx context.Context, rec store.Records, queue []notification) error {
	blocked := make(map[string]bool) // customers with an earlier notification waiting
	for _, nt := range queue {
		if blocked[nt.Event.Subject] {
			continue
		}
		if nt.NextTry.After(time.Now()) {
			blocked[nt.Event.Subject] = true
			continue
		}
		// Renew the lease before each attempt: an instance that lost it
		// stops sending.
		if ok, err := rec.TryLease(ctx, notifierLease, n.holder, notifyLeaseTTL); err != nil || !ok {
			return err
		}
		done, err := n.attempt(ctx, rec, nt)
		if err != nil || ctx.Err() != nil {
			return err
		}
		if !done {
			blocked[nt.Event.Subject] = true
		}
	}
	return nil
}

// attempt makes one delivery attempt and records its outcome. It reports
// whether the notification was delivered (or dead-lettered, which also
// unblocks the next one). An attempt in flight when ctx ends (a reload or
// shutdown) gets notifyStopGrace to finish and is recorded if it
// succeeded, so that the next instance does not send it again; a failed
// one is left for the next instance.
func (n *notifier) attempt(ctx context.Context, rec store.Records, nt notification) (bool, error) {
	actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), notifyAttemptTimeout)
	defer cancel()
	stop := context.AfterFunc(ctx, func() {
		t := time.AfterFunc(notifyStopGrace, cancel)
		<-actx.Done()
		t.Stop()
	})
	defer stop()
	started := time.Now().UTC()
	sendErr := n.send(actx, nt, started)
	if sendErr != nil && ctx.Err() != nil {
		return false, ctx.Err()
	}
	now := time.Now().UTC()
	nt.Attempts++
	nt.LastTry = now
	if nt.FirstTry.IsZero() {
		nt.FirstTry = started
	}
	done := true
	switch {
	case sendErr == nil:
		nt.State, nt.DeliveredAt, nt.NextTry, nt.LastError = stateDelivered, now, time.Time{}, ""
	default:
		nt.LastError = sendErr.Error()
		next, dead := notifyRetry.Next(nt.Attempts, nt.FirstTry, now)
		if dead {
			nt.State, nt.NextTry = stateDead, time.Time{}
			n.logger.Error("notification dead-lettered after retrying", zap.String("id", nt.ID), zap.Int("attempts", nt.Attempts), zap.Error(sendErr))
		} else {
			nt.NextTry, done = next, false
			n.logger.Warn("notification delivery failed; will retry", zap.String("id", nt.ID), zap.Time("next_attempt", next), zap.Error(sendErr))
		}
	}
	wctx, wcancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer wcancel()
	if _, err := putNotification(wctx, rec, nt, false); err != nil {
		return false, err
	}
	return done, nil
}

// send makes one attempt on the notification's channel.
func (n *notifier) send(ctx context.Context, nt notification, at time.Time) error {
	if nt.Channel == channelEmail {
		if n.email == nil {
			return errors.New("email is no longer configured")
		}
		if nt.Type == notify.KeyExpiringType {
			return n.sendKeyExpiringEmail(ctx, nt)
		}
		var p notify.Payload
		if err := json.Unmarshal(nt.Payload, &p); err != nil {
			return err
		}
		return n.email.Send(ctx, nt.Target, nt.ID, notify.RenderEmail(p))
	}
	w, ok := n.webhooks[nt.Channel]
	if !ok {
		return fmt.Errorf("webhook %s is no longer configured", nt.Target)
	}
	return w.Send(ctx, nt.ID, at, nt.Payload)
}

// loadNotifications returns the stored notifications whose id starts with
// prefix.
func loadNotifications(ctx context.Context, rec store.Records, prefix string) ([]notification, error) {
	rs, err := rec.ListRecords(ctx, recordKindNotification, prefix)
	if err != nil {
		return nil, err
	}
	out := make([]notification, 0, len(rs))
	for _, r := range rs {
		var nt notification
		if err := json.Unmarshal(r.Data, &nt); err != nil {
			return nil, fmt.Errorf("notification %s: %w", r.ID, err)
		}
		out = append(out, nt)
	}
	return out, nil
}

// putNotification stores a notification (only if absent: when it does not
// exist yet, and reports whether it was stored). Threshold events are
// pruned at their period's end plus store.Retention; a period lasts at
// most 31 days and an hour, so the notification outlives its event and is
// never created twice.
func putNotification(ctx context.Context, rec store.Records, nt notification, onlyIfAbsent bool) (bool, error) {
	data, _ := json.Marshal(nt) // plain fields: cannot fail
	return rec.PutRecord(ctx, store.Record{
		Kind: recordKindNotification, ID: nt.ID, Data: data,
		Expires: nt.Event.At.Add(33*24*time.Hour + store.Retention),
	}, onlyIfAbsent)
}
