package store

import "time"

// Key statuses, as KeyStatus reports them.
const (
	KeyActive   = "active"
	KeyExpiring = "expiring"
	KeyExpired  = "expired"
	KeyRevoked  = "revoked"
)

// ExpiringWindow is how long before its expiry a key is reported as
// expiring.
const ExpiringWindow = 7 * 24 * time.Hour

// Expired reports whether the key has expired at now: from its ExpiresAt
// instant on, exactly.
func (k Key) Expired(now time.Time) bool {
	return !k.ExpiresAt.IsZero() && !now.Before(k.ExpiresAt)
}

// Status is the key's status at now: revoked, expired, expiring (expires
// within ExpiringWindow) or active.
func (k Key) Status(now time.Time) string {
	switch {
	case !k.Active():
		return KeyRevoked
	case k.Expired(now):
		return KeyExpired
	case !k.ExpiresAt.IsZero() && k.ExpiresAt.Sub(now) <= ExpiringWindow:
		return KeyExpiring
	}
	return KeyActive
}

// MergeStored returns k, a key being stored again under the hash of old,
// the key as stored: CreatedAt and RevokedAt are old's; Name is old's
// unless k names the key; ExpiresAt is old's (a runtime change, such as a
// roll, is kept) unless k.ConfigExpiresAt differs from old's, i.e. the
// configuration declares a new expiry, which then replaces it.
func (k Key) MergeStored(old Key) Key {
	k.CreatedAt, k.RevokedAt = old.CreatedAt, old.RevokedAt
	if k.Name == "" {
		k.Name = old.Name
	}
	if k.ConfigExpiresAt.Equal(old.ConfigExpiresAt) {
		k.ExpiresAt = old.ExpiresAt
	} else {
		k.ExpiresAt = k.ConfigExpiresAt
	}
	return k
}

// KeyChange is a change to a stored key (Store.UpdateKey).
type KeyChange struct {
	// Name, when not nil, replaces the key's name.
	Name *string
	// ExpiresAt, when not nil, replaces the key's expiry; a zero time
	// removes it.
	ExpiresAt *time.Time
	// ShortenOnly applies ExpiresAt only when the key has no expiry or a
	// later one, so that a roll never lengthens the old key's life.
	ShortenOnly bool
}

// Apply returns k changed by ch.
func (k Key) Apply(ch KeyChange) Key {
	if ch.Name != nil {
		k.Name = *ch.Name
	}
	if e := ch.ExpiresAt; e != nil {
		if !ch.ShortenOnly || k.ExpiresAt.IsZero() || e.Before(k.ExpiresAt) {
			k.ExpiresAt = e.UTC()
		}
	}
	return k
}
