package metering

import (
	"math/rand/v2"
	"strings"
	"testing"
	"time"
	_ "time/tzdata" // the tests must not depend on the machine's zoneinfo
)

func utc(y int, m time.Month, d, h, min, s int) time.Time {
	return time.Date(y, m, d, h, min, s, 0, time.UTC)
}

func zone(t *testing.T, name string) *time.Location {
	t.Helper()
	loc, err := time.LoadLocation(name)
	if err != nil {
		t.Fatal(err)
	}
	return loc
}

const day = 24 * 60 * 60

func TestCalendarPeriods(t *testing.T) {
	tests := []struct {
		name       string
		zone       string
		at         time.Time
		start, end time.Time
		id         string
		seconds    int64
	}{
		{"UTC mid-month", "UTC", utc(2026, 11, 15, 12, 0, 0),
			utc(2026, 11, 1, 0, 0, 0), utc(2026, 12, 1, 0, 0, 0), "20261101T000000Z", 30 * day},
		{"UTC first instant of the month", "UTC", utc(2026, 11, 1, 0, 0, 0),
			utc(2026, 11, 1, 0, 0, 0), utc(2026, 12, 1, 0, 0, 0), "20261101T000000Z", 30 * day},
		{"UTC last instant of the month", "UTC", utc(2026, 12, 1, 0, 0, 0).Add(-time.Nanosecond),
			utc(2026, 11, 1, 0, 0, 0), utc(2026, 12, 1, 0, 0, 0), "20261101T000000Z", 30 * day},
		{"UTC December runs into the next year", "UTC", utc(2026, 12, 31, 23, 59, 59),
			utc(2026, 12, 1, 0, 0, 0), utc(2027, 1, 1, 0, 0, 0), "20261201T000000Z", 31 * day},
		{"UTC February of a leap year", "UTC", utc(2028, 2, 29, 23, 0, 0),
			utc(2028, 2, 1, 0, 0, 0), utc(2028, 3, 1, 0, 0, 0), "20280201T000000Z", 29 * day},
		{"UTC February of a common year", "UTC", utc(2026, 2, 28, 23, 0, 0),
			utc(2026, 2, 1, 0, 0, 0), utc(2026, 3, 1, 0, 0, 0), "20260201T000000Z", 28 * day},
		{"UTC February 2100 is not a leap month", "UTC", utc(2100, 2, 10, 0, 0, 0),
			utc(2100, 2, 1, 0, 0, 0), utc(2100, 3, 1, 0, 0, 0), "21000201T000000Z", 28 * day},
		{"an instant given in another zone is placed by its UTC month", "UTC",
			time.Date(2026, 12, 1, 0, 30, 0, 0, time.FixedZone("+01", 3600)),
			utc(2026, 11, 1, 0, 0, 0), utc(2026, 12, 1, 0, 0, 0), "20261101T000000Z", 30 * day},
		{"Berlin March loses an hour to DST", "Europe/Berlin", utc(2026, 3, 15, 0, 0, 0),
			utc(2026, 2, 28, 23, 0, 0), utc(2026, 3, 31, 22, 0, 0), "20260228T230000Z", 31*day - 3600},
		{"Berlin October gains an hour", "Europe/Berlin", utc(2026, 10, 26, 0, 0, 0),
			utc(2026, 9, 30, 22, 0, 0), utc(2026, 10, 31, 23, 0, 0), "20260930T220000Z", 31*day + 3600},
		{"Berlin November starts at local midnight, 23:00 UTC", "Europe/Berlin", utc(2026, 10, 31, 23, 0, 0),
			utc(2026, 10, 31, 23, 0, 0), utc(2026, 11, 30, 23, 0, 0), "20261031T230000Z", 30 * day},
		{"Berlin: one second before local midnight is still October", "Europe/Berlin", utc(2026, 10, 31, 22, 59, 59),
			utc(2026, 9, 30, 22, 0, 0), utc(2026, 10, 31, 23, 0, 0), "20260930T220000Z", 31*day + 3600},
		{"Berlin: New Year local is still December in UTC", "Europe/Berlin", utc(2026, 12, 31, 23, 30, 0),
			utc(2026, 12, 31, 23, 0, 0), utc(2027, 1, 31, 23, 0, 0), "20261231T230000Z", 31 * day},
		{"New York March loses an hour", "America/New_York", utc(2026, 3, 20, 0, 0, 0),
			utc(2026, 3, 1, 5, 0, 0), utc(2026, 4, 1, 4, 0, 0), "20260301T050000Z", 31*day - 3600},
		{"New York November, DST ends on the 1st at 2:00", "America/New_York", utc(2026, 11, 1, 6, 30, 0),
			utc(2026, 11, 1, 4, 0, 0), utc(2026, 12, 1, 5, 0, 0), "20261101T040000Z", 30*day + 3600},
		{"New York: 23:30 local on October 31 is still October", "America/New_York", utc(2026, 11, 1, 3, 30, 0),
			utc(2026, 10, 1, 4, 0, 0), utc(2026, 11, 1, 4, 0, 0), "20261001T040000Z", 31 * day},
		{"Lord Howe: half-hour DST", "Australia/Lord_Howe", utc(2026, 4, 10, 0, 0, 0),
			utc(2026, 3, 31, 13, 0, 0), utc(2026, 4, 30, 13, 30, 0), "20260331T130000Z", 30*day + 1800},
		// Paraguay moved its clocks from 00:00 (-04) to 01:00 (-03) on 1
		// October 1972: midnight did not exist, so the month starts at
		// 01:00 local (04:00 UTC), not at 23:00 on 30 September.
		{"Asuncion: midnight of the 1st skipped, the month starts at 01:00", "America/Asuncion", utc(1972, 10, 1, 4, 0, 0),
			utc(1972, 10, 1, 4, 0, 0), utc(1972, 11, 1, 3, 0, 0), "19721001T040000Z", 31*day - 3600},
		{"Asuncion: 23:30 on 30 September belongs to September", "America/Asuncion", utc(1972, 10, 1, 3, 30, 0),
			utc(1972, 9, 1, 4, 0, 0), utc(1972, 10, 1, 4, 0, 0), "19720901T040000Z", 30 * day},
		// Egypt moved from 00:00 to 01:00 on 1 August 2014 (east of UTC).
		{"Cairo: midnight of the 1st skipped", "Africa/Cairo", utc(2014, 7, 31, 22, 0, 0),
			utc(2014, 7, 31, 22, 0, 0), utc(2014, 8, 31, 21, 0, 0), "20140731T220000Z", 31*day - 3600},
		// Tunis turned clocks back from 01:00 CEST to 00:00 CET on 1 October
		// 1978: local midnight happened twice; the month starts at the first.
		{"Tunis: midnight of the 1st repeated, the month starts at the first", "Africa/Tunis", utc(1978, 9, 30, 22, 30, 0),
			utc(1978, 9, 30, 22, 0, 0), utc(1978, 10, 31, 23, 0, 0), "19780930T220000Z", 31*day + 3600},
		{"Tunis: the hour before belongs to September", "Africa/Tunis", utc(1978, 9, 30, 21, 59, 59),
			utc(1978, 8, 31, 22, 0, 0), utc(1978, 9, 30, 22, 0, 0), "19780831T220000Z", 30 * day},
		// Goose Bay went from 00:01 ADT back to 23:01 AST on 1 November
		// 2009: the local date ran 1 November, 31 October, 1 November.
		{"Goose Bay: local date goes back to October for an hour", "America/Goose_Bay", utc(2009, 11, 1, 3, 30, 0),
			utc(2009, 11, 1, 3, 0, 0), utc(2009, 12, 1, 4, 0, 0), "20091101T030000Z", 30*day + 3600},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := PeriodRule{Location: zone(t, tc.zone)}
			p := r.Period(tc.at, time.Time{})
			if !p.Start.Equal(tc.start) || !p.End.Equal(tc.end) {
				t.Fatalf("Period(%v) = [%v, %v), want [%v, %v)", tc.at.UTC(), p.Start.UTC(), p.End.UTC(), tc.start, tc.end)
			}
			if got := p.ID(); got != tc.id {
				t.Errorf("ID() = %q, want %q", got, tc.id)
			}
			if got := p.Seconds(); got != tc.seconds {
				t.Errorf("Seconds() = %d, want %d", got, tc.seconds)
			}
			if !p.Contains(tc.at) {
				t.Errorf("period does not contain at")
			}
		})
	}
}

