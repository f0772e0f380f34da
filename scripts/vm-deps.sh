#!/bin/bash
# Install what airlock's microVM backend needs, on Debian 12 (idempotent):
#   - qemu-system-x86 (QEMU 10, microvm + qboot) from bookworm-backports;
#   - the guest kernel: Debian's linux-image-cloud-amd64 (its versioned
#     dependency), downloaded with `apt-get download` and unpacked into the
#     cache WITHOUT installing it on the host; a PVH-bootable vmlinux is
#     extracted from the bzImage;
#   - virtiofsd and vhost-device-vsock from crates.io (cargo install).
# Prints the paths at the end. Cache: $AIRLOCK_VM_CACHE (default
# /var/cache/airlock/vm); the backend looks there too.
set -euo pipefail

CACHE=${AIRLOCK_VM_CACHE:-/var/cache/airlock/vm}
export DEBIAN_FRONTEND=noninteractive
say() { printf 'vm-deps: %s\n' "$*" >&2; }
[ "$(id -u)" = 0 ] || { say "run as root"; exit 1; }

# --- apt: bookworm-backports ------------------------------------------------
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    mirror=$(grep -rhoE 'https?://[^ ]*debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
        | grep -v security | head -n1 | tr -d ' ' || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    say "adding bookworm-backports ($mirror)"
    cat >/etc/apt/sources.list.d/bookworm-backports.sources <<EOF
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    apt-get update -qq
fi

need_pkgs=()
qemu_ver=$(dpkg-query -W -f '${Version}' qemu-system-x86 2>/dev/null || true)
case "$qemu_ver" in
    *bpo12*) ;;
    *) need_pkgs+=(qemu-system-x86) ;;
esac
for p in libseccomp-dev libcap-ng-dev pkg-config e2fsprogs qemu-utils xz-utils zstd; do
    dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
    say "installing ${need_pkgs[*]} (from bookworm-backports where newer)"
    apt-get update -qq
    apt-get install -y -qq -t bookworm-backports --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi
[ -e /usr/share/qemu/qboot.rom ] || { say "missing /usr/share/qemu/qboot.rom (qemu-system-data)"; exit 1; }

# --- guest kernel -----------------------------------------------------------
kpkg=$(apt-cache depends linux-image-cloud-amd64 | sed -n 's/.*Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -n1)
[ -n "$kpkg" ] || { say "cannot resolve linux-image-cloud-amd64"; exit 1; }
kver=${kpkg#linux-image-}
kdir=$CACHE/kernel-$kver

# extract_vmlinux BZIMAGE OUT: find the compressed payload by its magic and
# decompress it (like the kernel's scripts/extract-vmlinux).
extract_vmlinux() {
    local img=$1 out=$2 magic cmd pos tmp
    tmp=$(mktemp)
    for spec in '\037\213\010:gunzip' '\3757zXZ\000:unxz' 'BZh:bunzip2' '\135\000\000\000:unlzma' \
                '\211\114\132:lzop -d' '\002!L\030:lz4 -d' '(\265/\375:unzstd'; do
        magic=${spec%%:*}; cmd=${spec#*:}
        # shellcheck disable=SC2059
        for pos in $(LC_ALL=C grep -obUaP "$(printf "$magic" | od -An -tx1 | tr -d ' \n' | sed 's/../\\x&/g')" "$img" | cut -d: -f1); do
            tail -c +$((pos + 1)) "$img" | $cmd >"$tmp" 2>/dev/null || true
            if [ -s "$tmp" ] && [ "$(head -c 4 "$tmp" | od -An -tx1 | tr -d ' ')" = 7f454c46 ]; then
                mv "$tmp" "$out"
                return 0
            fi
        done
    done
    rm -f "$tmp"
    return 1
}

if [ ! -s "$kdir/vmlinux" ]; then
    say "fetching $kpkg (not installed on the host)"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && apt-get download -qq "$kpkg")
    dpkg-deb -x "$work"/"$kpkg"_*.deb "$work/root"
    mkdir -p "$kdir.tmp"
    cp "$work/root/boot/vmlinuz-$kver" "$kdir.tmp/vmlinuz"
    cp "$work/root/boot/config-$kver" "$kdir.tmp/config"
    cp "$work/root/boot/System.map-$kver" "$kdir.tmp/System.map" 2>/dev/null || true
    rm -rf "$kdir.tmp/modules"
    mv "$work/root/lib/modules/$kver" "$kdir.tmp/modules"
    extract_vmlinux "$kdir.tmp/vmlinuz" "$kdir.tmp/vmlinux" || { say "cannot extract vmlinux from the bzImage"; exit 1; }
    echo "$kver" >"$kdir.tmp/version"
    rm -rf "$kdir"
    mv "$kdir.tmp" "$kdir"
    rm -rf "$work"
    trap - EXIT
fi
ln -sfn "kernel-$kver" "$CACHE/kernel"

# --- vhost-user daemons -----------------------------------------------------
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v virtiofsd >/dev/null || ! command -v vhost-device-vsock >/dev/null; then
    command -v cargo >/dev/null || { say "cargo (Rust) is needed to install virtiofsd and vhost-device-vsock"; exit 1; }
fi
for tool in virtiofsd vhost-device-vsock; do
    if ! command -v "$tool" >/dev/null; then
        say "cargo install $tool (a few minutes)"
        cargo install --locked --quiet "$tool" || cargo install --quiet "$tool"
    fi
done

echo "qemu:               $(command -v qemu-system-x86_64) ($(qemu-system-x86_64 --version | head -n1))"
echo "firmware:           /usr/share/qemu/qboot.rom"
echo "kernel:             $kdir/vmlinux ($kver)"
echo "modules:            $kdir/modules"
echo "virtiofsd:          $(command -v virtiofsd)"
echo "vhost-device-vsock: $(command -v vhost-device-vsock)"
