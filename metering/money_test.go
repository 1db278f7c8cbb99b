package metering

import (
	"errors"
	"math"
	"strings"
	"testing"
)

func TestParseMicros(t *testing.T) {
	tests := []struct {
		in   string
		want int64
	}{
		{"0", 0},
		{"0.0", 0},
		{"0.002", 2000},
		{"0.000001", 1},
		{"49", 49_000_000},
		{"49.00", 49_000_000},
		{"49.5", 49_500_000},
		{"007.10", 7_100_000},
		{"123456.654321", 123_456_654_321},
		{"9223372036854.775807", math.MaxInt64},
	}
	for _, tc := range tests {
		got, err := ParseMicros(tc.in)
		if err != nil || got != tc.want {
			t.Errorf("ParseMicros(%q) = %d, %v; want %d", tc.in, got, err, tc.want)
		}
	}
}

func TestParseMicrosRejects(t *testing.T) {
	tests := []struct{ in, err string }{
		{"", "empty"},
		{"-1", "negative"},
		{"-0.5", "negative"},
		{"1e3", "exponent"},
		{"2E-3", "exponent"},
		{"1,000", "thousands"},
		{"0,5", "thousands"},
		{"0.0000001", "at most 6 decimal places"},
		{"0.0020000", "at most 6 decimal places"},
		{"+1", "want a decimal number"},
		{"$1", "want a decimal number"},
		{".5", "want a decimal number"},
		{"5.", "want a decimal number"},
		{"1.2.3", "want a decimal number"},
		{" 1", "want a decimal number"},
		{"1 ", "want a decimal number"},
		{"0x10", "want a decimal number"},
		{"NaN", "want a decimal number"},
		{"Inf", "want a decimal number"},
		{"١", "want a decimal number"},
		{"9223372036854.775808", "too large"},
		{"9223372036855", "too large"},
		{"99999999999999999999999", "too large"},
	}
	for _, tc := range tests {
		got, err := ParseMicros(tc.in)
		if err == nil || !strings.Contains(err.Error(), tc.err) {
			t.Errorf("ParseMicros(%q) = %d, %v; want an error containing %q", tc.in, got, err, tc.err)
		}
	}
	if _, err := ParseMicros("9223372036855"); !errors.Is(err, ErrMoneyOverflow) {
		t.Errorf("overflow error %v is not ErrMoneyOverflow", err)
	}
}

func TestFormatMicros(t *testing.T) {
	tests := []struct {
		in   int64
		want string
	}{
		{0, "0"},
		{1, "0.000001"},
		{2000, "0.002"},
		{49_000_000, "49"},
		{49_500_000, "49.5"},
		{100_010_000, "100.01"},
		{-2_500_000, "-2.5"},
		{math.MaxInt64, "9223372036854.775807"},
		{math.MinInt64, "-9223372036854.775808"},
	}
	for _, tc := range tests {
		if got := FormatMicros(tc.in); got != tc.want {
			t.Errorf("FormatMicros(%d) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestMicrosRoundTrip(t *testing.T) {
	for _, m := range []int64{0, 1, 10, 999_999, 1_000_000, 1_000_001, 123_456_789, math.MaxInt64 - 1, math.MaxInt64} {
		got, err := ParseMicros(FormatMicros(m))
		if err != nil || got != m {
			t.Errorf("ParseMicros(FormatMicros(%d)) = %d, %v", m, got, err)
		}
	}
}

func TestOverageCharge(t *testing.T) {
	tests := []struct {
		units, price, want int64
		err                string
	}{
		{units: 0, price: 2000, want: 0},
		{units: 1, price: 2000, want: 2000},
		{units: 12_345, price: 2000, want: 24_690_000}, // 24.69
		{units: 1_000_000, price: 1000, want: 1_000_000_000},
		{units: math.MaxInt64, price: 1, want: math.MaxInt64},
		{units: math.MaxInt64, price: 0, want: 0},
		{units: math.MaxInt64 / 2000, price: 2000, want: math.MaxInt64 / 2000 * 2000},
		{units: math.MaxInt64/2000 + 1, price: 2000, err: "too large"},
		{units: math.MaxInt64, price: 2, err: "too large"},
		{units: 1 << 32, price: 1 << 31, err: "too large"}, // exactly 2^63
		{units: 1 << 32, price: 1<<31 - 1, want: 1<<63 - 1<<32},
		{units: -1, price: 2000, err: "negative"},
		{units: 1, price: -1, err: "negative"},
	}
	for _, tc := range tests {
		got, err := OverageCharge(tc.units, tc.price)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("OverageCharge(%d, %d) = %d, %v; want error %q", tc.units, tc.price, got, err, tc.err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("OverageCharge(%d, %d) = %d, %v; want %d", tc.units, tc.price, got, err, tc.want)
		}
	}
}

func TestParseCurrency(t *testing.T) {
	for in, want := range map[string]string{"usd": "usd", "USD": "usd", "Eur": "eur", "jpy": "jpy"} {
		if got, err := ParseCurrency(in); err != nil || got != want {
			t.Errorf("ParseCurrency(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "us", "usdt", "us1", "u d", "$us", "u@d", "u[d", "ü", "€€€"} {
		if got, err := ParseCurrency(bad); err == nil {
			t.Errorf("ParseCurrency(%q) = %q, want an error", bad, got)
		}
	}
}
