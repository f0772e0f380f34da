#!/usr/bin/env bash
# Build the guest agent as a static binary (glibc, crt-static: this
# toolchain has no musl target) and print its path. Built in its own target
# directory with an explicit --target so the static flag never reaches
# build scripts or proc macros.
set -euo pipefail
cd "$(dirname "$0")/.."
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release \
    -p airlock-guest --target x86_64-unknown-linux-gnu --target-dir target/guest
bin="$PWD/target/guest/x86_64-unknown-linux-gnu/release/airlock-guest"
if ! ldd "$bin" 2>&1 | grep -Eq 'statically linked|not a dynamic executable'; then
    echo "airlock: $bin is not static" >&2
    exit 1
fi
echo "$bin"
