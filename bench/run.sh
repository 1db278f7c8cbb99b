#!/usr/bin/env bash
# Load benchmark of the api_monetize handler against bare Caddy, on loopback.
#
#   bash bench/run.sh                       # 30 rounds x 2 s at 32 connections
#   ROUNDS=10 DURATION=5 CONNS="32 1" bash bench/run.sh
#   CADDY=/path/to/caddy bash bench/run.sh  # skip the build, use this binary
#   GOGC=400 bash bench/run.sh              # GOGC/GOMAXPROCS/GOMEMLIMIT go to every Caddy
#   FOUNDATION=65f76dd bash bench/run.sh    # also run that git revision's build (E, F below)
#   COMPARE=HEAD bash bench/run.sh          # also run C and D on that revision's build (G, H)
#   COMPARE_CADDY=/path/to/caddy bash ...   # the same with a binary built before
#   TOGETHER=10 bash bench/run.sh           # also 10 rounds of each config loaded at once with B
#   UPSTREAM_HEADERS=4 bash bench/run.sh    # the upstream adds 4 typical API response headers
#   RATE_LIMIT_HEADERS=ietf bash bench/run.sh  # rate_limit_headers for C, D, G, H (default: both)
#   ONLY=C bash bench/run.sh                # just B and C, alternating every 2 s
#   BENCH_RESULTS=rows-1.tsv bash bench/run.sh  # keep the per-run rows; pool runs with
#   bash bench/summary.sh rows-1.tsv rows-2.tsv   # the summary over both runs' rounds
#
# Other knobs: WARMUP (s per config, 2), THREADS (wrk -t, 1), BASE_PORT
# (18180; uses BASE_PORT+1..+40), BENCH_RESULTS=<file> keeps the raw
# per-run rows (TSV). Default run: about 7 minutes per CONNS value, plus the
# build. Many short rounds rather than a few long ones: B's own CPU per
# request drifts by 20-30 % within minutes on a shared 2-core machine, and
# a round's runs are then seconds apart, so the pairing cancels the drift.
#
# Builds Caddy from xcaddy.json once (go -C build run .), then starts, each as
# its own process on 127.0.0.1 with its own admin port:
#   A  bare Caddy: respond
#   B  bare Caddy: reverse_proxy to the upstream
#   C  api_monetize (embedded store) + reverse_proxy to the upstream
#   D  api_monetize (Redis store)    + reverse_proxy to the upstream
#   upstream: Caddy (same binary) with respond; a private redis-server for D.
# With FOUNDATION=<git revision> (the rate-limit-only foundation, 65f76dd), it
# also builds that revision from xcaddy.json (in a temporary git worktree) and
# runs its plugin with the foundation's tier (rate limit only) in the same
# rounds, so metering's cost is measured against it in one run:
#   E  foundation build, embedded store   + reverse_proxy to the upstream
#   F  foundation build, Redis store      + reverse_proxy (database 1 of the same Redis)
# With COMPARE=<git revision> (or COMPARE_CADDY=<binary>) it also runs C's
# and D's configurations on that build, in the same rounds, to measure a
# change before and after in one run:
#   G  compared build, embedded store      (C's configuration)
#   H  compared build, Redis store         (D's configuration, database 2)
# C and D have one tier (rate 100000000/min and a 10^9-unit monthly quota
# with overage billing, so every request is rate-limited, reserved against
# the quota and metered; nothing is ever denied) and one
# Caddyfile-declared key, sent by wrk in X-API-Key; every config is hit on
# /v1/bench. After a warm-up, each round runs every config once per
# connection count, the config order rotated every round so machine drift
# hits all alike. Per run it records wrk's req/s and p50/p99, the processes'
# utime+stime from /proc/<pid>/stat, GC cycles (GODEBUG=gctrace=1) and, for D,
# Redis INFO commandstats. It prints medians over the rounds, paired
# ratios (taken per round, then the median) of C and D to B, and the
# quartiles of those pairings (throughput ratio and added gateway CPU in
# µs), which show how far one round's machine noise reaches.
#
# TOGETHER=<rounds> then pairs in time as well: each round loads every
# config but A and B at the same moment as B (two wrk, each with half of the
# first CONNS value's connections, for DURATION), so both see the same
# machine, and prints the quartiles of the added gateway CPU per request
# and of the throughput ratio. Much less noisy than comparing runs taken
# one after the other on a shared machine.
#
# Needs wrk, redis-server and redis-cli (installed with apt-get when missing
# and running as root), curl and go. Everything listens on 127.0.0.1 only,
# every run is bounded by DURATION, and every process started here is killed
# at exit. Caddy's data and config go to a temporary directory (private
# XDG_DATA_HOME/XDG_CONFIG_HOME) that is removed at exit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

