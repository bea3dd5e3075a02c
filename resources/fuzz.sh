#!/usr/bin/env bash
# Fuzzing (docs/fuzzing.md). Three modes:
#
#   resources/fuzz.sh [SECONDS]                  CI's short pass: every target for SECONDS
#                                                (default 60), from a scratch copy of its
#                                                committed seeds.
#   resources/fuzz.sh --long [SECONDS] [TARGET...]
#                                                A long campaign: each TARGET (default all) for
#                                                SECONDS (default 3600), one after the other,
#                                                with a corpus kept across runs in
#                                                $ISM_FUZZ_CACHE/<target> (default
#                                                ~/.cache/ism/fuzz) and crash inputs in
#                                                $ISM_FUZZ_CACHE/artifacts/<target>/.
#                                                ISM_FUZZ_RUNS=N stops each target after N
#                                                executions (libFuzzer -runs) if that comes
#                                                first; the summary gives the seconds taken.
#   resources/fuzz.sh --check-reset TARGET [DIR] Runs every input of DIR (default the long
#                                                campaign's corpus, else the seeds) once in one
#                                                process and once each on its own, and compares
#                                                what the target reports of each (ISM_FUZZ_DEBUG
#                                                digests): state left by one input would show.
#                                                ISM_FUZZ_CHECK_MAX bounds the inputs checked.
#
# Both fuzzing modes print, per target, the executions, exec/s, coverage (libFuzzer's cov:
# edges and ft: features) and crashes, and exit non-zero if any target crashed, leaked,
# timed out or ran out of memory. Run long campaigns niced: nice -n 19 resources/fuzz.sh --long
#
# cargo-fuzz wants nightly for AddressSanitizer (-Zsanitizer). The installed toolchain is
# stable, so RUSTC_BOOTSTRAP=1 lets stable rustc accept those flags; the sanitizer runtime
# ships with the stable x86_64-unknown-linux-gnu standard library.
set -euo pipefail
script=$(realpath "$0")
cd "$(dirname "$script")/../fuzz"
export PATH="$HOME/.cargo/bin:$PATH"
export RUSTC_BOOTSTRAP=1

mode=short
case "${1:-}" in
--long)
    mode=long
    shift
    ;;
--check-reset)
    mode=check
    shift
    ;;
-h | --help)
    sed -n '2,/^set -euo/p' "$script" | sed '$d; s/^# \{0,1\}//'
    exit 0
    ;;
esac

cache=${ISM_FUZZ_CACHE:-$HOME/.cache/ism/fuzz}
# One input taking longer than this is a hang; libFuzzer reports it as a crash.
timeout=${ISM_FUZZ_TIMEOUT:-10}
rss_limit=${ISM_FUZZ_RSS_MB:-4096}
bin_dir=target/x86_64-unknown-linux-gnu/release

# "label value" lines from a libFuzzer log: executions, exec/s, coverage, peak rss.
summarise() {
    local log=$1
    local execs rate last
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -n 1)
    last=$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
    corp=$(sed -n 's/.* corp: \([0-9]*\).*/\1/p' <<<"$last")
    echo "execs=${execs:-?} exec/s=${rate:-?} cov=${cov:-?} ft=${ft:-?} corpus=${corp:-?} rss_mb=${rss:-?}"
}