func TestZeroRuleIsCalendarUTC(t *testing.T) {
	at := utc(2026, 5, 31, 23, 59, 59)
	want := Period{Start: utc(2026, 5, 1, 0, 0, 0), End: utc(2026, 6, 1, 0, 0, 0)}
	if got := (PeriodRule{}).Period(at, utc(2020, 1, 17, 5, 0, 0)); got != want {
		t.Errorf("zero rule: got %v, want %v", got, want)
	}
}

func TestAnniversaryPeriods(t *testing.T) {
	jan31 := utc(2026, 1, 31, 10, 20, 30)
	tests := []struct {
		name       string
		anchor, at time.Time
		start, end time.Time
	}{
		{"first period starts at the anchor", jan31, jan31,
			jan31, utc(2026, 2, 28, 10, 20, 30)},
		{"at before the anchor gives the first period", jan31, utc(2025, 6, 1, 0, 0, 0),
			jan31, utc(2026, 2, 28, 10, 20, 30)},
		{"31st clamps to February 28", jan31, utc(2026, 3, 1, 0, 0, 0),
			utc(2026, 2, 28, 10, 20, 30), utc(2026, 3, 31, 10, 20, 30)},
		{"and goes back to March 31 (no drift)", jan31, utc(2026, 3, 31, 10, 20, 30),
			utc(2026, 3, 31, 10, 20, 30), utc(2026, 4, 30, 10, 20, 30)},
		{"one second before the anniversary time", jan31, utc(2026, 3, 31, 10, 20, 29),
			utc(2026, 2, 28, 10, 20, 30), utc(2026, 3, 31, 10, 20, 30)},
		{"earlier in the anchor day-of-month belongs to the previous period", jan31, utc(2026, 5, 31, 0, 0, 0),
			utc(2026, 4, 30, 10, 20, 30), utc(2026, 5, 31, 10, 20, 30)},
		{"31st clamps to February 29 in a leap year", jan31, utc(2028, 3, 15, 0, 0, 0),
			utc(2028, 2, 29, 10, 20, 30), utc(2028, 3, 31, 10, 20, 30)},
		{"29th in a common year clamps to the 28th", utc(2024, 2, 29, 0, 0, 0), utc(2025, 2, 28, 12, 0, 0),
			utc(2025, 2, 28, 0, 0, 0), utc(2025, 3, 29, 0, 0, 0)},
		{"30th skips nothing in a 31-day month", utc(2026, 1, 30, 0, 0, 0), utc(2026, 3, 30, 0, 0, 0),
			utc(2026, 3, 30, 0, 0, 0), utc(2026, 4, 30, 0, 0, 0)},
		{"anchor at the end of a year", utc(2026, 12, 31, 23, 59, 59), utc(2027, 1, 15, 0, 0, 0),
			utc(2026, 12, 31, 23, 59, 59), utc(2027, 1, 31, 23, 59, 59)},
		{"anchor at the end of a year, into February", utc(2026, 12, 31, 23, 59, 59), utc(2027, 2, 1, 0, 0, 0),
			utc(2027, 1, 31, 23, 59, 59), utc(2027, 2, 28, 23, 59, 59)},
		{"years after the anchor", utc(2026, 12, 31, 23, 59, 59), utc(2031, 12, 31, 23, 59, 58),
			utc(2031, 11, 30, 23, 59, 59), utc(2031, 12, 31, 23, 59, 59)},
		{"anchor in another zone is taken in UTC", time.Date(2026, 3, 1, 0, 30, 0, 0, time.FixedZone("+01", 3600)), utc(2026, 3, 10, 0, 0, 0),
			utc(2026, 2, 28, 23, 30, 0), utc(2026, 3, 28, 23, 30, 0)},
		{"anchor fractions of a second are dropped", utc(2026, 4, 5, 6, 7, 8).Add(999 * time.Millisecond), utc(2026, 5, 5, 6, 7, 8),
			utc(2026, 5, 5, 6, 7, 8), utc(2026, 6, 5, 6, 7, 8)},
		{"zero anchor gives calendar months in UTC", time.Time{}, utc(2026, 7, 4, 0, 0, 0),
			utc(2026, 7, 1, 0, 0, 0), utc(2026, 8, 1, 0, 0, 0)},
	}
	rule := PeriodRule{Anniversary: true, Location: zone(t, "Europe/Berlin")} // Location is ignored
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := rule.Period(tc.at, tc.anchor)
			if !p.Start.Equal(tc.start) || !p.End.Equal(tc.end) {
				t.Fatalf("Period(%v, anchor %v) = [%v, %v), want [%v, %v)", tc.at, tc.anchor, p.Start, p.End, tc.start, tc.end)
			}
			if p.Start.Location() != time.UTC {
				t.Errorf("Start in %v, want UTC", p.Start.Location())
			}
			if got, err := ParseTimeID(p.ID()); err != nil || !got.Equal(p.Start) {
				t.Errorf("ParseTimeID(%q) = %v, %v; want %v", p.ID(), got, err, p.Start)
			}
		})
	}
}

