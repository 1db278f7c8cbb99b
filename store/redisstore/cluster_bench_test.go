package redisstore

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/apimonetize/caddy-api-monetize/internal/rediscluster"
	"github.com/apimonetize/caddy-api-monetize/metering"
)

// Benchmarks of the Redis Cluster path, on a private 3-master cluster on
// loopback (no replicas: the machine's cores go to the masters):
//
//	go test -run '^$' -bench Cluster -benchtime 3s ./store/redisstore
//
// Besides ns/op they report the script calls each request made in all
// (scripts/op: one EVALSHA per reservation, whatever the shard count) and
// the busiest master's share of them, and BenchmarkClusterMemory the Redis
// memory a customer active every hour of a month takes.

// masterStats sums a field of INFO section over the masters of c, by
// master.
func masterStats(b *testing.B, c *rediscluster.Cluster, section string, field func(info string) int64) []int64 {
	b.Helper()
	var out []int64
	for _, m := range c.Masters(context.Background()) {
		cl := redis.NewClient(&redis.Options{Addr: m.Addr()})
		info, err := cl.Info(context.Background(), section).Result()
		_ = cl.Close()
		if err != nil {
			b.Fatal(err)
		}
		out = append(out, field(info))
	}
	return out
}

// scriptCalls reads the calls of EVALSHA and EVAL from INFO commandstats.
func scriptCalls(info string) int64 {
	var n int64
	for _, line := range strings.Split(info, "\n") {
		for _, cmd := range []string{"cmdstat_evalsha:calls=", "cmdstat_eval:calls="} {
			if v, ok := strings.CutPrefix(line, cmd); ok {
				v, _, _ = strings.Cut(v, ",")
				c, _ := strconv.ParseInt(v, 10, 64)
				n += c
			}
		}
	}
	return n
}

// usedMemory reads used_memory from INFO memory.
func usedMemory(info string) int64 {
	for _, line := range strings.Split(info, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "used_memory:"); ok {
			n, _ := strconv.ParseInt(v, 10, 64)
			return n
		}
	}
	return 0
}

// BenchmarkClusterReserveParallel measures Reserve throughput on the
// cluster with 8×GOMAXPROCS goroutines on one store, each on its own
// customer (customers spread over the masters by their slots).
func BenchmarkClusterReserveParallel(b *testing.B) {
	benchClusterReserve(b, rediscluster.Start(b, 3, 0), 0)
}

// BenchmarkClusterReserveParallelWait is BenchmarkClusterReserveParallel
// on a cluster with a replica per master, without and with WaitReplicas 1:
// the cost of waiting for a replica (one WAIT per pipeline).
func BenchmarkClusterReserveParallelWait(b *testing.B) {
	c := rediscluster.Start(b, 3, 1)
	b.Run("no-wait", func(b *testing.B) { benchClusterReserve(b, c, 0) })
	b.Run("wait-1", func(b *testing.B) { benchClusterReserve(b, c, 1) })
}

func benchClusterReserve(b *testing.B, c *rediscluster.Cluster, wait int) {
	s := openStore(b, Options{URL: c.URL(), Cluster: true, KeyPrefix: clusterPrefix(), OpTimeout: time.Second, WaitReplicas: wait})
	// Warm up: every master's connections and scripts.
	for i := range 30 {
		if _, err := s.Reserve(context.Background(), benchReservation(fmt.Sprint("warm-", i))); err != nil {
			b.Fatal(err)
		}
	}
	before := masterStats(b, c, "commandstats", scriptCalls)
	var n atomic.Int64
	b.ReportAllocs()
	b.SetParallelism(8)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		r := benchReservation(fmt.Sprint("bench-", n.Add(1)))
		for pb.Next() {
			r.Seq++
			if _, err := s.Reserve(context.Background(), r); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.StopTimer()
	after := masterStats(b, c, "commandstats", scriptCalls)
	var total, busiest int64
	for i := range after {
		d := after[i] - before[i]
		total += d
		busiest = max(busiest, d)
	}
	b.ReportMetric(float64(total)/float64(b.N), "scripts/op")
	if total > 0 {
		b.ReportMetric(float64(busiest)/float64(total), "busiest-master-share")
	}
}

// BenchmarkClusterMemory fills 50 customers' months, each with usage in
// all 745 hours a month can have, and reports the Redis memory (summed
// over the masters) per customer-month. Each op is one customer-month.
func BenchmarkClusterMemory(b *testing.B) {
	c := rediscluster.Start(b, 3, 0)
	s := openStore(b, Options{URL: c.URL(), Cluster: true, KeyPrefix: clusterPrefix(), OpTimeout: time.Second})
	p := metering.PeriodRule{}.Period(time.Now(), time.Time{})
	before := masterStats(b, c, "memory", usedMemory)
	customers := 0
	for b.Loop() {
		customers++
		r := benchReservation(fmt.Sprint("mem-", customers))
		for h := range 745 {
			r.Seq++
			r.Quota.HourID = metering.TimeID(p.Start.Add(time.Duration(h) * time.Hour))
			if _, err := s.Reserve(context.Background(), r); err != nil {
				b.Fatal(err)
			}
		}
	}
	after := masterStats(b, c, "memory", usedMemory)
	var grew int64
	for i := range after {
		grew += after[i] - before[i]
	}
	b.ReportMetric(float64(grew)/float64(customers), "bytes/customer-month")
}
