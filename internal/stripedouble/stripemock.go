package stripedouble

import (
	"bytes"
	"fmt"
	"go/build"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// StripeMockVersion is the stripe-mock release the requests are validated
// against (.ci/run installs it).
const StripeMockVersion = "v0.203.0"

// StripeMock starts stripe-mock on free loopback ports for the test and
// returns its HTTP base URL. stripe-mock validates every request against
// Stripe's OpenAPI spec and answers with fixtures (it keeps no state). The
// test is skipped when the binary is missing (and fails when STRIPE_MOCK
// names a missing file): install it with
// `go install github.com/stripe/stripe-mock@v0.203.0`. STRIPE_MOCK may name
// the binary.
func StripeMock(t testing.TB) string {
	t.Helper()
	bin := os.Getenv("STRIPE_MOCK")
	if bin != "" && !fileExists(bin) {
		t.Fatalf("STRIPE_MOCK=%s does not exist", bin) // CI must not skip silently
	}
	if bin == "" {
		if p, err := exec.LookPath("stripe-mock"); err == nil {
			bin = p
		} else if p := filepath.Join(build.Default.GOPATH, "bin", "stripe-mock"); fileExists(p) {
			bin = p
		}
	}
	if bin == "" {
		t.Skipf("stripe-mock is not installed; run `go install github.com/stripe/stripe-mock@%s` to validate Stripe requests", StripeMockVersion)
	}
	httpAddr, httpsAddr := freeAddr(t), freeAddr(t)
	cmd := exec.Command(bin, "-http-addr", httpAddr, "-https-addr", httpsAddr)
	var out bytes.Buffer // its request log, shown when the test fails
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting stripe-mock: %v", err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("stripe-mock log:\n%s", out.String())
		}
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", httpAddr, 200*time.Millisecond)
		if err == nil {
			_ = c.Close()
			return "http://" + httpAddr
		}
		if time.Now().After(deadline) {
			t.Fatalf("stripe-mock did not listen on %s: %v", httpAddr, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func freeAddr(t testing.TB) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("finding a free port: %v", err)
	}
	defer l.Close()
	return fmt.Sprint(l.Addr())
}

func fileExists(p string) bool {
	st, err := os.Stat(p)
	return err == nil && !st.IsDir()
}
