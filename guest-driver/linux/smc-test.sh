#!/usr/bin/env bash
# AF_SMC between PVM Linux guests under cloud-hypervisor, connected by virtio-net on a host
# bridge, with the kernel's own word on whether each connection ran over SMC-D or fell back to
# TCP (issue #16). See docs/smc-test.md.
#
# The script creates a Linux bridge and one tap per guest (names carry its pid), boots up to
# three guests at once, each with `--net tap=...` on that bridge:
#   A  server, with an `--ism` device on the ism-pool broker
#   B  client, with an `--ism` device on the same broker         (case "smc")
#   C  client, without an ism device                              (case "noism")
# Every guest loads virtio_ism (installed into the image by `make install`), prints how many
# SMC-D devices the SMC core has (tests/smc-check.c `devices`: SMC generic netlink), sets its
# address with busybox `ip`, and each client pings A, then exchanges BYTES both ways with A
# over plain TCP and then over AF_SMC (tests/smc-check.c: every byte checked on both sides).
# While each AF_SMC connection is open both ends ask SMC diag (NETLINK_SOCK_DIAG, AF_SMC) for
# the socket's mode: `smcd`, `smcr` or `fallback reason=...`.
# Expectations: case noism must fall back (C has no SMC-D device) and still deliver every
# byte; case smc must match --expect:
#   smcd      both ends report SMC-D
#   fallback  both ends report a TCP fallback
#   auto      (default) smcd when both A and B have an SMC-D device registered with the SMC
#             core (virtio_ism offering SMC-D), fallback otherwise; the mode seen is printed
# The EXIT trap stops the guests and the broker and deletes the taps and the bridge.
#
# Usage: smc-test.sh [--vmm cloud-hypervisor|PATH] [--expect auto|smcd|fallback]
#                    [--case all|smc|noism] [--bytes N] [--pool PATH] [--timeout SECONDS]
#                    [--keep-logs DIR]
#   --vmm: a cloud-hypervisor binary (the patched build with --ism); the default is
#   lib-vmtest.sh's `cloud-hypervisor` ($ISM_CLOUD_HYPERVISOR_DIR or resources/cloud-hypervisor.sh).
#   ism-vmm has no virtio-net and is refused.
# Prints one "SKIPPED: ..." line and exits 0 without /dev/kvm, root, /dev/net/tun, `ip`, bridge
# and tap support, or the cloud-hypervisor binary. Prints
# `ISM-LINUX-SMC result=pass|fail smc=MODE noism=MODE bytes=N` and exits 0 only on pass.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
SMC_SCRIPT=smc-test.sh
expect=auto
which_case=all
bytes=131072
# shellcheck source=lib-smc.sh
source "$here/lib-smc.sh"
smc_option() {
    case "$1" in
        --expect) expect="$2" ;;
        --case) which_case="$2" ;;
        --bytes) bytes="$2" ;;
        *) return 1 ;;
    esac
}
smc_parse_args 32 "$@"
case "$expect" in auto|smcd|fallback) ;; *) echo "--expect auto|smcd|fallback" >&2; exit 2 ;; esac
case "$which_case" in all|smc|noism) ;; *) echo "--case all|smc|noism" >&2; exit 2 ;; esac
[[ "$bytes" =~ ^[0-9]+$ && "$bytes" -gt 0 ]] || { echo "--bytes needs a positive number" >&2; exit 2; }

smc_preflight

start=$SECONDS
deadline=$((SECONDS + timeout_s))
smc_setup_work
build_s=0
guests_start=$SECONDS

guests=(a)
case "$which_case" in
    all) guests+=(b c) ;;
    smc) guests+=(b) ;;
    noism) guests+=(c) ;;
esac
declare -A tap addr mac port
addr=([a]=192.168.116.1 [b]=192.168.116.2 [c]=192.168.116.3)
mac=([a]=52:54:00:16:00:0a [b]=52:54:00:16:00:0b [c]=52:54:00:16:00:0c)
# Each client's TCP check on port N, its AF_SMC exchange on N+1.
port=([b]=7100 [c]=7200)
smc_setup_net "${guests[@]}"
echo "host: bridge $br, taps $(for g in "${guests[@]}"; do printf "%s " "${tap[$g]}"; done)"

