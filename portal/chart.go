package portal

import (
	"fmt"
	"time"

	"github.com/apimonetize/caddy-api-monetize/metering"
)

// Chart geometry, in SVG user units.
const (
	chartWidth  = 640
	chartHeight = 220
	chartLeft   = 56 // room for the axis labels
	chartTop    = 16
	chartBottom = 24
)

// chart is the usage chart of a period: one bar per day with the units
// used up to the end of that day, and the included units as a line.
type chart struct {
	Width, Height int
	Bars          []bar
	// HasIncluded draws the included line at IncludedY.
	HasIncluded bool
	IncludedY   int
	// Max labels the top of the axis; AxisY/BaseY are the axis' ends.
	Max          int64
	AxisX        int
	AxisY, BaseY int
	Days         []day
}

// bar is one day's bar.
type bar struct {
	X, Y, W, H int
	Label      string // day of month, under every few bars
	Title      string // tooltip and accessible text
}

// day is a row of the table that repeats the chart for screen readers and
// text browsers.
type day struct {
	Date             string
	Units, Total     int64
	Requests         int64
	OverIncludedLine bool
}

// meterChart is the daily chart of one of the other meters.
type meterChart struct {
	// Meter is the meter's name, also the unit its chart counts.
	Meter string
	chart
}

// meterCharts builds the daily chart of each of u's other meters, in the
// order of u.Meters, against its included units when the tier has some.
func meterCharts(u Usage, now time.Time) []meterChart {
	var out []meterChart
	for _, m := range u.Meters {
		mu := Usage{Start: u.Start, End: u.End, Hours: m.Hours, Included: m.Included}
		out = append(out, meterChart{Meter: m.Meter, chart: dailyChartOf(mu, now, m.Meter)})
	}
	return out
}

// dailyChart builds the chart of u's period, from its start to the end of
// today or of the period, whichever is first. Days are UTC days.
func dailyChart(u Usage, now time.Time) chart { return dailyChartOf(u, now, "units") }

// dailyChartOf is dailyChart with the bars' titles counting unit.
func dailyChartOf(u Usage, now time.Time, unit string) chart {
	start := u.Start.UTC().Truncate(24 * time.Hour)
	end := u.End.UTC()
	if now.Before(end) {
		end = now.UTC()
	}
	perDay := map[time.Time][2]int64{}
	for _, h := range u.Hours {
		t, err := metering.ParseTimeID(h.HourID)
		if err != nil {
			continue
		}
		d := t.UTC().Truncate(24 * time.Hour)
		v := perDay[d]
		perDay[d] = [2]int64{v[0] + h.Billed, v[1] + h.Requests}
	}
	var days []day
	var total int64
	for d := start; d.Before(end) && len(days) < 62; d = d.Add(24 * time.Hour) {
		v := perDay[d]
		total += v[0]
		days = append(days, day{Date: d.Format("2006-01-02"), Units: v[0], Total: total, Requests: v[1]})
	}
	top := total
	if u.Included != nil {
		top = max(top, *u.Included)
	}
	totals := make([]int64, len(days))
	for i, d := range days {
		totals[i] = d.Total
		if u.Included != nil && d.Total > *u.Included {
			days[i].OverIncludedLine = true
		}
	}
	c := plot(totals, top, func(i int) (string, string) {
		label := ""
		if i%5 == 0 {
			label = days[i].Date[8:]
		}
		return label, fmt.Sprintf("%s: %d %s that day, %d in the period so far", days[i].Date, days[i].Units, unit, days[i].Total)
	})
	c.Days = days
	if u.Included != nil {
		c.HasIncluded, c.IncludedY = true, c.y(*u.Included)
	}
	return c
}

// hourlyChart is the units used in each UTC hour of the last two days of
// u's period, up to the current hour.
func hourlyChart(u Usage, now time.Time) chart {
	end := now.UTC().Truncate(time.Hour).Add(time.Hour)
	if pe := u.End.UTC(); pe.Before(end) {
		end = pe
	}
	start := end.Add(-48 * time.Hour)
	if ps := u.Start.UTC(); ps.After(start) {
		start = ps.Truncate(time.Hour)
	}
	perHour := map[time.Time]int64{}
	for _, h := range u.Hours {
		if t, err := metering.ParseTimeID(h.HourID); err == nil {
			perHour[t.UTC()] += h.Billed
		}
	}
	var hours []time.Time
	var values []int64
	var top int64
	for t := start; t.Before(end); t = t.Add(time.Hour) {
		hours = append(hours, t)
		values = append(values, perHour[t])
		top = max(top, perHour[t])
	}
	return plot(values, top, func(i int) (string, string) {
		label := ""
		if hours[i].Hour()%6 == 0 {
			label = hours[i].Format("15h")
		}
		return label, fmt.Sprintf("%s: %d units", hours[i].Format("2006-01-02 15:00 UTC"), values[i])
	})
}

// plot lays out one bar per value on an axis from 0 to top (at least 1);
// text gives each bar's axis label ("" for none) and its title.
func plot(values []int64, top int64, text func(i int) (label, title string)) chart {
	c := chart{Width: chartWidth, Height: chartHeight, AxisX: chartLeft, AxisY: chartTop, BaseY: chartHeight - chartBottom, Max: max(top, 1)}
	if len(values) == 0 {
		return c
	}
	slot := (chartWidth - chartLeft - 8) / len(values)
	w := max(slot*3/4, 2)
	for i, v := range values {
		label, title := text(i)
		b := bar{X: chartLeft + 4 + i*slot, Y: c.y(v), W: w, Label: label, Title: title}
		b.H = c.BaseY - b.Y
		c.Bars = append(c.Bars, b)
	}
	return c
}

// y is the vertical position of value v.
func (c chart) y(v int64) int {
	return c.BaseY - int(v*int64(c.BaseY-c.AxisY)/c.Max)
}
