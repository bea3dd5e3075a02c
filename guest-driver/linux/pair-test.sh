#!/usr/bin/env bash
# Two PVM Linux guests, each in its own VMM process (ism-vmm, or patched cloud-hypervisor with
# --vmm cloud-hypervisor), sharing memory through one ism-pool broker.
# The module gets into each image the documented ways (docs/guest-driver.md), against the
# PVM kernel's tree, release resolved at run time: A's image root by `make install
# INSTALL_MOD_PATH=ROOT`, B's by `dkms add/build/install -k RELEASE` (lib-install.sh); both
# guests load it with a plain `modprobe virtio_ism` and check /dev/ism0.
# Guest A (owner) allocates a region, writes a pattern, grants it read-only by default
# (READ|ATTACH), binds it for kicks and prints the token; this script reads the token from
# A's serial output and boots guest B with it on the kernel command line (after ` -- `).
# B asks for a writable attach (the device must refuse: WRITE not granted), attaches as
# granted (must come back read-only), asks for writable again (the driver must refuse),
# reads the pattern (must match), tries to write (must be refused) and kicks A; A's
# `ismctl wait` must see the kick, naming that region (A holds a second bound region that B
# never touches: no kick may name it, whether regions have vectors of their own or share one
# with the device's pending bits). ismctl is the Rust `ism` crate's CLI: every step goes
# through its Device/Region API. A boots first and B as soon as the token is known.
# The test body is the same under both VMMs; what differs (the binary, the serial set-up) is
# in lib-vmtest.sh (vmtest_pick_vmm, vmtest_exec_vmm).
# Usage: pair-test.sh [--vmm ism-vmm|cloud-hypervisor|PATH] [--pool PATH] [--timeout SECONDS]
#                     [--keep-logs DIR]
#   --vmm: ism-vmm (default, built with cargo), cloud-hypervisor (the patched build of
#   resources/cloud-hypervisor.sh, or $ISM_CLOUD_HYPERVISOR_DIR), or the path of either binary
#   (named cloud-hypervisor* for cloud-hypervisor).
# Needs /dev/kvm; prints "SKIPPED: ..." and exits 0 without it. Prints
# `ISM-LINUX-PAIR result=pass|fail vmm=KIND` and exits 0 only on pass: both guests' scripts
# passed and both VMMs exited 0 (the guests powered off).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
vmm=""
pool_bin=""
timeout_s=1200
keep=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --vmm) vmm="$2"; shift 2 ;;
        --vmm=*) vmm="${1#--vmm=}"; shift ;;
        --pool) pool_bin="$2"; shift 2 ;;
        --timeout) timeout_s="$2"; shift 2 ;;
        --keep-logs) keep="$2"; shift 2 ;;
        *) echo "Unknown argument $1" >&2; exit 2 ;;
    esac
done
if [[ ! -e /dev/kvm ]]; then
    echo "SKIPPED: /dev/kvm missing, cannot boot the two Linux guests of pair-test.sh"
    exit 0
fi

