package module

import (
	"net/http"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// identityVar is the request variable (caddyhttp.SetVar) holding the caller
// the api_monetize handler authenticated.
const identityVar = "api_monetize.identity"

// authenticatedCaller is the value under identityVar. Its type is
// unexported, so neither a client (headers, query) nor a configuration (the
// vars directive and matchers set strings and JSON values) can put one
// there: only the api_monetize handler does.
type authenticatedCaller struct {
	app    *App
	caller *caller
}

// String names the customer only, for a {http.vars.*} placeholder: never
// the key or its hash.
func (a authenticatedCaller) String() string { return a.caller.customer.ID }

// setIdentity records that app's api_monetize handler authenticated c for r.
func setIdentity(r *http.Request, app *App, c caller) {
	caddyhttp.SetVar(r.Context(), identityVar, authenticatedCaller{app: app, caller: &c})
}

// identity is the caller app's api_monetize handler authenticated for r,
// or nil.
func identity(r *http.Request, app *App) *caller {
	if id, ok := caddyhttp.GetVar(r.Context(), identityVar).(authenticatedCaller); ok && id.app == app {
		return id.caller
	}
	return nil
}
