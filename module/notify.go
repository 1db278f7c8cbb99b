package module

import "github.com/caddyserver/caddy/v2"

// provisionNotify validates the notification channels and adds the
// notifier to the app's background tasks.
func (a *App) provisionNotify(_ caddy.Context) error {
	return nil
}
