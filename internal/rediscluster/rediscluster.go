// Package rediscluster starts a private Redis Cluster on loopback for
// tests: masters with replicas, every node a redis-server process of its
// own with its own directory, without persistence. Tests that need it are
// skipped only when redis-server or redis-cli is not installed (and fail
// then under RequiredEnv).
package rediscluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Node is one redis-server of the cluster.
type Node struct {
	// Port is its loopback port (its cluster bus is Port+10000).
	Port int
	cmd  *exec.Cmd
	done chan struct{}
	dir  string
}

// Addr is the node's address.
func (n *Node) Addr() string { return "127.0.0.1:" + strconv.Itoa(n.Port) }

// Kill stops the node with SIGKILL (a crash: nothing is saved or handed
// over) and waits for it to exit.
func (n *Node) Kill() {
	if n.cmd.Process != nil {
		_ = n.cmd.Process.Signal(syscall.SIGKILL)
	}
	<-n.done
}

// Cluster is a running test cluster.
type Cluster struct {
	// Nodes are its nodes, masters first (as created: the first three
	// are masters, the next three their replicas).
	Nodes []*Node
	dir   string

	mu          sync.Mutex
	clients     []interface{ Close() error } // closed by Stop
	nodeClients map[*Node]*redis.Client
}

// keep registers cl to be closed by Stop.
func (c *Cluster) keep(cl interface{ Close() error }) {
	c.mu.Lock()
	c.clients = append(c.clients, cl)
	c.mu.Unlock()
}

// Stop kills every node, closes the clients handed out and removes the
// nodes' directories.
func (c *Cluster) Stop() {
	c.mu.Lock()
	for _, cl := range c.clients {
		_ = cl.Close()
	}
	c.clients, c.nodeClients = nil, nil
	c.mu.Unlock()
	for _, n := range c.Nodes {
		n.Kill()
	}
	_ = os.RemoveAll(c.dir)
}

// URL is the cluster's URL in go-redis's cluster form: every node a seed.
func (c *Cluster) URL() string {
	u := "redis://" + c.Nodes[0].Addr()
	for i, n := range c.Nodes[1:] {
		if i == 0 {
			u += "?"
		} else {
			u += "&"
		}
		u += "addr=" + n.Addr()
	}
	return u
}

// Client returns a go-redis cluster client on c, closed by Stop.
func (c *Cluster) Client() *redis.ClusterClient {
	var addrs []string
	for _, n := range c.Nodes {
		addrs = append(addrs, n.Addr())
	}
	cl := redis.NewClusterClient(&redis.ClusterOptions{Addrs: addrs, ClusterStateReloadInterval: time.Second})
	c.keep(cl)
	return cl
}

// MasterFor returns the node that is master of key's slot now, asking the
// cluster (not a cached map).
func (c *Cluster) MasterFor(ctx context.Context, key string) (*Node, error) {
	for _, n := range c.Nodes {
		cl := redis.NewClient(&redis.Options{Addr: n.Addr()})
		slot, err := cl.ClusterKeySlot(ctx, key).Result()
		if err != nil {
			_ = cl.Close()
			continue
		}
		slots, err := cl.ClusterSlots(ctx).Result()
		_ = cl.Close()
		if err != nil {
			continue
		}
		for _, s := range slots {
			if int64(s.Start) <= slot && slot <= int64(s.End) && len(s.Nodes) > 0 {
				for _, m := range c.Nodes {
					if m.Addr() == s.Nodes[0].Addr {
						return m, nil
					}
				}
			}
		}
	}
	return nil, fmt.Errorf("no node knows the master of %q", key)
}

// RequiredEnv, set to "required" (as .ci/test does), makes Start and the
// callers of Skip fail the test instead of skipping it when no cluster can
// be started.
const RequiredEnv = "REDIS_CLUSTER_TESTS"

