package notify

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"io"
	"math"
	"mime"
	"mime/multipart"
	"mime/quotedprintable"
	"net/mail"
	"net/url"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
)

// FuzzPayload fuzzes the notification payload and email builders with the
// fields a customer record and a tier hold. Properties: the webhook body is
// JSON that decodes to the same payload; the percentage is exact for
// non-negative usage; the email is a well-formed MIME message whose
// headers are exactly the ones written (no field can add one, whatever
// line breaks it holds) and whose two parts decode back to the rendered
// text and HTML; a meter's payload (odd thresholds) names the meter with
// meter-name characters only.
func FuzzPayload(f *testing.F) {
	f.Add("acme", "pro", int64(800), int64(1000), 80, "bill", "billing@example.com")
	f.Add("c\r\nBcc: victim@example.com", "t\nX: y", int64(1200), int64(1000), 120, "block", "a@b.example")
	f.Add("ünï", "<script>", int64(9223372036854775807), int64(1), 100, "throttle", "x@y.example")
	f.Add("", "", int64(0), int64(0), 0, "", "z@z.example")
	f.Fuzz(func(t *testing.T, customer, tier string, used, included int64, threshold int, overQuota, to string) {
		at := time.Date(2026, 12, 6, 10, 0, 0, 0, time.UTC)
		period := Period{Start: time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC), End: time.Date(2027, 1, 1, 0, 0, 0, 0, time.UTC)}
		p := NewPayload(customer, tier, period, used, included, threshold, overQuota, at)
		if threshold%2 != 0 {
			// A meter's notification, named by the fuzzed tier string.
			p = p.ForMeter(tier)
			if strings.ContainsFunc(p.Data.Meter, func(r rune) bool { return r < '-' || r > 'z' }) {
				t.Fatalf("meter name %q kept a character meter names never have", p.Data.Meter)
			}
		}

		var back Payload
		if err := json.Unmarshal(p.Marshal(), &back); err != nil {
			t.Fatalf("the webhook body is not JSON: %v\n%s", err, p.Marshal())
		}
		// JSON carries strings as valid UTF-8: compare what survives it.
		want := p
		want.Data.Customer, want.Data.Tier, want.Data.OverQuota = utf8(want.Data.Customer), utf8(want.Data.Tier), utf8(want.Data.OverQuota)
		if !reflect.DeepEqual(back, want) {
			t.Fatalf("the webhook body does not round-trip:\n%+v\n%+v", back, want)
		}
		if used >= 0 && included > 0 {
			q, r := used/included, used%included
			if q <= (math.MaxInt64-100)/100 && p.Data.Percentage != (q*100+r*100/included) {
				t.Fatalf("percentage of %d/%d is %d", used, included, p.Data.Percentage)
			}
			if p.Data.Percentage < 0 {
				t.Fatalf("negative percentage %d for %d/%d", p.Data.Percentage, used, included)
			}
		}

		rcpt, err := mail.ParseAddress(to)
		if err != nil {
			return // the app refuses such addresses (checkEmail); the SMTP sender too
		}
		from := &mail.Address{Name: "API Billing", Address: "billing@example.com"}
		e := RenderEmail(p)
		raw := buildMessage(from, rcpt, "ntf_1", e, at)
		msg, err := mail.ReadMessage(bytes.NewReader(raw))
		if err != nil {
			t.Fatalf("the email does not parse: %v\n%s", err, raw)
		}
		var names []string
		for k := range msg.Header {
			names = append(names, k)
		}
		wantNames := []string{"From", "To", "Subject", "Date", "Message-Id", "Mime-Version", "Auto-Submitted", "Content-Type"}
		if len(names) != len(wantNames) {
			t.Fatalf("the email has headers %q, want %q", names, wantNames)
		}
		for _, n := range wantNames {
			if len(msg.Header[n]) != 1 {
				t.Fatalf("the email has headers %q, want each of %q once", names, wantNames)
			}
		}
		dec := new(mime.WordDecoder)
		if subject, err := dec.DecodeHeader(msg.Header.Get("Subject")); err != nil || subject != e.Subject {
			t.Fatalf("subject %q decodes to %q, %v; want %q", msg.Header.Get("Subject"), subject, err, e.Subject)
		}
		_, params, err := mime.ParseMediaType(msg.Header.Get("Content-Type"))
		if err != nil {
			t.Fatal(err)
		}
		mr := multipart.NewReader(msg.Body, params["boundary"])
		for _, wantBody := range []string{e.Text, e.HTML} {
			part, err := mr.NextRawPart()
			if err != nil {
				t.Fatalf("a part is missing: %v", err)
			}
			body, err := io.ReadAll(quotedprintable.NewReader(part))
			if err != nil {
				t.Fatalf("a part does not decode: %v", err)
			}
			// Line ends are the transport's: CRLF, whatever the field held.
			if got, want := string(body), crlf.Replace(wantBody); got != want {
				t.Fatalf("a part decodes to %q, want %q", got, wantBody)
			}
		}
		if _, err := mr.NextRawPart(); err != io.EOF {
			t.Fatalf("more than two parts: %v", err)
		}
	})
}

