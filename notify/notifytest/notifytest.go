// Package notifytest runs real notification receivers for tests: an HTTP
// endpoint that verifies every Standard Webhooks signature with the
// published reference library, and an in-process SMTP server.
package notifytest

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	standardwebhooks "github.com/standard-webhooks/standard-webhooks/libraries/go"
)

// Delivery is one request the Receiver accepted or refused.
type Delivery struct {
	// ID is the webhook-id header.
	ID string
	// Body is the request body.
	Body []byte
	// Accepted reports a 2xx answer.
	Accepted bool
}

// Receiver is a webhook endpoint. It verifies every request with the
// Standard Webhooks library (signature and timestamp tolerance), refuses
// the first FailFirst attempts of each webhook-id with a 503, and records
// every request.
type Receiver struct {
	// URL is the endpoint.
	URL string

	wh        *standardwebhooks.Webhook
	mu        sync.Mutex
	failFirst int
	attempts  map[string]int
	log       []Delivery
	bad       []string
}

// NewReceiver starts a receiver for the given whsec_ secret, closed when
// the test ends.
func NewReceiver(t testing.TB, secret string, failFirst int) *Receiver {
	t.Helper()
	wh, err := standardwebhooks.NewWebhook(secret)
	if err != nil {
		t.Fatal(err)
	}
	r := &Receiver{wh: wh, failFirst: failFirst, attempts: make(map[string]int)}
	srv := httptest.NewServer(http.HandlerFunc(r.serve))
	t.Cleanup(srv.Close)
	r.URL = srv.URL
	return r
}

func (r *Receiver) serve(w http.ResponseWriter, req *http.Request) {
	body, _ := io.ReadAll(req.Body)
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.wh.Verify(body, req.Header); err != nil {
		r.bad = append(r.bad, err.Error())
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	id := req.Header.Get("webhook-id")
	r.attempts[id]++
	ok := r.attempts[id] > r.failFirst
	r.log = append(r.log, Delivery{ID: id, Body: body, Accepted: ok})
	if !ok {
		w.WriteHeader(http.StatusServiceUnavailable)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// Accepted returns the accepted deliveries, deduplicated on webhook-id as a
// receiver does, in order of first acceptance, and how many accepted
// requests there were in all.
func (r *Receiver) Accepted() (unique []Delivery, total int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	seen := make(map[string]bool)
	for _, d := range r.log {
		if !d.Accepted {
			continue
		}
		total++
		if !seen[d.ID] {
			seen[d.ID] = true
			unique = append(unique, d)
		}
	}
	return unique, total
}

// Requests returns every verified request, accepted or not.
func (r *Receiver) Requests() []Delivery {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Delivery(nil), r.log...)
}

// Invalid returns the verification errors of requests whose signature or
// timestamp did not verify.
func (r *Receiver) Invalid() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.bad...)
}

// Mail is a message the SMTP server accepted.
type Mail struct {
	// From is the envelope sender, To the envelope recipients.
	From string
	To   []string
	// Data is the message as sent.
	Data []byte
	// TLS reports that the session had switched to TLS (STARTTLS).
	TLS bool
	// User is the authenticated user, if any.
	User string
}

// SMTPServer is an in-process SMTP server.
type SMTPServer struct {
	// Addr is its host:port.
	Addr string
	// RootCAs trusts its certificate when it offers STARTTLS.
	RootCAs *x509.CertPool

	mu        sync.Mutex
	mails     []Mail
	user      string
	password  string
	failFirst int
	attempts  int
}

// SMTPOptions configure an SMTPServer.
type SMTPOptions struct {
	// STARTTLS offers STARTTLS with a self-signed certificate for
	// 127.0.0.1.
	STARTTLS bool
	// User and Password, when set, are required (AUTH PLAIN).
	User, Password string
	// FailFirst refuses the first messages with a temporary error.
	FailFirst int
}

// NewSMTPServer starts an SMTP server on 127.0.0.1, closed when the test
// ends.
func NewSMTPServer(t testing.TB, o SMTPOptions) *SMTPServer {
	t.Helper()
	s := &SMTPServer{user: o.User, password: o.Password, failFirst: o.FailFirst}
	srv := smtp.NewServer(smtp.BackendFunc(func(c *smtp.Conn) (smtp.Session, error) {
		return &session{srv: s, conn: c}, nil
	}))
	srv.Domain = "localhost"
	srv.AllowInsecureAuth = !o.STARTTLS
	srv.ReadTimeout, srv.WriteTimeout = 10*time.Second, 10*time.Second
	if o.STARTTLS {
		cert, pool := selfSigned(t)
		srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}}
		s.RootCAs = pool
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.Addr = l.Addr().String()
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close() })
	return s
}

// Mails returns the accepted messages.
func (s *SMTPServer) Mails() []Mail {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Mail(nil), s.mails...)
}

type session struct {
	srv  *SMTPServer
	conn *smtp.Conn
	user string
	from string
	to   []string
}

func (s *session) AuthMechanisms() []string {
	if s.srv.user == "" {
		return nil
	}
	return []string{sasl.Plain}
}

func (s *session) Auth(string) (sasl.Server, error) {
	return sasl.NewPlainServer(func(_, username, password string) error {
		if username != s.srv.user || password != s.srv.password {
			return errors.New("invalid username or password")
		}
		s.user = username
		return nil
	}), nil
}

func (s *session) Mail(from string, _ *smtp.MailOptions) error {
	if s.srv.user != "" && s.user == "" {
		return smtp.ErrAuthRequired
	}
	s.from = from
	return nil
}

func (s *session) Rcpt(to string, _ *smtp.RcptOptions) error {
	s.to = append(s.to, to)
	return nil
}

func (s *session) Data(r io.Reader) error {
	var b bytes.Buffer
	if _, err := io.Copy(&b, r); err != nil {
		return err
	}
	_, isTLS := s.conn.TLSConnectionState()
	s.srv.mu.Lock()
	defer s.srv.mu.Unlock()
	s.srv.attempts++
	if s.srv.attempts <= s.srv.failFirst {
		return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "try again later"}
	}
	s.srv.mails = append(s.srv.mails, Mail{From: s.from, To: s.to, Data: b.Bytes(), TLS: isTLS, User: s.user})
	return nil
}

func (s *session) Reset()        { s.from, s.to = "", nil }
func (s *session) Logout() error { return nil }

// selfSigned makes a certificate for 127.0.0.1 and a pool trusting it.
func selfSigned(t testing.TB) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "127.0.0.1"},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, pool
}