// Skip skips t because of err, or fails it when RequiredEnv says the
// cluster tests must run.
func Skip(t testing.TB, err error) {
	t.Helper()
	if os.Getenv(RequiredEnv) == "required" {
		t.Fatalf("%s=required: %v", RequiredEnv, err)
	}
	t.Skip(err)
}

// Available reports why a cluster cannot be started here (redis-server
// or redis-cli missing), or nil.
func Available() error {
	for _, bin := range []string{"redis-server", "redis-cli"} {
		if _, err := exec.LookPath(bin); err != nil {
			return fmt.Errorf("%s not installed", bin)
		}
	}
	return nil
}

// Start starts a cluster of masters masters with replicas replicas each,
// stopped at cleanup. It skips the test when redis-server or redis-cli is
// missing.
func Start(t testing.TB, masters, replicas int) *Cluster {
	t.Helper()
	if err := Available(); err != nil {
		Skip(t, err)
	}
	c, err := New(masters, replicas)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Stop)
	return c
}

// New starts a cluster of masters masters with replicas replicas each, on
// free loopback ports, and waits until every node reports the cluster ok
// and every replica has synced. Stop ends it.
func New(masters, replicas int) (_ *Cluster, err error) {
	if err := Available(); err != nil {
		return nil, err
	}
	server, _ := exec.LookPath("redis-server")
	cli, _ := exec.LookPath("redis-cli")
	dir, err := os.MkdirTemp("", "rediscluster-")
	if err != nil {
		return nil, err
	}
	c := &Cluster{dir: dir}
	defer func() {
		if err != nil {
			c.Stop()
		}
	}()
	used := map[int]bool{}
	for i := range masters * (1 + replicas) {
		port, err := freePort(used)
		if err != nil {
			return nil, err
		}
		nd := filepath.Join(dir, strconv.Itoa(port))
		if err := os.Mkdir(nd, 0o700); err != nil {
			return nil, err
		}
		cmd := exec.Command(server, "--port", strconv.Itoa(port), "--bind", "127.0.0.1",
			"--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
			"--cluster-node-timeout", "2000", "--save", "", "--appendonly", "no",
			// A replica syncs at once (the default waits 5s for others),
			// so it can take over from the start.
			"--repl-diskless-sync-delay", "0",
			// The masters that live keep serving their slots while one is
			// failing over (what docs/redis-cluster.md recommends).
			"--cluster-require-full-coverage", "no",
			"--dir", nd, "--logfile", filepath.Join(nd, "log"))
		if err := cmd.Start(); err != nil {
			return nil, fmt.Errorf("starting redis-server %d: %w", i, err)
		}
		n := &Node{Port: port, cmd: cmd, done: make(chan struct{}), dir: nd}
		go func() { _ = cmd.Wait(); close(n.done) }()
		c.Nodes = append(c.Nodes, n)
	}
	for _, n := range c.Nodes {
		if err := waitPing(n); err != nil {
			return nil, err
		}
	}
	args := []string{"--cluster", "create"}
	for _, n := range c.Nodes {
		args = append(args, n.Addr())
	}
	args = append(args, "--cluster-replicas", strconv.Itoa(replicas), "--cluster-yes")
	out, err := exec.Command(cli, args...).CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("redis-cli --cluster create: %w\n%s", err, out)
	}
	// Every node agrees the cluster is up, and every replica has synced.
	deadline := time.Now().Add(30 * time.Second)
	for _, n := range c.Nodes {
		for {
			out, _ := exec.Command(cli, "-p", strconv.Itoa(n.Port), "cluster", "info").Output()
			repl, _ := exec.Command(cli, "-p", strconv.Itoa(n.Port), "info", "replication").Output()
			synced := bytes.Contains(repl, []byte("role:master")) || bytes.Contains(repl, []byte("master_link_status:up"))
			if bytes.Contains(out, []byte("cluster_state:ok")) && synced {
				break
			}
			if time.Now().After(deadline) {
				return nil, fmt.Errorf("cluster node %s not ok:\n%s%s", n.Addr(), out, repl)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return c, nil
}

// WaitFailover waits until a node other than gone is master of key's
// slot (a replica of gone took over) and every node but gone reports
// cluster_state:ok.
func (c *Cluster) WaitFailover(ctx context.Context, gone *Node, key string) error {
	for {
		m, err := c.MasterFor(ctx, key)
		ok := err == nil && m != gone
		for _, n := range c.Nodes {
			if n == gone || !ok {
				continue
			}
			cl := redis.NewClient(&redis.Options{Addr: n.Addr()})
			info, err := cl.ClusterInfo(ctx).Result()
			_ = cl.Close()
			if err != nil || !strings.Contains(info, "cluster_state:ok") {
				ok = false
				break
			}
		}
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// freePort returns a loopback port that is free, and whose cluster bus
// port (+10000) is free too, and not in used.
func freePort(used map[int]bool) (int, error) {
	for range 100 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, err
		}
		port := l.Addr().(*net.TCPAddr).Port
		_ = l.Close()
		if port+10000 > 65535 || used[port] || used[port+10000] || used[port-10000] {
			continue
		}
		bus, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port+10000))
		if err != nil {
			continue
		}
		_ = bus.Close()
		used[port], used[port+10000] = true, true
		return port, nil
	}
	return 0, errors.New("no free port pair for a cluster node")
}

