#!/usr/bin/env bash
# Shared build steps of the Linux guest tests (vm-test.sh, pair-test.sh). Source it after
# setting `root` (the repository) and `here` (guest-driver/linux).
#
# vmtest_build WORK [VMM]
#   builds (or takes from cache) the PVM kernel, builds virtio_ism.ko against it in WORK/kmod,
#   a static ismctl, and ism-vmm unless VMM is given. Sets PVM_VMLINUX, PVM_KERNEL_TREE,
#   VMTEST_KO, VMTEST_ISMCTL and VMTEST_VMM.
# VMTEST_PVM_CMDLINE: the kernel parameters a PVM guest needs on this host.
# The VMTEST_* variables are read by the scripts that source this file.
# shellcheck disable=SC2034,SC2154

VMTEST_PVM_CMDLINE="console=ttyS0 noxsave clearcpuid=cx16,popcnt,smap nokaslr quiet pvm_native_fixups"

vmtest_build() {
    local work="$1" vmm="${2:-}"
    local target="${CARGO_TARGET_DIR:-$root/target}"
    eval "$(bash "$root/resources/linux/build-pvm-kernel.sh")"
    mkdir -p "$work/kmod"
    cp -r "$here/." "$work/kmod/"
    make -C "$PVM_KERNEL_TREE" M="$work/kmod" modules >"$work/kmod.log" 2>&1 ||
        { cat "$work/kmod.log"; return 1; }
    VMTEST_KO="$work/kmod/virtio_ism.ko"

    (cd "$root" && RUSTFLAGS="-C target-feature=+crt-static" cargo build -q --release \
        -p ism --bin ismctl --target x86_64-unknown-linux-gnu)
    VMTEST_ISMCTL="$target/x86_64-unknown-linux-gnu/release/ismctl"
    if [[ -z "$vmm" ]]; then
        (cd "$root" && cargo build -q -p ism-vmm)
        vmm="$target/debug/ism-vmm"
    fi
    VMTEST_VMM="$vmm"
}
