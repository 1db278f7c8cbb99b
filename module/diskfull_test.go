package module

import (
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/apimonetize/caddy-api-monetize/internal/faultinject"
)

// The embedded store on a full disk: nothing admitted is left unbilled.

// Keys of the disk-full deployment: a tier that admits while the store
// fails (local) and one that refuses (deny).
const (
	diskFullLocalKey = "diskfull-local-key-0123456789"
	diskFullDenyKey  = "diskfull-deny-key-01234567890"
)

// diskFullCaddyfile runs the embedded store at storePath, checkpointed every
// 50ms, in front of upstream.
func diskFullCaddyfile(storePath, upstream string) func(adminPort, httpPort int) string {
	return func(adminPort, httpPort int) string {
		return fmt.Sprintf(`{
	admin localhost:%d
	http_port %d
	grace_period 1s
	api_monetize {
		store_path %s
		store_flush_interval 50ms
		key_secret diskfull-test-secret-01234
		tier local_tier {
			included 100/month
			over_quota bill 0.002
			on_store_error local
		}
		tier deny_tier {
			included 100/month
			over_quota bill 0.002
			on_store_error deny
		}
		customer c_local tier local_tier
		customer c_deny tier deny_tier
		key %s c_local
		key %s c_deny
	}
}

:%d {
	api_monetize {
		cost /v1/five* 5
	}
	reverse_proxy %s
}
`, adminPort, httpPort, storePath, diskFullLocalKey, diskFullDenyKey, httpPort, strings.TrimPrefix(upstream, "http://"))
	}
}

// mountTmpfs mounts a tmpfs of size (e.g. "16m") on a new directory and
// unmounts it when the test ends. It skips the test where mounting is not
// permitted.
func mountTmpfs(t *testing.T, size string) string {
	t.Helper()
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size, "tmpfs", dir).CombinedOutput(); err != nil {
		t.Skipf("cannot mount a tmpfs (needs root): %v: %s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
		}
	})
	return dir
}

// fillDisk keeps the filesystem of dir full, writing a file there until
// the filesystem refuses more, and again every 10ms (the store gives back
// space it had reserved: the unused part of its log segment), until the
// returned function is called; that function then deletes the file.
func fillDisk(t *testing.T, dir string) (free func()) {
	t.Helper()
	path := filepath.Join(dir, "filler")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	fill := func() {
		for _, chunk := range []int{1 << 16, 512} {
			buf := make([]byte, chunk)
			for {
				if _, err := f.Write(buf); err != nil {
					break
				}
			}
		}
	}
	fill()
	stop, stopped := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(stopped)
		for {
			select {
			case <-stop:
				return
			case <-time.After(10 * time.Millisecond):
				fill()
			}
		}
	}()
	free = sync.OnceFunc(func() {
		close(stop)
		<-stopped
		f.Close()
		if err := os.Remove(path); err != nil {
			t.Error(err)
		}
	})
	t.Cleanup(free)
	return free
}

// envDiskFullWhile names a file: while it exists, the embedded store's
// write-ahead log appends fail with ENOSPC in a Caddy process the tests
// start (see injectDiskFull).
const envDiskFullWhile = "API_MONETIZE_TEST_DISK_FULL_WHILE"

// injectDiskFull installs, in a Caddy process started by the tests, the
// fault envDiskFullWhile asks for.
func injectDiskFull() {
	path := os.Getenv(envDiskFullWhile)
	if path == "" {
		return
	}
	faultinject.SetDiskWrite(func() error {
		if _, err := os.Stat(path); err == nil {
			return syscall.ENOSPC
		}
		return nil
	})
}

