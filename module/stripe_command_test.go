package module

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"

	"github.com/apimonetize/caddy-api-monetize/internal/stripedouble"
)

const syncCaddyfile = `{
	api_monetize {
		stripe {
			secret_key {env.AM_SYNC_TEST_STRIPE_KEY}
			meter api_calls
			api_base {env.AM_SYNC_TEST_STRIPE_BASE}
		}
		tier free {
			rate 10/min
		}
		tier pro {
			price PRO_PRICE/month
			included 50000/month
			over_quota bill 0.002
		}
		tier enterprise {
			price custom
			included 1000000/month
			over_quota throttle 10/s bill 0.001
		}
		tier capped {
			price 9.00/month
			included 1000/month
			over_quota block
		}
	}
}

http://localhost:9 {
	respond ok
}
`

// stripeSync runs `caddy api-monetize <args…>` through the registered
// command and returns its output.
func stripeSync(t *testing.T, args ...string) (string, error) {
	t.Helper()
	c, ok := caddycmd.Commands()["api-monetize"]
	if !ok {
		t.Fatal("the api-monetize command is not registered")
	}
	root := &cobra.Command{Use: c.Name}
	c.CobraFunc(root)
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(args)
	err := root.Execute()
	return out.String(), err
}

func writeSyncCaddyfile(t *testing.T, dir, proPrice string) string {
	t.Helper()
	path := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(path, []byte(strings.Replace(syncCaddyfile, "PRO_PRICE", proPrice, 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestStripeSyncCommand(t *testing.T) {
	d := stripedouble.New()
	defer d.Close()
	t.Setenv("AM_SYNC_TEST_STRIPE_KEY", "sk_test_sync")
	t.Setenv("AM_SYNC_TEST_STRIPE_BASE", d.URL)
	dir := t.TempDir()
	path := writeSyncCaddyfile(t, dir, "49.00")

	out, err := stripeSync(t, "stripe-sync", "--dry-run", "--config", path)
	if err != nil || d.Creates("meter")+d.Creates("product")+d.Creates("price") != 0 {
		t.Fatalf("dry run: %v, created %d/%d/%d\n%s", err, d.Creates("meter"), d.Creates("product"), d.Creates("price"), out)
	}
	for _, want := range []string{
		`create meter "api_calls"`,
		"create price am_pro_base: 4900 usd (minor units) per month",
		`create price am_pro_usage: metered on "api_calls", graduated: first 50000 units 0, then 0.2 usd (minor units) per unit, per month`,
		`create price am_enterprise_usage: metered on "api_calls", graduated: first 1000000 units 0, then 0.1 usd`,
		"create price am_capped_base: 900 usd",
		"dry run: nothing was created",
	} {
		if !strings.Contains(out, want) {
			t.Fatalf("dry run output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "am_free_") || strings.Contains(out, "am_enterprise_base") || strings.Contains(out, "am_capped_usage") {
		t.Fatalf("dry run plans a price a free, custom or blocking tier does not have:\n%s", out)
	}

	out, err = stripeSync(t, "stripe-sync", "--config", path)
	if err != nil {
		t.Fatalf("sync: %v\n%s", err, out)
	}
	// 1 meter; products free, pro, enterprise, capped; prices pro base and
	// usage, enterprise usage, capped base.
	if m, p, pr := d.Creates("meter"), d.Creates("product"), d.Creates("price"); m != 1 || p != 4 || pr != 4 {
		t.Fatalf("created %d meters, %d products, %d prices; want 1, 4, 4\n%s", m, p, pr, out)
	}

	out, err = stripeSync(t, "stripe-sync", "--config", path)
	if err != nil || !strings.Contains(out, "up to date") || d.Creates("price") != 4 || d.Creates("product") != 4 {
		t.Fatalf("second sync: %v\n%s", err, out)
	}

	writeSyncCaddyfile(t, dir, "59.00")
	out, err = stripeSync(t, "stripe-sync", "--dry-run", "--config", path)
	if err != nil || !strings.Contains(out, "replace price am_pro_base") || d.Creates("price") != 4 {
		t.Fatalf("dry run of a changed price: %v\n%s", err, out)
	}
	out, err = stripeSync(t, "stripe-sync", "--config", path)
	if err != nil || !strings.Contains(out, "lookup key moved from") || d.Creates("price") != 5 {
		t.Fatalf("sync of a changed price: %v, %d prices\n%s", err, d.Creates("price"), out)
	}
}

func TestStripeSyncCommandErrors(t *testing.T) {
	d := stripedouble.New()
	defer d.Close()
	t.Setenv("AM_SYNC_TEST_STRIPE_BASE", d.URL)
	path := writeSyncCaddyfile(t, t.TempDir(), "49.00")

	t.Setenv("AM_SYNC_TEST_STRIPE_KEY", "")
	if _, err := stripeSync(t, "stripe-sync", "--config", path); err == nil || !strings.Contains(err.Error(), "secret_key is required") {
		t.Fatalf("sync without a key: %v", err)
	}

	noStripe := filepath.Join(t.TempDir(), "Caddyfile")
	if err := os.WriteFile(noStripe, []byte("{\n\tapi_monetize {\n\t\ttier free {\n\t\t\trate 10/min\n\t\t}\n\t}\n}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := stripeSync(t, "stripe-sync", "--config", noStripe); err == nil || !strings.Contains(err.Error(), "no stripe block") {
		t.Fatalf("sync without a stripe block: %v", err)
	}
	if d.Requests("GET /v1/products")+d.Requests("POST /v1/products") != 0 {
		t.Fatal("a refused configuration reached Stripe")
	}
}
