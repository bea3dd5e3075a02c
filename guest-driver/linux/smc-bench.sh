#!/usr/bin/env bash
# SMC-D against TCP/virtio-net between the same two PVM Linux guests, in one run (issue #16's
# benchmark). See docs/smc-test.md, "Benchmark".
#
# Boots A (server) and B (client) once under cloud-hypervisor, each with virtio-net on a host
# bridge (lib-smc.sh, shared with smc-test.sh) and an --ism device on one ism-pool broker. B
# runs tests/smc-check.c `bench-client` against A's `bench-server` first over plain TCP (-t),
# then over AF_SMC: ROUNDS 64-byte round trips (mean µs per round trip, CLOCK_MONOTONIC in
# the guest) and STREAM bytes in 64 KiB writes (MB/s), every message and chunk checked by
# sequence number. The AF_SMC column is labelled SMC-D only when SMC diag says the
# connection is SMC-D. What the data path costs: the guests' SMC-D counters
# (/sys/class/misc/ism0/counters: moves, signals, irqs) per round trip and per 64 KiB, and
# the host CPU time of both cloud-hypervisor processes per phase (/proc/PID/task/*/stat,
# split into vCPU threads and the rest), sampled when B's phase markers appear on its serial
# log (0.2 s polling: the samples include up to that much idle time).
# On PVM guest ring 0 is emulated (~1000x native): both columns are dominated by emulated
# guest kernel code; the table says so.
#
# Usage: smc-bench.sh [--vmm cloud-hypervisor|PATH] [--rounds N] [--stream BYTES]
#                     [--expect smcd|any] [--pool PATH] [--timeout SECONDS] [--keep-logs DIR]
#   --rounds (default 200), --stream (default 1048576), --expect smcd (default: fail unless
#   the AF_SMC connection ran over SMC-D) or any.
# Prints one "SKIPPED: ..." line and exits 0 when smc-test.sh would skip. Prints the table and
# `ISM-LINUX-SMC-BENCH result=pass|fail smc=MODE ...`; exits 0 only on pass.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
SMC_SCRIPT=smc-bench.sh
rounds=200
stream=1048576
expect=smcd
# shellcheck source=lib-smc.sh
source "$here/lib-smc.sh"
smc_option() {
    case "$1" in
        --rounds) rounds="$2" ;;
        --stream) stream="$2" ;;
        --expect) expect="$2" ;;
        *) return 1 ;;
    esac
}
smc_parse_args 24 "$@"
case "$expect" in smcd|any) ;; *) echo "--expect smcd|any" >&2; exit 2 ;; esac
[[ "$rounds" =~ ^[0-9]+$ && "$rounds" -gt 0 ]] || { echo "--rounds needs a positive number" >&2; exit 2; }
[[ "$stream" =~ ^[0-9]+$ && "$stream" -gt 0 ]] || { echo "--stream needs a positive number" >&2; exit 2; }

smc_preflight

start=$SECONDS
deadline=$((SECONDS + timeout_s))
smc_setup_work
guests=(a b)
declare -A tap mac addr
addr=([a]=192.168.117.1 [b]=192.168.117.2)
mac=([a]=52:54:00:16:01:0a [b]=52:54:00:16:01:0b)
port=7300 # TCP on port, AF_SMC on port+1
smc_setup_net "${guests[@]}"
echo "host: bridge $br, taps ${tap[a]} ${tap[b]}"
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"