// utf8 is s as encoding/json writes it back: each invalid byte replaced
// by U+FFFD.
func utf8(s string) string {
	var b strings.Builder
	for _, r := range s { // ranging yields RuneError once per invalid byte
		b.WriteRune(r)
	}
	return b.String()
}

// TestFuzzFindings keeps what FuzzPayload found: a usage too large for
// usage*100 wrapped the percentage negative (a notification saying -100 %),
// and a CR in a field turned into an extra line break in the email.
func TestFuzzFindings(t *testing.T) {
	if p := percentage(math.MaxInt64, 1); p != math.MaxInt64 {
		t.Errorf("percentage(MaxInt64, 1) = %d, want it saturated", p)
	}
	if p := percentage(1200, 1000); p != 120 {
		t.Errorf("percentage(1200, 1000) = %d", p)
	}
	if got := crlf.Replace("a\r\nb\rc\nd"); got != "a\r\nb\r\nc\r\nd" {
		t.Errorf("line ends written as %q", got)
	}
}

// FuzzWebhookSecret fuzzes the parsing of a webhook target's secret and
// URL (operator input). Properties: an accepted secret is 24 to 64 bytes
// and its error never echoes the secret; the signature is "v1," and a
// base64 HMAC-SHA256, deterministic for one message; an accepted URL is
// absolute http(s) without credentials.
func FuzzWebhookSecret(f *testing.F) {
	f.Add("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "https://hooks.example.com/usage")
	f.Add("whsec_", "http://user:pw@example.com/")
	f.Add("whsec_!!!", "//example.com")
	f.Add("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "https://[::1]:8443/x")
	f.Fuzz(func(t *testing.T, secret, target string) {
		key, err := ParseSecret(secret)
		if err != nil {
			// The error is one of the fixed messages (up to the byte count
			// it may name): nothing of the secret.
			if msg := withoutDigits(err.Error()); !slices.Contains(secretErrors, msg) {
				t.Fatalf("%q: unexpected error %q, does it echo the secret?", secret, err)
			}
		} else {
			if len(key) < 24 || len(key) > 64 {
				t.Fatalf("%q accepted with a %d-byte key", secret, len(key))
			}
			ts := time.Unix(1796551519, 0)
			sig := Sign(key, "msg_1", ts, []byte(`{"a":1}`))
			mac, ok := strings.CutPrefix(sig, "v1,")
			raw, decErr := base64.StdEncoding.DecodeString(mac)
			if !ok || decErr != nil || len(raw) != 32 || sig != Sign(key, "msg_1", ts, []byte(`{"a":1}`)) {
				t.Fatalf("signature %q is not a deterministic v1 HMAC-SHA256", sig)
			}
		}
		if CheckURL(target) == nil {
			u, err := url.Parse(target)
			if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil {
				t.Fatalf("%q accepted as a webhook URL", target)
			}
		}
	})
}

// secretErrors are ParseSecret's error messages without their digits.
var secretErrors = func() []string {
	var msgs []string
	for _, s := range []string{"nope", SecretPrefix + "!", SecretPrefix + "AAAA"} {
		_, err := ParseSecret(s)
		msgs = append(msgs, withoutDigits(err.Error()))
	}
	return msgs
}()

func withoutDigits(s string) string {
	return strings.Map(func(r rune) rune {
		if r >= '0' && r <= '9' {
			return -1
		}
		return r
	}, s)
}
