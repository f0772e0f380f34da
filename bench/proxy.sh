#!/usr/bin/env bash
# bench/proxy.sh - airlock egress proxy vs squid, side by side, in one run.
#
# Starts on 127.0.0.1 only: nginx (1 KiB and 100 MiB files), squid (allow all), and the
# airlock egress example proxy (release build, policy allow-cidr 127.0.0.1/32). Measures:
#   (a) plain HTTP 1 KiB GET through each proxy, keep-alive, c=1 and c=32
#       (oha if installed, else wrk with an absolute-form request script), DUR s each;
#   (b) 100 MiB download through a CONNECT tunnel (curl -p), median of BIG_RUNS, vs direct;
#   (c) idle RSS (process tree) of our proxy and squid, 1 s after start.
# Prints a table and the ratios against the targets.
#
# Bounded: every load run is time-limited; every process started here is stopped by PID
# on exit (trap). Scratch dir: $BENCH_DIR (default /tmp/airlock-proxybench).
# Usage: bash bench/proxy.sh        Knobs (env): DUR=10 BIG_RUNS=5
set -uo pipefail

ROOT=$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)
W=${BENCH_DIR:-/tmp/airlock-proxybench}
H=127.0.0.1
P_HTTP=28080 P_SQUID=23128 P_OURS=23129
DUR=${DUR:-10}
BIG_RUNS=${BIG_RUNS:-5}
URL_1K=http://$H:$P_HTTP/1k.bin
URL_BIG=http://$H:$P_HTTP/100m.bin

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }

