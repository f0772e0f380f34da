#!/usr/bin/env bash
# bench/tls.sh - airlock egress TLS termination vs mitmdump vs direct, side by side, in one run.
#
# Starts on 127.0.0.1 only: nginx with HTTPS/1.1 as in shared/bench/peers.sh (1 KiB and 100 MiB files; a local test CA and
# a leaf for localhost made here with openssl), the airlock egress example proxy twice
# (release build; both with --tls-ca-dir: one terminating, with `--allow-host
# localhost:PORT`; one with `--bypass-host localhost:PORT`, i.e. a plain tunnel), and
# mitmdump (regular mode; once default, once with stream_large_bodies=1m). Upstream TLS
# of airlock trusts the test CA through AIRLOCK_UPSTREAM_EXTRA_CA. Measures:
#   (1) HTTPS 1 KiB GET, a new connection per request (oha --disable-keepalive, c=1):
#       direct, airlock terminated, mitmdump;                               target >= 5x mitmdump
#   (2) HTTPS 1 KiB GET keep-alive, c=1 and c=32, DUR s each: direct, airlock, mitmdump;
#   (3) 100 MiB download (curl, median of BIG_RUNS): direct, airlock terminated,
#       mitmdump streaming, (optionally, MITM_BUFFERED=1) mitmdump default;  target >= 80% of direct
#       and airlock's RSS after it (never buffered: RSS stays far below 100 MiB);
#   (4) 100 MiB through the bypass tunnel;                                   target >= 90% of direct.
# Without oha (cargo install oha --version 1.16.0 --locked), (1) uses a curl loop and (2)
# is skipped.
#
# Bounded: every load run is time-limited; every process started here is stopped by PID
# on exit (trap). Scratch: $BENCH_DIR (default /tmp/airlock-tlsbench).
# Usage: bash bench/tls.sh     Knobs (env): DUR=10 N_NEWCONN=1000 BIG_RUNS=5 MITM_BUFFERED=0
set -uo pipefail

