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

// dailyChart builds the chart of u's period, from its start to the end of
// today or of the period, whichever is first. Days are UTC days.
func dailyChart(u Usage, now time.Time) chart {
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
	c := chart{Width: chartWidth, Height: chartHeight, AxisX: chartLeft, AxisY: chartTop, BaseY: chartHeight - chartBottom, Days: days}
	top := total
	if u.Included != nil {
		top = max(top, *u.Included)
	}
	top = max(top, 1)
	c.Max = top
	plotH := int64(c.BaseY - chartTop)
	y := func(v int64) int { return c.BaseY - int(v*plotH/top) }
	if u.Included != nil {
		c.HasIncluded, c.IncludedY = true, y(*u.Included)
	}
	if len(days) == 0 {
		return c
	}
	slot := (chartWidth - chartLeft - 8) / len(days)
	w := max(slot*3/4, 2)
	for i, d := range days {
		b := bar{X: chartLeft + 4 + i*slot, Y: y(d.Total), W: w, Title: fmt.Sprintf("%s: %d units that day, %d in the period so far", d.Date, d.Units, d.Total)}
		b.H = c.BaseY - b.Y
		if i%5 == 0 {
			b.Label = d.Date[8:]
		}
		if u.Included != nil && d.Total > *u.Included {
			days[i].OverIncludedLine = true
		}
		c.Bars = append(c.Bars, b)
	}
	return c
}