start=$SECONDS
deadline=$((SECONDS + timeout_s))
work="$(mktemp -d)"
pids=()
build_s=0
guests_start=$SECONDS
# shellcheck disable=SC2317  # run by the EXIT trap
cleanup() {
    local pid
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    if [[ -n "$keep" ]]; then
        { mkdir -p "$keep" && cp "$work"/*.log "$keep/"; } 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

finish() {
    local result="$1" why="$2"
    echo "--- guest A serial (ISM lines)"
    grep -a "ISM-\|virtio_ism\|Error" "$work/a.log" 2>/dev/null || true
    echo "--- guest B serial (ISM lines)"
    grep -a "ISM-\|virtio_ism\|Error" "$work/b.log" 2>/dev/null || true
    if [[ "$result" != pass ]]; then
        echo "--- last lines of A"; tail -n 15 "$work/a.log" 2>/dev/null || true
        echo "--- last lines of B"; tail -n 15 "$work/b.log" 2>/dev/null || true
        echo "--- $vmm_kind of A"; tail -n 15 "$work/a.vmm.log" 2>/dev/null || true
        echo "--- $vmm_kind of B"; tail -n 15 "$work/b.vmm.log" 2>/dev/null || true
        echo "--- pool"; tail -n 15 "$work/pool.log" 2>/dev/null || true
    fi
    echo "elapsed $((SECONDS - start)) s (build $build_s s, guests $((SECONDS - guests_start)) s, $vmm_kind): $why"
    echo "ISM-LINUX-PAIR result=$result vmm=$vmm_kind"
    [[ "$result" == pass ]]
}

# shellcheck source=lib-vmtest.sh
source "$here/lib-vmtest.sh"
# shellcheck source=lib-install.sh
source "$here/lib-install.sh"
vmm_kind="${vmm:-ism-vmm}"
vmtest_build "$work" "$vmm"
vmm_kind="$VMTEST_VMM_KIND"
echo "VMM: $vmm_kind, $VMTEST_VMM ($("$VMTEST_VMM" --version 2>&1 | head -n 1))"
release="$(install_release "$PVM_KERNEL_TREE")"
[[ -n "$release" ]] || { echo "No kernel release in $PVM_KERNEL_TREE"; exit 1; }
# Each image root starts as an installed system would: the kernel's own module metadata.
for side in a b; do
    install_kernel_modules_meta "$PVM_KERNEL_TREE" "$work/root-$side"
done
install_with_make "$PVM_KERNEL_TREE" "$work/root-a" "$work/install-a.log"
install_check "$work/root-a" "$release" extra
install_with_dkms "$PVM_KERNEL_TREE" "$work/root-b" "$work/install-b.log"
install_check "$work/root-b" "$release" updates/dkms
echo "installed for $release: A by make install (extra/), B by dkms install (updates/dkms/)"
if [[ -z "$pool_bin" ]]; then
    (cd "$root" && cargo build -q -p ism-pool --bin ism-pool)
    pool_bin="${CARGO_TARGET_DIR:-$root/target}/debug/ism-pool"
fi
build_s=$((SECONDS - start))
guests_start=$SECONDS

cat >"$work/a.sh" <<'GUEST'
set -e
step() { echo "ISM-PAIR-A step $*"; }
modprobe virtio_ism
[ -c /dev/ism0 ] || { echo "no /dev/ism0 after modprobe"; exit 1; }
step modprobe ok "$(uname -r)" "$(grep -o '^[^:]*virtio_ism.ko' "/lib/modules/$(uname -r)/modules.dep")"
ismctl info
# The ioctl ABI's EINVAL for non-zero flags/reserved fields, mmap inside a region, sysfs.
abi-check /dev/ism0
step abi-check ok
line="$(ismctl alloc 64K)"
token="${line%% *}"
step alloc ok "$line"
echo pair-pattern-0042 | ismctl write "$token"
out="$(ismctl read "$token" --len 17)"
[ "$out" = pair-pattern-0042 ] || { echo "read back '$out'"; exit 1; }
step write ok
ismctl grant "$token" --default ra
step grant ok
# A second region B never attaches: a kick of the first must name the first, not this one.
line2="$(ismctl alloc 64K)"
other="${line2%% *}"
step alloc-other ok "$line2"
read -r kick_mode </sys/class/misc/ism0/kick_vectors
step kick-vectors "$kick_mode"
# One waiter for the whole test: events are queued per open file, so a kick arriving while no
# ismctl has the device open would be lost. B's attach may raise an event before the kick.
# In a subshell: started directly with `&`, the guest shell died of SIGSEGV right after it on
# this PVM host (twice in a row); the subshell form ran through every time.
(ismctl wait --bind "$token" --bind "$other" --count 16 --timeout 1200 >/tmp/ev) &
waiter=$!
sleep 3
echo "ISM-PAIR-A token=$token"
# Polled with shell builtins only: every fork is slow on PVM (and busybox children have
# segfaulted there now and then).
kicked=""
while [ -z "$kicked" ]; do
    while IFS= read -r ev; do
        case "$ev" in "kick token=$token "*) kicked=yes ;; esac
    done </tmp/ev
    [ -n "$kicked" ] && break
    kill -0 "$waiter" 2>/dev/null || { cat /tmp/ev; echo "waiter ended without a kick"; exit 1; }
    sleep 5
done
# Anything a kick of the first region wrongly raised for the other has arrived by now.
sleep 5
kill "$waiter" 2>/dev/null || true
cat /tmp/ev
step kick-seen ok
other_kicked=""
while IFS= read -r ev; do
    case "$ev" in "kick token=$other "*) other_kicked=yes ;; esac
done </tmp/ev
# A kick names its region only: with a vector per region (run-time MSI-X allocation, Linux
# 6.2+), or on the shared config vector with the device's pending bits (what this PVM guest's
# 6.1 kernel uses). Both VMMs offer VIRTIO_ISM_F_KICK_PENDING, so "shared" (every bound
# region reported for every kick) means the driver did not use them: a failure.
case "$kick_mode,$other_kicked" in
    per-region,|pending-bits,) step kick-names-region ok "$kick_mode: only $token" ;;
    *) echo "kick_vectors=$kick_mode, kick reported for the untouched region: '${other_kicked:-no}'"; exit 1 ;;
esac
ismctl counters
ismctl list
echo "ISM-PAIR-A all-passed"
GUEST

cat >"$work/b.sh" <<'GUEST'
set -e
token="$1"
step() { echo "ISM-PAIR-B step $*"; }
modprobe virtio_ism
[ -c /dev/ism0 ] || { echo "no /dev/ism0 after modprobe"; exit 1; }
step modprobe ok "$(uname -r)" "$(grep -o '^[^:]*virtio_ism.ko' "/lib/modules/$(uname -r)/modules.dep")"
ismctl info
# refused WHO OUTPUT: the ismctl run must have failed for want of the WRITE grant.
refused() {
    case "$2" in
        *"WRITE permission not granted"*) step "$1-refused-rw" ok ;;
        *) echo "writable attach failed for another reason: $2"; exit 1 ;;
    esac
}
# The device itself must refuse WRITE: A granted ra by default.
if out="$(ismctl attach --rw "$token" 2>&1)"; then echo "device let a writable attach through"; exit 1; fi
refused device "$out"
peer="$(ismctl attach "$token")"
case "$peer" in *" ro") ;; *) echo "default grant ra gave '$peer'"; exit 1 ;; esac
step attach-read-only ok "$peer"
# Now the driver holds the region read-only: it must refuse to hand it out writable.
if out="$(ismctl attach --rw "$token" 2>&1)"; then echo "driver handed out a ro region writable"; exit 1; fi
refused driver "$out"
out="$(ismctl read "$token" --len 17)"
[ "$out" = pair-pattern-0042 ] || { echo "B read '$out'"; exit 1; }
step read-pattern ok
if out="$(echo x | ismctl write "$token" 2>&1)"; then echo "wrote a ro region"; exit 1; fi
case "$out" in *"mapped read-only"*) ;; *) echo "write failed for another reason: $out"; exit 1 ;; esac
step write-refused ok
ismctl kick "$token"
step kick ok
# A control command the device cannot answer in time: the host stops the pool broker, the
# device's ALLOC waits for it, and the driver gives up after ctrl_timeout_ms (lowered here
# below the device's own 5 s wait for the pool). It must return ETIMEDOUT, then take the late
# answer when it comes, detach the region that answer allocated (no leak: the host counts
# B's regions in the pool), and go on working.
devid="$(ismctl info | sed -n 's/^devid *//p')"
echo 1500 >/sys/module/virtio_ism/parameters/ctrl_timeout_ms
# The script counts B's regions in the pool now (A's, plus the page the SMC-D device keeps when
# the kernel has SMC) and again at check-pool: exactly one more (the ALLOC after the timeout).
# The SMC-D device's page is taken while it registers (a work item after probe): wait for it.
for _ in 1 2 3 4 5 6 7 8 9 10; do
    read -r smcd_state </sys/class/misc/ism0/smcd || smcd_state=""
    case "$smcd_state" in *registering*) sleep 3 ;; *) break ;; esac