declare -A STARTED=()
LASTPID=
start_bg() { # name cmd...
  local name=$1; shift
  "$@" >"$W/$name.out" 2>&1 &
  LASTPID=$!
  STARTED[$LASTPID]=$name
}
descendants() { local k; for k in $(ps -o pid= --ppid "$1" 2>/dev/null); do echo "$k"; descendants "$k"; done; }
stop_pid() { # TERM our process (and the children it spawned), KILL after 5 s
  local pid=$1 kids i k
  kill -0 "$pid" 2>/dev/null || { unset "STARTED[$pid]"; return 0; }
  kids=$(descendants "$pid")
  kill -TERM "$pid" 2>/dev/null
  for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  for k in $kids; do kill -0 "$k" 2>/dev/null && kill -KILL "$k" 2>/dev/null; done
  unset "STARTED[$pid]"
}
cleanup() { local p; for p in "${!STARTED[@]}"; do stop_pid "$p"; done; }
wait_port() { local i; for i in $(seq 150); do (exec 3<>"/dev/tcp/$H/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }
rss_tree_mib() { # pid -> RSS of pid + descendants, MiB
  local pids; pids="$1 $(descendants "$1" | tr '\n' ' ')"
  ps -o rss= -p "$(echo $pids | tr ' ' ',')" 2>/dev/null | awk '{s+=$1} END {printf "%.1f", s/1024}'
}

# ---------------------------------------------------------------- load tools
LOAD=wrk
command -v oha >/dev/null && LOAD=oha
http_load() { # label proxyport conc -> prints "req/s p50ms p99ms errors"
  local label=$1 port=$2 c=$3 out
  if [ "$LOAD" = oha ]; then
    out="$W/$label.json"
    timeout $((DUR + 30)) oha --no-tui -z "${DUR}s" -c "$c" -x "http://$H:$port" --output-format json -o "$out" "$URL_1K" \
      >"$W/$label.log" 2>&1
    python3 - "$out" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
s = d["summary"]; p = d.get("latencyPercentiles", {})
codes = d.get("statusCodeDistribution", {})
bad = sum(v for k, v in codes.items() if k != "200") + sum(d.get("errorDistribution", {}).values())
print(f'{s["requestsPerSec"]:.0f} {p.get("p50", 0)*1000:.2f} {p.get("p99", 0)*1000:.2f} {bad}')
PY
  else
    local t=$(( c < 2 ? 1 : 2 ))
    timeout $((DUR + 30)) wrk -t"$t" -c"$c" -d"${DUR}s" --latency -s "$W/abs.lua" "http://$H:$port" >"$W/$label.log" 2>&1
    awk '
      /Requests\/sec/ {rps=$2}
      /^ +50%/ {p50=$2} /^ +99%/ {p99=$2}
      /Non-2xx/ {bad+=$NF} /Socket errors/ {bad+=1}
      function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
      END {printf "%.0f %.2f %.2f %d\n", rps, ms(p50), ms(p99), bad}' "$W/$label.log"
  fi
}
big_load() { # label [curl proxy args...] -> prints median MB/s, "min-max"
  local label=$1 i out; shift
  : >"$W/$label.txt"
  for i in $(seq "$BIG_RUNS"); do
    out=$(curl -sS -o /dev/null --max-time 60 "$@" -w '%{http_code} %{size_download} %{speed_download}' "$URL_BIG" 2>&1)
    echo "$out" >>"$W/$label.txt"
  done
  awk '$1==200 && $2==104857600 {print $3/1e6} $1!=200 || $2!=104857600 {bad++}
       END {if (bad) print "ERR " bad > "/dev/stderr"}' "$W/$label.txt" | sort -n |
    awk '{v[NR]=$1} END {if (NR==0) {print "0 -"; exit} printf "%.0f %.0f-%.0f\n", v[int((NR+1)/2)], v[1], v[NR]}'
}

# ---------------------------------------------------------------- main
main() {
  for p in $P_HTTP $P_SQUID $P_OURS; do
    (exec 3<>"/dev/tcp/$H/$p") 2>/dev/null && { echo "port $p busy; stop whatever holds it" >&2; exit 1; }
  done
  for t in nginx squid curl "$LOAD"; do command -v "$t" >/dev/null || { echo "missing $t (apt-get install -y nginx-light squid wrk curl)" >&2; exit 1; }; done
  rm -rf "$W"; mkdir -p "$W/www" "$W/nginx" "$W/squid"
  trap cleanup EXIT
  trap 'exit 130' INT TERM

  log "building the egress example proxy (release)"
  (cd "$ROOT" && cargo build --release -q -p airlock-egress --example proxy) || { echo "build failed" >&2; exit 1; }
  local ours_bin
  ours_bin=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/examples/proxy
  [ -x "$ours_bin" ] || { echo "no binary at $ours_bin" >&2; exit 1; }

  head -c 1024 /dev/urandom >"$W/www/1k.bin"
  head -c 104857600 /dev/urandom >"$W/www/100m.bin"
  chmod 755 "$W" "$W/www"; chmod 644 "$W/www/"*
  printf 'wrk.method = "GET"\nwrk.path = "%s"\nwrk.headers["Host"] = "%s:%s"\n' "$URL_1K" "$H" "$P_HTTP" >"$W/abs.lua"
  cat >"$W/nginx/nginx.conf" <<EOF
worker_processes auto;
pid $W/nginx/nginx.pid;
error_log $W/nginx/error.log warn;
daemon off;
events { worker_connections 4096; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_timeout 65;
  keepalive_requests 1000000;
  default_type application/octet-stream;
  add_header Cache-Control "no-store" always;
  server { listen $H:$P_HTTP; root $W/www; }
}
EOF
  # squid as in shared/bench/peers.sh: defaults except listen, allow all, paths.
  cat >"$W/squid/squid.conf" <<EOF
http_port $H:$P_SQUID
http_access allow all
access_log daemon:$W/squid/access.log squid
cache_log $W/squid/cache.log
pid_filename $W/squid/squid.pid
coredump_dir $W/squid
shutdown_lifetime 1 seconds
EOF
  chown -R proxy:proxy "$W/squid" 2>/dev/null

  start_bg nginx nginx -c "$W/nginx/nginx.conf" -p "$W/nginx/"
  wait_port $P_HTTP || { cat "$W/nginx.out"; exit 1; }
  start_bg squid squid -N -f "$W/squid/squid.conf"; local squid=$LASTPID
  start_bg ours "$ours_bin" --listen "$H:$P_OURS" --allow-cidr "$H/32"; local ours=$LASTPID
  wait_port $P_SQUID || { echo "squid did not listen: $(tail -3 "$W/squid/cache.log")" >&2; exit 1; }
  wait_port $P_OURS || { echo "our proxy did not listen: $(cat "$W/ours.out")" >&2; exit 1; }
  sleep 1
  local rss_squid rss_ours
  rss_squid=$(rss_tree_mib "$squid"); rss_ours=$(rss_tree_mib "$ours")
  for px in $P_SQUID $P_OURS; do
    curl -sf -o /dev/null -x "http://$H:$px" "$URL_1K" || { echo "smoke test through :$px failed" >&2; exit 1; }
  done
  log "load tool: $LOAD; ${DUR}s per HTTP run; load average $(cut -d' ' -f1-3 /proc/loadavg)"

  declare -A R
  local who c
  for c in 1 32; do
    for who in squid ours; do
      local port=$P_SQUID; [ "$who" = ours ] && port=$P_OURS
      log "(a) $who 1 KiB keep-alive c=$c"
      DUR=3 http_load "$who.warm$c" "$port" 8 >/dev/null  # warm-up, 3 s
      R[$who.c$c]=$(http_load "$who.c$c" "$port" "$c")
    done
  done
  log "(b) 100 MiB: direct, squid CONNECT, ours CONNECT (x$BIG_RUNS each)"
  R[direct.big]=$(big_load direct)
  R[squid.big]=$(big_load squid -p -x "http://$H:$P_SQUID")
  R[ours.big]=$(big_load ours -p -x "http://$H:$P_OURS")
  local rss_ours_after; rss_ours_after=$(rss_tree_mib "$ours")

  # ---------------------------------------------------------------- report
  python3 - "${R[squid.c1]}" "${R[ours.c1]}" "${R[squid.c32]}" "${R[ours.c32]}" \
    "${R[direct.big]}" "${R[squid.big]}" "${R[ours.big]}" "$rss_squid" "$rss_ours" "$rss_ours_after" "$LOAD" "$DUR" <<'PY'
import sys
a = sys.argv[1:]
sq1, us1, sq32, us32 = (x.split() for x in a[0:4])
dbig, sbig, ubig = (x.split() for x in a[4:7])
rss_s, rss_u, rss_u_after, tool, dur = a[7], a[8], a[9], a[10], a[11]
f = float
print(f"\nairlock egress vs squid, 127.0.0.1, load tool {tool}, {dur} s per HTTP run\n")
print("| metric | squid | airlock | ratio | target | ok |")
print("|---|---|---|---|---|---|")
def row(name, s, u, target, better_if):
    r = f(u[0]) / f(s[0]) if f(s[0]) else 0
    ok = r >= target
    print(f"| {name} | {s[0]} (p50 {s[1]} / p99 {s[2]} ms, err {s[3]}) | {u[0]} (p50 {u[1]} / p99 {u[2]} ms, err {u[3]}) | {r:.2f}x | >= {target}x | {'yes' if ok else 'NO'} |")
row("HTTP 1 KiB c=1 req/s", sq1, us1, 1.5, "higher")
row("HTTP 1 KiB c=32 req/s", sq32, us32, 2.0, "higher")
d = f(dbig[0])
rs, ru = (f(sbig[0]) / d if d else 0), (f(ubig[0]) / d if d else 0)
print(f"| CONNECT 100 MiB MB/s (median, min-max); direct {dbig[0]} ({dbig[1]}) | {sbig[0]} ({sbig[1]}) = {rs:.0%} of direct | {ubig[0]} ({ubig[1]}) = {ru:.0%} of direct | | >= 90% of direct | {'yes' if ru >= 0.9 else 'NO'} |")
print(f"| idle RSS MiB (process tree) | {rss_s} | {rss_u} (after load {rss_u_after}) | | < 20 MiB | {'yes' if f(rss_u) < 20 else 'NO'} |")
PY
}

main "$@"