ROUNDS="${ROUNDS:-30}"
DURATION="${DURATION:-2}"
WARMUP="${WARMUP:-2}"
CONNS="${CONNS:-32}"
THREADS="${THREADS:-1}"
TOGETHER="${TOGETHER:-0}"
UPSTREAM_HEADERS="${UPSTREAM_HEADERS:-0}"
RATE_LIMIT_HEADERS="${RATE_LIMIT_HEADERS:-}"
BASE_PORT="${BASE_PORT:-18180}"
CONFIGS=(A B C D)
FOUNDATION="${FOUNDATION:-}"
[[ -n "$FOUNDATION" ]] && CONFIGS+=(E F)
COMPARE="${COMPARE:-}"
COMPARE_CADDY="${COMPARE_CADDY:-}"
[[ -n "$COMPARE" || -n "$COMPARE_CADDY" ]] && CONFIGS+=(G H)
# ONLY="C" (or "C D", ...) runs just those configurations besides B: with
# two configurations a pair's runs are seconds apart, so machine drift
# reaches the pairing much less.
ONLY="${ONLY:-}"
if [[ -n "$ONLY" ]]; then
	for c in $ONLY; do
		[[ " ${CONFIGS[*]} " == *" $c "* && "$c" != B ]] ||
			{ echo "ONLY lists configurations besides B (always run) among: ${CONFIGS[*]:2} A (G and H need COMPARE)" >&2; exit 2; }
	done
	read -ra CONFIGS <<<"B $ONLY"
fi

for v in ROUNDS DURATION WARMUP THREADS TOGETHER UPSTREAM_HEADERS BASE_PORT; do
	[[ "${!v}" =~ ^[0-9]+$ ]] || { echo "$v must be a whole number" >&2; exit 2; }
done
((ROUNDS >= 1 && ROUNDS <= 50 && TOGETHER <= 50 && DURATION >= 1 && DURATION <= 120 && UPSTREAM_HEADERS <= 4)) ||
	{ echo "ROUNDS must be 1..50, TOGETHER 0..50, DURATION 1..120 s and UPSTREAM_HEADERS 0..4" >&2; exit 2; }
[[ "$RATE_LIMIT_HEADERS" =~ ^(|both|ietf|legacy|none)$ ]] ||
	{ echo "RATE_LIMIT_HEADERS must be both, ietf, legacy or none" >&2; exit 2; }
for c in $CONNS; do
	[[ "$c" =~ ^[0-9]+$ ]] && ((c >= 1 && c <= 1000)) || { echo "CONNS must list numbers 1..1000" >&2; exit 2; }
done

# Ports: sites, upstream, admin endpoints, Redis.
declare -A PORT=([A]=$((BASE_PORT + 1)) [B]=$((BASE_PORT + 2)) [C]=$((BASE_PORT + 3)) [D]=$((BASE_PORT + 4))
	[E]=$((BASE_PORT + 5)) [F]=$((BASE_PORT + 6)) [G]=$((BASE_PORT + 7)) [H]=$((BASE_PORT + 8)) [U]=$((BASE_PORT + 10)))
declare -A ADMIN=([A]=$((BASE_PORT + 21)) [B]=$((BASE_PORT + 22)) [C]=$((BASE_PORT + 23)) [D]=$((BASE_PORT + 24))
	[E]=$((BASE_PORT + 25)) [F]=$((BASE_PORT + 26)) [G]=$((BASE_PORT + 27)) [H]=$((BASE_PORT + 28)) [U]=$((BASE_PORT + 30)))
REDIS_PORT=$((BASE_PORT + 40))

