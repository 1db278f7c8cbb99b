package notify

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// SecretPrefix starts every Standard Webhooks signing secret.
const SecretPrefix = "whsec_"

// Standard Webhooks headers.
const (
	HeaderID        = "webhook-id"
	HeaderTimestamp = "webhook-timestamp"
	HeaderSignature = "webhook-signature"
)

// ParseSecret decodes a Standard Webhooks secret: "whsec_" followed by the
// standard base64 encoding of 24 to 64 random bytes. It returns the HMAC
// key. The secret is never echoed in errors.
func ParseSecret(s string) ([]byte, error) {
	rest, ok := strings.CutPrefix(s, SecretPrefix)
	if !ok {
		return nil, errors.New("a webhook secret must start with " + SecretPrefix + " followed by base64 (Standard Webhooks)")
	}
	key, err := base64.StdEncoding.DecodeString(rest)
	if err != nil {
		return nil, errors.New("the part of the webhook secret after " + SecretPrefix + " is not valid base64")
	}
	if len(key) < 24 || len(key) > 64 {
		return nil, fmt.Errorf("a webhook secret must encode 24 to 64 bytes (Standard Webhooks), this one encodes %d; generate one with: echo whsec_$(openssl rand -base64 32)", len(key))
	}
	return key, nil
}

// CheckURL accepts an absolute http or https URL with a host.
func CheckURL(s string) error {
	u, err := url.Parse(s)
	if err != nil {
		return fmt.Errorf("not a URL: %v", err)
	}
	if (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		return errors.New("expected an absolute http:// or https:// URL")
	}
	if u.User != nil {
		return errors.New("credentials in the URL are not supported; sign with the secret instead")
	}
	return nil
}

// Sign returns the webhook-signature value of a message: "v1," and the
// base64 HMAC-SHA256, keyed with key, of "<id>.<unix timestamp>.<body>".
func Sign(key []byte, id string, ts time.Time, body []byte) string {
	h := hmac.New(sha256.New, key)
	h.Write([]byte(id))
	h.Write([]byte{'.'})
	h.Write(strconv.AppendInt(nil, ts.Unix(), 10))
	h.Write([]byte{'.'})
	h.Write(body)
	return "v1," + base64.StdEncoding.EncodeToString(h.Sum(nil))
}

// Webhook is a receiver of signed notifications.
type Webhook struct {
	// URL is the receiver's endpoint.
	URL string
	// Key is the decoded signing secret (see ParseSecret).
	Key []byte
	// Client sends the requests; nil means a client with a 10 s timeout.
	Client *http.Client
}

// defaultClient follows no redirects: a receiver answers 2xx itself.
var defaultClient = &http.Client{
	Timeout: 10 * time.Second,
	CheckRedirect: func(*http.Request, []*http.Request) error {
		return http.ErrUseLastResponse
	},
}

// StatusError is a delivery refused by the receiver.
type StatusError struct {
	// Code is the HTTP status.
	Code int
}

func (e StatusError) Error() string {
	return "receiver answered " + strconv.Itoa(e.Code) + " " + http.StatusText(e.Code)
}

// Send POSTs body, signed for id at ts, and succeeds on a 2xx answer; any
// other answer is a StatusError. Retries must reuse id.
func (w Webhook) Send(ctx context.Context, id string, ts time.Time, body []byte) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, w.URL, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "caddy-api-monetize")
	req.Header.Set(HeaderID, id)
	req.Header.Set(HeaderTimestamp, strconv.FormatInt(ts.Unix(), 10))
	req.Header.Set(HeaderSignature, Sign(w.Key, id, ts, body))
	client := w.Client
	if client == nil {
		client = defaultClient
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	_ = resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return StatusError{Code: resp.StatusCode}
	}
	return nil
}