finish() {
    local result="$1" why="$2" g
    for g in "${guests[@]}"; do
        echo "--- guest ${g^^} serial (SMC-TEST lines)"
        grep -a "SMC-TEST\|ISM-LINUX\|virtio_ism\|Error" "$work/$g.log" 2>/dev/null || true
    done
    if [[ "$result" != pass ]]; then
        for g in "${guests[@]}"; do
            echo "--- last lines of ${g^^}"; tail -n 15 "$work/$g.log" 2>/dev/null || true
            echo "--- cloud-hypervisor of ${g^^}"; tail -n 15 "$work/$g.vmm.log" 2>/dev/null || true
        done
        echo "--- pool"; tail -n 15 "$work/pool.log" 2>/dev/null || true
    fi
    echo "elapsed $((SECONDS - start)) s (build $build_s s, guests $((SECONDS - guests_start)) s): $why"
    echo "ISM-LINUX-SMC result=$result smc=${mode_smc:-n/a} noism=${mode_noism:-n/a} bytes=$bytes expect=$expect"
    [[ "$result" == pass ]]
}
mode_smc="" mode_noism=""

# One image for all guests: /smc-guest.sh ROLE ADDRESS BYTES [server: PEER:PORT...]
#                                                           [client: SERVER PORT]
cat >"$work/smc-guest.sh" <<'GUEST'
set -e
role="$1" addr="$2" bytes="$3"
shift 3
say() { echo "SMC-TEST-$role $*"; }
# run LABEL CMD...: CMD's output, each line prefixed; the script stops when CMD fails.
run() {
    label="$1"
    shift
    rc=0
    out="$("$@" 2>&1)" || rc=$?
    while IFS= read -r line; do
        say "$label$line"
    done <<EOF
$out
EOF
    [ "$rc" = 0 ] || { say "FAIL ${label}exit=$rc"; exit 1; }
}
modprobe virtio_ism
if [ -c /dev/ism0 ]; then say ism-device yes; else say ism-device no; fi
# The module's SMC-D state, where it has one (docs/smc.md), and the shared user EID.
[ -r /sys/class/misc/ism0/smcd ] && say "smcd $(cat /sys/class/misc/ism0/smcd)"
if [ -x /bin/smc-ueid ]; then run "ueid: " smc-ueid ISM-SMC-TEST; fi
run "" smc-check devices
dev=""
for d in /sys/class/net/*; do
    [ "${d##*/}" = lo ] && continue
    dev="${d##*/}"
    break
done
[ -n "$dev" ] || { say "FAIL no network interface"; exit 1; }
ip link set "$dev" up
ip addr add "$addr/24" dev "$dev"
say net "$dev" "$addr"
case "$role" in
    A)
        for spec in "$@"; do
            peer="${spec%%:*}" p="${spec#*:}"
            run "$peer tcp: " smc-check -t server "$p" "$bytes"
            run "$peer smc: " smc-check server "$((p + 1))" "$bytes"
        done
        ;;
    *)
        server="$1" p="$2"
        i=0
        until ping -c 1 -W 2 "$server" >/dev/null 2>&1; do
            i=$((i + 1))
            [ "$i" -lt 300 ] || { say "FAIL no ping answer from $server"; exit 1; }
            sleep 1
        done
        say ping ok "$server"
        run "tcp: " smc-check -t client "$server" "$p" "$bytes"
        run "smc: " smc-check client "$server" "$((p + 1))" "$bytes"
        ;;
esac
# Teardown: the sockets are closed, but SMC keeps its link groups and their DMBs for reuse.
# Unloading the module takes the SMC-D device away: SMC must end those link groups and
# unregister every DMB through the device, the module must find none left, and the kernel
# must not complain while it happens (the log is cleared first).
if [ -c /dev/ism0 ]; then
    c=/sys/class/misc/ism0/counters
    say "teardown dmbs=$(cat $c/smcd_dmbs) registered=$(cat $c/smcd_dmbs_registered)" \
        "unregistered=$(cat $c/smcd_dmbs_unregistered)"
    dmesg -c >/dev/null
    run "rmmod: " rmmod virtio_ism
    if dmesg | grep -E "left at remove|WARNING:|BUG:|Oops|refcount_t"; then
        say "FAIL teardown: the kernel log above"
        exit 1
    fi
    say teardown-done
    # The host reads the pool meanwhile: this device must hold no region any more.
    sleep 15
