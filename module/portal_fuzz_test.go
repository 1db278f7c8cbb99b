package module

import (
	"encoding/json"
	"reflect"
	"regexp"
	"testing"
	"time"

	"github.com/apimonetize/caddy-api-monetize/notify"
	"github.com/apimonetize/caddy-api-monetize/portal"
)

// portalOptionError is how the portal's own validation (Provision) names
// the option it refuses.
var portalOptionError = regexp.MustCompile(`^(base_url|product_name|logo_url|accent_color|docs_url|signup|signup_tier|session_idle_timeout|oidc|smtp|from): `)

// FuzzPortalDirective fuzzes the api_monetize_portal directive's options.
// Properties: no panic; a refusal names the line; an accepted directive
// has a base_url and a known signup policy, round-trips through JSON
// unchanged, and the portal's own validation (the one Provision runs, for
// JSON too) either accepts its options or refuses them naming the option,
// never with anything else.
func FuzzPortalDirective(f *testing.F) {
	for _, s := range []string{
		"api_monetize_portal {\n\tbase_url https://portal.example.com\n}",
		"api_monetize_portal {\n\tbase_url https://example.com/portal\n\tproduct_name \"Acme API\"\n\tlogo_url /logo.svg\n\taccent_color \"#0b6e4f\"\n\tdocs_url https://docs.example.com/\n\tsignup open\n\tsignup_tier free\n}",
		"api_monetize_portal {\n\tbase_url http://localhost:8080\n\taccent_color 1f5fbf\n\tsignup off\n\tsession_idle_timeout 45m\n}",
		"api_monetize_portal {\n\tbase_url https://p.example.com\n\toidc https://accounts.example.com id {env.SECRET}\n\temail {\n\t\tsmtp smtp.example.com:587\n\t\tfrom \"API <portal@example.com>\"\n\t\tusername u\n\t\tpassword p\n\t}\n}",
		"api_monetize_portal {\n\tbase_url ftp://x\n\tsignup maybe\n}",
		"api_monetize_portal {\n\taccent_color\n}",
		"api_monetize_portal {\n\tbase_url https://a\n\tbase_url https://b\n}",
		"api_monetize_portal extra",
		"api_monetize_portal {\n\toidc a b\n}",
		"api_monetize_portal {\n\tbase_url https://p.example.com\n\tsession_idle_timeout 1s\n}",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, input string) {
		if !startsWith(input, "api_monetize_portal") {
			return
		}
		d, _ := dispenser(input)
		p := new(PortalHandler)
		if err := p.UnmarshalCaddyfile(d); err != nil {
			if !positioned.MatchString(err.Error()) {
				t.Fatalf("%q: error without a position: %v", input, err)
			}
			return
		}
		if p.BaseURL == "" {
			t.Fatalf("%q: accepted without base_url", input)
		}
		switch p.Signup {
		case "", portal.SignupOpen, portal.SignupInvite, portal.SignupOff:
		default:
			t.Fatalf("%q: accepted the signup policy %q", input, p.Signup)
		}
		b, err := json.Marshal(p)
		if err != nil {
			t.Fatalf("%q: accepted, but its JSON fails: %v", input, err)
		}
		var back PortalHandler
		if err := json.Unmarshal(b, &back); err != nil || !reflect.DeepEqual(&back, p) {
			t.Fatalf("%q: the JSON does not round-trip (%v):\n%s\n%+v", input, err, b, back)
		}
		named := func(err error) {
			if err != nil && !portalOptionError.MatchString(err.Error()) {
				t.Fatalf("%q: refused without naming the option: %v", input, err)
			}
		}
		cfg := portal.Config{BaseURL: back.BaseURL, ProductName: back.ProductName, LogoURL: back.LogoURL,
			AccentColor: back.AccentColor, DocsURL: back.DocsURL, Signup: back.Signup, SessionIdleTimeout: time.Duration(back.SessionIdleTimeout)}
		if o := back.OIDC; o != nil {
			cfg.OIDC = &portal.OIDC{Issuer: o.Issuer, ClientID: o.ClientID, ClientSecret: o.ClientSecret}
		}
		_, err = portal.New(cfg, nil, nil, nil)
		named(err)
		if e := back.Email; e != nil {
			named(notify.CheckSMTP(e.SMTP, e.From))
		}
	})
}