done
step smcd-state ok "$smcd_state"
echo "ISM-PAIR-B pool-baseline devid=$devid"
echo "ISM-PAIR-B stop-broker"
sleep 4
if out="$(ismctl alloc 64K 2>&1)"; then echo "ALLOC answered with the broker stopped: $out"; exit 1; fi
case "$out" in *"did not answer in time"*) ;; *) echo "ALLOC failed for another reason: $out"; exit 1 ;; esac
step ctrl-timeout ok
echo "ISM-PAIR-B cont-broker"
echo 10000 >/sys/module/virtio_ism/parameters/ctrl_timeout_ms
sleep 8
# The device answers each command in order: the next one collects the late answer first.
line=""
for _ in 1 2 3 4 5; do
    line="$(ismctl alloc 64K 2>&1)" && break
    echo "ALLOC after the timeout: $line"
    line=""
    sleep 3
done
[ -n "$line" ] || { echo "the device stayed unusable after a control timeout"; exit 1; }
step alloc-after-timeout ok "$line"
c=/sys/class/misc/ism0/counters
read -r timeouts <$c/ctrl_timeouts
read -r late <$c/late_replies
read -r orphans <$c/orphans_detached
[ "$timeouts" -ge 1 ] && [ "$late" -ge 1 ] || { echo "ctrl_timeouts=$timeouts late_replies=$late"; exit 1; }
# orphans_detached is 1 when the late answer was the ALLOC's success (the broker resumed within
# the device's 5 s wait), 0 when it was the device's "pool unavailable".
step late-reply-collected ok "ctrl_timeouts=$timeouts late_replies=$late orphans_detached=$orphans"
# One region more than at pool-baseline (the ALLOC above); the late answer's must be gone.
echo "ISM-PAIR-B check-pool devid=$devid added=1"
sleep 10
echo "ISM-PAIR-B all-passed"
GUEST

