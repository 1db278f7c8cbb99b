package module

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"

	"github.com/apimonetize/caddy-api-monetize/store/redisstore"
)

// migrateOpTimeout bounds each store call of migrate-store: an operator
// tool, not a request path.
const migrateOpTimeout = 30 * time.Second

// addMigrateStoreCommand adds `caddy api-monetize migrate-store` to cmd.
func addMigrateStoreCommand(cmd *cobra.Command) {
	mig := &cobra.Command{
		Use:   "migrate-store --from <redis url> --to <redis cluster url> [--prefix am:] [--to-prefix <prefix>]",
		Short: "Copies a single Redis's api_monetize data into a Redis Cluster",
		Long: `
migrate-store copies what api_monetize keeps in a single Redis (the redis
global option) into a Redis Cluster (redis_cluster), in the cluster's key
layout: the key secret, the customers, their keys (with revocations, expiries
and last uses), the records (notifications, Stripe marks, audit, ...) and each
customer's usage, rate state, idempotency keys and threshold events. Nothing
the cluster already has is overwritten, so a second run copies nothing and a
run after a failed one completes it. Run it before the gateways switch to the
cluster. A cluster with another key secret is refused. --to is a URL in the
redis_cluster form (redis://host:port?addr=host2:port2...).
`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			fl := c.Flags()
			from, _ := fl.GetString("from")
			to, _ := fl.GetString("to")
			prefix, _ := fl.GetString("prefix")
			toPrefix, _ := fl.GetString("to-prefix")
			return runMigrateStore(c.Context(), from, to, prefix, toPrefix, c.OutOrStdout())
		},
	}
	mig.Flags().String("from", "", "URL of the single Redis to copy from")
	mig.Flags().String("to", "", "URL of the Redis Cluster to copy into")
	mig.Flags().String("prefix", redisstore.DefaultKeyPrefix, "redis_prefix of the source")
	mig.Flags().String("to-prefix", "", "redis_prefix of the cluster (default: --prefix)")
	cmd.AddCommand(mig)
}

// runMigrateStore opens both stores and copies from into to (see
// redisstore.Migrate), reporting to w.
func runMigrateStore(ctx context.Context, fromURL, toURL, prefix, toPrefix string, w io.Writer) error {
	if ctx == nil {
		ctx = context.Background()
	}
	if fromURL == "" || toURL == "" {
		return errors.New("migrate-store needs --from <redis url> and --to <redis cluster url>")
	}
	if toPrefix == "" {
		toPrefix = prefix
	}
	from, err := redisstore.New(redisstore.Options{URL: fromURL, KeyPrefix: prefix, OpTimeout: migrateOpTimeout})
	if err != nil {
		return fmt.Errorf("--from: %w", err)
	}
	defer from.Close()
	to, err := redisstore.New(redisstore.Options{URL: toURL, Cluster: true, KeyPrefix: toPrefix, OpTimeout: migrateOpTimeout})
	if err != nil {
		return fmt.Errorf("--to: %w", err)
	}
	defer to.Close()
	m, err := redisstore.Migrate(ctx, from, to, func(format string, args ...any) { fmt.Fprintf(w, format+"\n", args...) })
	if err != nil {
		return err
	}
	if m == (redisstore.Migrated{SecretCopied: m.SecretCopied}) {
		fmt.Fprintln(w, "up to date: the cluster has everything the source has")
	}
	return nil
}
