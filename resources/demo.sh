#!/usr/bin/env bash
# The demo: two guests in two VMM processes share one memory region through an ism-pool
# broker. Guest A allocates a region, writes a greeting and grants it to B; B attaches it,
# reads the greeting, writes a reply and kicks A's doorbell; A takes the interrupt and reads
# the reply. Installs what is missing, builds, runs, and cleans everything up on exit.
#
# Usage: bash resources/demo.sh [--vmm ism-vmm|cloud-hypervisor]
#   ism-vmm (default): about a minute on a fresh clone.
#   cloud-hypervisor: patched cloud-hypervisor from resources/cloud-hypervisor.sh (built once,
#   about 5-10 minutes; needs its source, see docs/cloud-hypervisor.md).
# Needs /dev/kvm.
set -euo pipefail

vmm_kind=ism-vmm
while [ $# -gt 0 ]; do
    case "$1" in
        --vmm) vmm_kind=${2:-}; shift 2 ;;
        --vmm=*) vmm_kind=${1#--vmm=}; shift ;;
        *) echo "usage: $0 [--vmm ism-vmm|cloud-hypervisor]" >&2; exit 2 ;;
    esac
done
case "$vmm_kind" in
    ism-vmm | cloud-hypervisor) ;;
    *) echo "demo: --vmm must be ism-vmm or cloud-hypervisor, not '$vmm_kind'" >&2; exit 2 ;;
esac

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

