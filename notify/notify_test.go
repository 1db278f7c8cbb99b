package notify_test

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"net/mail"
	"strings"
	"testing"
	"time"

	standardwebhooks "github.com/standard-webhooks/standard-webhooks/libraries/go"

	"github.com/apimonetize/caddy-api-monetize/notify"
	"github.com/apimonetize/caddy-api-monetize/notify/notifytest"
)

const secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

func TestMessages(t *testing.T) {
	for _, c := range []struct {
		threshold int
		policy    string
		want      string
	}{
		{80, notify.PolicyBill, "You have used 80% of your included API calls."},
		{80, notify.PolicyBlock, "You have used 80% of your included API calls."},
		{100, notify.PolicyBill, "You have exceeded your included 50000 API calls. Overage billing is active."},
		{120, notify.PolicyBill, "You have exceeded your included 50000 API calls. Overage billing is active."},
		{100, notify.PolicyThrottle, "You have exceeded your included 50000 API calls. Requests are now throttled until the period ends."},
		{100, notify.PolicyBlock, "You have used all of your included 50000 API calls. Further requests are blocked until the period ends."},
	} {
		if got := notify.Message(c.threshold, 50000, c.policy); got != c.want {
			t.Errorf("Message(%d, %s) = %q, want %q", c.threshold, c.policy, got, c.want)
		}
	}
}

func TestPayloadJSON(t *testing.T) {
	start := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
	p := notify.NewPayload("acme", "pro", notify.Period{Start: start, End: start.AddDate(0, 1, 0)},
		55001, 50000, 100, notify.PolicyBill, start.Add(time.Hour))
	var got map[string]any
	if err := json.Unmarshal(p.Marshal(), &got); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{
		"type": "usage.threshold_crossed", "timestamp": "2026-11-01T01:00:00Z",
		"data": map[string]any{
			"customer": "acme", "tier": "pro",
			"period": map[string]any{"start": "2026-11-01T00:00:00Z", "end": "2026-12-01T00:00:00Z"},
			"usage":  55001.0, "included": 50000.0, "percentage": 110.0, "threshold": 100.0,
			"over_quota": "bill",
			"message":    "You have exceeded your included 50000 API calls. Overage billing is active.",
		},
	}
	gb, _ := json.Marshal(got)
	wb, _ := json.Marshal(want)
	if string(gb) != string(wb) {
		t.Errorf("payload\n got %s\nwant %s", gb, wb)
	}
}

func TestParseSecret(t *testing.T) {
	if _, err := notify.ParseSecret(secret); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{"", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_", "whsec_not base64!", "whsec_c2hvcnQ="} {
		if _, err := notify.ParseSecret(bad); err == nil {
			t.Errorf("ParseSecret(%q) accepted", bad)
		} else if len(bad) > len("whsec_") && strings.Contains(err.Error(), bad) {
			t.Errorf("error echoes the secret: %v", err)
		}
	}
}

func TestCheckURL(t *testing.T) {
	for _, ok := range []string{"https://hooks.example.com/api-usage", "http://127.0.0.1:9000/x"} {
		if err := notify.CheckURL(ok); err != nil {
			t.Errorf("CheckURL(%q): %v", ok, err)
		}
	}
	for _, bad := range []string{"hooks.example.com", "ftp://x/y", "https://", "https://u:p@x/", "://x"} {
		if err := notify.CheckURL(bad); err == nil {
			t.Errorf("CheckURL(%q) accepted", bad)
		}
	}
}

// TestSignMatchesLibrary checks Sign against the Standard Webhooks
// reference library's signer.
func TestSignMatchesLibrary(t *testing.T) {
	key, _ := notify.ParseSecret(secret)
	wh, err := standardwebhooks.NewWebhook(secret)
	if err != nil {
		t.Fatal(err)
	}
	ts := time.Unix(1_700_000_000, 0)
	body := []byte(`{"type":"usage.threshold_crossed"}`)
	want, _ := wh.Sign("acme|20261101T000000Z|80|webhook", ts, body)
	if got := notify.Sign(key, "acme|20261101T000000Z|80|webhook", ts, body); got != want {
		t.Errorf("Sign = %s, library = %s", got, want)
	}
}