fi
say all-passed
GUEST
# Builds (lib-smc.sh): the kernel and module, ism-pool, smc-check, smc-ueid, the image.
smc_build "$work/smc-guest.sh"
build_s=$((SECONDS - start))
guests_start=$SECONDS

smc_start_pool || { finish fail "the pool broker did not create $sock"; exit 1; }

# smc_run_guest SIDE ISM(yes|no) ARGS (lib-smc.sh): serial output to SIDE.log,
# cloud-hypervisor's to SIDE.vmm.log.
server_args="A ${addr[a]} $bytes"
for g in "${guests[@]:1}"; do
    server_args+=" $g:${port[$g]}"
done
declare -A gpid
smc_run_guest a yes "$server_args" &
gpid[a]=$!
pids+=("${gpid[a]}")
for g in "${guests[@]:1}"; do
    with=yes
    [[ "$g" == c ]] && with=no
    smc_run_guest "$g" "$with" "${g^^} ${addr[$g]} $bytes ${addr[a]} ${port[$g]}" &
    gpid[$g]=$!
    pids+=("${gpid[$g]}")
done
echo "guests: ${guests[*]} booting ($VMTEST_VMM_KIND, A and B with --ism, C without)"

# pool_holds GUEST: the tokens the pool says GUEST's device holds (`ism-pool status`: the
# session whose pid is GUEST's cloud-hypervisor).
pool_holds() {
    local vmm_pid
    vmm_pid="$(pgrep -P "${gpid[$1]}" | head -n1)"
    [[ -n "$vmm_pid" ]] || return 1
    local line
    line="$("$pool_bin" status --socket "$sock" 2>/dev/null |
        sed -n "s/^ *devid [0-9]* *pid $vmm_pid .*holds \(\[[^]]*\]\).*/\1/p" | head -n1)"
    [[ -n "$line" ]] || return 1
    line="${line#[}"
    echo "${line%]}"
}
# While each ism guest waits after its teardown, what the pool says it holds, to
# $work/teardown-GUEST.pool ("holds=TOKENS"; TOKENS empty when it holds nothing).
(
    for _ in $(seq $((timeout_s * 2))); do
        left=0
        for g in a b; do
            [[ " ${guests[*]} " == *" $g "* && ! -e "$work/teardown-$g.pool" ]] || continue
            left=1
            if grep -aq "SMC-TEST-${g^^} teardown-done" "$work/$g.log" 2>/dev/null; then
                held="$(pool_holds "$g" || echo unknown)"
                echo "holds=${held// /}" >"$work/teardown-$g.pool"
            fi
        done
        [[ "$left" == 1 ]] || break
        sleep 0.5
    done
) &
pids+=("$!")

declare -A rc
set +e
for g in "${guests[@]}"; do
    wait "${gpid[$g]}"
    rc[$g]=$?
done
set -e
echo "cloud-hypervisor exit: $(for g in "${guests[@]}"; do printf '%s %s  ' "${g^^}" "${rc[$g]}"; done)"

# mode_of LOG PREFIX: the mode word of the SMC-MODE line under PREFIX (e.g. "SMC-TEST-A b smc: ").
mode_of() {
    { grep -ao "^$2SMC-MODE [a-z]*" "$1" 2>/dev/null || true; } | head -n1 | sed 's/.*SMC-MODE //'
}
checked_ok() {
    grep -aq "^$2SMC-CHECK [a-z]* ok family=$3 sent=$bytes received=$bytes checked=$bytes" "$1"
}
smcd_devices() {
    { grep -ao "^SMC-TEST-$2 SMC-DEVICES smcd=[0-9]*" "$1" 2>/dev/null || true; } | head -n1 |
        sed 's/.*smcd=//'
}

fails=()
for g in "${guests[@]}"; do
    grep -aq "SMC-TEST-${g^^} all-passed" "$work/$g.log" || fails+=("guest ${g^^} did not pass all its steps")
    [[ "${rc[$g]}" == 0 ]] || fails+=("cloud-hypervisor of ${g^^} exited ${rc[$g]}")
