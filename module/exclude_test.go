package module

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
)

// TestExcludeGaps checks which exclude lists leave the path itself of a
// "P/*" pattern reachable, and so deserve the adapt-time warning; the
// README's example (exclude /v1/admin /v1/admin/*) leaves none.
func TestExcludeGaps(t *testing.T) {
	for _, tc := range []struct {
		patterns []string
		want     []string
	}{
		{[]string{"/v1/admin/*"}, []string{"/v1/admin"}},
		{[]string{"/v1/admin", "/v1/admin/*"}, nil},
		{[]string{"/v1/admin/*", "/v1/ADMIN"}, nil}, // Caddy matches paths case-insensitively
		{[]string{"/v1/admin*"}, nil},
		{[]string{"/v1/*"}, []string{"/v1"}},
		{[]string{"/v1/admin/*", "/v2/internal/*", "/v2/internal"}, []string{"/v1/admin"}},
		{[]string{"/v1/*/admin/*"}, nil}, // a wildcard base is not a single path: no advice
		{[]string{"/*"}, nil},
		{[]string{"/\x15/*"}, []string{"/\x15"}}, // FuzzTierOption: a control character made the check panic
		{[]string{"/a b/*", "/%zz/*"}, []string{"/a b"}},
		{nil, nil},
	} {
		if got := excludeGaps(tc.patterns); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("excludeGaps(%q) = %q, want %q", tc.patterns, got, tc.want)
		}
	}
}

// TestExamplesExcludeNoGap checks that the shipped examples do what their
// reader expects of exclude: no "P/*" leaves P reachable.
func TestExamplesExcludeNoGap(t *testing.T) {
	for _, name := range []string{"quickstart", "redis"} {
		input, err := os.ReadFile(filepath.Join("..", "caddyfile-examples", name, "Caddyfile"))
		if err != nil {
			t.Fatal(err)
		}
		cfgJSON, _, err := caddyconfig.GetAdapter("caddyfile").Adapt(input, nil)
		if err != nil {
			t.Fatal(err)
		}
		var cfg struct {
			Apps struct {
				APIMonetize App `json:"api_monetize"`
			} `json:"apps"`
		}
		if err := json.Unmarshal(cfgJSON, &cfg); err != nil {
			t.Fatal(err)
		}
		for _, tier := range cfg.Apps.APIMonetize.Tiers {
			if gaps := excludeGaps(tier.Exclude); len(gaps) > 0 {
				t.Errorf("%s: tier %s leaves %q reachable", name, tier.Name, gaps)
			}
		}
	}
}