# abi-check: the ioctl checks ismctl cannot make (tests/abi-check.c), static like ismctl.
gcc -static -O2 -Wall -Wextra -Werror -I "$here/include/uapi" -o "$work/abi-check" \
    "$here/tests/abi-check.c"
for side in a b; do
    bash "$root/resources/linux/make-initramfs.sh" --output "$work/$side.cpio" --uncompressed \
        --root "$work/root-$side" \
        --add "$VMTEST_ISMCTL:/bin/ismctl" --add "$work/abi-check:/bin/abi-check" \
        --add "$work/$side.sh:/$side.sh" >&2
done

sock="$work/pool.sock"
"$pool_bin" --socket "$sock" --size 256M >"$work/pool.log" 2>&1 &
pool_pid=$!
pids+=("$pool_pid")
for _ in $(seq 100); do
    [[ -S "$sock" ]] && break
    sleep 0.1
done
[[ -S "$sock" ]] || { finish fail "the pool broker did not create $sock"; exit 1; }

# run_guest SIDE ARGS: the guest's serial output goes to SIDE.log, its VMM's messages to
# SIDE.vmm.log. vmtest_exec_vmm execs: the pid kept for the EXIT trap is then timeout(1)'s,
# which passes the signal on to the VMM.
run_guest() {
    local side="$1" args="$2"
    vmtest_exec_vmm $((deadline - SECONDS > 1 ? deadline - SECONDS : 1)) \
        "$work/$side.log" "$work/$side.vmm.log" \
        --kernel "$PVM_VMLINUX" --initramfs "$work/$side.cpio" \
        --cmdline "$VMTEST_PVM_CMDLINE -- sh $args" --cpus boot=1 --memory size=256M \
        --ism "id=ism0,size=16M,chunk_size=64K,pool=$sock"
}

run_guest a "/a.sh" &
pid_a=$!
pids+=("$pid_a")
token=""
while [[ -z "$token" ]]; do
    token="$(grep -ao 'ISM-PAIR-A token=0x[0-9a-f]*' "$work/a.log" 2>/dev/null | head -n1 | cut -d= -f2 || true)"
    [[ -n "$token" ]] && break
    kill -0 "$pid_a" 2>/dev/null || { finish fail "guest A ended before printing a token"; exit 1; }
    ((SECONDS < deadline)) || { finish fail "timed out waiting for A's token"; exit 1; }
    sleep 2
done
echo "guest A token $token after $((SECONDS - guests_start)) s; booting guest B"
echo "--- pool status with A's region"
"$pool_bin" status --socket "$sock" || true