// TestAnniversaryYearOf31st walks two years of periods from a January 31
// anchor: each starts on the month's last day when it has fewer than 31,
// and every period's End is the next one's Start.
func TestAnniversaryYearOf31st(t *testing.T) {
	anchor := utc(2027, 1, 31, 8, 0, 0)
	want := []string{
		"2027-01-31", "2027-02-28", "2027-03-31", "2027-04-30", "2027-05-31", "2027-06-30",
		"2027-07-31", "2027-08-31", "2027-09-30", "2027-10-31", "2027-11-30", "2027-12-31",
		"2028-01-31", "2028-02-29", "2028-03-31", "2028-04-30", "2028-05-31", "2028-06-30",
		"2028-07-31", "2028-08-31", "2028-09-30", "2028-10-31", "2028-11-30", "2028-12-31",
		"2029-01-31", "2029-02-28", "2029-03-31",
	}
	rule := PeriodRule{Anniversary: true}
	p := rule.Period(anchor, anchor)
	for i, w := range want {
		if got := p.Start.Format("2006-01-02 15:04"); got != w+" 08:00" {
			t.Fatalf("period %d starts %s, want %s 08:00", i, got, w)
		}
		if q := rule.Period(p.End.Add(-time.Nanosecond), anchor); q != p {
			t.Fatalf("period %d: last instant maps to %v, want %v", i, q, p)
		}
		next := rule.Period(p.End, anchor)
		if next.Start != p.End {
			t.Fatalf("period %d: next period starts %v, want %v", i, next.Start, p.End)
		}
		p = next
	}
}

