#!/usr/bin/env bash
# Build virtio_ism.ko with W=1 and warnings as errors (KCFLAGS=-Werror, passed here, not
# forced in Kbuild for users) against:
#  1. Debian's linux-headers for the cloud kernel the test images use (6.1, bookworm),
#     resolved at run time by resources/linux/fetch-debian-kernel.sh (downloads on first
#     use, then cached);
#  2. Debian's newest 6.12 cloud headers (bookworm-backports), resolved and cached by
#     resources/linux/fetch-debian-headers.sh 6.12;
#  3. the PVM kernel tree, when resources/linux/build-pvm-kernel.sh has built it
#     (never built here: that takes minutes; pass --pvm-build to build it);
#  4. `make install` and `dkms install` of it against Debian's 6.1 headers into scratch roots.
# Builds happen in a scratch copy, so the source tree stays clean.
# Prints "N passed, N failed" and exits non-zero on any failure.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
build_pvm=0
[[ "${1:-}" == "--pvm-build" ]] && build_pvm=1

passed=0
failed=0

build_against() {
    local label="$1" kdir="$2" cc="$3"
    local scratch
    scratch="$(mktemp -d)"
    cp -r "$here/." "$scratch/"
    rm -f "$scratch"/*.o "$scratch"/*.ko
    # grep -c, not grep -q, reads all its input: -q stopping at the first warning could make
    # the grep before it die of SIGPIPE, and under pipefail that status hid the warning.
    # No BTF for the module: the headers packages have no vmlinux to base it on (6.1 says
    # so and goes on; 6.12 runs pahole, which the builders need not have).
    if make -C "$kdir" M="$scratch" CC="$cc" W=1 KCFLAGS=-Werror CONFIG_DEBUG_INFO_BTF_MODULES= \
        modules >"$scratch/build.log" 2>&1 \
        && [[ -f "$scratch/virtio_ism.ko" ]] \
        && ! grep -E "warning:|WARNING:" "$scratch/build.log" | grep -v "Skipping BTF" | grep -c . >/dev/null; then
        echo "PASS virtio_ism.ko builds against $label ($kdir)"
        passed=$((passed + 1))
        if [[ -n "${ISM_KMOD_OUT:-}" ]]; then
            mkdir -p "$ISM_KMOD_OUT/$label"
            cp "$scratch/virtio_ism.ko" "$ISM_KMOD_OUT/$label/"
        fi
    else
        echo "FAIL virtio_ism.ko against $label ($kdir):"
        sed 's/^/    /' "$scratch/build.log"
        failed=$((failed + 1))
    fi
    rm -rf "$scratch"
}

# The documented installs (docs/guest-driver.md) into a scratch image root: `make install`
# and `dkms install -k RELEASE` must leave a module for RELEASE where modprobe finds it.
# (pair-test.sh does the same against the PVM kernel and boots the images.)
install_against() {
    local label="$1" kdir="$2"
    shift 2
    local release scratch
    release="$(install_release "$kdir")"
    scratch="$(mktemp -d)"
    if install_with_make "$kdir" "$scratch/make-root" "$scratch/make.log" "$@" &&
        install_check "$scratch/make-root" "$release" extra; then
        echo "PASS make install against $label: lib/modules/$release/extra/virtio_ism.ko"
        passed=$((passed + 1))
    else
        echo "FAIL make install against $label ($kdir)"
        failed=$((failed + 1))
    fi
    if install_with_dkms "$kdir" "$scratch/dkms-root" "$scratch/dkms.log" &&
        install_check "$scratch/dkms-root" "$release" updates/dkms; then
        echo "PASS dkms install against $label: lib/modules/$release/updates/dkms/virtio_ism.ko"
        passed=$((passed + 1))
    else
        echo "FAIL dkms install against $label ($kdir)"
        failed=$((failed + 1))
    fi
    rm -rf "$scratch"
}

# shellcheck source=lib-install.sh
source "$here/lib-install.sh"
command -v gcc-12 >/dev/null || apt-get install -y gcc-12 >&2
eval "$(bash "$root/resources/linux/fetch-debian-kernel.sh")"
build_against debian "$DEBIAN_HEADERS" gcc-12
install_against debian "$DEBIAN_HEADERS" CC=gcc-12
eval "$(bash "$root/resources/linux/fetch-debian-headers.sh" 6.12)"
build_against debian-6.12 "$DEBIAN_HEADERS" "$DEBIAN_HEADERS_CC"

pvm_tree=""
if [[ "$build_pvm" == 1 ]]; then
    eval "$(bash "$root/resources/linux/build-pvm-kernel.sh")"
    pvm_tree="$PVM_KERNEL_TREE"
else
    # The newest cached tree, if any (the recipe hash may differ from the current one).
    # shellcheck disable=SC2012  # the cache's directory names are plain
    pvm_tree="$(ls -dt "${ISM_CACHE:-$HOME/.cache/ism}"/pvm-kernel/*/linux 2>/dev/null | head -n1 || true)"
fi
if [[ -n "$pvm_tree" && -f "$pvm_tree/Module.symvers" ]]; then
    build_against pvm "$pvm_tree" gcc
else
    echo "SKIPPED: PVM kernel tree not built (resources/linux/build-pvm-kernel.sh)"
fi

echo "kmod: $passed passed, $failed failed"
[[ "$failed" == 0 ]]
