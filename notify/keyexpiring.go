package notify

import (
	"bytes"
	"encoding/json"
	"fmt"
	"html/template"
	"strings"
	"time"
)

// KeyExpiringType is the type of a key expiry announcement.
const KeyExpiringType = "key.expiring"

// KeyExpiringPayload is the JSON body announcing that an API key expires
// soon, shaped like Payload (type, timestamp, data).
type KeyExpiringPayload struct {
	// Type is KeyExpiringType.
	Type string `json:"type"`
	// Timestamp is when the announcement was made.
	Timestamp time.Time `json:"timestamp"`
	// Data describes the key.
	Data KeyExpiringData `json:"data"`
}

// KeyExpiringData is the content of a key expiry announcement. It never
// holds the key, only its id and display prefix.
type KeyExpiringData struct {
	// Customer is the key owner's id.
	Customer string `json:"customer"`
	// KeyID is the key's public id.
	KeyID string `json:"key_id"`
	// KeyName is the key's name (may be empty).
	KeyName string `json:"key_name"`
	// KeyPrefix is the start of the key, for humans to recognise it.
	KeyPrefix string `json:"key_prefix"`
	// ExpiresAt is when the key stops working.
	ExpiresAt time.Time `json:"expires_at"`
	// Notice is the announcement's window: "7d" or "1d" before the expiry.
	Notice string `json:"notice"`
	// Message is a sentence for humans.
	Message string `json:"message"`
}

// NewKeyExpiringPayload builds the announcement, made at, that a key
// expires at expiresAt, in the given notice window.
func NewKeyExpiringPayload(customer, keyID, keyName, keyPrefix string, expiresAt time.Time, notice string, at time.Time) KeyExpiringPayload {
	label := keyPrefix + "…"
	if keyName != "" {
		label = fmt.Sprintf("%q (%s…)", keyName, keyPrefix)
	}
	return KeyExpiringPayload{
		Type: KeyExpiringType, Timestamp: at.UTC(),
		Data: KeyExpiringData{
			Customer: customer, KeyID: keyID, KeyName: keyName, KeyPrefix: keyPrefix,
			ExpiresAt: expiresAt.UTC(), Notice: notice,
			Message: "Your API key " + label + " expires at " + expiresAt.UTC().Format(time.RFC3339) + ". Replace it before then: requests with it will be refused.",
		},
	}
}

// Marshal encodes the announcement as its webhook body.
func (p KeyExpiringPayload) Marshal() []byte {
	b, _ := json.Marshal(p) // plain fields: cannot fail
	return b
}

var keyExpiringHTML = template.Must(template.New("key").Parse(`<!DOCTYPE html>
<html><body style="font-family:sans-serif">
<p>{{.Message}}</p>
<table>
<tr><td>Customer</td><td>{{.Customer}}</td></tr>
<tr><td>Key</td><td>{{.KeyName}} {{.KeyPrefix}}… ({{.KeyID}})</td></tr>
<tr><td>Expires</td><td>{{.Expires}}</td></tr>
</table>
</body></html>
`))

// RenderKeyExpiringEmail renders an announcement as an email.
func RenderKeyExpiringEmail(p KeyExpiringPayload) Email {
	d := p.Data
	expires := d.ExpiresAt.Format(time.RFC3339)
	var text strings.Builder
	fmt.Fprintf(&text, "%s\n\n", d.Message)
	fmt.Fprintf(&text, "Customer: %s\n", d.Customer)
	fmt.Fprintf(&text, "Key:      %s %s… (%s)\n", d.KeyName, d.KeyPrefix, d.KeyID)
	fmt.Fprintf(&text, "Expires:  %s\n", expires)
	var html bytes.Buffer
	_ = keyExpiringHTML.Execute(&html, map[string]any{
		"Message": d.Message, "Customer": d.Customer, "KeyName": d.KeyName, "KeyPrefix": d.KeyPrefix, "KeyID": d.KeyID, "Expires": expires,
	}) // only fails on a bad template or writer
	return Email{Subject: "API key expiring: " + d.KeyPrefix + "… expires " + expires, Text: text.String(), HTML: html.String()}
}
