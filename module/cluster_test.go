package module

import (
	"sync"
	"testing"

	"github.com/apimonetize/caddy-api-monetize/internal/rediscluster"
)

// The tests that run on a Redis Cluster share one private cluster (three
// masters with a replica each), started by the first of them and stopped
// by TestMain; each test works under its own key prefix.
var testCluster struct {
	once sync.Once
	c    *rediscluster.Cluster
	err  error
}

// sharedCluster returns the package's test cluster, starting it, and skips
// the test when redis-server or redis-cli is missing.
func sharedCluster(t *testing.T) *rediscluster.Cluster {
	t.Helper()
	if err := rediscluster.Available(); err != nil {
		rediscluster.Skip(t, err)
	}
	testCluster.once.Do(func() { testCluster.c, testCluster.err = rediscluster.New(3, 1) })
	if testCluster.err != nil {
		t.Fatalf("starting the test Redis Cluster: %v", testCluster.err)
	}
	return testCluster.c
}

// stopSharedCluster stops the test cluster if a test started it.
func stopSharedCluster() {
	if testCluster.c != nil {
		testCluster.c.Stop()
	}
}

// clusterStoreLines are the global options of a store on the shared test
// cluster under a fresh prefix.
func clusterStoreLines(t *testing.T) string {
	return "redis_cluster " + sharedCluster(t).URL() + "\n\t\tredis_prefix " + redisTestPrefix(t)
}
