# Shared steps of the SMC scripts (smc-test.sh, smc-bench.sh): PVM Linux guests under
# cloud-hypervisor on a host bridge with one tap per guest, an ism-pool broker, and one image
# with virtio_ism, smc-check and smc-ueid. Source it after setting `here` (guest-driver/linux),
# `root` (the repository) and SMC_SCRIPT (the caller's name, for messages); the caller keeps
# its own arguments, guest script and checks.
#
# smc_parse_args HELP_END ARG...
#                            the options both scripts take, with their defaults:
#                            --vmm (and --vmm=; cloud-hypervisor), --pool (built), --timeout
#                            (1500 s), --keep-logs (none), -h/--help (prints the caller's header
#                            comment, lines 2 to HELP_END); any other option with its value
#                            goes to the caller's `smc_option NAME VALUE`, which returns
#                            non-zero for an option it does not know
# smc_skip MESSAGE...        prints "SKIPPED: MESSAGE" and exits 0
# smc_preflight              skips without /dev/kvm, root, /dev/net/tun or `ip`; sources
#                            lib-vmtest.sh and lib-install.sh; refuses ism-vmm and skips on a
#                            missing --vmm path ($vmm)
# smc_setup_work             makes $work, the arrays pids and links, and the EXIT trap
#                            (stops every pid in pids, deletes the links, copies the logs to
#                            $keep when set)
# smc_setup_net GUEST...     the bridge $br and a tap per guest (tap[GUEST]), named after $$
# smc_build GUEST_SCRIPT     picks and builds (vmtest_build), checks the kernel's SMC options,
#                            installs the module into $work/root, builds ism-pool ($pool_bin
#                            when empty), smc-check and smc-ueid, and $work/guest.cpio with
#                            GUEST_SCRIPT as /smc-guest.sh
# smc_start_pool             starts the broker on $work/pool.sock (returns 1 when it does not
#                            come up)
# smc_run_guest SIDE ISM(yes|no) ARGS
#                            replaces the (sub)shell with cloud-hypervisor running the image
#                            with `sh /smc-guest.sh ARGS`; serial output to $work/SIDE.log,
#                            cloud-hypervisor's to $work/SIDE.vmm.log; limit: $deadline
# shellcheck shell=bash disable=SC2034,SC2154

smc_parse_args() {
    local help_end=$1
    shift
    vmm="cloud-hypervisor"
    pool_bin=""
    timeout_s=1500
    keep=""
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --vmm=*) vmm="${1#--vmm=}"; shift; continue ;;
            -h|--help) sed -n "2,${help_end}p" "$here/$SMC_SCRIPT"; exit 0 ;;
        esac
        [[ $# -ge 2 ]] || { echo "$1 needs a value" >&2; exit 2; }
        case "$1" in
            --vmm) vmm="$2" ;;
            --pool) pool_bin="$2" ;;
            --timeout) timeout_s="$2" ;;
            --keep-logs) keep="$2" ;;
            *) smc_option "$1" "$2" || { echo "Unknown argument $1" >&2; exit 2; } ;;
        esac
        shift 2
    done
}

smc_skip() {
    echo "SKIPPED: $*"
    exit 0
}

