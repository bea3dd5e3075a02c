#!/usr/bin/env bash
# CI step: the two-Linux-guest test (pair-test.sh), once, in a bounded time.
# pair-test.sh builds (or takes from ~/.cache/ism) the PVM kernel, installs virtio_ism.ko into
# the two images with `make install` and `dkms install`, boots both guests on one ism-pool and
# checks modprobe, grants, the pattern, the refused writes and the kick.
#
# Usage: ci-linux-guests.sh [BUDGET_SECONDS]   (default $ISM_LINUX_GUESTS_BUDGET or 2400)
# The budget bounds everything, the kernel build of a fresh cache included. Prints the time
# taken. Exit 0 on pass; non-zero on any failure, a run that did not fit in the budget
# included (said loudly). A run that failed because a guest program died of SIGSEGV (the
# PVM-host flake, docs/linux-guests.md) is retried once, loudly, if 15 minutes are left.
# Without /dev/kvm: one SKIPPED line, exit 0.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
budget="${1:-${ISM_LINUX_GUESTS_BUDGET:-2400}}"

if [[ ! -e /dev/kvm ]]; then
    echo "!!!!! SKIPPED: /dev/kvm missing: the two-Linux-guest test (pair-test.sh) did not run !!!!!"
    exit 0
fi

start=$SECONDS
last_rc=0
log="$(mktemp)"
trap 'rm -f "$log"' EXIT

# attempt SECONDS: one pair-test.sh run bounded by SECONDS; its output goes to the console and
# to $log. pair-test's own deadline bounds the guests; timeout(1) bounds the builds before
# them too, and a minute of margin lets pair-test report its own timeout (with the guests'
# logs) first.
attempt() {
    local limit="$1" rc
    set +e
    timeout -k 30 "$limit" bash "$here/pair-test.sh" --timeout "$((limit > 120 ? limit - 60 : limit))" 2>&1 |
        tee "$log"
    rc=${PIPESTATUS[0]}
    set -e
    last_rc="$rc"
    [[ "$rc" == 0 ]] && grep -q "^ISM-LINUX-PAIR result=pass" "$log"
}

# A guest program killed by SIGSEGV: the PVM-host flake of docs/linux-guests.md ("busybox
# segfaults"), recognised by the kernel's own report or by a guest script dying of signal 11.
guest_crashed() {
    grep -aq "ISM-LINUX kmsg .*segfault\|ISM-LINUX command exit=139" "$log"
}

report_failure() {
    local elapsed=$((SECONDS - start))
    # 124/137: timeout(1) stopped pair-test.sh itself (e.g. in a build step).
    if [[ "$last_rc" == 124 || "$last_rc" == 137 ]] || grep -q "timed out" "$log"; then
        echo "!!!!! Linux pair test DID NOT FIT: stopped after $elapsed s (budget $budget s); see the log above !!!!!"
    else
        echo "!!!!! Linux pair test FAILED after $elapsed s; see the log above !!!!!"
    fi
}

if attempt "$budget"; then
    echo "Linux pair test: PASSED in $((SECONDS - start)) s (budget $budget s)"
    exit 0
fi
# One retry, only for that crash, only if at least 15 minutes are left, and said loudly: a
# functional failure (a wrong pattern, a write let through, a lost kick) is never retried.
left=$((budget - (SECONDS - start)))
if guest_crashed && ((left >= 900)); then
    echo "!!!!! Linux pair test: a guest program crashed with SIGSEGV after $((SECONDS - start)) s:"
    grep -a "ISM-LINUX kmsg\|ISM-LINUX command exit=139" "$log" | sed 's/^/!!!!!   /'
    echo "!!!!! the known PVM-host flake (docs/linux-guests.md); retrying ONCE with $left s left !!!!!"
    if attempt "$left"; then
        echo "Linux pair test: PASSED on the retry after a guest SIGSEGV, $((SECONDS - start)) s in all (budget $budget s)"
        exit 0
    fi
fi
report_failure
exit 1