// TestPeriodsTile checks, at many random instants in zones with unusual
// transitions, that the period contains the instant and that periods tile
// time: the period at End starts at End, the period just before Start ends
// at Start, and calendar periods start on the 1st of their local month.
func TestPeriodsTile(t *testing.T) {
	rules := map[string]PeriodRule{"anniversary 31st": {Anniversary: true}}
	for _, name := range []string{"UTC", "Europe/Berlin", "America/New_York", "America/Asuncion",
		"Africa/Cairo", "America/Goose_Bay", "Australia/Lord_Howe", "Pacific/Chatham", "Asia/Kathmandu",
		"America/Santiago", "America/Havana", "Pacific/Apia", "Africa/Tunis"} {
		rules[name] = PeriodRule{Location: zone(t, name)}
	}
	anchor := utc(1969, 12, 31, 23, 0, 0)
	rng := rand.New(rand.NewPCG(1, 2))
	lo, hi := utc(1970, 1, 1, 0, 0, 0).Unix(), utc(2040, 1, 1, 0, 0, 0).Unix()
	for name, r := range rules {
		for range 20000 {
			at := time.Unix(lo+rng.Int64N(hi-lo), 0)
			p := r.Period(at, anchor)
			if !p.Contains(at) {
				t.Fatalf("%s: Period(%v) = %v does not contain it", name, at.UTC(), p)
			}
			if next := r.Period(p.End, anchor); next.Start != p.End {
				t.Fatalf("%s: period after %v starts %v", name, p, next.Start)
			}
			if prev := r.Period(p.Start.Add(-time.Nanosecond), anchor); prev.End != p.Start && p.Start != anchor {
				t.Fatalf("%s: period before %v ends %v", name, p, prev.End)
			}
			if !r.Anniversary {
				if local := p.Start.In(r.Location); local.Day() != 1 {
					t.Fatalf("%s: period starts %v", name, local)
				}
				if got := p.Start.In(r.Location).Add(-time.Nanosecond); got.Day() == 1 && got.Month() == p.Start.In(r.Location).Month() {
					t.Fatalf("%s: %v is already the 1st before the period starts", name, got)
				}
			}
			if p.Seconds() < 27*day || p.Seconds() > 32*day {
				t.Fatalf("%s: %v lasts %d s", name, p, p.Seconds())
			}
		}
	}
}