if [ "$mode" = check ]; then
    target=${1:?usage: resources/fuzz.sh --check-reset TARGET [DIR]}
    dir=${2:-}
    if [ -z "$dir" ]; then
        if [ -d "$cache/$target" ] && [ -n "$(ls -A "$cache/$target")" ]; then
            dir=$cache/$target
        else
            dir=corpus/$target
        fi
    fi
    if ! out=$(cargo fuzz build "$target" 2>&1); then
        echo "$out"
        exit 1
    fi
    bin=$bin_dir/$target
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    # -detect_leaks=0: libFuzzer would run again, under LeakSanitizer, every input that
    # allocates more than it frees (the first one builds the fixture).
    digests() { grep -E '^(Running: |ISM_FUZZ_DIGEST)' | sed 's|^Running: .*/|Running: |'; }
    # ISM_FUZZ_CHECK_MAX bounds how many inputs (a process each) are checked.
    mapfile -t inputs < <(find "$dir" -maxdepth 1 -type f | sort | head -n "${ISM_FUZZ_CHECK_MAX:-1000000}")
    echo "check-reset: $target, ${#inputs[@]} inputs from $dir"
    [ "${#inputs[@]}" -gt 0 ] || exit 0
    # Together, in one process (batches keep the command line short).
    printf '%s\0' "${inputs[@]}" |
        ISM_FUZZ_DEBUG=1 xargs -0 -n 500 "$bin" -rss_limit_mb="$rss_limit" -detect_leaks=0 2>&1 | digests >"$work/together"
    # One process each.
    for input in "${inputs[@]}"; do
        ISM_FUZZ_DEBUG=1 "$bin" -rss_limit_mb="$rss_limit" -detect_leaks=0 "$input" 2>&1 | digests
    done >"$work/alone"
    if ! grep -q ISM_FUZZ_DIGEST "$work/alone"; then
        echo "check-reset: $target prints no digests (it keeps no state across inputs)"
        exit 0
    fi
    if diff -u "$work/alone" "$work/together" >"$work/diff"; then
        echo "check-reset: $target: every input behaves the same after the others as on its own"
    else
        echo "check-reset: $target: inputs behave differently after others (- alone, + together):"
        head -n 60 "$work/diff"
        exit 1
    fi
    exit 0
fi

if [ "$mode" = long ]; then
    secs=3600
    if [[ "${1:-}" =~ ^[0-9]+$ ]]; then
        secs=$1
        shift
    fi
else
    secs=${1:-60}
    shift || true
fi
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

failed=()
summary=()
for target in "${targets[@]}"; do
    log=$(mktemp)
    if [ "$mode" = long ]; then
        corpus=$cache/$target
        artifacts=$cache/artifacts/$target
        mkdir -p "$corpus" "$artifacts"
        # New inputs go to the first directory; the committed seeds are read every time.
        mkdir -p "corpus/$target"
        dirs=("$corpus" "corpus/$target")
        echo "fuzz --long: $target for ${secs}s, corpus $corpus"
    else
        # Work in a scratch copy so new inputs don't clutter the committed seeds.
        work=$(mktemp -d)
        artifacts=$work/artifacts
        mkdir -p "$artifacts" "$work/corpus" "corpus/$target"
        cp -r "corpus/$target/." "$work/corpus/"
        dirs=("$work/corpus")
        echo "fuzz: $target for ${secs}s"
    fi
    status=0
    runs=()
    if [ -n "${ISM_FUZZ_RUNS:-}" ]; then
        runs=(-runs="$ISM_FUZZ_RUNS")
    fi
    # Built first, so the time below is the fuzzing alone.
    cargo fuzz build "$target" >"$log" 2>&1 || { cat "$log"; exit 1; }
    started=$SECONDS
    cargo fuzz run "$target" "${dirs[@]}" -- \
        -max_total_time="$secs" "${runs[@]}" -rss_limit_mb="$rss_limit" -timeout="$timeout" \
        -print_final_stats=1 -artifact_prefix="$artifacts/" >"$log" 2>&1 || status=$?
    took=$((SECONDS - started))
    crashes=$(find "$artifacts" -maxdepth 1 -type f \( -name 'crash-*' -o -name 'leak-*' \
        -o -name 'timeout-*' -o -name 'oom-*' \) | wc -l)
    line="$target: $(summarise "$log") seconds=$took crashes=$crashes"
    if [ "$status" -ne 0 ] || [ "$crashes" -ne 0 ]; then
        failed+=("$target")
        line="$line FAILED (exit $status)"
        # The report: what failed and where the input is.
        grep -E -A 30 '^(==[0-9]+==|thread .* panicked|SUMMARY|ERROR:)' "$log" | head -n 60 || tail -n 40 "$log"
        find "$artifacts" -maxdepth 1 -type f -printf 'artifact: %p\n' | head -n 5
    fi
    echo "  $line"
    summary+=("$line")
    rm -f "$log"
    if [ "$mode" = short ]; then
        # Keep what failed where cargo-fuzz keeps it (ignored by git).
        if [ "$crashes" -ne 0 ]; then
            mkdir -p "artifacts/$target"
            cp "$artifacts"/* "artifacts/$target/"
            echo "  crash inputs copied to fuzz/artifacts/$target/"
        fi
        rm -rf "$work"
    fi
done

echo "fuzz summary ($mode, ${secs}s per target):"
printf '  %s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz: FAILED: ${failed[*]}"
    exit 1
fi
