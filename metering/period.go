// Package metering holds the pure logic of usage metering and monthly
// quotas: billing periods, quota and threshold arithmetic, billable
// responses and exact money amounts. It does no I/O; the stores and the
// HTTP handler call it. All arithmetic is on integers (units, seconds,
// micro-units of a currency); nothing here uses floating point.
package metering

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// PeriodRule decides where a customer's quota periods begin and end. The
// zero PeriodRule is calendar months in UTC.
type PeriodRule struct {
	// Anniversary makes each period start on the customer's anchor
	// day-of-month at the anchor's time of day, in UTC. Location is then
	// ignored. When false, periods are calendar months in Location.
	Anniversary bool
	// Location is the time zone of calendar months. Nil means UTC.
	Location *time.Location
}

// Period is one quota period: the instants t with Start <= t < End.
type Period struct {
	// Start is the first instant of the period.
	Start time.Time
	// End is the first instant after the period (the next period's Start).
	End time.Time
}

// TimeIDLayout is the layout of TimeID: the instant in UTC to the second,
// ISO 8601 basic format, e.g. "20261101T000000Z". Such ids sort in time
// order as plain strings.
const TimeIDLayout = "20060102T150405Z"

// TimeID formats t, truncated to the second, as a stable text id for store
// keys (see TimeIDLayout). It names an instant, not a wall-clock date, so it
// is unambiguous whatever the zone of a calendar period.
func TimeID(t time.Time) string {
	return t.UTC().Format(TimeIDLayout)
}

// ParseTimeID parses an id written by TimeID. It accepts only the exact
// form TimeID produces.
func ParseTimeID(s string) (time.Time, error) {
	t, err := time.Parse(TimeIDLayout, s)
	if err != nil || TimeID(t) != s {
		return time.Time{}, fmt.Errorf("invalid time id %q (want e.g. 20261101T000000Z)", s)
	}
	return t, nil
}

// ID is the period's stable id for store keys: TimeID(Start), the start
// instant in UTC, e.g. "20261101T000000Z" for November 2026 in UTC and
// "20261031T230000Z" for November 2026 in Europe/Berlin. Period starts are
// whole seconds, so ParseTimeID(p.ID()) is the instant p.Start.
func (p Period) ID() string { return TimeID(p.Start) }

// Seconds is the period's length in whole seconds: the RateLimit "w"
// parameter of a quota policy. Months differ in length, and a calendar month
// in a zone with daylight saving time may be an hour shorter or longer.
func (p Period) Seconds() int64 {
	return int64(p.End.Sub(p.Start) / time.Second)
}

// SecondsLeft is how many seconds remain from at until the period ends,
// rounded up and clamped to 0..Seconds(): the Retry-After of a blocked quota
// and the RateLimit "t" parameter of a quota policy.
func (p Period) SecondsLeft(at time.Time) int64 {
	if !at.Before(p.End) {
		return 0
	}
	if at.Before(p.Start) {
		return p.Seconds()
	}
	return int64((p.End.Sub(at) + time.Second - 1) / time.Second)
}

// Contains reports whether t lies within the period.
func (p Period) Contains(t time.Time) bool {
	return !t.Before(p.Start) && t.Before(p.End)
}

// HourStart is the start of the UTC hour containing t: the bucket of the
// hourly usage ledger.
func HourStart(t time.Time) time.Time {
	return t.UTC().Truncate(time.Hour)
}

// Period returns the period containing at.
//
// Calendar months start at the first instant of the 1st in the rule's
// Location: local midnight, or, where a daylight-saving change skips
// midnight, the first instant after the change, and where clocks turn back
// across midnight, its first occurrence.
//
// Anniversary periods start on the anchor's day-of-month at the anchor's
// time of day, both in UTC and to the second. An anchor day of 29-31 is
// clamped to the last day of shorter months without drifting: anchor
// January 31 gives January 31, February 28 (29 in leap years), March 31,
// April 30, and so on. When at is before the anchor, the result is the
// first period, which starts at the anchor. A zero anchor yields calendar
// months in UTC.
func (r PeriodRule) Period(at, anchor time.Time) Period {
	if r.Anniversary {
		return anniversaryPeriod(at, anchor)
	}
	loc := r.location()
	local := at.In(loc)
	y, m := local.Year(), local.Month()
	p := Period{Start: monthStart(y, m, loc), End: monthStart(y, m+1, loc)}
	// at's local date is in month m, so at is not before the first instant
	// of m's 1st. It can be at or after the next month's start only where
	// clocks turned back across that midnight and the local date briefly
	// returned to month m.
	if !at.Before(p.End) {
		p = Period{Start: p.End, End: monthStart(y, m+2, loc)}
	}
	return p
}

// StartingIn returns the period that starts within the given month: the
// calendar month itself (in the rule's Location), or the anniversary period
// whose start falls in that UTC month. It reports false when the month is
// before an anniversary anchor's month, where no period starts. It serves
// queries such as ?period=2026-02; see ParseMonth.
func (r PeriodRule) StartingIn(year int, month time.Month, anchor time.Time) (Period, bool) {
	if !r.Anniversary {
		loc := r.location()
		return Period{Start: monthStart(year, month, loc), End: monthStart(year, month+1, loc)}, true
	}
	a := anchor.UTC().Truncate(time.Second)
	k := monthsBetween(a.Year(), a.Month(), year, month)
	if k < 0 {
		return Period{}, false
	}
	return Period{Start: anniversaryStart(a, k), End: anniversaryStart(a, k+1)}, true
}