func TestWebhookSend(t *testing.T) {
	rcv := notifytest.NewReceiver(t, secret, 1)
	key, _ := notify.ParseSecret(secret)
	w := notify.Webhook{URL: rcv.URL, Key: key}
	body := []byte(`{"type":"usage.threshold_crossed"}`)
	err := w.Send(context.Background(), "msg_1", time.Now(), body)
	var se notify.StatusError
	if !errors.As(err, &se) || se.Code != http.StatusServiceUnavailable {
		t.Fatalf("first attempt: got %v, want a 503 StatusError", err)
	}
	if err := w.Send(context.Background(), "msg_1", time.Now(), body); err != nil {
		t.Fatalf("second attempt: %v", err)
	}
	if bad := rcv.Invalid(); len(bad) > 0 {
		t.Fatalf("signatures did not verify: %v", bad)
	}
	got, total := rcv.Accepted()
	if len(got) != 1 || total != 1 || got[0].ID != "msg_1" || string(got[0].Body) != string(body) {
		t.Fatalf("accepted %+v (total %d)", got, total)
	}
	// A wrong key is refused by the receiver's verification.
	other, _ := notify.ParseSecret("whsec_" + strings.Repeat("A", 32))
	if err := (notify.Webhook{URL: rcv.URL, Key: other}).Send(context.Background(), "msg_2", time.Now(), body); err == nil {
		t.Fatal("a request signed with another key was accepted")
	}
	if len(rcv.Invalid()) != 1 {
		t.Fatalf("the receiver did not reject the bad signature: %v", rcv.Invalid())
	}
}

func TestRetrySchedule(t *testing.T) {
	r := notify.Retry{Base: 10 * time.Second, Max: 2 * time.Hour, GiveUp: 24 * time.Hour}
	first := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
	now := first
	nominal := r.Base
	for attempt := 1; ; attempt++ {
		next, dead := r.Next(attempt, first, now)
		if dead {
			if now.Sub(first) != r.GiveUp {
				t.Fatalf("dead-lettered after %v, want after the attempt at %v", now.Sub(first), r.GiveUp)
			}
			if attempt < 20 {
				t.Fatalf("only %d attempts in 24 h", attempt)
			}
			break
		}
		d := next.Sub(now)
		deadline := first.Add(r.GiveUp)
		if next.Equal(deadline) {
			if d > nominal {
				t.Fatalf("attempt %d: delay %v above the nominal %v", attempt, d, nominal)
			}
		} else if d < nominal/2 || d > nominal {
			t.Fatalf("attempt %d: delay %v outside [%v, %v]", attempt, d, nominal/2, nominal)
		}
		now = next
		nominal = min(2*nominal, r.Max)
	}
}

func TestEmailOverSMTP(t *testing.T) {
	for _, c := range []struct {
		name string
		opt  notifytest.SMTPOptions
	}{
		{"plain", notifytest.SMTPOptions{FailFirst: 1}},
		{"auth", notifytest.SMTPOptions{User: "mailer", Password: "s3cret"}},
		{"starttls+auth", notifytest.SMTPOptions{STARTTLS: true, User: "mailer", Password: "s3cret"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			srv := notifytest.NewSMTPServer(t, c.opt)
			s := notify.SMTP{Addr: srv.Addr, Username: c.opt.User, Password: c.opt.Password, From: "API Billing <billing@example.com>"}
			if srv.RootCAs != nil {
				s.TLS = tlsConfig(srv)
			}
			start := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
			p := notify.NewPayload("acme", "pro", notify.Period{Start: start, End: start.AddDate(0, 1, 0)}, 40000, 50000, 80, notify.PolicyBill, start)
			e := notify.RenderEmail(p)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			err := s.Send(ctx, "dev@acme.example", "acme|20261101T000000Z|80|email", e)
			if c.opt.FailFirst > 0 {
				if err == nil || !strings.Contains(err.Error(), "451") {
					t.Fatalf("first send: got %v, want the server's 451", err)
				}
				err = s.Send(ctx, "dev@acme.example", "acme|20261101T000000Z|80|email", e)
			}
			if err != nil {
				t.Fatal(err)
			}
			mails := srv.Mails()
			if len(mails) != 1 {
				t.Fatalf("%d mails, want 1", len(mails))
			}
			m := mails[0]
			if m.From != "billing@example.com" || len(m.To) != 1 || m.To[0] != "dev@acme.example" {
				t.Fatalf("envelope from %q to %q", m.From, m.To)
			}
			if m.TLS != c.opt.STARTTLS || m.User != c.opt.User {
				t.Fatalf("TLS %v user %q, want %v %q", m.TLS, m.User, c.opt.STARTTLS, c.opt.User)
			}
			checkMail(t, m.Data, "dev@acme.example", "API usage alert: 80% of your included API calls", "You have used 80% of your included API calls.")
		})
	}
}