func TestStartingIn(t *testing.T) {
	berlin := PeriodRule{Location: zone(t, "Europe/Berlin")}
	anniv := PeriodRule{Anniversary: true}
	jan31 := utc(2026, 1, 31, 10, 0, 0)
	tests := []struct {
		name       string
		r          PeriodRule
		y          int
		m          time.Month
		anchor     time.Time
		ok         bool
		start, end time.Time
	}{
		{"calendar UTC", PeriodRule{}, 2026, 2, jan31, true, utc(2026, 2, 1, 0, 0, 0), utc(2026, 3, 1, 0, 0, 0)},
		{"calendar Berlin", berlin, 2026, 11, jan31, true, utc(2026, 10, 31, 23, 0, 0), utc(2026, 11, 30, 23, 0, 0)},
		{"anniversary anchor month", anniv, 2026, 1, jan31, true, jan31, utc(2026, 2, 28, 10, 0, 0)},
		{"anniversary clamped month", anniv, 2026, 2, jan31, true, utc(2026, 2, 28, 10, 0, 0), utc(2026, 3, 31, 10, 0, 0)},
		{"anniversary next year", anniv, 2027, 1, jan31, true, utc(2027, 1, 31, 10, 0, 0), utc(2027, 2, 28, 10, 0, 0)},
		{"anniversary before the anchor", anniv, 2025, 12, jan31, false, time.Time{}, time.Time{}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p, ok := tc.r.StartingIn(tc.y, tc.m, tc.anchor)
			if ok != tc.ok || !p.Start.Equal(tc.start) || !p.End.Equal(tc.end) {
				t.Fatalf("StartingIn = %v, %v; want [%v, %v), %v", p, ok, tc.start, tc.end, tc.ok)
			}
			if ok && tc.r.Period(p.Start, tc.anchor) != p {
				t.Errorf("StartingIn disagrees with Period at its start")
			}
		})
	}
}

func TestSecondsLeft(t *testing.T) {
	p := Period{Start: utc(2026, 11, 1, 0, 0, 0), End: utc(2026, 12, 1, 0, 0, 0)}
	tests := []struct {
		at   time.Time
		want int64
	}{
		{p.Start, 30 * day},
		{p.Start.Add(-time.Hour), 30 * day},
		{p.End.Add(-time.Second), 1},
		{p.End.Add(-time.Nanosecond), 1},
		{p.End.Add(-1500 * time.Millisecond), 2},
		{p.End, 0},
		{p.End.Add(time.Hour), 0},
	}
	for _, tc := range tests {
		if got := p.SecondsLeft(tc.at); got != tc.want {
			t.Errorf("SecondsLeft(%v) = %d, want %d", tc.at, got, tc.want)
		}
	}
}

