#!/usr/bin/env bash
# Sandbox start latency, side by side in one run (hyperfine medians):
#   cold:  airlock run shell WS -- true   (a new sandbox every run; removed after)
#   warm:  airlock exec NAME true          (an existing running sandbox)
#   peers: bwrap --unshare-all true, unshare -Urnmpf true, srt true
# Targets (issue 2): warm exec <= 15 ms, cold run <= 150 ms.
# Usage: bench/sandbox.sh [RUNS]   (default 20; needs root, a built airlock)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-20}"
command -v hyperfine >/dev/null || apt-get install -y -q hyperfine >/dev/null
command -v bwrap >/dev/null || apt-get install -y -q bubblewrap >/dev/null
# srt needs ripgrep and socat at run time.
command -v rg >/dev/null && command -v socat >/dev/null || apt-get install -y -q ripgrep socat >/dev/null
if ! command -v srt >/dev/null; then
    timeout 600 npm install -g @anthropic-ai/sandbox-runtime@0.0.78 >/dev/null 2>&1 || echo "srt not installable; skipping it" >&2
fi
cargo build --release --quiet -p airlock-cli
AIRLOCK_GUEST="$(scripts/build-guest.sh)"
export AIRLOCK_GUEST
export AIRLOCK_TEMPLATES="${AIRLOCK_TEMPLATES:-/var/lib/airlock/templates}"
AIRLOCK_HOME="$(mktemp -d /tmp/albench.XXXX)"
export AIRLOCK_HOME
A="$PWD/target/release/airlock"
WS="$AIRLOCK_HOME/ws"; mkdir -p "$WS"
R="$AIRLOCK_HOME/results"; mkdir -p "$R"
cleanup() { for n in $("$A" ls -q 2>/dev/null); do "$A" rm -f "$n" >/dev/null 2>&1 || true; done; rm -rf "$AIRLOCK_HOME"; }
trap cleanup EXIT
"$A" template build base >/dev/null
"$A" run shell "$WS" --name warm -- true
# Each cold run makes a new sandbox (unique name) and removes it in the
# untimed --prepare step of the next run.
cat > "$R/cold.sh" <<SH
#!/bin/sh
exec "$A" run shell "$WS" --name "cold-\$(cat /proc/sys/kernel/random/uuid | cut -c1-8)" -- true
SH
chmod +x "$R/cold.sh"
prep="for n in \$($A ls -q | grep ^cold-); do $A rm -f \$n >/dev/null; done"
peers=(-n 'bwrap --unshare-all true' 'bwrap --ro-bind / / --dev /dev --proc /proc --unshare-all --die-with-parent true'
       -n 'unshare -Urnmpf true' 'unshare -Urnmpf --mount-proc true')
command -v srt >/dev/null && peers+=(-n 'srt true' 'srt true')
hyperfine -N --warmup 3 --runs "$RUNS" --export-json "$R/warm.json" \
    -n 'airlock exec (warm)' "$A exec warm true" "${peers[@]}" >&2
hyperfine --warmup 1 --runs "$RUNS" --prepare "$prep" --export-json "$R/cold.json" \
    -n 'airlock run (cold, new sandbox)' "$R/cold.sh" >&2
python3 - "$R/warm.json" "$R/cold.json" <<'PY'
import json, sys
rows = []
for f in sys.argv[1:]:
    for r in json.load(open(f))["results"]:
        rows.append((r["command"], r["median"] * 1000, r["mean"] * 1000, r["stddev"] * 1000))
med = {n: m for n, m, _, _ in rows}
print(f"{'command':40} {'median ms':>10} {'mean ms':>9} {'sd':>6}")
for n, m, mean, sd in rows:
    print(f"{n:40} {m:10.2f} {mean:9.2f} {sd:6.2f}")
warm = med['airlock exec (warm)']; cold = med['airlock run (cold, new sandbox)']
print(f"\nwarm exec {warm:.1f} ms (target <= 15 ms: {'OK' if warm <= 15 else 'MISSED'})")
print(f"cold run  {cold:.1f} ms (target <= 150 ms: {'OK' if cold <= 150 else 'MISSED'})")
for peer in ('bwrap --unshare-all true', 'srt true'):
    if peer in med:
        print(f"ratio vs {peer}: warm {warm/med[peer]:.2f}x, cold {cold/med[peer]:.2f}x")
PY
