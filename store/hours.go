package store

import (
	"context"
	"time"
)

// HourIndex is implemented by stores that index, per UTC hour, the
// subjects that reserved or settled usage in it, so that a background
// loop (the Stripe reporter) reads what changed in an hour instead of
// every customer. The index is written beside the metering, not inside
// its transaction: a subject whose index write was lost (a crash just
// after the metering call, a store fault) is missing from it, so a
// caller must still sweep every customer now and then.
type HourIndex interface {
	// HourSubjects returns, in no particular order and without
	// duplicates, the subjects indexed in the UTC hour hourID
	// (metering.TimeID form, as Quota.HourID). A listed subject may have
	// no billed usage in the hour. The index of an hour is kept
	// HourIndexRetention after the hour.
	HourSubjects(ctx context.Context, hourID string) ([]string, error)
	// LateSubjects returns the subjects metered for an hour earlier than
	// the hour the metering call ran in (a spool replayed after an outage,
	// a settlement after the hour ended), which an hour's index read when
	// the hour closed may have missed. Each comes with a version that
	// every such call of the subject changes.
	LateSubjects(ctx context.Context) ([]LateSubject, error)
	// DoneLate removes the late subjects whose version is still the one
	// given: those with a late call since stay.
	DoneLate(ctx context.Context, done []LateSubject) error
}

// LateSubject is a subject metered late, and the version of its entry.
type LateSubject struct {
	// Subject is the customer id.
	Subject string
	// Version changes at each late metering call of the subject.
	Version int64
}

// HourIndexRetention is how long an hour's index is kept after the hour
// starts: longer than Stripe accepts meter events (35 days).
const HourIndexRetention = 40 * 24 * time.Hour