say() { printf '\033[1m%s\033[0m\n' "$*"; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
    die "/dev/kvm missing or not accessible: the demo needs KVM"
fi

say "== 1. Setup and build"
bash resources/setup.sh
cargo build --quiet -p ism-vmm -p ism-pool
target="${CARGO_TARGET_DIR:-$repo/target}"
vmm="$target/debug/ism-vmm"
pool="$target/debug/ism-pool"
# The freestanding test guest is its own cargo workspace with its own flags and target dir.
(cd tests/guest && env -u CARGO_TARGET_DIR -u RUSTFLAGS cargo build --quiet --release)
guest="$repo/tests/guest/target/x86_64-unknown-linux-gnu/release/ism-test-guest"
if [ "$vmm_kind" = cloud-hypervisor ]; then
    # Prints the directory of the cached build last; dies with what to set when it cannot.
    ch_dir="$(bash resources/cloud-hypervisor.sh | tail -n 1)"
    vmm="$ch_dir/cloud-hypervisor"
    command -v python3 >/dev/null || die "python3 is needed to find cloud-hypervisor's serial pty"
fi
for f in "$vmm" "$pool" "$guest"; do [ -x "$f" ] || die "missing $f after the build"; done

work="$(mktemp -d /tmp/ism-demo.XXXXXX)"
pids=()
cleanup() {
    local status=$?
    exec 3>&- 4>&- 2>/dev/null || true
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ "$status" -ne 0 ]; then
        for f in "$work"/*.out "$work"/*.err; do
            [ -s "$f" ] && { echo "--- $f"; tail -n 20 "$f"; }
        done
    fi
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "== 2. Start the ism-pool broker"
"$pool" --socket "$work/pool.sock" --size 256M 2>"$work/pool.err" &
pids+=($!)
for _ in $(seq 100); do [ -S "$work/pool.sock" ] && break; sleep 0.1; done
[ -S "$work/pool.sock" ] || die "the broker did not start"
echo "broker listening on $work/pool.sock"

# cloud-hypervisor reads serial input only from a terminal: its serial console is a pty,
# whose path its API reports (vm.info), read with cat and written through a descriptor.
serial_pty() {
    python3 -c '
import json, socket, sys, time
for _ in range(600):
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(sys.argv[1])
        s.sendall(b"GET /api/v1/vm.info HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += s.recv(65536)
        head, _, body = reply.partition(b"\r\n\r\n")
        length = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
        while len(body) < length:
            body += s.recv(65536)
        print(json.loads(body)["config"]["serial"]["file"])
        break
    except (OSError, ValueError, IndexError, KeyError):
        time.sleep(0.05)
else:
    sys.exit("no serial pty in vm.info at " + sys.argv[1])
' "$1"
}

# start_guest NAME FD: boot the test guest in ism mode; its serial input is opened on file
# descriptor FD (a FIFO to ism-vmm's stdin, or cloud-hypervisor's pty), its serial output
# goes to $work/NAME.out.
start_guest() {
    local name=$1 fd=$2
    local ism="id=ism0,size=64M,chunk_size=4K,pool=$work/pool.sock"
    if [ "$vmm_kind" = cloud-hypervisor ]; then
        "$vmm" --kernel "$guest" --cmdline "ism.test=ism" --cpus boot=1 --memory size=128M \
            --serial pty --console off --api-socket "$work/$name.api" --ism "$ism" \
            </dev/null >"$work/$name.err" 2>&1 &
        pids+=($!)
        local pty
        pty="$(serial_pty "$work/$name.api")" || die "guest $name: no serial pty"
        # cat ends with EIO when the VM powers off and the pty goes away.
        cat "$pty" >"$work/$name.out" 2>/dev/null &
        pids+=($!)
        eval "exec $fd>\"$pty\""
        echo 0 >"$work/$name.seq"
        return 0
    else
        mkfifo "$work/$name.in"
        "$vmm" --kernel "$guest" --cmdline "ism.test=ism" --cpus boot=1 --memory size=128M \
            --serial tty --ism "$ism" \
            <"$work/$name.in" >"$work/$name.out" 2>"$work/$name.err" &
        pids+=($!)
    fi
    eval "exec $fd>\"$work/$name.in\""
    echo 0 >"$work/$name.seq"
}

# wait_for NAME PATTERN: print the first `ISM-TEST` line of NAME matching PATTERN (60 s max).
wait_for() {
    local name=$1 pattern=$2 line
    for _ in $(seq 600); do
        # Only whole lines: the guest ends each with \r\n, so a line still being written
        # has no \r yet.
        line="$(grep -a -m1 -E "ISM-TEST .*$pattern.*"$'\r' "$work/$name.out" || true)"
        if [ -n "$line" ]; then
            printf '%s\n' "${line#*ISM-TEST }" | tr -d '\r'
            return 0
        fi
        grep -a -q -E 'ISM-TEST (panic|fault|error)=' "$work/$name.out" && break
        sleep 0.1
    done
    die "guest $name: no line matching '$pattern'"
}

# run NAME FD COMMAND...: send one command to a guest and print its answer line.
run() {
    local name=$1 fd=$2 seq answer
    shift 2
    seq=$(($(cat "$work/$name.seq") + 1))
    echo "$seq" >"$work/$name.seq"
    printf '%s\n' "$*" >&"$fd"
    answer="$(wait_for "$name" "seq=$seq cmd=")"
    case "$answer" in
        *status=ok*) printf '%s\n' "$answer" ;;
        *) die "guest $name: '$*' failed: $answer" ;;
    esac
}

# field KEY LINE: the value of KEY=... in LINE.
field() { printf '%s\n' "$2" | tr ' ' '\n' | sed -n "s/^$1=//p" | head -n1; }

say "== 3. Boot guests A and B, each in its own $vmm_kind process"
start_guest A 3
start_guest B 4
ready_a="$(wait_for A 'ism=ready')"
ready_b="$(wait_for B 'ism=ready')"
devid_b="$(field devid "$ready_b")"
echo "A: virtio-ism device ready, group $(field gid "$ready_a"), device id $(field devid "$ready_a")"
echo "B: virtio-ism device ready, group $(field gid "$ready_b"), device id $devid_b"

say "== 4. A allocates a region, writes a greeting, grants it to B"
alloc="$(run A 3 alloc 64K)"
token="$(field token "$alloc")"
echo "A: allocated region $token ($(field size "$alloc") bytes)"
run A 3 write "$token" 0 hello-from-A >/dev/null
echo "A: wrote \"hello-from-A\" at offset 0"
run A 3 grant "$token" "$devid_b" rwa >/dev/null
echo "A: granted read/write/attach to device $devid_b (B)"
run A 3 bind "$token" >/dev/null
echo "A: bound an MSI-X vector to the region's doorbell"

say "== 5. B attaches the region with the token it was given and reads it"
attach="$(run B 4 attach "$token" rw)"
echo "B: attached $token, writable=$(field writable "$attach")"
read_b="$(run B 4 read "$token" 0 12)"
echo "B: read \"$(field text "$read_b")\" (bytes $(field read "$read_b"))"
[ "$(field text "$read_b")" = hello-from-A ] || die "B did not see A's bytes"

say "== 6. B writes a reply and kicks the doorbell; A takes the interrupt and reads it"
run B 4 write "$token" 4096 reply-from-B >/dev/null
echo "B: wrote \"reply-from-B\" at offset 4096"
run B 4 kick "$token" >/dev/null
echo "B: kicked the region's doorbell"
kick="$(run A 3 wait-kick 1)"
[ "$(field seen "$kick")" = true ] || die "A saw no kick: $kick"
echo "A: kick interrupt received (kicks=$(field kicks "$kick"))"
read_a="$(run A 3 read "$token" 4096 12)"
echo "A: read \"$(field text "$read_a")\""
[ "$(field text "$read_a")" = reply-from-B ] || die "A did not see B's reply"

say "== 7. The broker's view"
"$pool" status --socket "$work/pool.sock"

say "== 8. Power off"
run B 4 poweroff >/dev/null
run A 3 poweroff >/dev/null
echo "both guests powered off; the demo worked"
