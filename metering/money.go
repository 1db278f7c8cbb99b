package metering

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
)

// MicrosPerUnit is the number of micro-units in one unit of a currency:
// amounts are held as int64 millionths (49.00 USD = 49000000).
const MicrosPerUnit = 1_000_000

// ErrMoneyOverflow is returned when an amount does not fit in int64
// micro-units (about 9.2 trillion currency units).
var ErrMoneyOverflow = errors.New("amount too large")

// ParseMicros parses an exact, non-negative decimal amount of a currency
// into micro-units: "0.002" is 2000, "49.00" is 49000000, "0" is 0. It
// accepts digits with an optional '.' followed by 1 to 6 digits, and
// rejects signs, exponents, thousands separators, currency symbols, more
// than 6 decimal places and amounts beyond int64.
func ParseMicros(s string) (int64, error) {
	intPart, frac, hasDot := strings.Cut(s, ".")
	switch {
	case s == "":
		return 0, errors.New("empty amount")
	case s[0] == '-':
		return 0, fmt.Errorf("invalid amount %q: negative amounts are not allowed", s)
	case strings.ContainsAny(s, "eE") && strings.Trim(s, "0123456789.eE+-") == "":
		return 0, fmt.Errorf("invalid amount %q: write it as a plain decimal, without an exponent", s)
	case strings.Contains(s, ","):
		return 0, fmt.Errorf("invalid amount %q: use '.' for decimals and no thousands separators", s)
	case intPart == "" || !allDigits(intPart) || hasDot && (frac == "" || !allDigits(frac)):
		return 0, fmt.Errorf("invalid amount %q: want a decimal number such as 49.00 or 0.002", s)
	case len(frac) > 6:
		return 0, fmt.Errorf("invalid amount %q: at most 6 decimal places", s)
	}
	fracMicros, _ := strconv.ParseInt(frac+strings.Repeat("0", 6-len(frac)), 10, 64)
	whole, err := strconv.ParseInt(intPart, 10, 64)
	if err != nil || whole > (math.MaxInt64-fracMicros)/MicrosPerUnit {
		return 0, fmt.Errorf("invalid amount %q: %w", s, ErrMoneyOverflow)
	}
	return whole*MicrosPerUnit + fracMicros, nil
}

// FormatMicros formats micro-units as the shortest exact decimal: 2000 is
// "0.002", 49000000 is "49", 49500000 is "49.5". Negative amounts get a
// leading '-'. ParseMicros(FormatMicros(m)) == m for every m >= 0.
func FormatMicros(m int64) string {
	sign := ""
	u := uint64(m)
	if m < 0 {
		sign = "-"
		u = -u // two's complement magnitude; exact for math.MinInt64 too
	}
	whole := strconv.FormatUint(u/MicrosPerUnit, 10)
	frac := u % MicrosPerUnit
	if frac == 0 {
		return sign + whole
	}
	digits := strconv.FormatUint(frac+MicrosPerUnit, 10)[1:] // 6 digits, zero-padded
	return sign + whole + "." + strings.TrimRight(digits, "0")
}

// OverageCharge is the exact price in micro-units of units overage units at
// priceMicros micro-units each. It fails on negative inputs and when the
// product does not fit in int64 (ErrMoneyOverflow).
func OverageCharge(units, priceMicros int64) (int64, error) {
	if units < 0 || priceMicros < 0 {
		return 0, fmt.Errorf("overage charge of %d units at %d micros: negative input", units, priceMicros)
	}
	if units != 0 && priceMicros > math.MaxInt64/units {
		return 0, fmt.Errorf("overage charge of %d units at %s each: %w", units, FormatMicros(priceMicros), ErrMoneyOverflow)
	}
	return units * priceMicros, nil
}

// ParseCurrency validates a three-letter currency code (ISO 4217 form, e.g.
// "USD" or "eur") and returns it in lower case, as Stripe writes it. It
// checks the form only, not that the currency exists.
func ParseCurrency(s string) (string, error) {
	if len(s) != 3 {
		return "", fmt.Errorf("invalid currency %q: want a three-letter code such as usd", s)
	}
	for i := range 3 {
		c := s[i] | 0x20 // ASCII lower case; non-letters stay outside a-z
		if c < 'a' || c > 'z' {
			return "", fmt.Errorf("invalid currency %q: want a three-letter code such as usd", s)
		}
	}
	return strings.ToLower(s), nil
}
