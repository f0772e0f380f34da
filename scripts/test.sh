#!/usr/bin/env bash
# The test command: installs what the tests need, builds airlock and the
# static guest agent, makes sure the base template exists (built once and
# cached in $AIRLOCK_TEMPLATES, default /var/lib/airlock/templates), then
# runs every test. The sandbox suite needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
echo "== build" >&2
cargo build --workspace --bins --quiet
AIRLOCK_GUEST="$(scripts/build-guest.sh)"
export AIRLOCK_GUEST
export AIRLOCK_TEMPLATES="${AIRLOCK_TEMPLATES:-/var/lib/airlock/templates}"
echo "== template (cached in $AIRLOCK_TEMPLATES)" >&2
tmp_home="$(mktemp -d)"
AIRLOCK_HOME="$tmp_home" target/debug/airlock template build base
rm -rf "$tmp_home"
echo "== tests" >&2
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --no-fail-fast -- --test-threads="${AIRLOCK_TEST_THREADS:-4}" "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "%d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$rc"
