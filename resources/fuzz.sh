#!/usr/bin/env bash
# Runs every fuzz target for a bounded time: resources/fuzz.sh [SECONDS_PER_TARGET]
#
# cargo-fuzz wants nightly for AddressSanitizer (-Zsanitizer). The installed toolchain is
# stable, so RUSTC_BOOTSTRAP=1 lets stable rustc accept those flags; the sanitizer runtime
# ships with the stable x86_64-unknown-linux-gnu standard library.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
export PATH="$HOME/.cargo/bin:$PATH"
export RUSTC_BOOTSTRAP=1
for target in $(cargo fuzz list); do
    echo "fuzz: $target for ${secs}s"
    mkdir -p "corpus/$target"
    # Work in a scratch copy so new inputs don't clutter the committed seeds.
    work=$(mktemp -d)
    cp -r "corpus/$target/." "$work/"
    cargo fuzz run "$target" "$work" -- -max_total_time="$secs" -rss_limit_mb=4096 2>&1 | tail -n 5
    rm -rf "$work"
done
