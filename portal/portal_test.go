package portal

import (
	"context"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/store"
	"github.com/apimonetize/caddy-api-monetize/store/boltstore"
)

func TestNormalizeEmail(t *testing.T) {
	for in, want := range map[string]string{
		"Dev@Example.com":              "dev@example.com",
		"  dev@example.com ":           "dev@example.com",
		"Dev <dev@example.com>":        "",
		"dev@example.com, x@evil.test": "",
		"dev":                          "",
		"":                             "",
		"dev@example.com\r\nBcc: x@y":  "",
		strings.Repeat("a", 250) + "@example.com": "",
	} {
		if got := normalizeEmail(in); got != want {
			t.Errorf("normalizeEmail(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestAllowConcurrent: attempts racing on one subject get exactly limit
// slots, on a real store.
func TestAllowConcurrent(t *testing.T) {
	st, err := boltstore.Open(filepath.Join(t.TempDir(), "store.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	now := time.Now()
	var allowed atomic.Int32
	var wg sync.WaitGroup
	for range 20 {
		wg.Go(func() {
			ok, err := allow(context.Background(), st, "email", "dev@example.com", 5, now)
			if err != nil {
				t.Error(err)
			}
			if ok {
				allowed.Add(1)
			}
		})
	}
	wg.Wait()
	if n := allowed.Load(); n != 5 {
		t.Fatalf("%d of 20 racing attempts allowed, want 5", n)
	}
	if ok, _ := allow(context.Background(), st, "email", "other@example.com", 5, now); !ok {
		t.Fatal("another subject is throttled")
	}
	if ok, _ := allow(context.Background(), st, "email", "dev@example.com", 5, now.Add(throttleWindow)); !ok {
		t.Fatal("the next window is throttled")
	}
}

// TestDailyChart: one bar per day up to today with the period's running
// total, the included line, and the days past it flagged.
func TestDailyChart(t *testing.T) {
	start := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
	included := int64(100)
	hour := func(d, h int) string {
		return metering.TimeID(start.Add(time.Duration(d)*24*time.Hour + time.Duration(h)*time.Hour))
	}
	u := Usage{
		Start: start, End: start.AddDate(0, 1, 0), Included: &included,
		Hours: []store.HourUsage{
			{HourID: hour(0, 3), Counters: store.Counters{Billed: 30, Requests: 3}},
			{HourID: hour(0, 9), Counters: store.Counters{Billed: 10, Requests: 1}},
			{HourID: hour(2, 0), Counters: store.Counters{Billed: 80, Requests: 8}},
		},
	}
	c := dailyChart(u, start.Add(3*24*time.Hour+time.Hour)) // during the 4th day
	if len(c.Days) != 4 || len(c.Bars) != 4 {
		t.Fatalf("days %d, bars %d, want 4", len(c.Days), len(c.Bars))
	}
	totals := []int64{40, 40, 120, 120}
	for i, d := range c.Days {
		if d.Total != totals[i] {
			t.Errorf("day %d total %d, want %d", i, d.Total, totals[i])
		}
		if d.OverIncludedLine != (totals[i] > included) {
			t.Errorf("day %d over the included line: %v", i, d.OverIncludedLine)
		}
	}
	if c.Max != 120 || !c.HasIncluded {
		t.Fatalf("max %d, included %v", c.Max, c.HasIncluded)
	}
	// The tallest bar reaches the top; the included line sits at 100/120.
	if c.Bars[2].Y != c.AxisY || c.Bars[2].H != c.BaseY-c.AxisY {
		t.Errorf("tallest bar %+v, axis %d..%d", c.Bars[2], c.AxisY, c.BaseY)
	}
	if want := c.BaseY - int(100*int64(c.BaseY-c.AxisY)/120); c.IncludedY != want {
		t.Errorf("included line at %d, want %d", c.IncludedY, want)
	}
}

// TestHourlyChart: one bar per UTC hour of the last two days up to the
// current hour, never before the period's start.
func TestHourlyChart(t *testing.T) {
	start := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
	now := start.Add(3*24*time.Hour + 90*time.Minute) // Nov 4, 01:30
	u := Usage{Start: start, End: start.AddDate(0, 1, 0), Hours: []store.HourUsage{
		{HourID: metering.TimeID(start), Counters: store.Counters{Billed: 99}}, // outside the two days
		{HourID: metering.TimeID(now.Truncate(time.Hour)), Counters: store.Counters{Billed: 7}},
		{HourID: metering.TimeID(now.Add(-5 * time.Hour).Truncate(time.Hour)), Counters: store.Counters{Billed: 14}},
	}}
	c := hourlyChart(u, now)
	if len(c.Bars) != 48 || c.Max != 14 {
		t.Fatalf("%d bars, max %d; want 48 bars, max 14", len(c.Bars), c.Max)
	}
	if last := c.Bars[47]; !strings.Contains(last.Title, "2026-11-04 01:00 UTC: 7 units") {
		t.Errorf("last bar %+v", last)
	}
	if b := c.Bars[42]; b.Y != c.AxisY || !strings.Contains(b.Title, ": 14 units") {
		t.Errorf("bar of 5 hours ago %+v", b)
	}
	if young := hourlyChart(u, start.Add(9*time.Hour+time.Minute)); len(young.Bars) != 10 {
		t.Errorf("a period 9 hours old has %d hourly bars, want 10", len(young.Bars))
	}
}

func TestHumanDuration(t *testing.T) {
	for d, want := range map[time.Duration]string{
		time.Hour: "1 hour", 2 * time.Hour: "2 hours", 90 * time.Minute: "90 minutes", 5 * time.Minute: "5 minutes", time.Minute: "1 minute",
	} {
		if got := humanDuration(d); got != want {
			t.Errorf("humanDuration(%v) = %q, want %q", d, got, want)
		}
	}
}

func TestAgentSummary(t *testing.T) {
	for ua, want := range map[string]string{
		"Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0":                                                                  "Firefox on Linux",
		"Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0 Safari/537.36 Edg/130.0":                   "Edge on Windows",
		"Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1": "Safari on iOS",
		"curl/8.5.0": "curl", "": "Unknown browser", "<script>": "Unknown browser",
	} {
		if got := agentSummary(ua); got != want {
			t.Errorf("agentSummary(%q) = %q, want %q", ua, got, want)
		}
	}
}
