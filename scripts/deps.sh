#!/usr/bin/env bash
# Install the host packages airlock needs (Debian/Ubuntu). Idempotent:
# does nothing when everything is present.
#   mmdebstrap  builds the sandbox root filesystem from Debian packages
#   iproute2    `ip` (tests build their network world with it)
#   util-linux, bsdutils: unshare/setpriv/script used by tests
#   curl, ca-certificates: README examples
set -euo pipefail
need=()
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v ip >/dev/null || need+=(iproute2)
command -v script >/dev/null || need+=(bsdutils)
command -v setpriv >/dev/null || need+=(util-linux)
command -v newuidmap >/dev/null || need+=(uidmap)
command -v curl >/dev/null || need+=(curl ca-certificates)
command -v cc >/dev/null || need+=(gcc libc6-dev)
if ((${#need[@]})); then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "airlock: installing ${need[*]}" >&2
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
fi
