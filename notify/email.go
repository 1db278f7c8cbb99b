package notify

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"html/template"
	"mime"
	"mime/quotedprintable"
	"net"
	"net/mail"
	"net/smtp"
	"strconv"
	"strings"
	"time"
)

// Email is a rendered notification email.
type Email struct {
	// Subject is the subject line.
	Subject string
	// Text and HTML are the two alternative bodies.
	Text string
	HTML string
}

var htmlBody = template.Must(template.New("email").Parse(`<!DOCTYPE html>
<html><body style="font-family:sans-serif">
<p>{{.Message}}</p>
<table>
<tr><td>Customer</td><td>{{.Customer}}</td></tr>
<tr><td>Tier</td><td>{{.Tier}}</td></tr>
<tr><td>Period</td><td>{{.Start}} to {{.End}}</td></tr>
<tr><td>Usage</td><td>{{.Usage}} of {{.Included}} included {{.Units}} ({{.Percentage}}%)</td></tr>
<tr><td>Over quota</td><td>{{.OverQuota}}</td></tr>
</table>
</body></html>
`))

// RenderEmail renders a payload as an email.
func RenderEmail(p Payload) Email {
	d := p.Data
	end := "-"
	if !d.Period.End.IsZero() {
		end = d.Period.End.Format(time.RFC3339)
	}
	start := d.Period.Start.Format(time.RFC3339)
	var text strings.Builder
	fmt.Fprintf(&text, "%s\n\n", d.Message)
	fmt.Fprintf(&text, "Customer:   %s\n", d.Customer)
	fmt.Fprintf(&text, "Tier:       %s\n", d.Tier)
	fmt.Fprintf(&text, "Period:     %s to %s\n", start, end)
	fmt.Fprintf(&text, "Usage:      %d of %d included %s (%d%%)\n", d.Usage, d.Included, d.units(), d.Percentage)
	fmt.Fprintf(&text, "Over quota: %s\n", d.OverQuota)
	var html bytes.Buffer
	_ = htmlBody.Execute(&html, map[string]any{
		"Message": d.Message, "Customer": d.Customer, "Tier": d.Tier, "Start": start, "End": end,
		"Usage": d.Usage, "Included": d.Included, "Percentage": d.Percentage, "OverQuota": d.OverQuota,
		"Units": d.units(),
	}) // only fails on a bad template or writer
	return Email{
		Subject: "API usage alert: " + strconv.Itoa(d.Threshold) + "% of your included " + d.units(),
		Text:    text.String(),
		HTML:    html.String(),
	}
}

// SMTP sends email through a server: STARTTLS when the server offers it,
// and AUTH PLAIN when Username is set (only over TLS, or to localhost).
type SMTP struct {
	// Addr is the server's host:port.
	Addr string
	// Username and Password authenticate, when Username is set.
	Username string
	Password string
	// From is the sender, e.g. "API Billing <billing@example.com>".
	From string
	// TLS configures STARTTLS; nil verifies the server's certificate for
	// its host name with the system roots.
	TLS *tls.Config
}

// CheckSMTP validates an SMTP server address and a sender.
func CheckSMTP(addr, from string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil || host == "" {
		return fmt.Errorf("smtp: expected host:port such as smtp.example.com:587, got %q", addr)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return fmt.Errorf("smtp: invalid port in %q", addr)
	}
	if _, err := mail.ParseAddress(from); err != nil {
		return fmt.Errorf("from: expected an address such as \"API Billing <billing@example.com>\", got %q", from)
	}
	return nil
}