# /smc-guest.sh ROLE ADDRESS PORT [B: SERVER ROUNDS STREAM]
cat >"$work/smc-guest.sh" <<'GUEST'
set -e
role="$1" addr="$2" port="$3"
shift 3
say() { echo "SMC-BENCH-$role $*"; }
# bench LABEL CMD...: CMD's lines as they come, prefixed, then `rc=STATUS` (the host checks it).
bench() {
    label="$1"
    shift
    { r=0; "$@" 2>&1 || r=$?; echo "rc=$r"; } | while IFS= read -r line; do say "$label$line"; done
}
modprobe virtio_ism
if [ -c /dev/ism0 ]; then say ism-device yes; else say ism-device no; fi
[ -r /sys/class/misc/ism0/smcd ] && say "smcd $(cat /sys/class/misc/ism0/smcd)"
if [ -x /bin/smc-ueid ]; then say "ueid: $(smc-ueid ISM-SMC-TEST 2>&1)"; fi
say "$(smc-check devices 2>&1)"
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
        bench "tcp: " smc-check -t bench-server "$port"
        bench "smc: " smc-check bench-server "$((port + 1))"
        ;;
    B)
        server="$1" rounds="$2" stream="$3"
        i=0
        until ping -c 1 -W 2 "$server" >/dev/null 2>&1; do
            i=$((i + 1))
            [ "$i" -lt 300 ] || { say "FAIL no ping answer from $server"; exit 1; }
            sleep 1
        done
        say ping ok "$server"
        bench "tcp: " smc-check -t bench-client "$server" "$port" "$rounds" "$stream"
        bench "smc: " smc-check bench-client "$server" "$((port + 1))" "$rounds" "$stream"
        ;;
esac
say done
GUEST
smc_build "$work/smc-guest.sh"
build_s=$((SECONDS - start))
guests_start=$SECONDS
smc_start_pool || { echo "the pool broker did not create $sock"; exit 1; }

declare -A gpid
smc_run_guest a yes "A ${addr[a]} $port" &
gpid[a]=$!
pids+=("${gpid[a]}")
smc_run_guest b yes "B ${addr[b]} $port ${addr[a]} $rounds $stream" &
gpid[b]=$!
pids+=("${gpid[b]}")
echo "guests: A and B booting (cloud-hypervisor, both with --ism); $rounds round trips, $stream stream bytes"

# cpu_ticks PID: "VCPU OTHER" clock ticks (utime+stime) of the process's vCPU threads and of
# all its other threads (device, event loop, ...).
cpu_ticks() {
    local v=0 o=0 f stat comm rest
    for f in /proc/"$1"/task/*/stat; do
        stat="$(cat "$f" 2>/dev/null)" || continue
        comm="${stat#*(}" comm="${comm%%)*}"
        rest="${stat##*) }"
        read -r -a fields <<<"$rest"
        # fields[0] is the state (field 3); utime and stime are fields 14 and 15.
        if [[ "$comm" == vcpu* ]]; then
            v=$((v + fields[11] + fields[12]))
        else
            o=$((o + fields[11] + fields[12]))
        fi
    done
    echo "$v $o"
}
vmm_pid() {
    pgrep -P "$1" 2>/dev/null | head -n1
}
# Samples at each of B's phase markers: samples[N]="PHASE-LINE|A_VCPU A_OTHER|B_VCPU B_OTHER".
samples=()
seen=0
pa="" pb=""
while kill -0 "${gpid[a]}" 2>/dev/null || kill -0 "${gpid[b]}" 2>/dev/null; do
    [[ -n "$pa" ]] || pa="$(vmm_pid "${gpid[a]}")"
    [[ -n "$pb" ]] || pb="$(vmm_pid "${gpid[b]}")"
    n="$(grep -ac "SMC-BENCH-PHASE" "$work/b.log" 2>/dev/null || true)"
    n="${n:-0}"
    if ((n > seen)) && [[ -n "$pa" && -n "$pb" ]]; then
        ta="$(cpu_ticks "$pa")" tb="$(cpu_ticks "$pb")"
        mapfile -t lines < <(grep -a "SMC-BENCH-PHASE" "$work/b.log" | sed 's/^SMC-BENCH-B //; s/\r$//')
        while ((seen < n)); do
            samples+=("${lines[$seen]}|$ta|$tb")
            seen=$((seen + 1))
        done
    fi
    sleep 0.2
done
declare -A rc
set +e
for g in "${guests[@]}"; do
    wait "${gpid[$g]}"
    rc[$g]=$?
done
set -e
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"
# The serial logs end their lines with CR LF.
sed -i 's/\r$//' "$work/a.log" "$work/b.log"

fails=()
for g in a b; do
    [[ "${rc[$g]}" == 0 ]] || fails+=("cloud-hypervisor of ${g^^} exited ${rc[$g]}")
    grep -aq "SMC-BENCH-${g^^} done" "$work/$g.log" || fails+=("guest ${g^^} did not finish")
    grep -aq "SMC-BENCH-${g^^} ism-device yes" "$work/$g.log" || fails+=("${g^^} has no /dev/ism0")
    for fam in tcp smc; do
        grep -aq "SMC-BENCH-${g^^} $fam: rc=0" "$work/$g.log" ||
            fails+=("${g^^}'s $fam benchmark did not pass")
    done
done
# field LINE KEY: the value of KEY=... in LINE.
field() {
    sed -n "s/.* $2=\([^ ]*\).*/\1/p" <<<"$1"
}
declare -A pp st proto
for fam in tcp smc; do
    line="$(grep -a "^SMC-BENCH-B $fam: SMC-BENCH proto=" "$work/b.log" | head -n1 || true)"
    pp[$fam]="$(field "$line" pingpong_us)"
    st[$fam]="$(field "$line" stream_MBps)"
    proto[$fam]="$(sed -n 's/.*SMC-BENCH proto=\([^ ]*\).*/\1/p' <<<"$line")"
