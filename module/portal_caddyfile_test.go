package module

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

func TestParsePortal(t *testing.T) {
	input := `api_monetize_portal {
		base_url https://portal.example.com
		product_name "Acme API"
		logo_url https://cdn.example.com/logo.svg
		accent_color 0b6e4f
		docs_url https://docs.example.com/openapi.json
		signup open
		signup_tier pro
		session_idle_timeout 45m
		oidc https://accounts.example.com portal-client {env.OIDC_SECRET}
		email {
			smtp smtp.example.com:587
			from "Acme <portal@example.com>"
			username {env.SMTP_USER}
			password {env.SMTP_PASSWORD}
		}
	}`
	got := new(PortalHandler)
	if err := got.UnmarshalCaddyfile(caddyfile.NewTestDispenser(input)); err != nil {
		t.Fatal(err)
	}
	want := &PortalHandler{
		BaseURL: "https://portal.example.com", ProductName: "Acme API", LogoURL: "https://cdn.example.com/logo.svg",
		AccentColor: "#0b6e4f", DocsURL: "https://docs.example.com/openapi.json", Signup: "open", SignupTier: "pro",
		SessionIdleTimeout: caddy.Duration(45 * time.Minute),
		OIDC:               &PortalOIDC{Issuer: "https://accounts.example.com", ClientID: "portal-client", ClientSecret: "{env.OIDC_SECRET}"},
		Email:              &EmailConfig{SMTP: "smtp.example.com:587", From: "Acme <portal@example.com>", Username: "{env.SMTP_USER}", Password: "{env.SMTP_PASSWORD}"},
	}
	if g, w := mustJSON(t, got), mustJSON(t, want); g != w {
		t.Errorf("got %s, want %s", g, w)
	}
}

func TestParsePortalErrors(t *testing.T) {
	for _, tc := range []struct {
		name, input string
		line        int
		want        string
	}{
		{"no base_url", "api_monetize_portal {\n\tsignup open\n}", 1, "missing 'base_url <url>'"},
		{"argument", "api_monetize_portal https://x", 1, "unexpected argument 'https://x'"},
		{"unknown option", "api_monetize_portal {\n\tbase_url https://x\n\ttheme dark\n}", 3, "unrecognized option 'theme'"},
		{"bad signup", "api_monetize_portal {\n\tbase_url https://x\n\tsignup maybe\n}", 3, "signup expects open, invite or off, got 'maybe'"},
		{"twice", "api_monetize_portal {\n\tbase_url https://x\n\tbase_url https://y\n}", 3, "given twice (first at Testfile:2)"},
		{"unquoted colour", "api_monetize_portal {\n\tbase_url https://x\n\taccent_color #0b6e4f\n}", 3, "quote it: an unquoted # starts a comment"},
		{"oidc without secret", "api_monetize_portal {\n\tbase_url https://x\n\toidc https://id.example.com client\n}", 3, "oidc expects <issuer> <client_id> <client_secret>, got 2 values"},
		{"bad idle timeout", "api_monetize_portal {\n\tbase_url https://x\n\tsession_idle_timeout soon\n}", 3, "session_idle_timeout expects a duration such as 30m or 2h, got 'soon'"},
		{"email without from", "api_monetize_portal {\n\tbase_url https://x\n\temail {\n\t\tsmtp smtp.example.com:587\n\t}\n}", 3, "email: missing 'from <address>'"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkErr(t, new(PortalHandler).UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input)), tc.line, tc.want, "")
		})
	}
}

// TestPortalProvisionErrors: what only Provision can check (JSON configs
// get the same rules) fails validation with a precise message.
func TestPortalProvisionErrors(t *testing.T) {
	global := `{
	api_monetize {
		store_path ` + filepath.Join(t.TempDir(), "store.db") + `
		tier free {
			included 10/month
		}
		%NOTIFY%
	}
}
:8080 {
	api_monetize_portal {
		%OPTS%
	}
}
`
	email := "email {\n\t\t\tsmtp 127.0.0.1:2525\n\t\t\tfrom portal@example.com\n\t\t}"
	for _, tc := range []struct{ name, notify, opts, want string }{
		{"no email sender", "", "base_url https://p.example.com", "no email sender for sign-in links"},
		{"http base_url", "", "base_url http://p.example.com\n" + email, "base_url: must be https (plain http only on localhost)"},
		{"relative base_url", "", "base_url /portal\n" + email, "base_url: expected an absolute URL"},
		{"bad colour", "", "base_url https://p.example.com\naccent_color \"#12345\"\n" + email, "accent_color: expected a colour as #rrggbb"},
		{"css in colour", "", "base_url https://p.example.com\naccent_color \"red;}body{x\"\n" + email, "accent_color: expected a colour as #rrggbb"},
		{"unknown tier", "", "base_url https://p.example.com\nsignup_tier gold\n" + email, `signup_tier "gold" is not a configured tier`},
		{"http logo", "", "base_url https://p.example.com\nlogo_url http://cdn.example.com/l.png\n" + email, "logo_url: expected an https URL or an absolute path"},
		{"http issuer", "", "base_url https://p.example.com\noidc http://id.example.com c s\n" + email, "oidc: the issuer must be https"},
		{"script docs", "", "base_url https://p.example.com\ndocs_url javascript:alert(1)\n" + email, "docs_url: expected an http(s) URL"},
		{"short idle timeout", "", "base_url https://p.example.com\nsession_idle_timeout 1m\n" + email, "session_idle_timeout: expected from 5m0s to 12h0m0s, got 1m0s"},
		{"long idle timeout", "", "base_url https://p.example.com\nsession_idle_timeout 13h\n" + email, "session_idle_timeout: expected from 5m0s to 12h0m0s, got 13h0m0s"},
		{"notify email is used", "notify {\n\t\t\temail {\n\t\t\t\tsmtp 127.0.0.1:2525\n\t\t\t\tfrom a@example.com\n\t\t\t}\n\t\t}", "base_url https://p.example.com", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			input := strings.ReplaceAll(strings.ReplaceAll(global, "%NOTIFY%", tc.notify), "%OPTS%", tc.opts)
			cfg, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(input), nil)
			if err != nil {
				t.Fatalf("adapt: %v", err)
			}
			var c caddy.Config
			if err := json.Unmarshal(cfg, &c); err != nil {
				t.Fatal(err)
			}
			err = caddy.Validate(&c)
			if tc.want == "" {
				if err != nil {
					t.Fatalf("valid config refused: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error containing %q", err, tc.want)
			}
		})
	}
}

// TestPortalExample: the shipped portal example adapts without warnings.
func TestPortalExample(t *testing.T) {
	input, err := os.ReadFile(filepath.Join("..", "caddyfile-examples", "portal", "Caddyfile"))
	if err != nil {
		t.Fatal(err)
	}
	out, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt(input, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range warnings {
		t.Errorf("warning: %s:%d: %s", w.File, w.Line, w.Message)
	}
	if !strings.Contains(string(out), `"handler":"api_monetize_portal"`) {
		t.Errorf("no portal handler in %s", out)
	}
}