// TestEmbeddedStoreDiskFull fills the disk of the embedded store under
// load: a real tmpfs filled up (where mount is permitted), and an injected
// ENOSPC on every log write (everywhere). The tier with on_store_error
// deny refuses (503) what it cannot record; the local tier admits, and
// the usage is kept in memory. Once space returns, the ledger holds
// exactly the 2xx responses each customer received (nothing was counted
// as lost: the buffer did not overflow).
func TestEmbeddedStoreDiskFull(t *testing.T) {
	t.Run("tmpfs", func(t *testing.T) {
		dir := mountTmpfs(t, "16m")
		testEmbeddedStoreDiskFull(t, filepath.Join(dir, "store.db"), func() (free func()) {
			free = fillDisk(t, dir)
			time.Sleep(300 * time.Millisecond) // several checkpoints: the store gives back what it had reserved
			return free
		})
	})
	t.Run("injected", func(t *testing.T) {
		flag := filepath.Join(t.TempDir(), "disk-full")
		t.Setenv(envDiskFullWhile, flag)
		testEmbeddedStoreDiskFull(t, filepath.Join(t.TempDir(), "store.db"), func() (free func()) {
			if err := os.WriteFile(flag, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			return func() {
				if err := os.Remove(flag); err != nil {
					t.Fatal(err)
				}
			}
		})
	})
}

// testEmbeddedStoreDiskFull runs TestEmbeddedStoreDiskFull on a store at
// storePath whose disk fill makes full until the function it returns is
// called.
func testEmbeddedStoreDiskFull(t *testing.T, storePath string, fill func() (free func())) {
	up := newExactUpstream(t)
	p := launchFaultyCaddy(t, "caddy", diskFullCaddyfile(storePath, up.URL),
		"api_monetize store call failed", "writing metered usage into the store file failed",
		"the embedded store cannot write")
	client := loadClient(t, 8)
	for _, key := range []string{diskFullLocalKey, diskFullDenyKey} {
		if s := statusOf(t, client, p, key); s != http.StatusOK {
			t.Fatalf("before the disk is full: %d", s)
		}
	}
	warm := map[string]int64{"c_local": 1, "c_deny": 1} // one unit each, above

	free := fill()
	errorsBefore := p.metric(t, "caddy_api_monetize_store_errors_total")
	local := newMeterLoad()
	var reqs []meterReq
	for i := range 400 {
		r := faultPatterns(p.base)[i%4]
		r.key = diskFullLocalKey
		reqs = append(reqs, r)
	}
	local = fireMeter(client, reqs, 8)
	reqs = reqs[:0]
	for i := range 200 {
		r := faultPatterns(p.base, http.StatusServiceUnavailable)[i%4]
		r.key = diskFullDenyKey
		reqs = append(reqs, r)
	}
	deny := fireMeter(client, reqs, 8)
	local.check(t, "local tier while the disk is full")
	deny.check(t, "deny tier while the disk is full")
	if p.metric(t, "caddy_api_monetize_store_errors_total") == errorsBefore {
		t.Fatal("no store call failed while the disk was full: the test did not exercise a full disk")
	}
	refused := 0
	for o, n := range deny.outcomes {
		if o.status == http.StatusServiceUnavailable {
			refused += n
		}
	}
	if refused == 0 {
		t.Errorf("the deny tier refused nothing while the disk was full (outcomes %v)", deny.outcomes)
	}

	free()
	for customer, l := range map[string]*meterLoad{"c_local": local, "c_deny": deny} {
		wantUnits, wantReqs := l.okUnits+warm[customer], l.okCount+warm[customer]
		u := eventually(30*time.Second, func() usageView {
			u, _ := p.tryUsage(customer)
			return u
		}, func(u usageView) bool { return u.Billed == wantUnits && u.Requests == wantReqs })
		if u.Billed != wantUnits || u.Requests != wantReqs {
			t.Errorf("%s: ledger billed %d units in %d requests once space returned; clients received 2xx responses worth %d units in %d requests (outcomes %v)",
				customer, u.Billed, u.Requests, wantUnits, wantReqs, l.outcomes)
		}
	}
	if lost := p.metric(t, "caddy_api_monetize_lost_usage_records_total"); lost != 0 {
		t.Errorf("%d usage records counted as lost", lost)
	}
	t.Logf("local tier outcomes %v, deny tier outcomes %v", local.outcomes, deny.outcomes)
}
