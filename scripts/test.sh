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
# The VM's private Docker daemon (tests/all/vm.rs): Debian's engine and CLI.
AIRLOCK_HOME="$tmp_home" target/debug/airlock template build docker --package docker.io --package docker-cli
echo "== agent templates (cached in $AIRLOCK_TEMPLATES)" >&2
t0=$SECONDS
for a in claude codex gemini copilot opencode; do
    AIRLOCK_HOME="$tmp_home" target/debug/airlock template build "$a"
done
echo "== agent templates ready in $((SECONDS - t0))s" >&2
rm -rf "$tmp_home"
echo "== tests" >&2
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --no-fail-fast -- --test-threads="${AIRLOCK_TEST_THREADS:-4}" "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
# The microVM layer: boots real VMs (TCG here), so it is a separate,
# clearly named step that installs its tools first (QEMU from
# bookworm-backports, the Debian cloud kernel, virtiofsd, vhost-device-vsock).
if [ "${AIRLOCK_SKIP_VM:-0}" = 1 ]; then
    echo "== VM tests SKIPPED (AIRLOCK_SKIP_VM=1)" | tee -a "$log"
else
    echo "== VM tools" >&2
    scripts/vm-deps.sh >&2 || rc=1
    echo "== VM tests" >&2
    cargo test -p airlock-backend --test vm -- --ignored --test-threads=2 2>&1 | tee -a "$log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
    cargo test -p airlock-cli --test all -- --ignored vm:: 2>&1 | tee -a "$log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
fi
set -e
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "%d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$rc"