work="$(mktemp -d)"
pids=()
cleanup() {
	local pid
	for pid in "${pids[@]}"; do
		kill "$pid" 2>/dev/null || true
	done
	for pid in "${pids[@]}"; do
		wait "$pid" 2>/dev/null || true
	done
	local wt
	for wt in foundation compare; do
		if [[ -d "$work/$wt" ]]; then
			git worktree remove --force "$work/$wt" 2>/dev/null || true
		fi
	done
	rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

. bench/need.sh
need wrk wrk
need redis-server redis-server
need redis-cli redis-tools
need curl curl

port_free() { # nothing accepts connections on 127.0.0.1:<port>
	if { exec 3<>"/dev/tcp/127.0.0.1/$1"; } 2>/dev/null; then
		exec 3>&-
		return 1
	fi
}
for p in "${PORT[@]}" "${ADMIN[@]}" "$REDIS_PORT"; do
	port_free "$p" || { echo "port $p on 127.0.0.1 is in use; set BASE_PORT" >&2; exit 1; }
done

# ---- build ----
if [[ -n "${CADDY:-}" ]]; then
	caddy="$CADDY"
else
	echo "building Caddy from xcaddy.json ..."
	go -C build run . -o "$work/caddy" >"$work/build.log" 2>&1 || { tail -30 "$work/build.log" >&2; exit 1; }
	caddy="$work/caddy"
fi
"$caddy" list-modules | grep -qx http.handlers.api_monetize ||
	{ echo "$caddy has no http.handlers.api_monetize module" >&2; exit 1; }
declare -A BIN=([U]="$caddy" [A]="$caddy" [B]="$caddy" [C]="$caddy" [D]="$caddy")
build_rev() { # build_rev <git revision> <name>: Caddy from that revision's xcaddy.json, at $work/caddy-<name>
	echo "building $1 from its own xcaddy.json ..."
	{ git worktree add --detach --quiet "$work/$2" "$1" &&
		go -C "$work/$2/build" run . -o "$work/caddy-$2"; } >"$work/build-$2.log" 2>&1 ||
		{ tail -30 "$work/build-$2.log" >&2; exit 1; }
	git worktree remove --force "$work/$2"
}
if [[ -n "$FOUNDATION" ]]; then
	build_rev "$FOUNDATION" foundation
	BIN[E]="$work/caddy-foundation"
	BIN[F]="$work/caddy-foundation"
fi
if [[ -n "$COMPARE_CADDY" ]]; then
	BIN[G]="$COMPARE_CADDY"
elif [[ -n "$COMPARE" ]]; then
	build_rev "$COMPARE" compare
	BIN[G]="$work/caddy-compare"
fi
[[ -n "${BIN[G]:-}" ]] && BIN[H]="${BIN[G]}"

# ---- configuration ----
# The key and the HMAC secret are random per run and reach Caddy through
# placeholders, so they are never written to a file.
BENCH_API_KEY="bench$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
BENCH_KEY_SECRET="$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export BENCH_API_KEY BENCH_KEY_SECRET
export XDG_DATA_HOME="$work/data" XDG_CONFIG_HOME="$work/config"

global() { # global <admin port> [api_monetize store line [foundation]]
	printf '{\n\tadmin localhost:%s\n\tauto_https off\n\tpersist_config off\n' "$1"
	if (($# > 1)); then
		printf '\tapi_monetize {\n'
		[[ -n "$2" ]] && printf '\t\t%s\n' "$2"
		printf '\t\tkey_secret {env.BENCH_KEY_SECRET}\n'
		if (($# == 2)) && [[ -n "$RATE_LIMIT_HEADERS" ]]; then
			printf '\t\trate_limit_headers %s\n' "$RATE_LIMIT_HEADERS"
		fi
		if (($# > 2)); then # the foundation's tier: a rate limit only
			printf '\t\ttier pro {\n\t\t\trate 100000000/min\n\t\t\tendpoints /v1/*\n\t\t}\n'
		else
			printf '\t\ttier pro {\n\t\t\trate 100000000/min\n\t\t\tincluded 1000000000/month\n\t\t\tover_quota bill 0.002\n\t\t\tendpoints /v1/*\n\t\t}\n'
		fi
		printf '\t\tcustomer acme tier pro\n'
		printf '\t\tkey {env.BENCH_API_KEY} acme\n'
		printf '\t}\n'
	fi
	printf '}\n'
}
site() { # site <port> <handler lines...>
	printf ':%s {\n\tbind 127.0.0.1\n' "$1"
	shift
	printf '\t%s\n' "$@"
	printf '}\n'
}
upstream="reverse_proxy 127.0.0.1:${PORT[U]}"
# The upstream answers "ok" with Content-Type, Content-Length, Date and
# Server; UPSTREAM_HEADERS=n adds the first n of four headers a JSON API
# typically sends as well. (Past eight entries a Go map leaves its small
# form, so how many headers the response carries decides what five more
# cost every proxy in front of it; B's response has five.)
api_headers=('header Cache-Control "private, max-age=0"' 'header Vary Accept-Encoding'
	'header X-Request-Id 01J9Z3Q4K8M2N5P7R0S3T6V9W1' 'header X-Content-Type-Options nosniff')
{ global "${ADMIN[U]}"; site "${PORT[U]}" "${api_headers[@]:0:UPSTREAM_HEADERS}" 'respond "ok"'; } >"$work/U.Caddyfile"
{ global "${ADMIN[A]}"; site "${PORT[A]}" 'respond "ok"'; } >"$work/A.Caddyfile"
{ global "${ADMIN[B]}"; site "${PORT[B]}" "$upstream"; } >"$work/B.Caddyfile"
{ global "${ADMIN[C]}" ""; site "${PORT[C]}" api_monetize "$upstream"; } >"$work/C.Caddyfile"
{ global "${ADMIN[D]}" "redis redis://127.0.0.1:$REDIS_PORT/0"; site "${PORT[D]}" api_monetize "$upstream"; } >"$work/D.Caddyfile"
{ global "${ADMIN[E]}" "" foundation; site "${PORT[E]}" api_monetize "$upstream"; } >"$work/E.Caddyfile"
{ global "${ADMIN[F]}" "redis redis://127.0.0.1:$REDIS_PORT/1" foundation; site "${PORT[F]}" api_monetize "$upstream"; } >"$work/F.Caddyfile"
{ global "${ADMIN[G]}" ""; site "${PORT[G]}" api_monetize "$upstream"; } >"$work/G.Caddyfile"
{ global "${ADMIN[H]}" "redis redis://127.0.0.1:$REDIS_PORT/2"; site "${PORT[H]}" api_monetize "$upstream"; } >"$work/H.Caddyfile"

# ---- processes ----
declare -A PID
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
	--daemonize no --logfile "$work/redis.log" &
PID[R]=$!
pids+=("${PID[R]}")
rcli() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"; }
for _ in $(seq 50); do rcli ping >/dev/null 2>&1 && break; sleep 0.1; done
rcli ping >/dev/null || { echo "private Redis did not start" >&2; cat "$work/redis.log" >&2; exit 1; }

for c in U "${CONFIGS[@]}"; do
	mkdir -p "$work/data-$c"
	XDG_DATA_HOME="$work/data-$c" GODEBUG="${GODEBUG:+$GODEBUG,}gctrace=1" \
		"${BIN[$c]}" run --config "$work/$c.Caddyfile" --adapter caddyfile >"$work/$c.log" 2>&1 &
	PID[$c]=$!
	pids+=("${PID[$c]}")
done

URL() { echo "http://127.0.0.1:${PORT[$1]}/v1/bench"; }
for c in U "${CONFIGS[@]}"; do
	code=000
	for _ in $(seq 100); do
		code="$(curl -s -o /dev/null -w '%{http_code}' -H "X-API-Key: $BENCH_API_KEY" "$(URL "$c")" || true)"
		[[ "$code" == 200 ]] && break
		kill -0 "${PID[$c]}" 2>/dev/null || break
		sleep 0.1
	done
	if [[ "$code" != 200 ]]; then
		echo "config $c does not answer 200 on $(URL "$c") (got $code); its log:" >&2
		grep -v '^gc ' "$work/$c.log" | tail -20 >&2
		curl -s -H "X-API-Key: $BENCH_API_KEY" "$(URL "$c")" >&2 || true
		exit 1
	fi
done

# ---- measurement helpers ----
CLK_TCK="$(getconf CLK_TCK)"
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; } # utime+stime of pid
gc_count() { grep -c '^gc ' "$work/$1.log" || true; }
redis_cmdstats() { # "<command> <calls>" per line, from INFO commandstats
	rcli info commandstats | tr -d '\r' | awk -F'[:=,]' '/^cmdstat_/ { sub(/^cmdstat_/, "", $1); print $1, $3 }'
}

# run_wrk <config> <conns> <seconds> <outfile>
run_wrk() {
	timeout $(($3 + 15)) wrk -t"$THREADS" -c"$2" -d"$3s" --latency \
		-H "X-API-Key: $BENCH_API_KEY" "$(URL "$1")" >"$4"
}

results="$work/results.tsv" # round conns config rps p50_ms p99_ms requests bad gw_us up_us redis_us gc calls cmds
: >"$results"

measure() { # measure <round> <conns> <config>
	local r=$1 n=$2 c=$3 out="$work/wrk.out"
	local gw0 up0 rd0 gc0 gw1 up1 rd1 gc1 calls cmds
	gw0=$(cpu_ticks "${PID[$c]}"); up0=$(cpu_ticks "${PID[U]}"); rd0=$(cpu_ticks "${PID[R]}")
	gc0=$(gc_count "$c"); redis_cmdstats >"$work/redis.before"
	run_wrk "$c" "$n" "$DURATION" "$out"
	gw1=$(cpu_ticks "${PID[$c]}"); up1=$(cpu_ticks "${PID[U]}"); rd1=$(cpu_ticks "${PID[R]}")
	gc1=$(gc_count "$c"); redis_cmdstats >"$work/redis.after"
	# Per-command deltas; the INFO that took the first snapshot is not the
	# benchmark's.
	awk 'NR == FNR { before[$1] = $2; next }
		{ d = $2 - before[$1] - ($1 == "info"); if (d > 0) print $1, d }' \
		"$work/redis.before" "$work/redis.after" >"$work/redis.delta"
	calls=$(awk '$1 ~ /^(eval|evalsha|eval_ro|evalsha_ro|fcall|fcall_ro)$/ { s += $2 } END { print s + 0 }' "$work/redis.delta")
	cmds=$(awk '{ s += $2 } END { print s + 0 }' "$work/redis.delta")
	awk -v r="$r" -v n="$n" -v c="$c" -v tck="$CLK_TCK" \
		-v gw=$((gw1 - gw0)) -v up=$((up1 - up0)) -v rd=$((rd1 - rd0)) -v gc=$((gc1 - gc0)) \
		-v calls="$calls" -v cmds="$cmds" '
		function ms(v) {
			if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0
			if (v ~ /m$/) return v * 60000; if (v ~ /s$/) return v * 1000; return v + 0
		}
		/Requests\/sec:/ { rps = $2 }
		/^ +50%/ { p50 = ms($2) }
		/^ +99%/ { p99 = ms($2) }
		/ requests in / { reqs = $1 }
		/Non-2xx or 3xx responses:/ { bad += $NF }
		/Socket errors:/ { gsub(/[^0-9 ]/, " "); split($0, e, " +"); for (i in e) bad += e[i] }
		END {
			if (reqs < 1) { print "wrk reported no requests" > "/dev/stderr"; exit 1 }
			us = 1e6 / tck / reqs
			if (c != "D" && c != "F" && c != "H") { calls = 0; cmds = 0; rd = 0 }
			if (c == "A") up = 0
			printf "%d\t%d\t%s\t%.0f\t%.3f\t%.3f\t%d\t%d\t%.2f\t%.2f\t%.2f\t%.3f\t%.3f\t%.3f\n",
				r, n, c, rps, p50, p99, reqs, bad, gw * us, up * us, rd * us, gc * 1000 / reqs, calls / reqs, cmds / reqs
		}' "$out" >>"$results"
	if [[ "$c" == D ]]; then
		{
			awk -v n="$n" '{ print n, $1, $2 }' "$work/redis.delta"
			echo "$n requests $(tail -1 "$results" | cut -f7)"
		} >>"$work/redis-D.txt"
	fi
	tail -1 "$results" | awk -F'\t' '{ printf "  round %d  c=%-4d %s  %8.0f req/s  p50 %.3f ms  p99 %.3f ms  gw %.1f us/req%s\n", $1, $2, $3, $4, $5, $6, $9, ($8 > 0 ? "  ERRORS/NON-2XX: " $8 : "") }'
}

# ---- report header ----
echo
echo "== environment"
echo "  $("$caddy" version)  api_monetize checkout: $(git describe --always --dirty 2>/dev/null || echo unknown)"
echo "  $(go version 2>/dev/null || echo 'go: not in PATH')   $(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2)   $(redis-server --version | cut -d' ' -f1-3)"
echo "  CPU: $(nproc) x $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)"
echo "  GOGC=${GOGC:-unset (Go default 100)}  GOMAXPROCS=${GOMAXPROCS:-unset (Go default: $(nproc) CPUs)}  GOMEMLIMIT=${GOMEMLIMIT:-unset}"
echo "  wrk -t$THREADS -c{$CONNS} -d${DURATION}s, $ROUNDS rounds, order rotated per round; all on 127.0.0.1"
echo "  upstream: respond \"ok\" with $UPSTREAM_HEADERS extra response headers (UPSTREAM_HEADERS); rate_limit_headers ${RATE_LIMIT_HEADERS:-both}"

echo
echo "== warm-up (${WARMUP}s per config)"
if ((WARMUP > 0)); then
	for c in "${CONFIGS[@]}"; do
		for n in $CONNS; do run_wrk "$c" "$n" "$WARMUP" /dev/null; done
	done
fi

echo
echo "== rounds"
for ((r = 1; r <= ROUNDS; r++)); do
	for n in $CONNS; do
		for ((i = 0; i < ${#CONFIGS[@]}; i++)); do
			measure "$r" "$n" "${CONFIGS[$(((i + r - 1) % ${#CONFIGS[@]}))]}"
			sleep 1
		done
	done
done

# together <round> <config>: <config> and B loaded at the same time.
together() {
	local r=$1 c=$2 half=$((( ${CONNS%% *} + 1) / 2)) b0 c0 b1 c1 wpid
	b0=$(cpu_ticks "${PID[B]}"); c0=$(cpu_ticks "${PID[$c]}")
	run_wrk B "$half" "$DURATION" "$work/together-B.out" &
	wpid=$!
	run_wrk "$c" "$half" "$DURATION" "$work/together-c.out"
	wait "$wpid"
	b1=$(cpu_ticks "${PID[B]}"); c1=$(cpu_ticks "${PID[$c]}")
	awk -v r="$r" -v c="$c" -v tck="$CLK_TCK" -v gb=$((b1 - b0)) -v gc=$((c1 - c0)) '
		/ requests in / { if (FILENAME ~ /-B.out$/) rb = $1; else rc = $1 }
		END {
			if (rb < 1 || rc < 1) { print "wrk reported no requests" > "/dev/stderr"; exit 1 }
			printf "%d\t%s\t%.2f\t%.2f\t%.4f\n", r, c, gb * 1e6 / tck / rb, gc * 1e6 / tck / rc, rc / rb
		}' "$work/together-B.out" "$work/together-c.out" >>"$work/together.tsv"
	tail -1 "$work/together.tsv" | awk -F'\t' '{ printf "  together %d  %s with B  gw %.1f vs %.1f us/req (%+.1f)  req/s ratio %.3f\n", $1, $2, $4, $3, $4 - $3, $5 }'
}
if ((TOGETHER > 0)); then
	echo
	echo "== together: each config loaded at the same time as B (wrk -c$((( ${CONNS%% *} + 1) / 2)) each)"
	: >"$work/together.tsv"
	for ((r = 1; r <= TOGETHER; r++)); do
		for c in "${CONFIGS[@]}"; do
			[[ "$c" == A || "$c" == B ]] && continue
			together "$r" "$c"
			sleep 1
		done
	done
fi

for c in "${CONFIGS[@]}"; do
	kill -0 "${PID[$c]}" 2>/dev/null || { echo "config $c's Caddy exited during the benchmark" >&2; exit 1; }
done

# ---- summary ----
REDIS_CALLS="$work/redis-D.txt" TOGETHER_ROWS="$( ((TOGETHER > 0)) && echo "$work/together.tsv")" \
	bash bench/summary.sh "$results"
if [[ -n "${BENCH_RESULTS:-}" ]]; then
	cp "$results" "$BENCH_RESULTS"
	echo "raw per-run rows written to $BENCH_RESULTS"
fi