ROOT=$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)
W=${BENCH_DIR:-/tmp/airlock-tlsbench}
H=127.0.0.1
P_HTTPS=28443 P_OURS=23131 P_BYPASS=23132 P_MITM=23133 P_MITMS=23134
DUR=${DUR:-10}
N_NEWCONN=${N_NEWCONN:-1000}
BIG_RUNS=${BIG_RUNS:-5}
MITM_BUFFERED=${MITM_BUFFERED:-0}
URL_1K=https://localhost:$P_HTTPS/1k.bin
URL_BIG=https://localhost:$P_HTTPS/100m.bin
export NO_COLOR=1

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
wait_port() { local i; for i in $(seq 300); do (exec 3<>"/dev/tcp/$H/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }
rss_tree_mib() { # pid -> RSS of pid + descendants, MiB
  local pids; pids="$1 $(descendants "$1" | tr '\n' ' ')"
  ps -o rss= -p "$(echo $pids | tr ' ' ',')" 2>/dev/null | awk '{s+=$1} END {printf "%.1f", s/1024}'
}

# ---------------------------------------------------------------- load
oha_json() { # file -> "req/s p50ms p99ms errors"
  python3 - "$1" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception:
    print("0 0 0 ERR"); sys.exit()
s = d["summary"]; p = d.get("latencyPercentiles", {})
codes = d.get("statusCodeDistribution", {})
# connections cut by the -z deadline are not errors
bad = sum(v for k, v in codes.items() if k != "200") + sum(
    v for k, v in d.get("errorDistribution", {}).items() if "deadline" not in k)
print(f'{s["requestsPerSec"]:.0f} {(p.get("p50") or 0)*1000:.2f} {(p.get("p99") or 0)*1000:.2f} {bad}')
PY
}
# label ca c mode(ka|new) [proxy port or -]
https_load() {
  local label=$1 ca=$2 c=$3 mode=$4 port=${5:--} px=() extra=()
  [ "$port" != - ] && px=(-x "http://$H:$port")
  if [ "$mode" = new ]; then
    extra=(-n "$N_NEWCONN" --disable-keepalive)
  else
    extra=(-z "${DUR}s")
  fi
  timeout $((DUR + 120)) oha --no-tui -c "$c" "${extra[@]}" "${px[@]}" --cacert "$ca" \
    --output-format json -o "$W/$label.json" "$URL_1K" >"$W/$label.log" 2>&1
  oha_json "$W/$label.json"
}
curl_newconn() { # label ca [proxy port or -] -> "req/s 0 0 errors" (curl process per request)
  local label=$1 ca=$2 port=${3:--} px=() i bad=0 t0 t1 n=200
  [ "$port" != - ] && px=(-x "http://$H:$port")
  t0=$(date +%s%N)
  for i in $(seq $n); do
    curl -sS -o /dev/null --max-time 10 "${px[@]}" --cacert "$ca" "$URL_1K" 2>>"$W/$label.err" || bad=$((bad + 1))
  done
  t1=$(date +%s%N)
  awk -v n=$n -v ns=$((t1 - t0)) -v bad=$bad 'BEGIN {printf "%.0f 0 0 %d\n", n / (ns / 1e9), bad}'
}
big_load() { # label ca runs [proxy port or -] -> "median MB/s min-max"
  local label=$1 ca=$2 runs=$3 port=${4:--} px=() i out
  [ "$port" != - ] && px=(-x "http://$H:$port")
  : >"$W/$label.txt"
  for i in $(seq "$runs"); do
    out=$(curl -sS -o /dev/null --max-time 150 "${px[@]}" --cacert "$ca" \
      -w '%{http_code} %{size_download} %{speed_download}' "$URL_BIG" 2>&1)
    echo "$out" >>"$W/$label.txt"
  done
  awk '$1==200 && $2==104857600 {print $3/1e6} $1!=200 || $2!=104857600 {bad++}
       END {if (bad) print "ERR " bad > "/dev/stderr"}' "$W/$label.txt" | sort -n |
    awk '{v[NR]=$1} END {if (NR==0) {print "0 -"; exit} printf "%.0f %.0f-%.0f\n", v[int((NR+1)/2)], v[1], v[NR]}'
}

# ---------------------------------------------------------------- main
main() {
  for p in $P_HTTPS $P_OURS $P_BYPASS $P_MITM $P_MITMS; do
    (exec 3<>"/dev/tcp/$H/$p") 2>/dev/null && { echo "port $p busy; stop whatever holds it" >&2; exit 1; }
  done
  for t in nginx mitmdump curl openssl python3; do
    command -v "$t" >/dev/null || { echo "missing $t (apt-get install -y nginx-light mitmproxy curl openssl)" >&2; exit 1; }
  done
  local have_oha=0; command -v oha >/dev/null && have_oha=1
  rm -rf "$W"; mkdir -p "$W/www" "$W/nginx" "$W/tls" "$W/mitm" "$W/mitms"
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
  ( cd "$W/tls" &&
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
      -subj "/CN=airlock bench CA" -keyout ca.key -out ca.crt &&
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=localhost \
      -keyout server.key -out server.csr &&
    printf 'basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >leaf.ext &&
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
      -extfile leaf.ext -out server.crt ) >"$W/openssl.log" 2>&1 || { cat "$W/openssl.log"; exit 1; }
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
  server {
    listen $H:$P_HTTPS ssl;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_certificate $W/tls/server.crt;
    ssl_certificate_key $W/tls/server.key;
    root $W/www;
  }
}
EOF
  start_bg nginx nginx -c "$W/nginx/nginx.conf" -p "$W/nginx/"
  wait_port $P_HTTPS || { cat "$W/nginx.out"; exit 1; }

  export AIRLOCK_UPSTREAM_EXTRA_CA=$W/tls/ca.crt
  start_bg ours "$ours_bin" --listen "$H:$P_OURS" --allow-host "localhost:$P_HTTPS" --tls-ca-dir "$W/ca"
  local ours=$LASTPID
  wait_port $P_OURS || { echo "our proxy did not listen: $(cat "$W/ours.out")" >&2; exit 1; }
  start_bg bypass "$ours_bin" --listen "$H:$P_BYPASS" --bypass-host "localhost:$P_HTTPS" --tls-ca-dir "$W/ca"
  wait_port $P_BYPASS || { echo "bypass proxy did not listen: $(cat "$W/bypass.out")" >&2; exit 1; }
  start_bg mitm mitmdump -q --mode regular --listen-host "$H" --listen-port "$P_MITM" \
    --set confdir="$W/mitm" --set ssl_verify_upstream_trusted_ca="$W/tls/ca.crt"
  start_bg mitms mitmdump -q --mode regular --listen-host "$H" --listen-port "$P_MITMS" \
    --set confdir="$W/mitms" --set ssl_verify_upstream_trusted_ca="$W/tls/ca.crt" --set stream_large_bodies=1m
  wait_port $P_MITM && wait_port $P_MITMS || { echo "mitmdump did not listen: $(tail -3 "$W/mitm.out")" >&2; exit 1; }
  for i in $(seq 50); do [ -s "$W/mitm/mitmproxy-ca-cert.pem" ] && [ -s "$W/mitms/mitmproxy-ca-cert.pem" ] && break; sleep 0.1; done

  local CA_D=$W/tls/ca.crt CA_O=$W/ca/ca.pem CA_M=$W/mitm/mitmproxy-ca-cert.pem CA_MS=$W/mitms/mitmproxy-ca-cert.pem
  # smoke tests: the terminating proxy presents airlock's CA, the bypass the upstream's
  curl -sSf -o /dev/null --cacert "$CA_D" "$URL_1K" || { echo "direct smoke test failed" >&2; exit 1; }
  curl -sSf -o /dev/null -x "http://$H:$P_OURS" --cacert "$CA_O" "$URL_1K" || { echo "airlock smoke test failed: $(tail -3 "$W/ours.out")" >&2; exit 1; }
  curl -sSf -o /dev/null -x "http://$H:$P_BYPASS" --cacert "$CA_D" "$URL_1K" || { echo "bypass smoke test failed" >&2; exit 1; }
  curl -sSf -o /dev/null -x "http://$H:$P_MITM" --cacert "$CA_M" "$URL_1K" || { echo "mitmdump smoke test failed" >&2; exit 1; }
  curl -sSf -o /dev/null -x "http://$H:$P_OURS" --cacert "$CA_D" "$URL_1K" 2>/dev/null && { echo "airlock did not terminate TLS" >&2; exit 1; }
  sleep 1
  local rss_idle; rss_idle=$(rss_tree_mib "$ours")
  log "load tool: $([ $have_oha = 1 ] && echo oha || echo 'curl loop (no oha)'); load average $(cut -d' ' -f1-3 /proc/loadavg)"

  declare -A R
  local who port ca
  log "(1) new connection per request"
  for who in direct ours mitm; do
    case $who in direct) port=- ca=$CA_D;; ours) port=$P_OURS ca=$CA_O;; mitm) port=$P_MITM ca=$CA_M;; esac
    if [ $have_oha = 1 ]; then
      R[$who.new]=$(https_load "$who.new" "$ca" 1 new "$port")
    else
      R[$who.new]=$(curl_newconn "$who.new" "$ca" "$port")
    fi
    log "  $who: ${R[$who.new]}"
  done
  for c in 1 32; do
    log "(2) keep-alive c=$c, ${DUR}s each"
    for who in direct ours mitm; do
      case $who in direct) port=- ca=$CA_D;; ours) port=$P_OURS ca=$CA_O;; mitm) port=$P_MITM ca=$CA_M;; esac
      if [ $have_oha = 1 ]; then
        R[$who.c$c]=$(https_load "$who.c$c" "$ca" "$c" ka "$port")
      else
        R[$who.c$c]="0 0 0 n/a"
      fi
      log "  $who: ${R[$who.c$c]}"
    done
  done
  log "(3) 100 MiB download x$BIG_RUNS: direct, airlock terminated, mitmdump streaming"
  R[direct.big]=$(big_load direct "$CA_D" "$BIG_RUNS")
  R[ours.big]=$(big_load ours "$CA_O" "$BIG_RUNS" "$P_OURS")
  local rss_after; rss_after=$(rss_tree_mib "$ours")
  R[mitms.big]=$(big_load mitms "$CA_MS" "$BIG_RUNS" "$P_MITMS")
  R[mitm.big]="n/a -"
  if [ "$MITM_BUFFERED" = 1 ]; then
    log "    mitmdump default (buffers whole bodies), 1 run"
    R[mitm.big]=$(big_load mitm "$CA_M" 1 "$P_MITM")
  fi
  log "(4) 100 MiB through the bypass tunnel x$BIG_RUNS"
  R[bypass.big]=$(big_load bypass "$CA_D" "$BIG_RUNS" "$P_BYPASS")

  # ---------------------------------------------------------------- report
  python3 - "${R[direct.new]}" "${R[ours.new]}" "${R[mitm.new]}" \
    "${R[direct.c1]}" "${R[ours.c1]}" "${R[mitm.c1]}" \
    "${R[direct.c32]}" "${R[ours.c32]}" "${R[mitm.c32]}" \
    "${R[direct.big]}" "${R[ours.big]}" "${R[mitms.big]}" "${R[mitm.big]}" "${R[bypass.big]}" \
    "$rss_idle" "$rss_after" "$have_oha" "$DUR" "$(nproc)" <<'PY' | tee "$W/summary.md"
