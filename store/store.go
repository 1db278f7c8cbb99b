// Package store defines where api_monetize keeps its durable state
// (customers, API keys, the key secret) and its shared rate-limit state, and
// the contract every implementation meets. Two implementations exist:
// redisstore (shared by several Caddy instances) and boltstore (embedded,
// one process, the default).
package store

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// ErrNotFound is returned when a customer or key does not exist.
var ErrNotFound = errors.New("not found")

// ErrUnavailable wraps errors caused by the store being unreachable, slow or
// failing (timeouts, connection errors, an open circuit breaker). Callers
// apply their on_store_error policy when errors.Is(err, ErrUnavailable).
var ErrUnavailable = errors.New("store unavailable")

// ErrBusy wraps errors of calls that this process could not even send to
// the store in time: its own queue of calls or its connection pool was
// saturated by a burst. It wraps ErrUnavailable (the store could not
// answer), but says nothing about the store's health: a circuit breaker
// does not count it, and callers shed the request (503) instead of
// deciding without the store. Check it before ErrUnavailable.
var ErrBusy = fmt.Errorf("%w: this process is saturated, the call was not sent: %w", ErrUnavailable, ErrNotSent)

// ErrNotSent is wrapped by errors of calls that certainly never reached the
// store (ErrBusy, an open circuit breaker, a call queued behind a stalled
// connection): their outcome is known, nothing was written. Any other
// error of a shared store's Reserve leaves the outcome unknown: the call
// may still run (see Settlement.Void).
var ErrNotSent = errors.New("the call was not sent")

// Customer is an API consumer. Limits and usage belong to the customer: all
// of a customer's keys share them.
type Customer struct {
	// ID is the customer's stable identifier (e.g. "acme").
	ID string `json:"id"`
	// Tier is the name of the customer's current tier.
	Tier string `json:"tier"`
	// ConfigTier is the tier the Caddyfile last declared for this customer;
	// empty for customers created through the admin API. A runtime tier
	// change (admin API, billing) survives reloads until the configuration
	// declares a different tier.
	ConfigTier string `json:"config_tier,omitempty"`
	// StripeCustomerID is the customer's Stripe id (cus_…), if billed.
	StripeCustomerID string `json:"stripe_customer_id,omitempty"`
	// Email is where usage notifications go.
	Email string `json:"email,omitempty"`
	// Anchor is the billing anchor date (start of the first period); zero
	// means CreatedAt (see BillingAnchor).
	Anchor time.Time `json:"anchor,omitzero"`
	// CreatedAt is when the customer was first stored.
	CreatedAt time.Time `json:"created_at"`
}

// BillingAnchor is when the customer's anniversary periods start: Anchor,
// or the day the customer was first stored.
func (c Customer) BillingAnchor() time.Time {
	if c.Anchor.IsZero() {
		return c.CreatedAt.UTC().Truncate(24 * time.Hour)
	}
	return c.Anchor
}

// Key is a stored API key. The key itself is never stored: only its keyed
// hash (HMAC-SHA256 with the key secret) and a short display prefix.
type Key struct {
	// ID is the key's public identifier, derived from its hash.
	ID string `json:"id"`
	// Hash is the hex HMAC-SHA256 of the key; the lookup index.
	Hash string `json:"hash"`
	// CustomerID is the owner of the key.
	CustomerID string `json:"customer_id"`
	// Prefix is the start of the key, for humans to recognise it.
	Prefix string `json:"prefix"`
	// CreatedAt is when the key was first stored.
	CreatedAt time.Time `json:"created_at"`
	// RevokedAt is when the key was revoked; zero while the key is active.
	RevokedAt time.Time `json:"revoked_at,omitzero"`
	// FromConfig marks a key declared in the configuration: it is revoked
	// when a later configuration no longer declares it.
	FromConfig bool `json:"from_config,omitempty"`
	// Name is a label for humans (e.g. "ci"); it may be empty.
	Name string `json:"name,omitempty"`
	// ExpiresAt is when the key stops working; zero means never.
	ExpiresAt time.Time `json:"expires_at,omitzero"`
	// ConfigExpiresAt is the expiry the configuration last declared for
	// this key (see MergeStored).
	ConfigExpiresAt time.Time `json:"config_expires_at,omitzero"`
	// LastUsedAt is the last use recorded by TouchKeys. Only KeyByID and
	// ListKeys fill it in; it is not kept in the key's own record.
	LastUsedAt time.Time `json:"-"`
}

