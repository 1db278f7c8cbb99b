package module

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"

	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/store"
	"github.com/apimonetize/caddy-api-monetize/stripereport"
)

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "api-monetize",
		Usage: "stripe-sync [--dry-run] --config <path> [--adapter <name>] | migrate-store --from <redis url> --to <redis cluster url>",
		Short: "Tools for the api_monetize app (Stripe catalog sync, store migration)",
		Long: `
Tools for the api_monetize app.

stripe-sync creates, in the Stripe account of the configuration's
api_monetize stripe secret_key, what the tiers need: one Billing Meter
(event name = meter, sum, customers by stripe_customer_id), per tier a
Product (metadata api_monetize_tier=<tier>), a flat base Price (lookup key
am_<tier>_base; not for free or custom prices) and, for tiers that bill
overage, a metered Price on the meter (lookup key am_<tier>_usage, graduated:
the included units at 0, then the overage price). Objects are found again by
metadata and lookup key: a run over an unchanged configuration creates
nothing and prints "up to date". A changed price gets a new Price that takes
over the lookup key; the old one is left as it is. --dry-run prints the plan
and creates nothing.

migrate-store copies a single Redis's data into a Redis Cluster's layout
(see caddy api-monetize migrate-store --help).
`,
		CobraFunc: func(cmd *cobra.Command) {
			sync := &cobra.Command{
				Use:   "stripe-sync [--dry-run] --config <path> [--adapter <name>]",
				Short: "Creates the Stripe meter, products and prices of the configured tiers",
				Args:  cobra.NoArgs,
				RunE: func(c *cobra.Command, _ []string) error {
					fl := c.Flags()
					config, _ := fl.GetString("config")
					adapter, _ := fl.GetString("adapter")
					dryRun, _ := fl.GetBool("dry-run")
					return runStripeSync(c.Context(), config, adapter, dryRun, c.OutOrStdout())
				},
			}
			sync.Flags().StringP("config", "c", "", "Configuration file (default: the Caddyfile in the current directory)")
			sync.Flags().StringP("adapter", "a", "", "Name of the config adapter (default: caddyfile for Caddyfiles, else JSON)")
			sync.Flags().Bool("dry-run", false, "Print the plan without creating anything")
			cmd.AddCommand(sync)
			addMigrateStoreCommand(cmd) // migrate_command.go
		},
	})
}

// runStripeSync loads the configuration like `caddy adapt`, takes its
// api_monetize app and syncs the tiers to Stripe.
func runStripeSync(ctx context.Context, configFile, adapter string, dryRun bool, w io.Writer) error {
	if ctx == nil {
		ctx = context.Background()
	}
	cfgJSON, _, _, err := caddycmd.LoadConfig(configFile, adapter)
	if err != nil {
		return err
	}
	if cfgJSON == nil {
		return errors.New("no configuration: use --config <path>, or run where a Caddyfile is")
	}
	var cfg struct {
		Apps map[string]json.RawMessage `json:"apps"`
	}
	if err := json.Unmarshal(cfgJSON, &cfg); err != nil {
		return fmt.Errorf("decoding the configuration: %v", err)
	}
	raw, ok := cfg.Apps["api_monetize"]
	if !ok {
		return errors.New("the configuration has no api_monetize app")
	}
	var a App
	if err := caddy.StrictUnmarshalJSON(raw, &a); err != nil {
		return fmt.Errorf("decoding apps.api_monetize: %v", err)
	}
	if a.Stripe == nil {
		return errors.New("api_monetize has no stripe block: add one with secret_key {env.STRIPE_SECRET_KEY}")
	}
	if err := a.compileTiers(); err != nil {
		return err
	}
	s, err := a.stripeSettings()
	if err != nil {
		return err
	}
	cat, err := a.stripeCatalog(s.meter)
	if err != nil {
		return err
	}
	sc := stripereport.NewClient(s.secretKey, s.apiBase, stripeRequestTimeout)
	_, err = stripereport.SyncCatalog(ctx, sc, cat, dryRun, w)
	return err
}

// stripeCatalog describes the app's tiers (compiled) for the catalog sync.
// Tiers that bill units beyond their quota get a metered price.
func (a *App) stripeCatalog(meter string) (stripereport.Catalog, error) {
	currency := "usd"
	if a.Currency != "" {
		c, err := metering.ParseCurrency(a.Currency)
		if err != nil {
			return stripereport.Catalog{}, err
		}
		currency = c
	}
	cat := stripereport.Catalog{Currency: currency, Meter: meter}
	for _, m := range a.meters {
		cat.Meters = append(cat.Meters, stripereport.CatalogMeter{Name: m.name, Event: m.stripeEvent})
	}
	for _, t := range a.tiers {
		ct := stripereport.CatalogTier{Name: t.Name}
		if p := t.Price; p != nil {
			ct.Custom, ct.BaseMicros, ct.Interval = p.Custom, p.AmountMicros, p.Interval
		}
		if t.Included != nil {
			ct.IncludedUnits = t.Included.Units
		}
		if t.quotaMode == store.QuotaBill || t.quotaMode == store.QuotaThrottle {
			ct.OverageMicros = t.overagePriceMic
		}
		for _, tm := range t.meters {
			if q := tm.quota; (q.quotaMode == store.QuotaBill || q.quotaMode == store.QuotaThrottle) && q.overagePriceMic > 0 {
				ct.Meters = append(ct.Meters, stripereport.CatalogTierMeter{Meter: tm.name, IncludedUnits: q.included, OverageMicros: q.overagePriceMic})
			}
		}
		cat.Tiers = append(cat.Tiers, ct)
	}
	return cat, nil
}
