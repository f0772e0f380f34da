#!/usr/bin/env bash
# bench/transparent.sh - transparent capture (TAP + user-space stack) vs the explicit proxy.
#
# Creates a throwaway network namespace whose only device is the sandbox's TAP eth0
# (10.0.2.15/24, via airlock-backend's setup code), served by airlock-netstack in the
# `transparent_bench` example, which hands flows to Egress::serve_transparent and also
# runs the same engine as an explicit proxy on 127.0.0.1 plus an in-memory HTTP upstream
# on 127.0.0.1 (policy: allow-host localhost:UPSTREAM). Measures, same run:
#   (a) throughput of a BIG_MB download, median of RUNS:
#         transparent: inside the netns, curl http://10.0.2.2:UP/N  (gateway = host loopback)
#         explicit:    on the host,     curl -x 127.0.0.1:PROXY http://localhost:UP/N
#         direct:      on the host,     curl http://127.0.0.1:UP/N  (floor reference)
#   (b) time per new connection: CONNS sequential 1-byte GETs, each on a new connection,
#       one curl process for all of them; added latency = transparent - explicit.
# Target (issue 4): transparent throughput >= 50% of explicit.
# No packet leaves the machine: the upstream is local and the netns has no other route.
# Usage: sudo bash bench/transparent.sh     Knobs (env): BIG_MB=512 RUNS=3 CONNS=200
set -uo pipefail

ROOT=$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)
BIG_MB=${BIG_MB:-512}
RUNS=${RUNS:-3}
CONNS=${CONNS:-200}
NS=airlock-tbench-$$
OUT=$(mktemp -d /tmp/airlock-tbench.XXXXXX)
PID=

cleanup() {
    [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
    ip netns del "$NS" 2>/dev/null
    rm -rf "$OUT"
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || { echo "needs root (creates a network namespace)" >&2; exit 1; }
command -v curl >/dev/null || { echo "needs curl" >&2; exit 1; }

echo "building (release) ..." >&2
(cd "$ROOT" && cargo build -q --release -p airlock-netstack --example transparent_bench) || exit 1
BIN=$ROOT/target/release/examples/transparent_bench

ip netns add "$NS" || exit 1
"$BIN" "$NS" >"$OUT/ready" 2>"$OUT/log" &
PID=$!
for _ in $(seq 1 100); do grep -q READY "$OUT/ready" 2>/dev/null && break; sleep 0.1; done
read -r _ PROXY UP <"$OUT/ready" || { echo "harness did not start:"; cat "$OUT/log"; exit 1; }

N=$((BIG_MB * 1024 * 1024))
inns() { ip netns exec "$NS" "$@"; }

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

speed() { # label cmd... -> prints median MB/s
    local label=$1; shift
    for _ in $(seq 1 "$RUNS"); do
        "$@" -s -o /dev/null -w '%{speed_download}\n' --max-time 120
    done | median | awk -v l="$label" '{printf "%.1f\n", $1/1e6}'
}

per_conn() { # cmd... (curl prefix) url -> ms per new connection
    local urls=() i
    for i in $(seq 1 "$CONNS"); do urls+=(-o /dev/null "$@"); done
    local t0 t1
    t0=$(date +%s%N)
    "${CURL[@]}" -s -H 'Connection: close' "${urls[@]}" || echo "curl failed" >&2
    t1=$(date +%s%N)
    awk -v a="$t0" -v b="$t1" -v n="$CONNS" 'BEGIN {printf "%.3f\n", (b-a)/1e6/n}'
}

echo "warming up ..." >&2
inns curl -s -o /dev/null --max-time 10 "http://10.0.2.2:$UP/1" || { echo "transparent path broken:"; cat "$OUT/log"; exit 1; }
curl -s -o /dev/null --max-time 10 -x "http://127.0.0.1:$PROXY" "http://localhost:$UP/1" || { echo "explicit path broken"; exit 1; }

echo "throughput: ${BIG_MB} MiB x $RUNS ..." >&2
T_DIRECT=$(speed direct curl "http://127.0.0.1:$UP/$N")
T_EXPL=$(speed explicit curl -x "http://127.0.0.1:$PROXY" "http://localhost:$UP/$N")
T_TRANS=$(speed transparent inns curl "http://10.0.2.2:$UP/$N")

echo "new connections: $CONNS each ..." >&2
CURL=(curl); L_DIRECT=$(per_conn "http://127.0.0.1:$UP/1")
CURL=(curl -x "http://127.0.0.1:$PROXY"); L_EXPL=$(per_conn "http://localhost:$UP/1")
CURL=(ip netns exec "$NS" curl); L_TRANS=$(per_conn "http://10.0.2.2:$UP/1")

printf '\n%-12s %14s %18s\n' path "MB/s (median)" "ms per new conn"
printf '%-12s %14s %18s\n' direct "$T_DIRECT" "$L_DIRECT"
printf '%-12s %14s %18s\n' explicit "$T_EXPL" "$L_EXPL"
printf '%-12s %14s %18s\n' transparent "$T_TRANS" "$L_TRANS"
awk -v t="$T_TRANS" -v e="$T_EXPL" -v lt="$L_TRANS" -v le="$L_EXPL" 'BEGIN {
    r = t / e * 100
    printf "\ntransparent/explicit throughput: %.0f%% (target >= 50%%: %s)\n", r, (r >= 50 ? "PASS" : "FAIL")
    printf "added latency per new connection (transparent - explicit): %.3f ms\n", lt - le
}'
grep -v '^$' "$OUT/log" | head -5 >&2 || true