// Send delivers an email to one recipient. notificationID identifies the
// notification: retries of one notification carry the same Message-ID.
func (s SMTP) Send(ctx context.Context, to, notificationID string, e Email) error {
	from, err := mail.ParseAddress(s.From)
	if err != nil {
		return fmt.Errorf("from: %v", err)
	}
	rcpt, err := mail.ParseAddress(to)
	if err != nil {
		return fmt.Errorf("recipient: %v", err)
	}
	host, _, err := net.SplitHostPort(s.Addr)
	if err != nil {
		return err
	}
	msg := buildMessage(from, rcpt, notificationID, e, time.Now())

	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", s.Addr)
	if err != nil {
		return err
	}
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(time.Minute)
	}
	_ = conn.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Now()) })
	defer stop()
	c, err := smtp.NewClient(conn, host)
	if err != nil {
		_ = conn.Close()
		return err
	}
	defer c.Close()
	if ok, _ := c.Extension("STARTTLS"); ok {
		cfg := s.TLS
		if cfg == nil {
			cfg = &tls.Config{ServerName: host}
		}
		if err := c.StartTLS(cfg); err != nil {
			return fmt.Errorf("STARTTLS: %w", err)
		}
	}
	if s.Username != "" {
		if ok, _ := c.Extension("AUTH"); !ok {
			return errors.New("the SMTP server offers no AUTH, but a username is configured")
		}
		if err := c.Auth(smtp.PlainAuth("", s.Username, s.Password, host)); err != nil {
			return fmt.Errorf("AUTH: %w", err)
		}
	}
	if err := c.Mail(from.Address); err != nil {
		return fmt.Errorf("MAIL FROM: %w", err)
	}
	if err := c.Rcpt(rcpt.Address); err != nil {
		return fmt.Errorf("RCPT TO: %w", err)
	}
	w, err := c.Data()
	if err != nil {
		return fmt.Errorf("DATA: %w", err)
	}
	if _, err := w.Write(msg); err != nil {
		return fmt.Errorf("DATA: %w", err)
	}
	if err := w.Close(); err != nil {
		return fmt.Errorf("DATA: %w", err)
	}
	return c.Quit()
}

// buildMessage writes a MIME multipart/alternative message with a plain
// text and an HTML part, both quoted-printable.
func buildMessage(from, to *mail.Address, notificationID string, e Email, now time.Time) []byte {
	var b bytes.Buffer
	boundary := randomBoundary()
	domain := "localhost"
	if i := strings.LastIndexByte(from.Address, '@'); i >= 0 {
		domain = from.Address[i+1:]
	}
	header := func(k, v string) { b.WriteString(k + ": " + v + "\r\n") }
	header("From", from.String())
	header("To", to.String())
	header("Subject", mime.QEncoding.Encode("utf-8", e.Subject))
	header("Date", now.Format(time.RFC1123Z))
	sum := sha256.Sum256([]byte(notificationID))
	header("Message-ID", "<"+hex.EncodeToString(sum[:16])+"@"+domain+">")
	header("MIME-Version", "1.0")
	header("Auto-Submitted", "auto-generated")
	header("Content-Type", `multipart/alternative; boundary="`+boundary+`"`)
	b.WriteString("\r\n")
	part := func(ctype, body string) {
		b.WriteString("--" + boundary + "\r\n")
		header("Content-Type", ctype+"; charset=utf-8")
		header("Content-Transfer-Encoding", "quoted-printable")
		b.WriteString("\r\n")
		qp := quotedprintable.NewWriter(&b)
		_, _ = qp.Write([]byte(crlf.Replace(body)))
		_ = qp.Close()
		b.WriteString("\r\n")
	}
	part("text/plain", e.Text)
	part("text/html", e.HTML)
	b.WriteString("--" + boundary + "--\r\n")
	return b.Bytes()
}

// crlf writes every line end of a part's body (LF, CRLF or a lone CR) as
// CRLF, so a CR in a field cannot turn into an extra line break.
var crlf = strings.NewReplacer("\r\n", "\r\n", "\r", "\r\n", "\n", "\r\n")

func randomBoundary() string {
	var r [12]byte
	_, _ = rand.Read(r[:]) // never fails since Go 1.24
	return "am-" + hex.EncodeToString(r[:])
}