func TestSMTPAuthNeverInClear(t *testing.T) {
	// PLAIN over an unencrypted connection is refused unless the server is
	// localhost; 127.0.0.1 counts as local for net/smtp, so check the
	// refusal path with a server name that is not local.
	srv := notifytest.NewSMTPServer(t, notifytest.SMTPOptions{User: "mailer", Password: "s3cret"})
	_, port, _ := strings.Cut(srv.Addr, ":")
	s := notify.SMTP{Addr: "localhost.:" + port, Username: "mailer", Password: "s3cret", From: "billing@example.com"}
	err := s.Send(context.Background(), "dev@acme.example", "x", notify.Email{Subject: "s", Text: "t", HTML: "h"})
	if err == nil || len(srv.Mails()) != 0 {
		t.Fatalf("credentials were sent without TLS to a non-local server name (err %v)", err)
	}
}

// checkMail parses a message and checks its recipient, subject and that
// both its text and HTML parts carry the sentence.
func checkMail(t *testing.T, data []byte, to, subject, sentence string) {
	t.Helper()
	msg, err := mail.ReadMessage(strings.NewReader(string(data)))
	if err != nil {
		t.Fatal(err)
	}
	if got := msg.Header.Get("To"); !strings.Contains(got, to) {
		t.Errorf("To %q", got)
	}
	dec := new(mime.WordDecoder)
	if got, _ := dec.DecodeHeader(msg.Header.Get("Subject")); got != subject {
		t.Errorf("Subject %q, want %q", got, subject)
	}
	mt, params, err := mime.ParseMediaType(msg.Header.Get("Content-Type"))
	if err != nil || mt != "multipart/alternative" {
		t.Fatalf("Content-Type %q", msg.Header.Get("Content-Type"))
	}
	mr := multipart.NewReader(msg.Body, params["boundary"])
	types := map[string]bool{}
	for {
		p, err := mr.NextPart()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(p) // multipart decodes quoted-printable
		ct, _, _ := mime.ParseMediaType(p.Header.Get("Content-Type"))
		types[ct] = true
		if !strings.Contains(string(body), sentence) {
			t.Errorf("%s part lacks %q:\n%s", ct, sentence, body)
		}
	}
	if !types["text/plain"] || !types["text/html"] {
		t.Errorf("parts %v, want text/plain and text/html", types)
	}
}

// TestPayloadForMeter checks a meter's notification: the payload names the
// meter, its message and email count the meter's units, and a name cannot
// add a header to the email.
func TestPayloadForMeter(t *testing.T) {
	start := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
	p := notify.NewPayload("acme", "pro", notify.Period{Start: start, End: start.AddDate(0, 1, 0)},
		1600000, 2000000, 80, notify.PolicyBill, start).ForMeter("tokens")
	var got struct {
		Data map[string]any `json:"data"`
	}
	if err := json.Unmarshal(p.Marshal(), &got); err != nil {
		t.Fatal(err)
	}
	if got.Data["meter"] != "tokens" || got.Data["message"] != "You have used 80% of your included tokens." {
		t.Errorf("data %v", got.Data)
	}
	e := notify.RenderEmail(p)
	if e.Subject != "API usage alert: 80% of your included tokens" ||
		!strings.Contains(e.Text, "Usage:      1600000 of 2000000 included tokens (80%)") ||
		!strings.Contains(e.HTML, "1600000 of 2000000 included tokens") {
		t.Errorf("email %q\n%s\n%s", e.Subject, e.Text, e.HTML)
	}
	if s := notify.RenderEmail(p.ForMeter("x\r\nBcc: a@b")).Subject; strings.ContainsAny(s, "\r\n") || strings.Contains(s, "Bcc:") {
		t.Errorf("subject %q carries a header", s)
	}
}
