#!/usr/bin/env bash
# CI step: the two-Linux-guest test (pair-test.sh), once, in a bounded time.
# pair-test.sh builds (or takes from ~/.cache/ism) the PVM kernel, installs virtio_ism.ko into
# the two images with `make install` and `dkms install`, boots both guests on one ism-pool and
# checks modprobe, grants, the pattern, the refused writes and the kick.
#
# Usage: ci-linux-guests.sh [BUDGET_SECONDS]   (default $ISM_LINUX_GUESTS_BUDGET or 2400)
# The budget bounds everything, the kernel build of a fresh cache included. Prints the time
# taken. Exit 0 on pass; non-zero on any failure, a run that did not fit in the budget
# included (said loudly). Without /dev/kvm: one SKIPPED line, exit 0.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
budget="${1:-${ISM_LINUX_GUESTS_BUDGET:-2400}}"

if [[ ! -e /dev/kvm ]]; then
    echo "!!!!! SKIPPED: /dev/kvm missing: the two-Linux-guest test (pair-test.sh) did not run !!!!!"
    exit 0
fi

start=$SECONDS
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
# pair-test.sh's own deadline bounds the guests; timeout(1) bounds the builds before them too.
# A minute of margin lets pair-test report its own timeout (with the guests' logs) first.
set +e
timeout -k 30 "$budget" bash "$here/pair-test.sh" --timeout "$((budget > 120 ? budget - 60 : budget))" 2>&1 |
    tee "$log"
rc=${PIPESTATUS[0]}
set -e
elapsed=$((SECONDS - start))

if [[ "$rc" == 0 ]] && grep -q "^ISM-LINUX-PAIR result=pass" "$log"; then
    echo "Linux pair test: PASSED in $elapsed s (budget $budget s)"
    exit 0
fi
if [[ "$rc" == 124 || "$rc" == 137 ]] || grep -q "timed out" "$log"; then
    echo "!!!!! Linux pair test DID NOT FIT: stopped after $elapsed s (budget $budget s); see the log above !!!!!"
else
    echo "!!!!! Linux pair test FAILED after $elapsed s (exit $rc); see the log above !!!!!"
fi
exit 1
