#!/bin/sh
# Kept for muscle memory: the build lives in scripts/build-guest.sh.
exec "$(dirname "$0")/../../scripts/build-guest.sh" "$@"