done
# check_case PEER EXPECTED: both ends' bytes and modes for the connection with client PEER.
check_case() {
    local peer="$1" want="$2" P m_srv m_cli
    P="${peer^^}"
    for fam in tcp smc; do
        checked_ok "$work/a.log" "SMC-TEST-A $peer $fam: " "$fam" ||
            fails+=("A did not check all $bytes bytes from ${P} over $fam")
        checked_ok "$work/$peer.log" "SMC-TEST-$P $fam: " "$fam" ||
            fails+=("${P} did not check all $bytes bytes from A over $fam")
    done
    m_srv="$(mode_of "$work/a.log" "SMC-TEST-A $peer smc: ")"
    m_cli="$(mode_of "$work/$peer.log" "SMC-TEST-$P smc: ")"
    echo "case $peer: A's end ${m_srv:-none}, ${P}'s end ${m_cli:-none}; expected $want"
    [[ "$m_srv" == "$want" && "$m_cli" == "$want" ]] ||
        fails+=("AF_SMC A<->${P}: modes A=${m_srv:-none} ${P}=${m_cli:-none}, expected $want")
    MODE_SEEN="${m_srv:-none}/${m_cli:-none}"
}
if [[ " ${guests[*]} " == *" b "* ]]; then
    want="$expect"
    if [[ "$expect" == auto ]]; then
        da="$(smcd_devices "$work/a.log" A)" db="$(smcd_devices "$work/b.log" B)"
        if [[ "${da:-0}" -ge 1 && "${db:-0}" -ge 1 ]]; then want=smcd; else want=fallback; fi
        echo "expect auto: SMC-D devices A=${da:-?} B=${db:-?} -> $want"
    fi
    check_case b "$want"
    mode_smc="$MODE_SEEN"
    grep -aq "SMC-TEST-B ism-device yes" "$work/b.log" || fails+=("B has no /dev/ism0")
fi
if [[ " ${guests[*]} " == *" c "* ]]; then
    check_case c fallback
    mode_noism="$MODE_SEEN"
    grep -aq "SMC-TEST-C ism-device no" "$work/c.log" || fails+=("C, started without --ism, has an ism device")
    grep -aq "SMC-TEST-C SMC-DEVICES smcd=0" "$work/c.log" || fails+=("C, started without --ism, has an SMC-D device")
fi
grep -aq "SMC-TEST-A ism-device yes" "$work/a.log" || fails+=("A has no /dev/ism0")
# Teardown (guests with an ism device): rmmod returned, no DMB was left, the kernel said
# nothing, the pool holds nothing for the device. Where the connection ran over SMC-D, each
# side registered a DMB, and B, which leaves first, still had its DMB when it unloaded the
# module (A's may be gone by its own teardown: SMC ends A's link group when B's goes).
for g in a b; do
    [[ " ${guests[*]} " == *" $g "* ]] || continue
    G="${g^^}"
    line="$(grep -ao "SMC-TEST-$G teardown dmbs=[0-9]*.*" "$work/$g.log" | head -n1 || true)"
    echo "teardown $G: ${line#SMC-TEST-"$G" teardown }"
    grep -aq "SMC-TEST-$G teardown-done" "$work/$g.log" ||
        fails+=("$G: unloading virtio_ism did not end cleanly")
    pool="$(cat "$work/teardown-$g.pool" 2>/dev/null || echo "holds=not-read")"
    echo "teardown $G: the pool after it: $pool"
    [[ "$pool" == "holds=" ]] || fails+=("$G: after the teardown the pool says its device $pool")
    dmbs="$(sed -n 's/.*teardown dmbs=\([0-9]*\).*/\1/p' <<<"$line")"
    registered="$(sed -n 's/.* registered=\([0-9]*\).*/\1/p' <<<"$line")"
    if [[ "$mode_smc" == smcd/smcd ]]; then
        [[ "${registered:-0}" -ge 1 ]] || fails+=("$G: registered no DMB over SMC-D")
        [[ "$g" != b || "${dmbs:-0}" -ge 1 ]] ||
            fails+=("B: no DMB registered when it unloaded the module: the teardown tested nothing")
    fi
done

if [[ ${#fails[@]} -eq 0 ]]; then
    finish pass "every byte checked both ways over TCP and AF_SMC; modes as expected"
    exit 0
fi
printf 'FAIL: %s\n' "${fails[@]}"
if ((SECONDS >= deadline)); then
    finish fail "timed out: the guests had not finished when the ${timeout_s} s budget ran out"
else
    finish fail "${fails[0]}"
fi
exit 1
