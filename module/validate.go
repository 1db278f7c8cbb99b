package module

import (
	"errors"
	"net/mail"
	"regexp"
	"strings"
)

// stripeCustomerIDPattern is a Stripe customer id: "cus_" and letters and
// digits, as Stripe issues them.
var stripeCustomerIDPattern = regexp.MustCompile(`^cus_[A-Za-z0-9]{1,250}$`)

// checkStripeCustomerID validates a customer's Stripe id, wherever it comes
// from (Caddyfile, JSON config, admin API).
func checkStripeCustomerID(v string) error {
	if !stripeCustomerIDPattern.MatchString(v) {
		return errors.New("expected a Stripe customer id such as cus_NffrFeUfNV2Hib (cus_ and letters and digits)")
	}
	return nil
}

// maxEmailLength is the longest address SMTP carries (RFC 5321: a path of
// 256 octets, less the angle brackets).
const maxEmailLength = 254

// checkEmail validates a customer's notification address, wherever it comes
// from (Caddyfile, JSON config, admin API): one plain address, nothing
// around it (no display name, no comment, no line break that could add a
// header to a notification email).
func checkEmail(v string) error {
	bad := len(v) > maxEmailLength || strings.ContainsFunc(v, func(r rune) bool { return r < 0x20 || r == 0x7f })
	if !bad {
		addr, err := mail.ParseAddress(v)
		bad = err != nil || addr.Address != v
	}
	if bad {
		return errors.New("expected a plain address such as billing@example.com")
	}
	return nil
}
