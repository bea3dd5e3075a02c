#!/usr/bin/env bash
# Boot a Linux guest under ism-vmm with a hard timeout and check that it reached /init.
#
# Usage: boot-test.sh [--debian] [--gzip] [--vmm PATH] [--timeout SECONDS] [--cpus N]
#                     [--memory SIZE] [--kernel FILE --initramfs FILE] [--extra "KERNEL PARAMS"]
#                     [--log FILE]
#   default guest: the PVM kernel of build-pvm-kernel.sh (built first if missing, ~5 min);
#   --debian: Debian's cloud kernel from fetch-debian-kernel.sh instead.
#   --gzip: boot the gzip initramfs; the default is the plain cpio, because inflating it runs
#           emulated on PVM hosts and took longer than the rest of the boot (docs/linux-guests.md).
#   --vmm: the ism-vmm binary; default: $CARGO_TARGET_DIR/debug/ism-vmm (built with cargo if
#          missing), CARGO_TARGET_DIR defaulting to the repository's target/.
# Passes when the serial console shows `ISM-LINUX booted` and ism-vmm then exits 0 (the guest
# powered off). Prints the wall time to that line and to the VMM's exit; exit status 0/1.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# shellcheck source=lib.sh
source "$here/lib.sh"

guest=pvm
initramfs_key=INITRAMFS_UNCOMPRESSED
vmm=""
timeout_s=180
cpus=1
memory=256M
kernel=""
initramfs=""
extra=""
logfile=""
while [ $# -gt 0 ]; do
    case "$1" in
        --debian) guest=debian; shift ;;
        --gzip) initramfs_key=INITRAMFS; shift ;;
        --vmm) vmm="${2:?}"; shift 2 ;;
        --timeout) timeout_s="${2:?}"; shift 2 ;;
        --cpus) cpus="${2:?}"; shift 2 ;;
        --memory) memory="${2:?}"; shift 2 ;;
        --kernel) kernel="${2:?}"; shift 2 ;;
        --initramfs) initramfs="${2:?}"; shift 2 ;;
        --extra) extra="${2:?}"; shift 2 ;;
        --log) logfile="${2:?}"; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) die "Unknown argument $1 (see --help)" ;;
    esac
done

if [ ! -e /dev/kvm ]; then
    echo "SKIPPED: /dev/kvm missing, cannot boot a Linux guest"
    exit 0
fi

if [ -z "$kernel" ] || [ -z "$initramfs" ]; then
    if [ "$guest" = pvm ]; then
        paths="$("$here/build-pvm-kernel.sh")" || die "build-pvm-kernel.sh failed"
        kernel="${kernel:-$(sed -n 's/^PVM_VMLINUX=//p' <<<"$paths")}"
        initramfs="${initramfs:-$(sed -n "s/^PVM_$initramfs_key=//p" <<<"$paths")}"
    else
        paths="$("$here/fetch-debian-kernel.sh")" || die "fetch-debian-kernel.sh failed"
        kernel="${kernel:-$(sed -n 's/^DEBIAN_VMLINUX=//p' <<<"$paths")}"
        initramfs="${initramfs:-$(sed -n "s/^DEBIAN_$initramfs_key=//p" <<<"$paths")}"
    fi
fi
[ -f "$kernel" ] || die "Kernel $kernel missing"
[ -f "$initramfs" ] || die "Initramfs $initramfs missing"

if [ -z "$vmm" ]; then
    target="${CARGO_TARGET_DIR:-$repo/target}"
    vmm="$target/debug/ism-vmm"
    if [ ! -x "$vmm" ]; then
        log "building ism-vmm"
        (cd "$repo" && CARGO_TARGET_DIR="$target" cargo build -q -p ism-vmm) >&2 ||
            die "cargo build -p ism-vmm failed"
    fi
fi
[ -x "$vmm" ] || die "ism-vmm binary $vmm missing"

# PVM needs these (see docs/linux-guests.md); they are harmless on hardware KVM, where the
# patch's pvm_native_fixups only skips a self-test and an fwait.
cmdline="console=ttyS0 noxsave clearcpuid=cx16,popcnt,smap nokaslr quiet pvm_native_fixups"
[ -z "$extra" ] || cmdline="$cmdline $extra"

logfile="${logfile:-$(mktemp /tmp/ism-boot-test.XXXXXX.log)}"
log "booting $(basename "$kernel") with $cpus vCPU(s), $memory, timeout ${timeout_s}s; serial log $logfile"
log "cmdline: $cmdline"
# Guest ring 0 runs emulated on PVM hosts: boot time depends on how busy the host is.
log "host load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"

start=$(date +%s.%N)
set +e
{
    timeout -k 5 "$timeout_s" "$vmm" --kernel "$kernel" --initramfs "$initramfs" \
        --cmdline "$cmdline" --cpus "boot=$cpus" --memory "size=$memory" --serial tty \
        </dev/null 2>&1
    echo "ISM-BOOT-TEST vmm-exit=$?"
} | while IFS= read -r line; do
    line="${line%$'\r'}"
    printf '%s\n' "$line" >>"$logfile"
    case "$line" in
        *"ISM-LINUX booted"*)
            printf '%s\n' "ISM-BOOT-TEST booted-after=$(echo "$(date +%s.%N) - $start" | bc)" >>"$logfile" ;;
    esac
done
set -e
end=$(date +%s.%N)

vmm_exit="$(sed -n 's/^ISM-BOOT-TEST vmm-exit=//p' "$logfile" | tail -n1)"
booted_after="$(sed -n 's/^ISM-BOOT-TEST booted-after=//p' "$logfile" | tail -n1)"
total="$(echo "$end - $start" | bc)"
log "host load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
grep -a "ISM-LINUX" "$logfile" || true

if [ -n "$booted_after" ] && [ "$vmm_exit" = 0 ]; then
    printf 'PASS: %s reached /init after %.1f s (VMM exited 0 after %.1f s)\n' \
        "$(basename "$kernel")" "$booted_after" "$total"
    exit 0
fi
if [ "$vmm_exit" = 124 ] || [ "$vmm_exit" = 137 ]; then
    reason="timed out"
else
    reason="ism-vmm exited with status ${vmm_exit:-unknown}"
fi
if [ -n "$booted_after" ]; then
    printf 'FAIL: reached /init after %.1f s but %s\n' "$booted_after" "$reason"
else
    printf 'FAIL: no ISM-LINUX booted line; %s after %.1f s. Last serial lines:\n' "$reason" "$total"
    grep -av "^ISM-BOOT-TEST" "$logfile" | tail -n 15
fi
exit 1