done
mode_a="$(grep -ao "^SMC-BENCH-A smc: SMC-MODE [a-z]*" "$work/a.log" | head -n1 | sed 's/.*SMC-MODE //' || true)"
smc_label="AF_SMC (${proto[smc]:-none})"
[[ "${proto[smc]:-}" == smcd && "$mode_a" == smcd ]] && smc_label="SMC-D"
if [[ "$expect" == smcd && "$smc_label" != SMC-D ]]; then
    fails+=("the AF_SMC connection did not run over SMC-D on both ends (B: ${proto[smc]:-none}, A: ${mode_a:-none})")
fi

ratio() {
    [[ -n "$1" && -n "$2" ]] || { echo n/a; return; }
    awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "n/a" }'
}
echo
echo "## SMC-D against TCP/virtio-net, guests A and B, same run"
echo "PVM host: guest ring 0 is emulated (~1000x native), so BOTH columns are dominated by"
echo "emulated guest kernel code (socket calls, SMC/TCP stacks, interrupts), not by the data path."
echo "ratio = ${smc_label} / TCP (ping-pong: below 1x is faster; stream: above 1x is faster)"
echo
echo "| measure | $smc_label | TCP/virtio-net | ratio |"
echo "|---|---:|---:|---:|"
echo "| 64 B ping-pong (µs/round trip), $rounds rounds | ${pp[smc]:-n/a} | ${pp[tcp]:-n/a} | $(ratio "${pp[smc]:-}" "${pp[tcp]:-}") |"
echo "| 64 KiB stream (MB/s), $stream bytes | ${st[smc]:-n/a} | ${st[tcp]:-n/a} | $(ratio "${st[smc]:-}" "${st[tcp]:-}") |"
echo
echo "### What the data path costs"
echo "Guest SMC-D counters (/sys/class/misc/ism0/counters), A (server) + B (client), per unit:"
echo "| phase | per | moves | move_bytes | moves_deferred | signals | irqs |"
echo "|---|---|---:|---:|---:|---:|---:|"
chunks=$(((stream + 65535) / 65536))
for phase in pingpong stream; do
    la="$(grep -a "^SMC-BENCH-A smc: SMC-BENCH-COUNT bench-server $phase " "$work/a.log" | head -n1 || true)"
    lb="$(grep -a "^SMC-BENCH-B smc: SMC-BENCH-COUNT bench-client $phase " "$work/b.log" | head -n1 || true)"
    if [[ "$phase" == pingpong ]]; then div=$rounds per="round trip"; else div=$chunks per="64 KiB"; fi
    row="| $phase | $per |"
    for k in moves move_bytes moves_deferred signals irqs; do
        va="$(field "$la" "$k")" vb="$(field "$lb" "$k")"
        row+=" $(awk -v a="${va:-0}" -v b="${vb:-0}" -v d="$div" 'BEGIN { printf "%.2f", (a + b) / d }') |"
    done
    echo "$row"
