#!/usr/bin/env bash
# Scale benchmark of the api_monetize handler on a Redis Cluster, on loopback:
#
#   bash bench/cluster.sh                     # 10 rounds x 2 s at 32 connections
#   ROUNDS=6 CUSTOMERS=24 bash bench/cluster.sh
#   CADDY=/path/to/caddy bash bench/cluster.sh  # skip the build
#   MEMORY=0 bash bench/cluster.sh            # skip the customer-month memory benchmark
#
# Knobs: ROUNDS (10), DURATION (s per run, 2), WARMUP (s, 2), CONNS (32),
# CUSTOMERS (12, each with its own key, spread over the masters by their
# hash slots), MASTERS (3), BASE_PORT (18280; uses BASE_PORT+1..+60 and the
# masters' cluster bus ports, +10000). About 3 minutes plus the build and
# the memory benchmark (about 10 s).
#
# It starts a private Redis Cluster of MASTERS masters (no replicas, no
# persistence), an upstream (Caddy respond), a single Redis, and three
# Caddy processes in front of the upstream, measured one after another
# with the same wrk load (the order rotated every round, as bench/run.sh
# does):
#   B  bare Caddy: reverse_proxy to the upstream (the gateway baseline)
#   K  api_monetize on redis_cluster + reverse_proxy, with bench/run.sh's
#      tier (rate limit, monthly quota, overage billing: every request is
#      authenticated, rate-limited, reserved and metered); wrk sends the
#      CUSTOMERS keys in turn (X-API-Key), so every master serves some.
#   S  the same on a single Redis (redis), for comparison in the same rounds.
# Per run: wrk's req/s, the gateway's utime+stime per request
# (/proc/<pid>/stat) and, for K, every master's INFO commandstats. It prints
# the medians, the paired ratios to B (per round, then the median, with
# quartiles), the commands and script calls per request on each master,
# and used_memory per master and per customer after the load; Redis CPU per
# request is net of the processes' idle CPU (measured for 5 s before). With MEMORY=1
# (default) it then runs BenchmarkClusterMemory (store/redisstore): the
# Redis memory of a customer with usage in every hour of a month.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

ROUNDS="${ROUNDS:-10}"
DURATION="${DURATION:-2}"
WARMUP="${WARMUP:-2}"
CONNS="${CONNS:-32}"
CUSTOMERS="${CUSTOMERS:-12}"
MASTERS="${MASTERS:-3}"
MEMORY="${MEMORY:-1}"
BASE_PORT="${BASE_PORT:-18280}"
for v in ROUNDS DURATION WARMUP CONNS CUSTOMERS MASTERS MEMORY BASE_PORT; do
	[[ "${!v}" =~ ^[0-9]+$ ]] || { echo "$v must be a whole number" >&2; exit 2; }
done
((ROUNDS >= 1 && ROUNDS <= 50 && DURATION >= 1 && DURATION <= 60 && CONNS >= 1 && CONNS <= 1000 &&
	CUSTOMERS >= 1 && CUSTOMERS <= 200 && MASTERS >= 3 && MASTERS <= 10)) ||
	{ echo "ROUNDS 1..50, DURATION 1..60, CONNS 1..1000, CUSTOMERS 1..200, MASTERS 3..10" >&2; exit 2; }

declare -A PORT=([B]=$((BASE_PORT + 2)) [K]=$((BASE_PORT + 3)) [S]=$((BASE_PORT + 4)) [U]=$((BASE_PORT + 10)))
declare -A ADMIN=([B]=$((BASE_PORT + 22)) [K]=$((BASE_PORT + 23)) [S]=$((BASE_PORT + 24)) [U]=$((BASE_PORT + 30)))
SPORT=$((BASE_PORT + 40))
RPORTS=()
for ((i = 1; i <= MASTERS; i++)); do RPORTS+=($((BASE_PORT + 40 + i))); done