func waitPing(n *Node) error {
	cl := redis.NewClient(&redis.Options{Addr: n.Addr()})
	defer cl.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		err := cl.Ping(ctx).Err()
		cancel()
		if err == nil {
			return nil
		}
		select {
		case <-n.done:
			log, _ := os.ReadFile(filepath.Join(n.dir, "log"))
			return fmt.Errorf("redis-server %s exited:\n%s", n.Addr(), log)
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("redis-server %s does not answer: %w", n.Addr(), err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// client returns a plain client on n, closed by Stop.
func (c *Cluster) client(n *Node) *redis.Client {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.nodeClients == nil {
		c.nodeClients = map[*Node]*redis.Client{}
	}
	cl := c.nodeClients[n]
	if cl == nil {
		cl = redis.NewClient(&redis.Options{Addr: n.Addr(), ReadTimeout: 10 * time.Second})
		c.nodeClients[n] = cl
		c.clients = append(c.clients, cl)
	}
	return cl
}

// Slot returns the hash slot of key.
func (c *Cluster) Slot(ctx context.Context, key string) (int, error) {
	n, err := c.client(c.Nodes[0]).ClusterKeySlot(ctx, key).Result()
	return int(n), err
}

// Masters returns the nodes that are masters now.
func (c *Cluster) Masters(ctx context.Context) []*Node {
	var ms []*Node
	for _, n := range c.Nodes {
		info, err := c.client(n).Info(ctx, "replication").Result()
		if err == nil && strings.Contains(info, "role:master") {
			ms = append(ms, n)
		}
	}
	return ms
}

// owner returns the master that owns slot.
func (c *Cluster) owner(ctx context.Context, slot int) (*Node, error) {
	for _, m := range c.Masters(ctx) {
		slots, err := c.client(m).ClusterSlots(ctx).Result()
		if err != nil {
			continue
		}
		for _, s := range slots {
			if int(s.Start) <= slot && slot <= int(s.End) && len(s.Nodes) > 0 {
				for _, n := range c.Nodes {
					if n.Addr() == s.Nodes[0].Addr {
						return n, nil
					}
				}
			}
		}
	}
	return nil, fmt.Errorf("no master owns slot %d", slot)
}

// BeginMigration puts slot in the migrating state towards to (IMPORTING
// on to, MIGRATING on its owner), moving no key, and returns the owner.
func (c *Cluster) BeginMigration(ctx context.Context, slot int, to *Node) (*Node, error) {
	from, err := c.owner(ctx, slot)
	if err != nil {
		return nil, err
	}
	srcID, err := c.client(from).ClusterMyID(ctx).Result()
	if err != nil {
		return nil, err
	}
	dstID, err := c.client(to).ClusterMyID(ctx).Result()
	if err != nil {
		return nil, err
	}
	if err := c.client(to).Do(ctx, "CLUSTER", "SETSLOT", slot, "IMPORTING", srcID).Err(); err != nil {
		return nil, err
	}
	return from, c.client(from).Do(ctx, "CLUSTER", "SETSLOT", slot, "MIGRATING", dstID).Err()
}

// CancelMigration ends slot's migrating state on from and to, leaving it
// with from.
func (c *Cluster) CancelMigration(ctx context.Context, slot int, from, to *Node) error {
	for _, n := range []*Node{from, to} {
		if err := c.client(n).Do(ctx, "CLUSTER", "SETSLOT", slot, "STABLE").Err(); err != nil {
			return err
		}
	}
	return nil
}

// MoveSlot migrates slot from the master that owns it to the master to,
// as redis-cli --cluster reshard does: IMPORTING on to, MIGRATING on the
// owner, MIGRATE of its keys in batches of batch (each batch after
// pause, so traffic meets the split state), then SETSLOT NODE on every
// master.
func (c *Cluster) MoveSlot(ctx context.Context, slot int, to *Node, batch int, pause time.Duration) error {
	from, err := c.owner(ctx, slot)
	if err != nil {
		return err
	}
	if from == to {
		return nil
	}
	if _, err := c.BeginMigration(ctx, slot, to); err != nil {
		return err
	}
	src := c.client(from)
	dstID, err := c.client(to).ClusterMyID(ctx).Result()
	if err != nil {
		return err
	}
	for {
		keys, err := src.ClusterGetKeysInSlot(ctx, slot, batch).Result()
		if err != nil {
			return err
		}
		if len(keys) == 0 {
			break
		}
		args := []any{"MIGRATE", "127.0.0.1", to.Port, "", 0, 5000, "KEYS"}
		for _, k := range keys {
			args = append(args, k)
		}
		if err := src.Do(ctx, args...).Err(); err != nil {
			return fmt.Errorf("MIGRATE: %w", err)
		}
		time.Sleep(pause)
	}
	for _, n := range append([]*Node{to, from}, c.Masters(ctx)...) {
		if err := c.client(n).Do(ctx, "CLUSTER", "SETSLOT", slot, "NODE", dstID).Err(); err != nil {
			return fmt.Errorf("SETSLOT NODE on %s: %w", n.Addr(), err)
		}
	}
	return nil
}

// ReplicaOf returns a replica of master, or nil.
func (c *Cluster) ReplicaOf(ctx context.Context, master *Node) *Node {
	for _, n := range c.Nodes {
		if n == master {
			continue
		}
		info, err := c.client(n).Info(ctx, "replication").Result()
		if err == nil && strings.Contains(info, "master_port:"+strconv.Itoa(master.Port)+"\r\n") {
			return n
		}
	}
	return nil
}

// StartServer starts one standalone redis-server (no cluster) on a free
// loopback port, stopped at cleanup, for tests that must be its only
// client (e.g. counting its commands while other packages' tests use the
// shared Redis). It skips the test when redis-server is missing, or fails
// it when RequiredEnv says so.
func StartServer(t testing.TB) *Node {
	t.Helper()
	if err := Available(); err != nil {
		Skip(t, err)
	}
	server, _ := exec.LookPath("redis-server")
	port, err := freePort(map[int]bool{})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	cmd := exec.Command(server, "--port", strconv.Itoa(port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--dir", dir, "--logfile", filepath.Join(dir, "log"))
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting redis-server: %v", err)
	}
	n := &Node{Port: port, cmd: cmd, done: make(chan struct{}), dir: dir}
	go func() { _ = cmd.Wait(); close(n.done) }()
	t.Cleanup(n.Kill)
	if err := waitPing(n); err != nil {
		t.Fatal(err)
	}
	return n
}
