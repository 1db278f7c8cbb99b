// Package notifier is the notification state machine: it turns threshold
// events (the store's outbox) and keys about to expire into one
// notification per channel, stored in the store's records, and delivers
// them with retries, one instance at a time under a lease. The channels
// and payloads are package notify's; the api_monetize app configures a
// Notifier and runs it (see store.LeasedLoop).
package notifier

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

	"go.uber.org/zap"

	"github.com/apimonetize/caddy-api-monetize/notify"
	"github.com/apimonetize/caddy-api-monetize/store"
)

const (
	// RecordKind is the store record kind of notifications; their ids are
	// "<event id>|<channel>".
	RecordKind = "notification"
	// LeaseName is the name of the lease the sending instance holds.
	LeaseName = "notifier"
	// ChannelEmail names the email channel; webhook channels are
	// "webhook:<8 hex digits of the URL's SHA-256>" (see WebhookChannel).
	ChannelEmail = "email"
)

// Delivery states of a notification.
const (
	StatePending   = "pending"
	StateDelivered = "delivered"
	StateDead      = "dead"
)

// Notification is the stored state of one (event, channel).
type Notification struct {
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
	Attempts int `json:"attempts"`
	// CreatedAt, FirstTry, LastTry, NextTry and DeliveredAt date the
	// notification's life; LastError is why the last attempt failed.
	CreatedAt   time.Time `json:"created_at"`
	FirstTry    time.Time `json:"first_attempt_at,omitzero"`
	LastTry     time.Time `json:"last_attempt_at,omitzero"`
	NextTry     time.Time `json:"next_attempt_at,omitzero"`
	DeliveredAt time.Time `json:"delivered_at,omitzero"`
	LastError   string    `json:"last_error,omitempty"`
}

// Store is what the notifier needs from the store.
type Store interface {
	ThresholdEvents(ctx context.Context, subject string) ([]store.ThresholdEvent, error)
	GetCustomer(ctx context.Context, id string) (store.Customer, error)
	ListCustomers(ctx context.Context) ([]store.Customer, error)
	ListKeys(ctx context.Context, customerID string) ([]store.Key, error)
	store.Records
}

// Notifier turns threshold events and keys about to expire into
// notifications and delivers them. Run Tick periodically; it does nothing
// unless it holds the lease. Set the fields before the first Tick.
type Notifier struct {
	// Holder identifies this notifier in the lease; unique per instance.
	Holder string
	// LeaseTTL is how long the lease lasts without renewal; longer than
	// the interval between ticks.
	LeaseTTL time.Duration
	// Webhooks are the webhook channels by channel name (WebhookChannel),
	// Channels their names in configuration order.
	Webhooks map[string]notify.Webhook
	Channels []string
	// Email sends the email channel; nil: no email.
	Email *notify.SMTP
	// Payload builds the payload of a threshold event of customer c (c is
	// zero when the customer no longer exists).
	Payload func(c store.Customer, ev store.ThresholdEvent) []byte
	// Retry schedules failed deliveries.
	Retry notify.Retry
	// AttemptTimeout bounds one delivery attempt; StopGrace is how long
	// an attempt in flight may go on once the Tick's context ends.
	AttemptTimeout time.Duration
	StopGrace      time.Duration
	// KeyScanInterval is how often keys about to expire are looked for (a
	// scan reads every customer's keys).
	KeyScanInterval time.Duration
	// Now is the time keys expire by; nil is time.Now.
	Now func() time.Time
	// Logger logs errors; nil logs nothing.
	Logger *zap.Logger

	// created are the event ids whose notifications exist, so that only
	// new events are written.
	mu      sync.Mutex
	created map[string]bool
	// keyScan is the state of the key expiry scan (see keyexpiring.go).
	keyScan keyExpiryScan
}

// WebhookChannel names a webhook's channel after its URL, so that a
// notification keeps its channel across reloads that reorder webhooks.
func WebhookChannel(url string) string {
	sum := sha256.Sum256([]byte(url))
	return "webhook:" + hex.EncodeToString(sum[:4])
}

