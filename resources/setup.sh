#!/usr/bin/env bash
# Installs what building and testing ism needs on Debian 12. Idempotent and quiet when done.
set -euo pipefail

need_pkgs=()
for p in build-essential pkg-config; do
    dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${need_pkgs[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}"
fi

# dkms: guest-driver/linux checks `dkms install` of virtio_ism (build-ci.sh, pair-test.sh).
# Without recommends: they would pull the host kernel's headers, which nothing here uses.
if ! dpkg -s dkms >/dev/null 2>&1; then
    echo "setup: installing Debian package dkms"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dkms
fi

if ! command -v cargo-fuzz >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo-fuzz" ]; then
    echo "setup: installing cargo-fuzz from crates.io"
    cargo install cargo-fuzz --locked --quiet
fi