import sys
a = sys.argv[1:]
sp = lambda x: x.split()
dn, on, mn, d1, o1, m1, d32, o32, m32 = map(sp, a[0:9])
dbig, obig, msbig, mbig, bbig = map(sp, a[9:14])
rss_idle, rss_after, have_oha, dur, ncpu = a[14:19]
f = lambda v: float(v) if v not in ("n/a", "-", "") else 0.0
tool = "oha" if have_oha == "1" else "curl loop (no oha: keep-alive rows skipped)"
print(f"\nairlock TLS termination vs mitmdump vs direct; 127.0.0.1, nginx HTTPS upstream, {ncpu} cores, {tool}, {dur} s per keep-alive run\n")
print("| metric | direct | airlock (terminated) | mitmdump | airlock / mitmdump | airlock / direct | target | ok |")
print("|---|---|---|---|---|---|---|---|")
def row(name, d, o, m, target=None, kind=None):
    rm = f(o[0]) / f(m[0]) if f(m[0]) else 0
    rd = f(o[0]) / f(d[0]) if f(d[0]) else 0
    cell = lambda x: f"{x[0]} (p50 {x[1]} / p99 {x[2]} ms, err {x[3]})" if len(x) > 3 else x[0]
    ok = ""
    if kind == "mitm":
        ok = "yes" if rm >= target else "NO"
        t = f">= {target}x mitmdump"
    elif kind == "direct":
        ok = "yes" if rd >= target else "NO"
        t = f">= {target:.0%} of direct"
    else:
        t = ""
    print(f"| {name} | {cell(d)} | {cell(o)} | {cell(m)} | {rm:.2f}x | {rd:.0%} | {t} | {ok} |")