done
echo
echo "Host CPU of both cloud-hypervisor processes per unit (ms; clock ticks of 1/$(getconf CLK_TCK) s,"
echo "sampled at B's phase markers with 0.2 s polling): vCPU threads (mostly the emulated guest"
echo "kernel) and the other threads (virtio-net, virtio-ism and event-loop work in the VMM)."
echo "| phase | per | vCPU ms | other ms |"
echo "|---|---|---:|---:|"
hz="$(getconf CLK_TCK)"
# sample_of LABEL: the sample whose marker line is LABEL.
sample_of() {
    local s
    for s in "${samples[@]}"; do
        [[ "${s%%|*}" == "$1" ]] && { echo "$s"; return 0; }
    done
    return 0
}
for fam in tcp smc; do
    for phase in pingpong stream; do
        b0="$(sample_of "$fam: SMC-BENCH-PHASE begin $phase")"
        e0="$(sample_of "$fam: SMC-BENCH-PHASE end $phase")"
        [[ -n "$b0" && -n "$e0" ]] || { echo "| $fam $phase | | n/a | n/a |"; continue; }
        if [[ "$phase" == pingpong ]]; then div=$rounds per="round trip"; else div=$chunks per="64 KiB"; fi
        read -r bav bao <<<"$(cut -d'|' -f2 <<<"$b0")"
        read -r bbv bbo <<<"$(cut -d'|' -f3 <<<"$b0")"
        read -r eav eao <<<"$(cut -d'|' -f2 <<<"$e0")"
        read -r ebv ebo <<<"$(cut -d'|' -f3 <<<"$e0")"
        name="TCP/virtio-net"
        [[ "$fam" == smc ]] && name="$smc_label"
        awk -v v=$((eav - bav + ebv - bbv)) -v o=$((eao - bao + ebo - bbo)) -v d="$div" -v hz="$hz" \
            -v n="$name $phase" -v p="$per" \
            'BEGIN { printf "| %s | %s | %.2f | %.2f |\n", n, p, v * 1000 / hz / d, o * 1000 / hz / d }'
    done
done
echo "Samples (marker|A vCPU A other|B vCPU B other, ticks): $(printf '%s; ' "${samples[@]}")"
echo
echo "load average before: $load_before, after: $load_after ($(nproc) CPUs)"
echo "elapsed $((SECONDS - start)) s (build $build_s s, guests $((SECONDS - guests_start)) s)"
if [[ ${#fails[@]} -eq 0 ]]; then
    result=pass
else
    result=fail
    printf 'FAIL: %s\n' "${fails[@]}"
    for g in a b; do
        echo "--- last lines of ${g^^}"; tail -n 20 "$work/$g.log" 2>/dev/null || true
        echo "--- cloud-hypervisor of ${g^^}"; tail -n 10 "$work/$g.vmm.log" 2>/dev/null || true
    done
    ((SECONDS < deadline)) || echo "timed out: the ${timeout_s} s budget ran out"
fi
echo "ISM-LINUX-SMC-BENCH result=$result smc=${proto[smc]:-none}/${mode_a:-none} rounds=$rounds stream=$stream pingpong_us=${pp[smc]:-n/a}/${pp[tcp]:-n/a} stream_MBps=${st[smc]:-n/a}/${st[tcp]:-n/a}"
[[ "$result" == pass ]]
