#!/usr/bin/env bash
# What one metering script call costs Redis, in CPU instructions: exact and
# repeatable where timings on a shared machine are not.
#
#   bash bench/script-cost.sh                 # this checkout
#   COMPARE=HEAD~1 bash bench/script-cost.sh  # and that git revision, for a before/after
#
# It runs redis-server under valgrind (callgrind, which counts every
# instruction the server executes), makes N and then N+CALLS sequential
# reservations with store/redisstore's BenchmarkReserve (one EVALSHA each:
# a tier rate, a bill quota with thresholds, a replay window), each time on
# a fresh server, and prints the difference divided by CALLS: the
# instructions per reservation, network handling included. Redis's own
# INFO commandstats figure (usec_per_call) is printed beside it; it is
# timed, so it moves with the machine, and valgrind slows the server about
# 50-fold.
#
# Knobs: CALLS (2000), PORT (18240), METERS (0: the number of meters
# besides the default one each reservation carries, 0 to 2, each counted;
# a revision from before meters existed measures 0 whatever it says). Needs valgrind, redis-server and
# redis-cli (installed with apt-get when missing and running as root) and
# go. Everything listens on 127.0.0.1 only; the server is stopped at exit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CALLS="${CALLS:-2000}"
export REDISSTORE_BENCH_METERS="${METERS:-0}"
PORT="${PORT:-18240}"
COMPARE="${COMPARE:-}"
[[ "$CALLS" =~ ^[0-9]+$ && "$PORT" =~ ^[0-9]+$ ]] && ((CALLS >= 100)) ||
	{ echo "CALLS must be a number of at least 100, PORT a number" >&2; exit 2; }

. bench/need.sh
need valgrind valgrind
need redis-server redis-server
need redis-cli redis-tools

work="$(mktemp -d)"
server=""
cleanup() {
	[[ -n "$server" ]] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
	[[ -d "$work/compare" ]] && git worktree remove --force "$work/compare" 2>/dev/null
	rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

rcli() { redis-cli -h 127.0.0.1 -p "$PORT" "$@"; }

# run <test binary> <reservations>: the server's instruction total, and its
# usec_per_call for EVALSHA.
run() {
	rm -f "$work/callgrind.out"
	valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.out" -q \
		redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no >"$work/redis.log" 2>&1 &
	server=$!
	for _ in $(seq 150); do rcli ping >/dev/null 2>&1 && break; sleep 0.2; done
	rcli ping >/dev/null || { echo "redis-server did not start under valgrind" >&2; cat "$work/redis.log" >&2; exit 1; }
	REDISSTORE_TEST_URL="redis://127.0.0.1:$PORT/0" "$1" -test.run '^$' -test.bench '^BenchmarkReserve$' \
		-test.benchtime "${2}x" >"$work/bench.log" 2>&1 || { cat "$work/bench.log" >&2; exit 1; }
	local usec
	usec="$(rcli info commandstats | tr -d '\r' | sed -n 's/^cmdstat_evalsha:.*usec_per_call=\([0-9.]*\).*/\1/p')"
	rcli shutdown nosave >/dev/null 2>&1 || true
	wait "$server" 2>/dev/null || true
	server=""
	echo "$(awk '/^(summary|totals):/ {print $2; exit}' "$work/callgrind.out") $usec"
}

# measure <label> <module directory>
measure() {
	(cd "$2" && go test -c -o "$work/redisstore.test" ./store/redisstore) ||
		{ echo "cannot build $2's store/redisstore tests" >&2; exit 1; }
	local base more
	read -r base _ < <(run "$work/redisstore.test" 100)
	read -r more usec < <(run "$work/redisstore.test" $((100 + CALLS)))
	printf '%-28s %8d instructions per reservation   (EVALSHA %s us per call under valgrind)\n' \
		"$1" $(((more - base) / CALLS)) "$usec"
}

measure "checkout $(git rev-parse --short HEAD)$(git diff --quiet || echo '+changes')" .
if [[ -n "$COMPARE" ]]; then
	git worktree add --detach --quiet "$work/compare" "$COMPARE"
	measure "$COMPARE ($(git rev-parse --short "$COMPARE"))" "$work/compare"
fi
