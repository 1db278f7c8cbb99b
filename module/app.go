// Package module holds the api_monetize Caddy modules: the app (shared
// state, store, background loops), the HTTP handler that enforces keys,
// tiers and rate limits, the admin API, and their Caddyfile parsing.
package module

import (
	"github.com/caddyserver/caddy/v2"
)

func init() {
	caddy.RegisterModule(new(App))
}

// App is the api_monetize app. It owns the store, the tier catalog and the
// customer/key registry shared by every api_monetize handler, and runs the
// background loops.
type App struct {
	// Redis is the URL of a Redis server shared by every Caddy instance
	// (redis://[user:password@]host:port/db, rediss:// for TLS). Empty means
	// the embedded store in Caddy's data directory.
	Redis string `json:"redis,omitempty"`
	// StorePath is the embedded store's file. Default:
	// <Caddy data dir>/api_monetize/store.db.
	StorePath string `json:"store_path,omitempty"`
	// StoreTimeout bounds every store call made while serving a request.
	// Default: 100ms.
	StoreTimeout caddy.Duration `json:"store_timeout,omitempty"`
	// KeySecret is the HMAC secret API keys are hashed with; use a
	// placeholder such as {env.API_MONETIZE_KEY_SECRET}. When empty, a
	// secret is generated once and kept in the store.
	KeySecret string `json:"key_secret,omitempty"`
	// Tiers are the plans customers can be on.
	Tiers []Tier `json:"tiers,omitempty"`
	// Customers are upserted into the store at start.
	Customers []CustomerConfig `json:"customers,omitempty"`
	// Keys are upserted into the store at start.
	Keys []KeyConfig `json:"keys,omitempty"`
}

// CaddyModule returns the Caddy module information.
func (*App) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "api_monetize",
		New: func() caddy.Module { return new(App) },
	}
}
