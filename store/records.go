package store

import (
	"context"
	"time"
)

// Record is a small durable document kept by the app's background work:
// Stripe report marks, webhook event ids, notifications and their delivery
// state. Records of one Kind form a namespace; IDs are opaque strings.
type Record struct {
	// Kind is the record's namespace, e.g. "stripe_sent".
	Kind string `json:"kind"`
	// ID identifies the record within its Kind.
	ID string `json:"id"`
	// Data is the record's content (usually JSON).
	Data []byte `json:"data"`
	// Expires, when not zero, is when the store may forget the record; an
	// expired record is never returned.
	Expires time.Time `json:"expires,omitzero"`
}

// Records is the part of a store that keeps Records and leases. Background
// loops that several app instances run at once (during a reload, or on
// several Caddy instances sharing Redis) take a lease so that one instance
// works at a time, and use PutRecord with onlyIfAbsent to do each piece of
// work once.
type Records interface {
	// PutRecord stores r. With onlyIfAbsent it stores nothing and returns
	// false when an unexpired record with the same Kind and ID exists;
	// otherwise it returns true.
	PutRecord(ctx context.Context, r Record, onlyIfAbsent bool) (bool, error)
	// GetRecord returns one record, or ErrNotFound.
	GetRecord(ctx context.Context, kind, id string) (Record, error)
	// ListRecords returns the unexpired records of kind whose ID starts with
	// prefix, ordered by ID.
	ListRecords(ctx context.Context, kind, prefix string) ([]Record, error)
	// DeleteRecord removes a record; removing a missing one is not an
	// error.
	DeleteRecord(ctx context.Context, kind, id string) error

	// TryLease acquires the named lease for holder for ttl, or renews it
	// when holder already has it. It returns false when another holder has
	// an unexpired lease.
	TryLease(ctx context.Context, name, holder string, ttl time.Duration) (bool, error)
	// ReleaseLease gives up the lease if holder has it.
	ReleaseLease(ctx context.Context, name, holder string) error
}
