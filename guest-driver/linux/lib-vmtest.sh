# Shared steps of the Linux guest tests (vm-test.sh, pair-test.sh): the build, and everything
# that differs between the two VMMs they run under. Source it after setting `root` (the
# repository) and `here` (guest-driver/linux).
#
# vmtest_build WORK [VMM]
#   builds (or takes from cache) the PVM kernel, builds virtio_ism.ko against it in WORK/kmod,
#   a static ismctl, and picks the VMM (vmtest_pick_vmm). Sets PVM_VMLINUX, PVM_KERNEL_TREE,
#   VMTEST_KO, VMTEST_ISMCTL, VMTEST_VMM and VMTEST_VMM_KIND.
# vmtest_pick_vmm [VMM]
#   VMM is `ism-vmm` (the default: built with cargo, debug), `cloud-hypervisor` (the patched
#   build: $ISM_CLOUD_HYPERVISOR_DIR/cloud-hypervisor when that is set, as .ci/run sets it,
#   else the directory resources/cloud-hypervisor.sh prints last, which builds it once if it
#   is not cached), or the path of either binary (a file named cloud-hypervisor* is run as
#   cloud-hypervisor, anything else as ism-vmm). Sets VMTEST_VMM and VMTEST_VMM_KIND.
# vmtest_exec_vmm SECONDS SERIAL_LOG VMM_LOG ARGS...
#   replaces the calling (sub)shell with `timeout SECONDS` running the VMM with ARGS, the
#   options both VMMs spell the same (--kernel, --initramfs, --cmdline, --cpus, --memory,
#   --ism), plus its own serial set-up: the guest's serial output goes to SERIAL_LOG, the
#   VMM's messages to VMM_LOG (ism-vmm only: may be SERIAL_LOG), and the guest gets no serial
#   input.
#     ism-vmm:          --serial tty, stdout is SERIAL_LOG.
#     cloud-hypervisor: --serial file=SERIAL_LOG --console off. The file gets every byte from
#                       the first one; its --serial socket= mode drops what the guest writes
#                       before a client connects, and a pty (--serial pty, path from vm.info)
#                       is only needed for input, which these tests do not use (B's token
#                       goes on its kernel command line).
#   Both VMMs exit 0 when the guest powers off (ACPI S5). The pid of the caller becomes
#   timeout(1)'s, which passes SIGTERM on to the VMM.
# VMTEST_PVM_CMDLINE: the kernel parameters a PVM guest needs on this host. ism-vmm would
#   append the CPUID part itself on PVM hosts; cloud-hypervisor does not, so it is written out.
# The VMTEST_* variables are read by the scripts that source this file.
# shellcheck shell=bash disable=SC2034,SC2154

VMTEST_PVM_CMDLINE="console=ttyS0 noxsave clearcpuid=cx16,popcnt,smap nokaslr quiet pvm_native_fixups"

vmtest_pick_vmm() {
    local vmm="${1:-ism-vmm}" dir
    local target="${CARGO_TARGET_DIR:-$root/target}"
    case "$vmm" in
        ism-vmm)
            (cd "$root" && cargo build -q -p ism-vmm) || return 1
            VMTEST_VMM="$target/debug/ism-vmm"
            VMTEST_VMM_KIND=ism-vmm
            ;;
        cloud-hypervisor)
            if [[ -n "${ISM_CLOUD_HYPERVISOR_DIR:-}" ]]; then
                dir="$ISM_CLOUD_HYPERVISOR_DIR"
            else
                dir="$(bash "$root/resources/cloud-hypervisor.sh" | tail -n 1)" ||
                    { echo "resources/cloud-hypervisor.sh failed: no patched cloud-hypervisor" >&2; return 1; }
            fi
            VMTEST_VMM="$dir/cloud-hypervisor"
            VMTEST_VMM_KIND=cloud-hypervisor
            ;;
        *)
            VMTEST_VMM="$vmm"
            case "$(basename "$vmm")" in
                cloud-hypervisor*) VMTEST_VMM_KIND=cloud-hypervisor ;;
                *) VMTEST_VMM_KIND=ism-vmm ;;
            esac
            ;;
    esac
    [[ -x "$VMTEST_VMM" ]] || { echo "VMM binary $VMTEST_VMM missing or not executable" >&2; return 1; }
}

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
    vmtest_pick_vmm "$vmm"
}

vmtest_exec_vmm() {
    local limit="$1" serial="$2" vmm_log="$3"
    shift 3
    case "$VMTEST_VMM_KIND" in
        ism-vmm)
            if [[ "$serial" == "$vmm_log" ]]; then
                exec timeout -k 5 "$limit" "$VMTEST_VMM" "$@" --serial tty </dev/null >"$serial" 2>&1
            fi
            exec timeout -k 5 "$limit" "$VMTEST_VMM" "$@" --serial tty \
                </dev/null >"$serial" 2>"$vmm_log"
            ;;
        cloud-hypervisor)
            [[ "$serial" != "$vmm_log" ]] || { echo "cloud-hypervisor needs two log files" >&2; exit 2; }
            exec timeout -k 5 "$limit" "$VMTEST_VMM" "$@" --serial "file=$serial" --console off \
                </dev/null >"$vmm_log" 2>&1
            ;;
        *)
            echo "unknown VMM kind '$VMTEST_VMM_KIND'" >&2
            exit 2
            ;;
    esac
}