work="$(mktemp -d)"
pids=()
cleanup() {
	local pid
	for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
	for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
	rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

. bench/need.sh
need wrk wrk
need redis-server redis-server
need redis-cli redis-tools
need curl curl

port_free() {
	if { exec 3<>"/dev/tcp/127.0.0.1/$1"; } 2>/dev/null; then
		exec 3>&-
		return 1
	fi
}
for p in "${PORT[@]}" "${ADMIN[@]}" "${RPORTS[@]}" "$SPORT"; do
	port_free "$p" && port_free $((p + 10000)) || { echo "port $p (or $((p + 10000))) on 127.0.0.1 is in use; set BASE_PORT" >&2; exit 1; }
done

# ---- build ----
if [[ -n "${CADDY:-}" ]]; then
	caddy="$CADDY"
else
	echo "building Caddy from xcaddy.json ..."
	go -C build run . -o "$work/caddy" >"$work/build.log" 2>&1 || { tail -30 "$work/build.log" >&2; exit 1; }
	caddy="$work/caddy"
fi

# ---- the cluster ----
declare -A RPID
for p in "${RPORTS[@]}"; do
	mkdir -p "$work/r$p"
	redis-server --port "$p" --bind 127.0.0.1 --cluster-enabled yes --cluster-config-file nodes.conf \
		--cluster-node-timeout 2000 --save "" --appendonly no --dir "$work/r$p" --logfile "$work/r$p/log" &
	RPID[$p]=$!
	pids+=("${RPID[$p]}")
done
redis-server --port "$SPORT" --bind 127.0.0.1 --save "" --appendonly no --logfile "$work/single.log" &
SPID=$!
pids+=("$SPID")
rcli() { redis-cli -h 127.0.0.1 -p "$@"; }
for p in "${RPORTS[@]}"; do
	for _ in $(seq 50); do rcli "$p" ping >/dev/null 2>&1 && break; sleep 0.1; done
done
addrs=()
for p in "${RPORTS[@]}"; do addrs+=("127.0.0.1:$p"); done
redis-cli --cluster create "${addrs[@]}" --cluster-replicas 0 --cluster-yes >"$work/create.log" 2>&1 ||
	{ cat "$work/create.log" >&2; exit 1; }
for p in "${RPORTS[@]}"; do
	for _ in $(seq 100); do rcli "$p" cluster info | grep -q cluster_state:ok && break; sleep 0.1; done
done
url="redis://127.0.0.1:${RPORTS[0]}"
sep="?"
for p in "${RPORTS[@]:1}"; do url+="${sep}addr=127.0.0.1:$p"; sep="&"; done

# ---- configuration (keys reach Caddy and wrk through the environment) ----
export XDG_DATA_HOME="$work/data" XDG_CONFIG_HOME="$work/config"
BENCH_KEY_SECRET="$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export BENCH_KEY_SECRET
keys=()
for ((i = 1; i <= CUSTOMERS; i++)); do
	k="bench$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
	export "BENCH_API_KEY_$i=$k"
	keys+=("$k")
done
BENCH_KEYS="$(IFS=,; echo "${keys[*]}")"
export BENCH_KEYS
cat >"$work/keys.lua" <<'EOF'
local keys, i = {}, 0
for k in string.gmatch(os.getenv("BENCH_KEYS"), "[^,]+") do keys[#keys + 1] = k end
request = function()
	i = i % #keys + 1
	return wrk.format(nil, nil, { ["X-API-Key"] = keys[i] })
end
EOF
global() { # global <admin port> [store line]
	printf '{\n\tadmin localhost:%s\n\tauto_https off\n\tpersist_config off\n' "$1"
	if (($# > 1)); then
		printf '\tapi_monetize {\n\t\t%s\n\t\tkey_secret {env.BENCH_KEY_SECRET}\n' "$2"
		printf '\t\ttier pro {\n\t\t\trate 100000000/min\n\t\t\tincluded 1000000000/month\n\t\t\tover_quota bill 0.002\n\t\t\tendpoints /v1/*\n\t\t}\n'
		for ((i = 1; i <= CUSTOMERS; i++)); do
			printf '\t\tcustomer c%d tier pro\n\t\tkey {env.BENCH_API_KEY_%d} c%d\n' "$i" "$i" "$i"
		done
		printf '\t}\n'
	fi
	printf '}\n'
}
site() { printf ':%s {\n\tbind 127.0.0.1\n\t%s\n}\n' "$1" "$2"; }
upstream="reverse_proxy 127.0.0.1:${PORT[U]}"
{ global "${ADMIN[U]}"; site "${PORT[U]}" 'respond "ok"'; } >"$work/U.Caddyfile"
{ global "${ADMIN[B]}"; site "${PORT[B]}" "$upstream"; } >"$work/B.Caddyfile"
{ global "${ADMIN[K]}" "redis_cluster $url"; site "${PORT[K]}" "api_monetize
	$upstream"; } >"$work/K.Caddyfile"
{ global "${ADMIN[S]}" "redis redis://127.0.0.1:$SPORT/0"; site "${PORT[S]}" "api_monetize
	$upstream"; } >"$work/S.Caddyfile"

declare -A PID
for c in U B K S; do
	mkdir -p "$work/data-$c"
	XDG_DATA_HOME="$work/data-$c" "$caddy" run --config "$work/$c.Caddyfile" --adapter caddyfile >"$work/$c.log" 2>&1 &
	PID[$c]=$!
	pids+=("${PID[$c]}")
done
for c in U B K S; do
	code=000
	for _ in $(seq 100); do
		code="$(curl -s -o /dev/null -w '%{http_code}' -H "X-API-Key: ${keys[0]}" "http://127.0.0.1:${PORT[$c]}/v1/bench" || true)"
		[[ "$code" == 200 ]] && break
		sleep 0.1
	done
	[[ "$code" == 200 ]] || { echo "config $c does not answer 200 (got $code); its log:" >&2; tail -20 "$work/$c.log" >&2; exit 1; }
done

CLK_TCK="$(getconf CLK_TCK)"
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
cmdstats() { # "<port> <command> <calls>" for every master
	local p
	for p in "${RPORTS[@]}"; do
		rcli "$p" info commandstats | tr -d '\r' |
			awk -F'[:=,]' -v p="$p" '/^cmdstat_/ { sub(/^cmdstat_/, "", $1); print p, $1, $3 }'
	done
}
redis_ticks() { local p s=0; for p in "${RPORTS[@]}"; do s=$((s + $(cpu_ticks "${RPID[$p]}"))); done; echo "$s"; }
run_wrk() { # run_wrk <config> <seconds> <out>
	timeout $(($2 + 15)) wrk -t1 -c"$CONNS" -d"$2s" -s "$work/keys.lua" "http://127.0.0.1:${PORT[$1]}/v1/bench" >"$3"
}

echo
echo "== environment"
echo "  $("$caddy" version)  api_monetize checkout: $(git describe --always --dirty 2>/dev/null || echo unknown)"
echo "  $(redis-server --version | cut -d' ' -f1-3), $MASTERS masters, no replicas; CPU: $(nproc) x $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)"
echo "  wrk -t1 -c$CONNS -d${DURATION}s, $ROUNDS rounds, B, K and S in an order rotated per round; $CUSTOMERS customers (a key each)"
# The Redis processes' own CPU while idle (cluster bus, cron): subtracted
# from the per-request figures in the summary.
r0=$(redis_ticks); s0=$(cpu_ticks "$SPID"); sleep 5; r1=$(redis_ticks); s1=$(cpu_ticks "$SPID")
IDLE_K=$(awk -v t=$((r1 - r0)) -v tck="$CLK_TCK" 'BEGIN { printf "%.0f", t * 1e6 / tck / 5 }')
IDLE_S=$(awk -v t=$((s1 - s0)) -v tck="$CLK_TCK" 'BEGIN { printf "%.0f", t * 1e6 / tck / 5 }')
echo "  idle Redis CPU: masters together $IDLE_K us/s, the single Redis $IDLE_S us/s"

echo
echo "== warm-up (${WARMUP}s per config)"
for c in B K S; do run_wrk "$c" "$WARMUP" /dev/null; done

results="$work/results.tsv" # round config rps requests gw_us redis_us
: >"$results"
: >"$work/cmds.txt" # port command calls (K's runs, summed)
echo
echo "== rounds"
for ((r = 1; r <= ROUNDS; r++)); do
	all=(B K S)
	for ((i = 0; i < 3; i++)); do
		c=${all[$(((i + r - 1) % 3))]}
		g0=$(cpu_ticks "${PID[$c]}"); r0=$(redis_ticks); s0=$(cpu_ticks "$SPID"); cmdstats >"$work/before"
		run_wrk "$c" "$DURATION" "$work/wrk.out"
		g1=$(cpu_ticks "${PID[$c]}"); r1=$(redis_ticks); s1=$(cpu_ticks "$SPID"); cmdstats >"$work/after"
		reqs=$(awk '/ requests in / { print $1 }' "$work/wrk.out")
		rps=$(awk '/Requests\/sec:/ { print $2 }' "$work/wrk.out")
		bad=$(awk '/Non-2xx or 3xx responses:/ { b += $NF } END { print b + 0 }' "$work/wrk.out")
		if [[ "$c" == K ]]; then
			# The INFO calls that took the snapshots are not the benchmark's.
			awk 'NR == FNR { b[$1 " " $2] = $3; next } { d = $3 - b[$1 " " $2] - ($2 == "info"); if (d > 0) print $1, $2, d }' \
				"$work/before" "$work/after" >>"$work/cmds.txt"
			echo "requests $reqs" >>"$work/cmds.txt"
		fi
		[[ "$c" == S ]] && rd=$((s1 - s0)) || rd=$((r1 - r0))
		[[ "$c" == B ]] && rd=0
		awk -v r="$r" -v c="$c" -v rps="$rps" -v n="$reqs" -v g=$((g1 - g0)) -v rd="$rd" -v tck="$CLK_TCK" \
			'BEGIN { us = 1e6 / tck / n; printf "%d\t%s\t%.0f\t%d\t%.2f\t%.2f\n", r, c, rps, n, g * us, rd * us }' >>"$results"
		tail -1 "$results" | awk -F'\t' -v bad="$bad" '{ printf "  round %d  %s  %8.0f req/s  gw %.1f us/req%s%s\n", $1, $2, $3, $5, ($2 != "B" ? sprintf("  redis %.1f us/req", $6) : ""), (bad > 0 ? "  NON-2XX: " bad : "") }'
		sleep 1
	done
done
kill -0 "${PID[K]}" && kill -0 "${PID[S]}" || { echo "a plugin's Caddy exited" >&2; exit 1; }

echo
echo "== summary (medians over $ROUNDS rounds; ratios paired per round, quartiles 25% / median / 75%)"
awk -F'\t' -v ik="$IDLE_K" -v is="$IDLE_S" -v d="$DURATION" '
function q(s, p,   a, k, i, j, v, x) {
	k = split(s, a, " ")
	for (i = 2; i <= k; i++) { v = a[i] + 0; for (j = i - 1; j >= 1 && a[j] + 0 > v; j--) a[j + 1] = a[j]; a[j + 1] = v }
	x = (k - 1) * p + 1; i = int(x)
	return (i >= k) ? a[k] + 0 : a[i] + (x - i) * (a[i + 1] - a[i])
}
{ rps[$1, $2] = $3; gw[$1, $2] = $5; rd[$1, $2] = $6 - ($2 == "K" ? ik : is) * d / $4; if ($1 > R) R = $1 }
END {
	for (r = 1; r <= R; r++) {
		B = B " " rps[r, "B"]; GB = GB " " gw[r, "B"]
		for (ci = 1; ci <= 2; ci++) {
			c = ci == 1 ? "K" : "S"
			X[c] = X[c] " " rps[r, c]; G[c] = G[c] " " gw[r, c]; RD[c] = RD[c] " " rd[r, c]
			ratio[c] = ratio[c] " " rps[r, c] / rps[r, "B"]; added[c] = added[c] " " gw[r, c] - gw[r, "B"]
		}
	}
	printf "  B  bare reverse_proxy        %8.0f req/s   gateway %.1f us/req\n", q(B, .5), q(GB, .5)
	printf "  K  api_monetize, cluster     %8.0f req/s   gateway %.1f us/req   Redis (all masters, net of idle) %.1f us/req\n", q(X["K"], .5), q(G["K"], .5), q(RD["K"], .5)
	printf "  S  api_monetize, one Redis   %8.0f req/s   gateway %.1f us/req   Redis (net of idle) %.1f us/req\n", q(X["S"], .5), q(G["S"], .5), q(RD["S"], .5)
	for (ci = 1; ci <= 2; ci++) {
		c = ci == 1 ? "K" : "S"
		printf "  %s / B throughput             %.3f / %.3f / %.3f\n", c, q(ratio[c], .25), q(ratio[c], .5), q(ratio[c], .75)
		printf "  %s - B gateway CPU, us/req    %+.1f / %+.1f / %+.1f\n", c, q(added[c], .25), q(added[c], .5), q(added[c], .75)
	}
}' "$results"

echo
echo "== Redis commands per request, per master (K's runs; INFO commandstats)"
awk '
$1 == "requests" { n += $2; next }
{ by[$1] += $3; cmd[$1 " " $2] += $3; if ($2 ~ /^eval/) sc[$1] += $3; ports[$1] = 1; names[$2] = 1 }
END {
	for (p in ports) { tot += by[p]; stot += sc[p] }
	for (p in ports) {
		line = ""
		for (c in names) if (cmd[p " " c] / n >= 0.0005) line = line sprintf(" %s %.3f", c, cmd[p " " c] / n)
		printf "  master :%s  %.3f commands/req (%.0f%% of all), scripts %.3f/req:%s\n", p, by[p] / n, 100 * by[p] / tot, sc[p] / n, line
	}
	printf "  all masters: %.3f commands and %.3f script calls per request (%d requests)\n", tot / n, stot / n, n
}' "$work/cmds.txt" | sort

echo
echo "== Redis memory after the load"
total=0
for p in "${RPORTS[@]}"; do
	m=$(rcli "$p" info memory | tr -d '\r' | awk -F: '$1 == "used_memory" { print $2 }')
	k=$(rcli "$p" dbsize)
	c=$(rcli "$p" --scan --pattern 'am:{c*}:u:*' | wc -l)
	total=$((total + m))
	echo "  master :$p  used_memory $m bytes, $k keys, $c of the customers' period hashes"
done
echo "  $CUSTOMERS customers active in one hour: used_memory summed $total bytes (includes each master's baseline)"

if ((MEMORY)); then
	echo
	echo "== customer-month memory: go test -run '^\$' -bench ClusterMemory -benchtime 200x ./store/redisstore"
	go test -run '^$' -bench ClusterMemory -benchtime 200x ./store/redisstore 2>&1 | grep -E '^Benchmark|^ok|FAIL' || true
fi
