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
AIRLOCK_HOME="$(mktemp -d)" target/debug/airlock template build base
echo "== tests" >&2
cargo test --workspace --no-fail-fast -- --test-threads="${AIRLOCK_TEST_THREADS:-4}" "$@"
