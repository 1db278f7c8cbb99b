package module

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
)

const testWebhookSecret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

// inNotify wraps lines in a notify block of a minimal app; the lines start
// at Testfile:4.
func inNotify(lines string) string {
	return "api_monetize {\n\ttier free\n\tnotify {\n" + lines + "\n\t}\n}"
}

func TestParseNotify(t *testing.T) {
	in := `api_monetize {
	tier pro {
		included 50000/month
	}
	thresholds 80 100 120
	notify {
		webhook https://hooks.example.com/api-usage {
			secret {env.USAGE_WEBHOOK_SECRET}      # whsec_… (Standard Webhooks)
		}
		webhook https://ops.example.com/hook {
			secret ` + testWebhookSecret + `
		}
		email {
			smtp smtp.example.com:587
			username {env.SMTP_USER}
			password {env.SMTP_PASSWORD}
			from "API Billing <billing@example.com>"
		}
	}
	customer acme tier pro email dev@acme.example
}`
	v, err := parseApp(caddyfile.NewTestDispenser(in), nil)
	if err != nil {
		t.Fatal(err)
	}
	var app App
	if err := json.Unmarshal(v.(httpcaddyfile.App).Value, &app); err != nil {
		t.Fatal(err)
	}
	want := &NotifyConfig{
		Webhooks: []WebhookTarget{
			{URL: "https://hooks.example.com/api-usage", Secret: "{env.USAGE_WEBHOOK_SECRET}"},
			{URL: "https://ops.example.com/hook", Secret: testWebhookSecret},
		},
		Email: &EmailConfig{SMTP: "smtp.example.com:587", Username: "{env.SMTP_USER}", Password: "{env.SMTP_PASSWORD}", From: "API Billing <billing@example.com>"},
	}
	if !reflect.DeepEqual(app.Notify, want) {
		t.Errorf("notify = %+v, want %+v", app.Notify, want)
	}
	if app.Customers[0].Email != "dev@acme.example" {
		t.Errorf("customer email %q", app.Customers[0].Email)
	}
}

func TestParseNotifyErrors(t *testing.T) {
	const leaked = "whsec_c2hvcnQtc2VjcmV0"
	for _, tc := range []struct {
		name   string
		input  string
		line   int
		want   string
		secret string
	}{
		{"arguments", "api_monetize {\n\ttier free\n\tnotify ops@example.com\n}", 3, "notify takes no arguments", ""},
		{"empty", inNotify(""), 3, "add at least one", ""},
		{"twice", "api_monetize {\n\ttier free\n\tnotify {\n\t\temail {\n\t\t\tsmtp a:25\n\t\t\tfrom a@b.c\n\t\t}\n\t}\n\tnotify {\n\t}\n}", 9, "'notify' is given twice", ""},
		{"channel", inNotify("\t\tslack #ops"), 4, "unrecognized channel 'slack'", ""},
		{"webhook no url", inNotify("\t\twebhook"), 4, "webhook: expected a URL", ""},
		{"webhook relative url", inNotify("\t\twebhook /hook {\n\t\t\tsecret " + testWebhookSecret + "\n\t\t}"), 4, "expected an absolute http:// or https:// URL", ""},
		{"webhook ftp url", inNotify("\t\twebhook ftp://x/hook {\n\t\t\tsecret " + testWebhookSecret + "\n\t\t}"), 4, "absolute http:// or https://", ""},
		{"webhook no secret", inNotify("\t\twebhook https://x.example/hook"), 4, "missing 'secret <whsec_…>'", ""},
		{"webhook secret prefix", inNotify("\t\twebhook https://x.example/hook {\n\t\t\tsecret MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n\t\t}"), 5, "must start with whsec_", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"},
		{"webhook secret base64", inNotify("\t\twebhook https://x.example/hook {\n\t\t\tsecret whsec_not-base64!!\n\t\t}"), 5, "not valid base64", "not-base64"},
		{"webhook secret short", inNotify("\t\twebhook https://x.example/hook {\n\t\t\tsecret " + leaked + "\n\t\t}"), 5, "24 to 64 bytes", leaked},
		{"webhook twice", inNotify("\t\twebhook https://x.example/hook {\n\t\t\tsecret " + testWebhookSecret + "\n\t\t}\n\t\twebhook https://x.example/hook {\n\t\t\tsecret " + testWebhookSecret + "\n\t\t}"), 7, "declared twice (first at Testfile:4)", ""},
		{"webhook option", inNotify("\t\twebhook https://x.example/hook {\n\t\t\tsigning abc\n\t\t}"), 5, "unrecognized option 'signing'", ""},
		{"email no smtp", inNotify("\t\temail {\n\t\t\tfrom a@b.c\n\t\t}"), 4, "missing 'smtp <host:port>'", ""},
		{"email no from", inNotify("\t\temail {\n\t\t\tsmtp a:25\n\t\t}"), 4, "missing 'from <address>'", ""},
		{"email smtp port", inNotify("\t\temail {\n\t\t\tsmtp smtp.example.com\n\t\t}"), 5, "expected host:port", ""},
		{"email from", inNotify("\t\temail {\n\t\t\tsmtp a:25\n\t\t\tfrom billing\n\t\t}"), 6, "from expects an address", ""},
		{"email twice", inNotify("\t\temail {\n\t\t\tsmtp a:25\n\t\t\tfrom a@b.c\n\t\t}\n\t\temail {\n\t\t}"), 8, "'email' is given twice", ""},
		{"email password alone", inNotify("\t\temail {\n\t\t\tsmtp a:25\n\t\t\tfrom a@b.c\n\t\t\tpassword hunter2\n\t\t}"), 4, "password without username", "hunter2"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseApp(caddyfile.NewTestDispenser(tc.input), nil)
			checkErr(t, err, tc.line, tc.want, tc.secret)
		})
	}
}

// TestProvisionNotifyPlaceholders checks the values only known at load
// time: a placeholder that resolves to a bad URL or secret fails Provision
// without echoing the secret.
func TestProvisionNotifyPlaceholders(t *testing.T) {
	t.Setenv("NOTIFY_TEST_URL", "not a url")
	t.Setenv("NOTIFY_TEST_SECRET", "whsec_c2hvcnQtc2VjcmV0")
	for _, tc := range []struct {
		name, url, secret, want string
	}{
		{"url", "{env.NOTIFY_TEST_URL}", testWebhookSecret, "expected an absolute http:// or https:// URL"},
		{"secret", "https://x.example/hook", "{env.NOTIFY_TEST_SECRET}", "is its environment variable set?"},
		{"unset secret", "https://x.example/hook", "{env.NOTIFY_TEST_UNSET}", "must start with whsec_"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := &App{Notify: &NotifyConfig{Webhooks: []WebhookTarget{{URL: tc.url, Secret: tc.secret}}}, logger: caddy.Log()}
			err := a.provisionNotify(caddy.Context{})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error containing %q", err, tc.want)
			}
			if strings.Contains(err.Error(), "c2hvcnQtc2VjcmV0") {
				t.Fatalf("error leaks the secret: %v", err)
			}
		})
	}
}