run_guest b "/b.sh $token" &
pid_b=$!
pids+=("$pid_b")
# B's control-timeout steps: count B's regions in the pool before (pool-baseline), stop and
# resume the broker when B says so, and count again when it asks (check-pool: how many it
# added since the baseline).
stopped="" resumed="" pool_checked="" baseline=""
# b_regions DEVID: how many regions that session holds: the tokens in its `holds [...]` list
# (its "vm uses ... in N regions" counts the whole VM identity, here every root process).
b_regions() {
    "$pool_bin" status --socket "$sock" 2>&1 |
        sed -n "s/^ *devid $1 .*holds \[\([^]]*\)\].*/\1/p" | tr ',' '\n' | grep -c '0x' || true
}
while kill -0 "$pid_b" 2>/dev/null; do
    if [[ -z "$baseline" ]] && grep -aq "ISM-PAIR-B pool-baseline" "$work/b.log" 2>/dev/null; then
        base_devid="$(grep -ao 'ISM-PAIR-B pool-baseline devid=[0-9]*' "$work/b.log" | head -n1)"
        base_devid="${base_devid##*=}"
        baseline="$(b_regions "$base_devid")"
        echo "pool: B (devid $base_devid) holds ${baseline:-?} regions before its control-timeout step"
        baseline="${baseline:-unknown}"
    fi
    if [[ -n "$baseline" && -z "$stopped" ]] && grep -aq "ISM-PAIR-B stop-broker" "$work/b.log" 2>/dev/null; then
        kill -STOP "$pool_pid"
        stopped=yes
        echo "broker stopped for B's control-timeout step"
    fi
    if [[ -n "$stopped" && -z "$resumed" ]] && grep -aq "ISM-PAIR-B cont-broker" "$work/b.log"; then
        kill -CONT "$pool_pid"
        resumed=yes
        echo "broker resumed"
    fi
    check="$(grep -ao 'ISM-PAIR-B check-pool devid=[0-9]* added=[0-9]*' "$work/b.log" 2>/dev/null | head -n1 || true)"
    if [[ -n "$check" && -z "$pool_checked" ]]; then
        want_devid="${check#*devid=}"; want_devid="${want_devid%% *}"
        added="${check##*added=}"
        have="$(b_regions "$want_devid")"
        want="unknown"
        [[ "$baseline" =~ ^[0-9]+$ ]] && want=$((baseline + added))
        echo "pool: B (devid $want_devid) holds ${have:-?} regions, wants $want ($baseline before, $added added)"
        pool_checked="${have:-none}"
        if [[ "$have" != "$want" ]]; then
            "$pool_bin" status --socket "$sock" 2>&1 || true
            pool_checked="bad"
        fi
    fi
    sleep 0.3
done
[[ -n "$resumed" ]] || { [[ -n "$stopped" ]] && kill -CONT "$pool_pid"; }
set +e
wait "$pid_b"
rc_b=$?
wait "$pid_a"
rc_a=$?
set -e
echo "$vmm_kind exit: A $rc_a, B $rc_b"
if [[ "$pool_checked" == bad || -z "$pool_checked" ]] && grep -q "ISM-PAIR-B all-passed" "$work/b.log"; then
    finish fail "after B's control timeout the pool did not show B holding exactly its regions (a late answer's region leaked, or the count was not taken)"
    exit 1
fi
if grep -q "ISM-PAIR-A all-passed" "$work/a.log" && grep -q "ISM-PAIR-B all-passed" "$work/b.log"; then
    if [[ "$rc_a" == 0 && "$rc_b" == 0 ]]; then
        finish pass "B read A's pattern read-only, its write was refused, its kick reached A naming the region; a control timeout leaked nothing"
        exit 0
    fi
    finish fail "both guests passed but a $vmm_kind did not exit 0 after the power-off (A $rc_a, B $rc_b)"
    exit 1
fi
if ((SECONDS >= deadline)); then
    finish fail "timed out: the guests had not finished when the ${timeout_s} s budget ran out"
else
    finish fail "a guest step failed (see the serial lines above)"
fi
exit 1