func (n *Notifier) logger() *zap.Logger {
	if n.Logger == nil {
		return zap.NewNop()
	}
	return n.Logger
}

func (n *Notifier) now() time.Time {
	if n.Now != nil {
		return n.Now()
	}
	return time.Now()
}

// Lease is the notifier's lease.
func (n *Notifier) Lease() store.Lease {
	return store.Lease{Name: LeaseName, Holder: n.Holder, TTL: n.LeaseTTL}
}

// Tick takes or renews the lease and, when it holds it, creates the
// notifications of new threshold events and of keys about to expire, and
// delivers those that are due. Errors are logged.
func (n *Notifier) Tick(ctx context.Context, st Store) {
	if ok, err := n.Lease().Renew(ctx, st); err != nil || !ok {
		if err != nil && ctx.Err() == nil {
			n.logger().Warn("could not take the notifier lease", zap.Error(err))
		}
		return
	}
	if err := n.createAll(ctx, st); err != nil && ctx.Err() == nil {
		n.logger().Error("could not create notifications", zap.Error(err))
	}
	if err := n.announceExpiringKeys(ctx, st); err != nil && ctx.Err() == nil {
		n.logger().Error("could not create key expiry notifications", zap.Error(err))
	}
	if err := n.deliverDue(ctx, st); err != nil && ctx.Err() == nil {
		n.logger().Error("could not deliver notifications", zap.Error(err))
	}
}

