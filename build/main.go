// Command build builds a Caddy binary with the api_monetize plugin from the
// recipe in xcaddy.json, using the xcaddy library.
//
// xcaddy.json is a JSON-encoded xcaddy.Builder (github.com/caddyserver/xcaddy):
// caddy_version, plugins [{module_path, version}], replacements [{old, new}],
// build_flags, race_detector, … Unknown fields are an error.
//
// Usage, from the repository root:
//
//	go -C build run .                   # reads ../xcaddy.json, writes ../caddy
//	go -C build run . -o /tmp/caddy     # -o is relative to build/ unless absolute
//	go -C build run . -config ../xcaddy.json -o ../caddy
//
// Flags:
//
//	-config  path of the recipe (default ../xcaddy.json, i.e. the repository
//	         root when run from build/)
//	-o       output binary (default: "caddy" next to the recipe)
//
// Relative local replacement paths in the recipe ("." or "./…", "../…") are
// resolved against the directory that holds the recipe, so "." means the
// checkout the recipe sits in.
//
// A module that is replaced by a local directory is usually not published,
// and the Go module proxy answers 403 (not 404) for unknown module paths,
// which makes go fail instead of falling back to the replacement. When the
// recipe has a local replacement, the go commands run by xcaddy therefore get
// GOPROXY set to the configured proxy list with a trailing "direct" removed
// and "|off" appended: any proxy error then falls through to "off", which go
// treats as "not found", so the local replacement is used.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/caddyserver/xcaddy"
)

func main() {
	configPath := flag.String("config", filepath.Join("..", "xcaddy.json"), "path of the xcaddy.Builder JSON recipe")
	output := flag.String("o", "", `output binary (default "caddy" in the recipe's directory)`)
	flag.Parse()
	if flag.NArg() > 0 {
		log.Fatalf("unexpected arguments: %q", flag.Args())
	}

	builder, err := loadRecipe(*configPath)
	if err != nil {
		log.Fatal(err)
	}
	if hasLocalReplacement(builder) {
		proxy, err := localOnlyProxy()
		if err != nil {
			log.Fatal(err)
		}
		if err := os.Setenv("GOPROXY", proxy); err != nil {
			log.Fatal(err)
		}
		log.Printf("[INFO] GOPROXY=%s (local replacements are not published)", proxy)
	}

	out := *output
	if out == "" {
		out = filepath.Join(filepath.Dir(*configPath), "caddy")
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := builder.Build(ctx, out); err != nil {
		stop()
		log.Fatalf("build failed: %v", err)
	}
}

// loadRecipe reads the xcaddy.Builder at path and makes its local
// replacement paths absolute, relative to path's directory.
func loadRecipe(path string) (xcaddy.Builder, error) {
	var b xcaddy.Builder
	f, err := os.Open(path)
	if err != nil {
		return b, err
	}
	defer f.Close()
	dec := json.NewDecoder(f)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&b); err != nil {
		return b, fmt.Errorf("%s: %w", path, err)
	}
	if b.CaddyVersion == "" {
		return b, fmt.Errorf("%s: caddy_version is required (pin a release)", path)
	}
	base, err := filepath.Abs(filepath.Dir(path))
	if err != nil {
		return b, err
	}
	for i, r := range b.Replacements {
		dir := r.New.String()
		if !isLocalPath(dir) {
			continue
		}
		if !filepath.IsAbs(dir) {
			dir = filepath.Join(base, dir)
		}
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err != nil {
			return b, fmt.Errorf("%s: replacement %s => %s: %w", path, r.Old, dir, err)
		}
		b.Replacements[i].New = xcaddy.ReplacementPath(dir)
	}
	return b, nil
}

// isLocalPath reports whether a replacement target is a directory rather
// than a module path, following the go.mod rule (absolute, ".", "..", or
// starting with "./" or "../").
func isLocalPath(p string) bool {
	return filepath.IsAbs(p) || p == "." || p == ".." ||
		strings.HasPrefix(p, "./") || strings.HasPrefix(p, "../")
}

// hasLocalReplacement reports whether any replacement in b is a directory.
func hasLocalReplacement(b xcaddy.Builder) bool {
	for _, r := range b.Replacements {
		if isLocalPath(r.New.String()) {
			return true
		}
	}
	return false
}

// localOnlyProxy returns the current GOPROXY list with a trailing "direct"
// dropped and "|off" appended, so that a proxy refusing an unpublished module
// path ends in "not found" rather than an error. A list that is only
// "direct" or already ends in "off" is returned unchanged.
func localOnlyProxy() (string, error) {
	out, err := exec.Command(goCommand(), "env", "GOPROXY").Output()
	if err != nil {
		var exitErr *exec.ExitError
		if errors.As(err, &exitErr) {
			err = fmt.Errorf("%w: %s", err, exitErr.Stderr)
		}
		return "", fmt.Errorf("go env GOPROXY: %w", err)
	}
	proxy := strings.TrimSpace(string(out))
	trimmed := strings.TrimSuffix(strings.TrimSuffix(proxy, ",direct"), "|direct")
	switch {
	case trimmed == "direct", trimmed == "off", trimmed == "",
		strings.HasSuffix(trimmed, ",off"), strings.HasSuffix(trimmed, "|off"):
		return proxy, nil
	}
	return trimmed + "|off", nil
}

// goCommand is the go binary xcaddy runs: $XCADDY_WHICH_GO, else "go".
func goCommand() string {
	if g := os.Getenv("XCADDY_WHICH_GO"); g != "" {
		return g
	}
	return "go"
}