func (r PeriodRule) location() *time.Location {
	if r.Location == nil {
		return time.UTC
	}
	return r.Location
}

// monthStart is the first instant of the 1st of the month in loc (the
// month is normalised, so month 13 is January of the next year): local
// midnight, unless a daylight-saving change skips or repeats it.
func monthStart(year int, month time.Month, loc *time.Location) time.Time {
	t := time.Date(year, month, 1, 0, 0, 0, 0, loc)
	if t.Day() != 1 {
		// Midnight was skipped and time.Date resolved it to the last hour
		// of the previous day; the 1st begins when that zone offset ends.
		_, end := t.ZoneBounds()
		return end
	}
	// Clocks turned back to a time before midnight just after t's offset
	// began: midnight happened twice and time.Date may have returned the
	// second one. The first is an earlier instant under the previous,
	// larger offset.
	if begin, _ := t.ZoneBounds(); !begin.IsZero() {
		_, prev := begin.Add(-time.Nanosecond).Zone()
		_, cur := t.Zone()
		if first := t.Add(-time.Duration(prev-cur) * time.Second); prev > cur && first.Before(begin) {
			return first
		}
	}
	return t
}

func anniversaryPeriod(at, anchor time.Time) Period {
	a := anchor.UTC().Truncate(time.Second)
	if at.Before(a) {
		return Period{Start: a, End: anniversaryStart(a, 1)}
	}
	u := at.UTC()
	k := monthsBetween(a.Year(), a.Month(), u.Year(), u.Month())
	start := anniversaryStart(a, k)
	if at.Before(start) {
		k--
		start = anniversaryStart(a, k)
	}
	return Period{Start: start, End: anniversaryStart(a, k+1)}
}

// monthsBetween counts whole months from (y1, m1) to (y2, m2).
func monthsBetween(y1 int, m1 time.Month, y2 int, m2 time.Month) int {
	return (y2-y1)*12 + int(m2) - int(m1)
}

// anniversaryStart is the start of the k-th period (k >= 0) after the UTC,
// whole-second anchor a. Each start is computed from the anchor itself, so
// a clamp to a short month never carries over to the next one.
func anniversaryStart(a time.Time, k int) time.Time {
	first := time.Date(a.Year(), a.Month()+time.Month(k), 1, 0, 0, 0, 0, time.UTC)
	y, m := first.Year(), first.Month()
	day := min(a.Day(), daysIn(y, m))
	return time.Date(y, m, day, a.Hour(), a.Minute(), a.Second(), 0, time.UTC)
}

// daysIn is the number of days in the month.
func daysIn(year int, month time.Month) int {
	return time.Date(year, month+1, 0, 0, 0, 0, 0, time.UTC).Day()
}

// ParsePeriodRule parses the arguments of the Caddyfile "period" directive:
// "calendar" (calendar months in UTC), "calendar <IANA zone>" (e.g.
// "calendar Europe/Berlin") or "anniversary".
func ParsePeriodRule(args []string) (PeriodRule, error) {
	if len(args) == 0 {
		return PeriodRule{}, errors.New("period: want calendar [zone] or anniversary")
	}
	switch args[0] {
	case "calendar":
		switch len(args) {
		case 1:
			return PeriodRule{Location: time.UTC}, nil
		case 2:
			loc, err := loadZone(args[1])
			if err != nil {
				return PeriodRule{}, err
			}
			return PeriodRule{Location: loc}, nil
		}
		return PeriodRule{}, fmt.Errorf("period calendar: unexpected %q (want at most one time zone)", args[2])
	case "anniversary":
		if len(args) > 1 {
			return PeriodRule{}, fmt.Errorf("period anniversary: unexpected %q (anniversary periods follow the anchor in UTC and take no zone)", args[1])
		}
		return PeriodRule{Anniversary: true}, nil
	}
	return PeriodRule{}, fmt.Errorf("period: unknown kind %q (want calendar or anniversary)", args[0])
}

// loadZone loads an IANA time zone by name. "Local" is refused: it would
// make periods depend on the machine running Caddy.
func loadZone(name string) (*time.Location, error) {
	if name == "" || strings.EqualFold(name, "local") {
		return nil, fmt.Errorf("period calendar: time zone %q is not allowed (use an IANA name such as Europe/Berlin, or UTC)", name)
	}
	loc, err := time.LoadLocation(name)
	if err != nil {
		return nil, fmt.Errorf("period calendar: unknown time zone %q (want an IANA name such as Europe/Berlin)", name)
	}
	return loc, nil
}

// ParseMonth parses a month written "YYYY-MM" (e.g. "2026-02"), as in a
// usage query's ?period= parameter.
func ParseMonth(s string) (int, time.Month, error) {
	if len(s) != 7 || s[4] != '-' || !allDigits(s[:4]) || !allDigits(s[5:]) {
		return 0, 0, fmt.Errorf("invalid month %q (want YYYY-MM, e.g. 2026-02)", s)
	}
	y, _ := strconv.Atoi(s[:4])
	m, _ := strconv.Atoi(s[5:])
	if m < 1 || m > 12 {
		return 0, 0, fmt.Errorf("invalid month %q (month must be 01-12)", s)
	}
	return y, time.Month(m), nil
}

func allDigits(s string) bool {
	for i := range len(s) {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}
