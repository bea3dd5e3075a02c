#!/usr/bin/env bash
# Boot the PVM kernel under ism-vmm (or cloud-hypervisor: --vmm), load virtio_ism.ko and run
# ismctl (static) in the guest, with two ism devices on one embedded pool: the owner on
# /dev/ism0 allocates, writes, reads back and grants; the peer on /dev/ism1 attaches, writes
# what the owner reads, and kicks a region the owner bound (the owner's wait must see it).
# Usage: vm-test.sh [--vmm ism-vmm|cloud-hypervisor|PATH] [--timeout SECONDS] [--keep-log FILE]
#   --vmm as in pair-test.sh (lib-vmtest.sh: vmtest_pick_vmm); default ism-vmm.
# Needs /dev/kvm; prints "SKIPPED: ..." and exits 0 without it. Exit 0 = every guest step passed.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
vmm=""
timeout_s=900
log=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --vmm) vmm="$2"; shift 2 ;;
        --timeout) timeout_s="$2"; shift 2 ;;
        --keep-log) log="$2"; shift 2 ;;
        *) echo "Unknown argument $1" >&2; exit 2 ;;
    esac
done
if [[ ! -e /dev/kvm ]]; then
    echo "SKIPPED: /dev/kvm missing, cannot boot a Linux guest"
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
log="${log:-$work/serial.log}"

# shellcheck source=lib-vmtest.sh
source "$here/lib-vmtest.sh"
vmtest_build "$work" "$vmm"
ismctl="$VMTEST_ISMCTL"

cat >"$work/test.sh" <<'GUEST'
set -e
step() { echo "ISM-KMOD step $*"; }
insmod /lib/modules/virtio_ism.ko
step insmod ok
ls -l /dev/ism0
ismctl info
step info ok
abi-check /dev/ism0
step abi-check ok
line="$(ismctl alloc 64K)"
token="${line%% *}"
step alloc ok "$line"
echo hello-from-guest | ismctl write "$token"
out="$(ismctl read "$token" --len 16)"
[ "$out" = hello-from-guest ] || { echo "read back '$out'"; exit 1; }
step readback ok
ismctl grant "$token" --default ra
step grant ok
ismctl kick "$token"
step kick ok
# The second device (same embedded pool, another devid) is the peer.
ISM_NODE=/dev/ism1 ismctl info
peer="$(ISM_NODE=/dev/ism1 ismctl attach "$token")"
case "$peer" in *" ro") ;; *) echo "grant ra gave '$peer'"; exit 1 ;; esac
if echo x | ISM_NODE=/dev/ism1 ismctl write "$token"; then echo "wrote a ro region"; exit 1; fi
step peer-attach-read-only-grant ok "$peer"
ISM_NODE=/dev/ism1 ismctl detach "$token"
ismctl grant "$token" --device 2 rwa
peer="$(ISM_NODE=/dev/ism1 ismctl attach "$token")"
case "$peer" in *" rw") ;; *) echo "grant rwa gave '$peer'"; exit 1 ;; esac
step peer-attach-rw-device-grant ok "$peer"
echo from-peer | ISM_NODE=/dev/ism1 ismctl write "$token"
out="$(ismctl read "$token" --len 9)"
[ "$out" = from-peer ] || { echo "owner read '$out'"; exit 1; }
step peer-write-owner-read ok
ismctl wait --bind "$token" --count 1 --timeout 900 >/tmp/ev &
waiter=$!
sleep 20
ISM_NODE=/dev/ism1 ismctl kick "$token"
wait "$waiter"
cat /tmp/ev
grep -q '^kick ' /tmp/ev
step peer-kick-wakes-owner ok
ismctl list
ISM_NODE=/dev/ism1 ismctl detach "$token"
ismctl detach "$token"
step detach ok
ismctl counters
ISM_NODE=/dev/ism1 ismctl counters
# Unload (devices removed, the module's pseudo filesystem released) and load again.
rmmod virtio_ism
[ ! -e /dev/ism0 ] || { echo "/dev/ism0 still there after rmmod"; exit 1; }
step rmmod ok
insmod /lib/modules/virtio_ism.ko
ismctl info >/dev/null
ISM_NODE=/dev/ism1 ismctl info >/dev/null
step reload ok
# Draft mode: no extension negotiated (no event queue, QUERY, GRANT); the draft's flow still
# works: allocate, grant, a peer attaches and reads, the peer's kick wakes the owner.
rmmod virtio_ism
insmod /lib/modules/virtio_ism.ko draft=1
ismctl info >/tmp/info
cat /tmp/info
grep -q '^event_queue *false' /tmp/info && grep -q '^query *false' /tmp/info &&
    grep -q '^grant *false' /tmp/info || { echo "draft=1 negotiated extensions"; exit 1; }
line="$(ismctl alloc 64K)"
token="${line%% *}"
echo draft-pattern | ismctl write "$token"
ismctl grant "$token" --default ra
peer="$(ISM_NODE=/dev/ism1 ismctl attach --ro "$token")"
out="$(ISM_NODE=/dev/ism1 ismctl read "$token" --len 13)"
[ "$out" = draft-pattern ] || { echo "draft peer read '$out'"; exit 1; }
ismctl wait --bind "$token" --count 1 --timeout 900 >/tmp/ev &
waiter=$!
sleep 20
ISM_NODE=/dev/ism1 ismctl kick "$token"
wait "$waiter"
cat /tmp/ev
grep -q "^kick token=$token " /tmp/ev
step draft-flow ok "$peer"
echo "ISM-KMOD all-passed"
GUEST

# abi-check: the ioctl checks ismctl cannot make (tests/abi-check.c), static like ismctl.
gcc -static -O2 -Wall -Wextra -Werror -I "$here/include/uapi" -o "$work/abi-check" \
    "$here/tests/abi-check.c"
bash "$root/resources/linux/make-initramfs.sh" --output "$work/initramfs.cpio" --uncompressed \
    --add "$work/kmod/virtio_ism.ko:/lib/modules/virtio_ism.ko" \
    --add "$ismctl:/bin/ismctl" --add "$work/abi-check:/bin/abi-check" \
    --add "$work/test.sh:/test.sh" >&2

# ism-vmm's messages go into the serial log as before; cloud-hypervisor's into their own file.
vmm_log="$log"
[[ "$VMTEST_VMM_KIND" == ism-vmm ]] || vmm_log="$work/vmm.log"
set +e
(vmtest_exec_vmm "$timeout_s" "$log" "$vmm_log" --kernel "$PVM_VMLINUX" \
    --initramfs "$work/initramfs.cpio" --cmdline "$VMTEST_PVM_CMDLINE -- sh /test.sh" \
    --cpus boot=1 --memory size=256M \
    --ism "size=16M,chunk_size=64K,pool_size=8M" --ism "size=16M,chunk_size=64K")
rc=$?
set -e
grep -a "ISM-KMOD\|ISM-LINUX\|virtio_ism\|ism0" "$log" || true
if grep -q "ISM-KMOD all-passed" "$log"; then
    echo "PASS: virtio_ism + ismctl in a PVM guest ($VMTEST_VMM_KIND exit $rc)"
    exit 0
fi
echo "FAIL: $VMTEST_VMM_KIND exit $rc; last serial lines:"
tail -n 30 "$log"
if [[ "$vmm_log" != "$log" ]]; then
    echo "--- $VMTEST_VMM_KIND"
    tail -n 15 "$vmm_log"
fi
exit 1