smc_preflight() {
    [[ -e /dev/kvm ]] || smc_skip "/dev/kvm missing, cannot boot the Linux guests of $SMC_SCRIPT"
    [[ "$(id -u)" == 0 ]] || smc_skip "$SMC_SCRIPT needs root for the host bridge and taps"
    [[ -c /dev/net/tun ]] || smc_skip "/dev/net/tun missing: no taps for $SMC_SCRIPT"
    command -v ip >/dev/null || smc_skip "iproute2's ip missing: no bridge and taps for $SMC_SCRIPT"
    # shellcheck source=lib-vmtest.sh
    source "$here/lib-vmtest.sh"
    # shellcheck source=lib-install.sh
    source "$here/lib-install.sh"
    case "$vmm" in
        ism-vmm) echo "$SMC_SCRIPT needs cloud-hypervisor: ism-vmm has no virtio-net" >&2; exit 2 ;;
    esac
    # A path must name an existing binary: anything else is "not available here".
    if [[ "$vmm" == */* && ! -x "$vmm" ]]; then
        smc_skip "cloud-hypervisor binary $vmm missing"
    fi
}

# shellcheck disable=SC2317  # run by the EXIT trap
smc_cleanup() {
    local pid link
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    # Taps first, then the bridge (deleting a tap also takes it off the bridge).
    for link in "${links[@]}"; do
        ip link del "$link" 2>/dev/null || true
    done
    if [[ -n "$keep" ]]; then
        { mkdir -p "$keep" && cp "$work"/*.log "$keep/"; } 2>/dev/null || true
    fi
    rm -rf "$work"
}

smc_setup_work() {
    work="$(mktemp -d)"
    pids=()
    links=()
    trap smc_cleanup EXIT
    trap 'exit 1' INT TERM
}

# Host network: a bridge with no address (guest traffic stays on it) and one tap per guest,
# made before cloud-hypervisor opens them by name. Interface names are at most 15 bytes.
smc_setup_net() {
    local g t
    br="ismbr$$"
    ip link add "$br" type bridge forward_delay 0 stp_state 0 2>"$work/net.log" ||
        smc_skip "cannot create a Linux bridge ($(head -n1 "$work/net.log"))"
    links+=("$br")
    ip link set "$br" up
    declare -gA tap
    for g in "$@"; do
        t="ismt$$$g"
        ip tuntap add name "$t" mode tap 2>>"$work/net.log" ||
            smc_skip "cannot create tap $t ($(tail -n1 "$work/net.log"))"
        links=("$t" "${links[@]}")
        ip link set "$t" master "$br"
        ip link set "$t" up
        tap[$g]="$t"
    done
}

smc_build() {
    local guest_script="$1" release extra=()
    vmtest_pick_vmm "$vmm" 2>"$work/pick.log" ||
        smc_skip "no cloud-hypervisor binary ($(tail -n1 "$work/pick.log"))"
    [[ "$VMTEST_VMM_KIND" == cloud-hypervisor ]] ||
        { echo "$SMC_SCRIPT needs cloud-hypervisor (--vmm), not $VMTEST_VMM" >&2; exit 2; }
    vmtest_build "$work" "$VMTEST_VMM"
    echo "VMM: $VMTEST_VMM ($("$VMTEST_VMM" --version 2>&1 | head -n 1))"
    release="$(install_release "$PVM_KERNEL_TREE")"
    [[ -n "$release" ]] || { echo "No kernel release in $PVM_KERNEL_TREE"; exit 1; }
    if ! grep -q '^CONFIG_SMC=y' "$PVM_KERNEL_TREE/.config" ||
        ! grep -q '^CONFIG_SMC_DIAG=y' "$PVM_KERNEL_TREE/.config"; then
        echo "the PVM kernel in $PVM_KERNEL_TREE has no CONFIG_SMC/CONFIG_SMC_DIAG (resources/linux/pvm-guest.config)"
        exit 1
    fi
    install_kernel_modules_meta "$PVM_KERNEL_TREE" "$work/root"
    install_with_make "$PVM_KERNEL_TREE" "$work/root" "$work/install.log"
    install_check "$work/root" "$release" extra
    if [[ -z "$pool_bin" ]]; then
        (cd "$root" && cargo build -q -p ism-pool --bin ism-pool)
        pool_bin="${CARGO_TARGET_DIR:-$root/target}/debug/ism-pool"
    fi
    gcc -static -O2 -Wall -Wextra -Werror -o "$work/smc-check" "$here/tests/smc-check.c"
    # SMC-Dv2 between x86 guests needs the same user EID on both (docs/smc.md, where the
    # module's SMC-D part exists): tests/smc-ueid.c adds it, when the tree has it.
    if [[ -f "$here/tests/smc-ueid.c" ]]; then
        gcc -static -O2 -Wall -Wextra -Werror -o "$work/smc-ueid" "$here/tests/smc-ueid.c"
        extra+=(--add "$work/smc-ueid:/bin/smc-ueid")
    fi
    bash "$root/resources/linux/make-initramfs.sh" --output "$work/guest.cpio" --uncompressed \
        --root "$work/root" --add "$work/smc-check:/bin/smc-check" \
        --add "$guest_script:/smc-guest.sh" "${extra[@]}" >&2
}

smc_start_pool() {
    sock="$work/pool.sock"
    "$pool_bin" --socket "$sock" --size 256M >"$work/pool.log" 2>&1 &
    pids+=("$!")
    for _ in $(seq 100); do
        [[ -S "$sock" ]] && break
        sleep 0.1
    done
    [[ -S "$sock" ]]
}

smc_run_guest() {
    local side="$1" with_ism="$2" args="$3" ism=()
    [[ "$with_ism" == yes ]] && ism=(--ism "id=ism0,size=16M,chunk_size=64K,pool=$sock")
    vmtest_exec_vmm $((deadline - SECONDS > 1 ? deadline - SECONDS : 1)) \
        "$work/$side.log" "$work/$side.vmm.log" \
        --kernel "$PVM_VMLINUX" --initramfs "$work/guest.cpio" \
        --cmdline "$VMTEST_PVM_CMDLINE -- sh /smc-guest.sh $args" --cpus boot=1 --memory size=256M \
        --net "tap=${tap[$side]},mac=${mac[$side]}" "${ism[@]}"
}
