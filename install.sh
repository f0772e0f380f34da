#!/usr/bin/env bash
# Set up airlock on a Debian/Ubuntu machine: host packages, a release build,
# the static guest agent, and the base template. Re-running is safe.
#
#   ./install.sh                 install to /usr/local (sudo when not root)
#   PREFIX=$HOME/.local ./install.sh
set -euo pipefail
cd "$(dirname "$0")"
PREFIX="${PREFIX:-/usr/local}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
scripts/deps.sh
if ! command -v cargo >/dev/null; then
    echo "airlock: cargo (Rust) is required: https://rustup.rs or apt-get install cargo" >&2
    exit 1
fi
echo "== building airlock (release)" >&2
cargo build --release --quiet -p airlock-cli
guest="$(scripts/build-guest.sh)"
$SUDO install -D -m 0755 target/release/airlock "$PREFIX/bin/airlock"
$SUDO install -D -m 0755 "$guest" "$PREFIX/lib/airlock/airlock-guest"
$SUDO ln -sf "$PREFIX/bin/airlock" "$PREFIX/lib/airlock/docker-sandbox"
echo "== building the base template (Debian packages; about a minute)" >&2
"$PREFIX/bin/airlock" template build base
"$PREFIX/bin/airlock" doctor || true
cat >&2 <<MSG

airlock is installed: $PREFIX/bin/airlock
Start a shell in a sandbox sharing a project directory:
    airlock run shell ~/your-project
As a Docker CLI plugin ('docker sandbox ...'):
    mkdir -p ~/.docker/cli-plugins && ln -sf $PREFIX/bin/airlock ~/.docker/cli-plugins/docker-sandbox
MSG
