#!/usr/bin/env bash
# The summary of bench/run.sh's measurements, from its per-run rows
# (BENCH_RESULTS files, one row per run of a configuration: round, conns,
# config, req/s, p50 ms, p99 ms, requests, errors, gateway/upstream/Redis
# CPU us per request, GC cycles per 1k requests, Redis calls and commands
# per request). run.sh prints it at the end of every run; on its own it
# pools the rows of several runs:
#
#   bash bench/summary.sh rows-1.tsv rows-2.tsv ...
#
# A round pairs only the runs of one file (its rounds are renumbered after
# the previous file's), so runs taken one after another are judged
# together without pairing measurements minutes apart. Optional, from
# run.sh: REDIS_CALLS=<file> (D's Redis commands, "<conns> <command>
# <calls>" and "<conns> requests <n>" lines) and TOGETHER_ROWS=<file>
# (the TOGETHER rounds: round, config, B's and the config's gateway us per
# request, req/s ratio).
set -euo pipefail
(($# > 0)) || { echo "usage: bash bench/summary.sh <rows.tsv> [more rows.tsv ...]" >&2; exit 2; }
for f in "$@"; do
	[[ -s "$f" ]] || { echo "$f: no rows" >&2; exit 2; }
done

results="$(mktemp)"
trap 'rm -f "$results"' EXIT
awk -F'\t' -v OFS='\t' 'FNR == 1 { off = last } { $1 += off; if ($1 > last) last = $1; print }' "$@" >"$results"
CONNS="$(awk -F'\t' '!seen[$2]++ { print $2 }' "$results" | tr '\n' ' ')" # in the runs' order
ROUNDS="$(cut -f1 "$results" | sort -u | wc -l)"

QUANTILE_AWK='
function sortq(s, p,   a, k, i, j, v, x) {
	k = split(s, a, " ")
	for (i = 2; i <= k; i++) { v = a[i] + 0; for (j = i - 1; j >= 1 && a[j] + 0 > v; j--) a[j + 1] = a[j]; a[j + 1] = v }
	x = (k - 1) * p + 1; i = int(x)
	return (i >= k) ? a[k] + 0 : a[i] + (x - i) * (a[i + 1] - a[i])
}
'

echo
echo "== results: medians over $ROUNDS rounds$( (($# > 1)) && echo " of $# runs"); ratios are paired (per round, then median)"
echo "   CPU columns are process utime+stime per request served: gw = the Caddy under test,"
echo "   up = the upstream Caddy, rds = redis-server (D, F, H). GC = gateway GC cycles per 1k requests."
echo "   calls = Redis EVAL/EVALSHA calls (script round trips) per request; cmds = all Redis commands per"
echo "   request, counting those a script runs inside Redis as well (D, F, H; INFO commandstats deltas)."
for n in $CONNS; do
	echo
	echo "-- wrk -c$n"
	awk -F'\t' -v n="$n" '
		function median(s,   a, k, m) {
			k = split(s, a, " "); if (k == 0) return "n/a"
			# insertion sort, k is small
			for (i = 2; i <= k; i++) { v = a[i] + 0; for (j = i - 1; j >= 1 && a[j] + 0 > v; j--) a[j + 1] = a[j]; a[j + 1] = v }
			m = (k % 2) ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2
			return m
		}
		function minmax(s,   a, k, lo, hi) {
			k = split(s, a, " "); lo = hi = a[1] + 0
			for (i = 2; i <= k; i++) { if (a[i] + 0 < lo) lo = a[i] + 0; if (a[i] + 0 > hi) hi = a[i] + 0 }
			return sprintf("%.1fk-%.1fk", lo / 1000, hi / 1000)
		}
		$2 == n {
			c = $3; r = $1
			rps[c] = rps[c] " " $4; p50[c] = p50[c] " " $5; p99[c] = p99[c] " " $6
			bad[c] += $8; gw[c] = gw[c] " " $9; up[c] = up[c] " " $10; rd[c] = rd[c] " " $11
			gc[c] = gc[c] " " $12; calls[c] = calls[c] " " $13; cmds[c] = cmds[c] " " $14
			R[r, c, "rps"] = $4; R[r, c, "gw"] = $9; R[r, c, "tot"] = $9 + $10 + $11; rounds[r] = 1
		}
		END {
			printf "%-34s %9s %13s %7s %7s %7s %6s %6s %6s %6s %6s %6s %9s %9s %9s\n",
				"config", "req/s", "[min-max]", "p50 ms", "p99 ms", "gw us", "up us", "rds us", "GC/1k",
				"calls", "cmds", "errors", "rps/B", "gw cpu/B", "all cpu/B"
			name["A"] = "A bare respond"; name["B"] = "B bare reverse_proxy"
			name["C"] = "C api_monetize embedded + proxy"; name["D"] = "D api_monetize Redis + proxy"
			name["E"] = "E foundation embedded + proxy"; name["F"] = "F foundation Redis + proxy"
			name["G"] = "G compared build, embedded"; name["H"] = "H compared build, Redis"
			split("A B C D E F G H", order, " ")
			for (o = 1; o <= 8; o++) {
				c = order[o]
				if (rps[c] == "") continue
				rr = ""; rg = ""; rt = ""
				for (r in rounds) if ((r, c, "rps") in R && (r, "B", "rps") in R) {
					rr = rr " " R[r, c, "rps"] / R[r, "B", "rps"]
					rg = rg " " R[r, c, "gw"] / R[r, "B", "gw"]
					rt = rt " " R[r, c, "tot"] / R[r, "B", "tot"]
				}
				printf "%-34s %9.0f %13s %7.3f %7.3f %7.1f %6.1f %6.1f %6.2f %6s %6s %6d %9.3f %9.3f %9.3f\n",
					name[c], median(rps[c]), minmax(rps[c]), median(p50[c]), median(p99[c]),
					median(gw[c]), median(up[c]), median(rd[c]), median(gc[c]),
					(c == "D" || c == "F" || c == "H" ? sprintf("%.2f", median(calls[c])) : "-"),
					(c == "D" || c == "F" || c == "H" ? sprintf("%.2f", median(cmds[c])) : "-"),
					bad[c], median(rr), median(rg), median(rt)
			}
			# The cost of metering: each store against the foundation, paired per
			# round; and this build against the compared one.
			split("C E D F C G D H", pair, " ")
			for (o = 1; o <= 7; o += 2) {
				c = pair[o]; f = pair[o + 1]
				if (rps[f] == "") continue
				rr = ""; rg = ""
				for (r in rounds) if ((r, c, "rps") in R && (r, f, "rps") in R) {
					rr = rr " " R[r, c, "rps"] / R[r, f, "rps"]
					rg = rg " " R[r, c, "gw"] / R[r, f, "gw"]
				}
				printf "   %s against %s (paired): req/s %.3f, gateway CPU/req %.3f\n", c, f, median(rr), median(rg)
			}
		}' "$results"
	# The spread of the paired comparisons with B: quartiles over the rounds.
	awk -F'\t' -v n="$n" "$QUANTILE_AWK"'
		$2 == n { R[$1, $3, "rps"] = $4; R[$1, $3, "gw"] = $9; rounds[$1] = 1; seen[$3] = 1 }
		END {
			split("C D E F G H", order, " ")
			for (o = 1; o <= 6; o++) {
				c = order[o]; if (!(c in seen)) continue
				rr = ""; dg = ""; k = 0
				for (r in rounds) if ((r, c, "rps") in R && (r, "B", "rps") in R) {
					rr = rr " " R[r, c, "rps"] / R[r, "B", "rps"]; dg = dg " " R[r, c, "gw"] - R[r, "B", "gw"]; k++
				}
				printf "   %s against B, paired over %d rounds (quartiles): req/s %.3f %.3f %.3f; added gateway CPU %+.1f %+.1f %+.1f us/req\n",
					c, k, sortq(rr, 0.25), sortq(rr, 0.5), sortq(rr, 0.75), sortq(dg, 0.25), sortq(dg, 0.5), sortq(dg, 0.75)
			}
		}
	' "$results"
	[[ -n "${REDIS_CALLS:-}" && -f "$REDIS_CALLS" ]] && awk -v n="$n" '$1 == n { if ($2 == "requests") reqs += $3; else calls[$2] += $3 }
		END {
			if (reqs == 0) exit
			printf "   D: Redis commands per request (script-internal ones included):"
			for (c in calls) if (calls[c] / reqs >= 0.0005) printf " %s %.3f", c, calls[c] / reqs
			printf "\n"
		}' "$REDIS_CALLS"
done

if [[ -n "${TOGETHER_ROWS:-}" && -s "$TOGETHER_ROWS" ]]; then
	echo
	echo "-- together with B, $(cut -f1 "$TOGETHER_ROWS" | sort -u | wc -l) rounds (quartiles 25 % / median / 75 %)"
	awk -F'\t' "$QUANTILE_AWK"'
		{ d[$2] = d[$2] " " ($4 - $3); q[$2] = q[$2] " " $5; b[$2] = b[$2] " " $3 }
		END {
			split("C D E F G H", order, " ")
			for (o = 1; o <= 6; o++) {
				c = order[o]; if (!(c in d)) continue
				printf "   %s: added gateway CPU %+.1f / %+.1f / %+.1f us/req (B itself %.1f us/req); req/s ratio to B %.3f / %.3f / %.3f\n",
					c, sortq(d[c], 0.25), sortq(d[c], 0.5), sortq(d[c], 0.75), sortq(b[c], 0.5), sortq(q[c], 0.25), sortq(q[c], 0.5), sortq(q[c], 0.75)
			}
		}' "$TOGETHER_ROWS"
fi


if awk -F'\t' '$8 > 0 { bad = 1 } END { exit !bad }' "$results"; then
	echo
	echo "WARNING: some runs had socket errors or non-2xx responses (errors column); those numbers are not comparable." >&2
fi
