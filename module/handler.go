package module

import (
	"github.com/caddyserver/caddy/v2"
)

func init() {
	caddy.RegisterModule(new(Handler))
}

// Handler enforces API keys, tier endpoint access and cost-weighted rate
// limits in front of the next handler (usually reverse_proxy).
type Handler struct {
	// Costs assign a cost to request paths; the first match wins. A request
	// matching none costs 1.
	Costs []Cost `json:"costs,omitempty"`
	// KeyFrom lists where to look for the API key, in order. Default: the
	// X-API-Key header, then "Authorization: Bearer".
	KeyFrom []KeySource `json:"key_from,omitempty"`
}

// CaddyModule returns the Caddy module information.
func (*Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.api_monetize",
		New: func() caddy.Module { return new(Handler) },
	}
}