// createAll writes one notification per channel for every threshold event
// not yet seen. PutRecord with onlyIfAbsent makes creation exactly once,
// whichever instance sees the event first.
func (n *Notifier) createAll(ctx context.Context, st Store) error {
	events, err := st.ThresholdEvents(ctx, "")
	if err != nil {
		return err
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.created == nil {
		n.created = make(map[string]bool)
	}
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
func (n *Notifier) create(ctx context.Context, st Store, ev store.ThresholdEvent) error {
	c, err := st.GetCustomer(ctx, ev.Subject)
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		return err
	}
	return n.write(ctx, st, c, ev, "", n.Payload(c, ev))
}

// write stores one notification of an event per channel: every webhook,
// and email when the customer has an address. typ is "" for threshold
// events, else the payload's type.
func (n *Notifier) write(ctx context.Context, rec store.Records, c store.Customer, ev store.ThresholdEvent, typ string, payload []byte) error {
	now := time.Now().UTC()
	targets := make(map[string]string, len(n.Channels)+1)
	chans := slices.Clone(n.Channels)
	for _, ch := range n.Channels {
		targets[ch] = n.Webhooks[ch].URL
	}
	if n.Email != nil && c.Email != "" {
		chans = append(chans, ChannelEmail)
		targets[ChannelEmail] = c.Email
	}
	for _, ch := range chans {
		nt := Notification{
			ID: ev.ID + "|" + ch, Channel: ch, Target: targets[ch], Event: ev, Type: typ, Payload: payload,
			State: StatePending, CreatedAt: now, NextTry: now,
		}
		if _, err := Put(ctx, rec, nt, true); err != nil {
			return err
		}
	}
	return nil
}

// deliverDue attempts the due pending notifications, each channel in its
// own goroutine so that a slow receiver delays only its own channel. Per
// customer and channel, notifications go out in order (oldest event, then
// lowest threshold first): while one waits for a retry, later ones wait
// too.
func (n *Notifier) deliverDue(ctx context.Context, rec store.Records) error {
	all, err := Load(ctx, rec, "")
	if err != nil {
		return err
	}
	slices.SortStableFunc(all, func(a, b Notification) int {
		if c := a.Event.At.Compare(b.Event.At); c != 0 {
			return c
		}
		return a.Event.Threshold - b.Event.Threshold
	})
	byChannel := make(map[string][]Notification)
	for _, nt := range all {
		if nt.State == StatePending {
			byChannel[nt.Channel] = append(byChannel[nt.Channel], nt)
		}
	}
	var wg sync.WaitGroup
	errs := make(chan error, len(byChannel))
	for _, queue := range byChannel {
		wg.Go(func() {
			defer func() {
				if r := recover(); r != nil {
					n.logger().Error("background task panicked", zap.Any("panic", r), zap.Stack("stack"))
				}
			}()
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
func (n *Notifier) deliverChannel(ctx context.Context, rec store.Records, queue []Notification) error {
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
		if ok, err := n.Lease().Renew(ctx, rec); err != nil || !ok {
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
// shutdown) gets StopGrace to finish and is recorded if it succeeded, so
// that the next instance does not send it again; a failed one is left for
// the next instance.
func (n *Notifier) attempt(ctx context.Context, rec store.Records, nt Notification) (bool, error) {
	actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), n.AttemptTimeout)
	defer cancel()
	stop := context.AfterFunc(ctx, func() {
		t := time.AfterFunc(n.StopGrace, cancel)
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
		nt.State, nt.DeliveredAt, nt.NextTry, nt.LastError = StateDelivered, now, time.Time{}, ""
	default:
		nt.LastError = sendErr.Error()
		next, dead := n.Retry.Next(nt.Attempts, nt.FirstTry, now)
		if dead {
			nt.State, nt.NextTry = StateDead, time.Time{}
			n.logger().Error("notification dead-lettered after retrying", zap.String("id", nt.ID), zap.Int("attempts", nt.Attempts), zap.Error(sendErr))
		} else {
			nt.NextTry, done = next, false
			n.logger().Warn("notification delivery failed; will retry", zap.String("id", nt.ID), zap.Time("next_attempt", next), zap.Error(sendErr))
		}
	}
	wctx, wcancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer wcancel()
	if _, err := Put(wctx, rec, nt, false); err != nil {
		return false, err
	}
	return done, nil
}

// send makes one attempt on the notification's channel.
func (n *Notifier) send(ctx context.Context, nt Notification, at time.Time) error {
	if nt.Channel == ChannelEmail {
		if n.Email == nil {
			return errors.New("email is no longer configured")
		}
		if nt.Type == notify.KeyExpiringType {
			var p notify.KeyExpiringPayload
			if err := json.Unmarshal(nt.Payload, &p); err != nil {
				return err
			}
			return n.Email.Send(ctx, nt.Target, nt.ID, notify.RenderKeyExpiringEmail(p))
		}
		var p notify.Payload
		if err := json.Unmarshal(nt.Payload, &p); err != nil {
			return err
		}
		return n.Email.Send(ctx, nt.Target, nt.ID, notify.RenderEmail(p))
	}
	w, ok := n.Webhooks[nt.Channel]
	if !ok {
		return fmt.Errorf("webhook %s is no longer configured", nt.Target)
	}
	return w.Send(ctx, nt.ID, at, nt.Payload)
}

// Load returns the stored notifications whose id starts with prefix.
func Load(ctx context.Context, rec store.Records, prefix string) ([]Notification, error) {
	rs, err := rec.ListRecords(ctx, RecordKind, prefix)
	if err != nil {
		return nil, err
	}
	out := make([]Notification, 0, len(rs))
	for _, r := range rs {
		var nt Notification
		if err := json.Unmarshal(r.Data, &nt); err != nil {
			return nil, fmt.Errorf("notification %s: %w", r.ID, err)
		}
		out = append(out, nt)
	}
	return out, nil
}

// Put stores a notification (only if absent: when it does not exist yet,
// and reports whether it was stored). Threshold events are pruned at their
// period's end plus store.Retention; a period lasts at most 31 days and an
// hour, so the notification outlives its event and is never created twice.
func Put(ctx context.Context, rec store.Records, nt Notification, onlyIfAbsent bool) (bool, error) {
	data, _ := json.Marshal(nt) // plain fields: cannot fail
	return rec.PutRecord(ctx, store.Record{
		Kind: RecordKind, ID: nt.ID, Data: data,
		Expires: nt.Event.At.Add(33*24*time.Hour + store.Retention),
	}, onlyIfAbsent)
}
