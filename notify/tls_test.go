package notify_test

import (
	"crypto/tls"

	"github.com/apimonetize/caddy-api-monetize/notify/notifytest"
)

func tlsConfig(srv *notifytest.SMTPServer) *tls.Config {
	return &tls.Config{ServerName: "127.0.0.1", RootCAs: srv.RootCAs}
}