func TestHourStart(t *testing.T) {
	tests := []struct{ at, want time.Time }{
		{utc(2026, 11, 1, 13, 59, 59).Add(999 * time.Millisecond), utc(2026, 11, 1, 13, 0, 0)},
		{utc(2026, 11, 1, 13, 0, 0), utc(2026, 11, 1, 13, 0, 0)},
		{time.Date(2026, 11, 1, 0, 45, 0, 0, zone(t, "Asia/Kathmandu")), utc(2026, 10, 31, 19, 0, 0)}, // 19:00 UTC +05:45
	}
	for _, tc := range tests {
		got := HourStart(tc.at)
		if got != tc.want {
			t.Errorf("HourStart(%v) = %v, want %v", tc.at, got, tc.want)
		}
	}
}

func TestTimeID(t *testing.T) {
	at := time.Date(2026, 11, 1, 1, 2, 3, 456, zone(t, "Europe/Berlin"))
	if got := TimeID(at); got != "20261101T000203Z" {
		t.Errorf("TimeID = %q", got)
	}
	if got, err := ParseTimeID("20261101T000203Z"); err != nil || got != utc(2026, 11, 1, 0, 2, 3) {
		t.Errorf("ParseTimeID = %v, %v", got, err)
	}
	for _, bad := range []string{"", "2026-11", "20261101", "20261101T000203", "20261101T000203+0100",
		"20261301T000000Z", "20261101t000203z", " 20261101T000203Z", "20261131T000000Z"} {
		if _, err := ParseTimeID(bad); err == nil {
			t.Errorf("ParseTimeID(%q) accepted", bad)
		}
	}
}

func TestParsePeriodRule(t *testing.T) {
	tests := []struct {
		args     string
		want     PeriodRule
		zoneName string
		err      string
	}{
		{args: "calendar", want: PeriodRule{Location: time.UTC}, zoneName: "UTC"},
		{args: "calendar UTC", zoneName: "UTC"},
		{args: "calendar Europe/Berlin", zoneName: "Europe/Berlin"},
		{args: "calendar America/New_York", zoneName: "America/New_York"},
		{args: "anniversary", want: PeriodRule{Anniversary: true}},
		{args: "", err: "want calendar [zone] or anniversary"},
		{args: "monthly", err: `unknown kind "monthly"`},
		{args: "Calendar", err: `unknown kind "Calendar"`},
		{args: "calendar Europe/Berln", err: `unknown time zone "Europe/Berln"`},
		{args: "calendar Local", err: `"Local" is not allowed`},
		{args: "calendar Europe/Berlin extra", err: `unexpected "extra"`},
		{args: "anniversary UTC", err: `unexpected "UTC"`},
	}
	for _, tc := range tests {
		t.Run(tc.args, func(t *testing.T) {
			r, err := ParsePeriodRule(strings.Fields(tc.args))
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want one containing %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if r.Anniversary != tc.want.Anniversary {
				t.Errorf("Anniversary = %v", r.Anniversary)
			}
			if tc.zoneName != "" && (r.Location == nil || r.Location.String() != tc.zoneName) {
				t.Errorf("Location = %v, want %s", r.Location, tc.zoneName)
			}
		})
	}
}

func TestParseMonth(t *testing.T) {
	y, m, err := ParseMonth("2026-02")
	if err != nil || y != 2026 || m != time.February {
		t.Errorf("ParseMonth(2026-02) = %d, %v, %v", y, m, err)
	}
	for _, bad := range []string{"", "2026-2", "2026-00", "2026-13", "26-02", "2026/02", "+026-02", "2026-+2", "2026-02-01", "２０２６-02"} {
		if _, _, err := ParseMonth(bad); err == nil {
			t.Errorf("ParseMonth(%q) accepted", bad)
		}
	}
}