// Active reports whether the key may still be used.
func (k Key) Active() bool { return k.RevokedAt.IsZero() }

// MergeConfig returns stored, the customer as the store holds it, updated
// by c, the same customer declared in the configuration, by the rule of
// Store.UpsertConfigCustomer: contact fields (Email, Anchor when set, and
// StripeCustomerID when set) from c, and Tier from c only when
// c.ConfigTier differs from the stored ConfigTier. A Stripe link made at
// runtime (a checkout) survives a configuration that declares none.
func (stored Customer) MergeConfig(c Customer) Customer {
	stored.Email = c.Email
	if c.StripeCustomerID != "" {
		stored.StripeCustomerID = c.StripeCustomerID
	}
	if !c.Anchor.IsZero() {
		stored.Anchor = c.Anchor
	}
	if c.ConfigTier != stored.ConfigTier {
		stored.Tier = c.Tier
		stored.ConfigTier = c.ConfigTier
	}
	return stored
}

// Store is the persistence contract shared by every backend. All methods are
// safe for concurrent use. Methods return ErrNotFound for missing records and
// errors wrapping ErrUnavailable when the backend cannot be reached.
type Store interface {
	// KeySecret returns the secret used to hash API keys when none is
	// configured. The first call in the store's lifetime stores candidate;
	// later calls (from any instance) return the stored secret, so all
	// instances agree.
	KeySecret(ctx context.Context, candidate []byte) ([]byte, error)

	// UpsertConfigCustomer stores a customer declared in the configuration.
	// A new customer is created as given. For an existing one, contact
	// fields (Email, StripeCustomerID, Anchor when set) are updated, and
	// Tier is replaced only when c.ConfigTier differs from the stored
	// ConfigTier (the configuration changed); otherwise a runtime tier change
	// is kept. CreatedAt is kept.
	UpsertConfigCustomer(ctx context.Context, c Customer) (Customer, error)
	// CreateCustomer stores a new customer; it fails if the id exists.
	CreateCustomer(ctx context.Context, c Customer) error
	// GetCustomer returns one customer.
	GetCustomer(ctx context.Context, id string) (Customer, error)
	// ListCustomers returns all customers ordered by id.
	ListCustomers(ctx context.Context) ([]Customer, error)
	// SetTier changes a customer's tier and returns the updated customer.
	SetTier(ctx context.Context, id, tier string) (Customer, error)

	// PutKey stores a key. Storing a hash that exists updates its owner and
	// FromConfig but keeps its CreatedAt and its revocation (a revoked key
	// stays revoked), and its name and expiry by the rule of
	// Key.MergeStored.
	PutKey(ctx context.Context, k Key) (Key, error)
	// KeyByHash looks a key up by its hash.
	KeyByHash(ctx context.Context, hash string) (Key, error)
	// ListKeys returns a customer's keys ordered by creation time.
	ListKeys(ctx context.Context, customerID string) ([]Key, error)
	// RevokeKey marks a key revoked and returns it; revoking twice keeps the
	// first revocation time.
	RevokeKey(ctx context.Context, keyID string) (Key, error)
	// KeyByID returns the key with this id, LastUsedAt included.
	KeyByID(ctx context.Context, keyID string) (Key, error)
	// UpdateKey applies ch to the key with this id atomically (see
	// Key.Apply), announces the change like PutKey, and returns the key.
	UpdateKey(ctx context.Context, keyID string, ch KeyChange) (Key, error)
	// TouchKeys records key uses: for each key id, the stored LastUsedAt
	// becomes the later of itself and the given time. Uses of ids that name
	// no key are never reported. It is one write for the whole batch and, being
	// no change to a key, does not wake Watch.
	TouchKeys(ctx context.Context, uses map[string]time.Time) error

	// Meter meters usage against quotas (see usage.go).
	Meter
	// Records keeps documents and leases for background loops (see
	// records.go).
	Records

	// Watch calls onChange after any customer or key changes, in this
	// process or (for shared stores) in another one, until ctx is done. It
	// blocks; run it in a goroutine.
	Watch(ctx context.Context, onChange func()) error

	// Close releases the store's resources.
	Close() error
}

// ResyncWatcher is implemented by stores whose Watch can miss changes
// while disconnected (a shared store). WatchChanges is Watch telling the
// two causes of a call apart: onChange after a change, onResync after a
// (re-)connection, when changes may have been missed but none is known.
type ResyncWatcher interface {
	WatchChanges(ctx context.Context, onChange, onResync func()) error
}