row("HTTPS 1 KiB, new connection each, req/s", dn, on, mn, 5, "mitm")
row("HTTPS 1 KiB keep-alive c=1 req/s", d1, o1, m1)
row("HTTPS 1 KiB keep-alive c=32 req/s", d32, o32, m32)
big = lambda x: f"{x[0]} MB/s ({x[1]})"
rd = f(obig[0]) / f(dbig[0]) if f(dbig[0]) else 0
rm = f(obig[0]) / f(msbig[0]) if f(msbig[0]) else 0
print(f"| 100 MiB download, median MB/s (min-max) | {big(dbig)} | {big(obig)} | streaming: {big(msbig)}; default: {big(mbig)} | {rm:.2f}x (streaming) | {rd:.0%} | >= 80% of direct | {'yes' if rd >= 0.8 else 'NO'} |")
rb = f(bbig[0]) / f(dbig[0]) if f(dbig[0]) else 0
print(f"| bypass tunnel 100 MiB, median MB/s | {big(dbig)} | {big(bbig)} | | | {rb:.0%} | >= 90% of direct | {'yes' if rb >= 0.9 else 'NO'} |")
print(f"| airlock RSS MiB (process tree), idle / after the 100 MiB downloads | | {rss_idle} / {rss_after} | | | | never buffered: << 100 | {'yes' if f(rss_after) < 60 else 'NO'} |")
PY
}

main "$@"
