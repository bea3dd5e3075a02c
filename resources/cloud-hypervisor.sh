#!/usr/bin/env bash
# Builds cloud-hypervisor and ch-remote with the ism patch series (vmm-integration/cloud-hypervisor/)
# and prints, as its last stdout line, the directory holding both.
#
# Sources, in this order:
#   ISM_CH_SRC / ISM_MICRO_HTTP_SRC   a bare git repository or a checkout of cloud-hypervisor /
#                                     micro-http holding the pinned commits;
#   the script's own cache            copies kept by an earlier run;
#   git clone                         of the upstream repositories (needs network).
# Cache: ${ISM_CH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ism/cloud-hypervisor}. A build is keyed by the
# hash of the patch series, this script and the project crates cloud-hypervisor builds in; a second run
# with nothing changed only prints the directory.
set -euo pipefail

CH_COMMIT=ae44c2971c83dd2b1bd704fa81102ec0dec4e7d4
CH_URL=https://github.com/cloud-hypervisor/cloud-hypervisor
MICRO_HTTP_URL=https://github.com/firecracker-microvm/micro-http

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
series_dir=$top/vmm-integration/cloud-hypervisor
cache=${ISM_CH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ism/cloud-hypervisor}

die() { echo "cloud-hypervisor.sh: $*" >&2; exit 1; }
log() { echo "cloud-hypervisor.sh: $*" >&2; }

# The patches in series order (series file), or every *.patch sorted when there is no series file.
patches() {
    if [ -f "$series_dir/series" ]; then
        grep -v -e '^#' -e '^$' "$series_dir/series" | sed "s|^|$series_dir/|"
    else
        find "$series_dir" -maxdepth 1 -name '*.patch' | sort
    fi
}

# What the build depends on besides the pinned sources: the series, this script, the project crates
# the patches pull in by path, and the workspace manifest they inherit from.
build_key() {
    {
        patches | while read -r p; do sha256sum "$p"; done
        # By names relative to $top: the key must not depend on how the script was invoked.
        (cd "$top" && sha256sum resources/cloud-hypervisor.sh Cargo.toml)
        (cd "$top" && find virtio-ism -type f -not -path '*/target/*' | LC_ALL=C sort | xargs sha256sum)
    } | sed "s|$top/||" | sha256sum | cut -c1-16
}

mkdir -p "$cache"
exec 9>"$cache/lock"
flock 9

key=$(build_key)
out=$cache/bin-$key
if [ -x "$out/cloud-hypervisor" ] && [ -x "$out/ch-remote" ]; then
    echo "$out"
    exit 0
fi

# Brings commit $3 into the cache repository $2 from $1 (env source), the cache itself, or URL $4.
# Prints nothing; dies with what to set.
obtain() {
    local var=$1 repo=$2 commit=$3 url=$4 src=${!1:-}
    if [ ! -d "$repo/.git" ]; then
        rm -rf "$repo"
        git init -q "$repo"
    fi
    if git -C "$repo" cat-file -e "$commit^{commit}" 2>/dev/null; then
        return 0
    fi
    if [ -n "$src" ]; then
        [ -d "$src" ] || die "$var=$src is not a directory; set $var to a bare git repository or a checkout of $url"
        git -C "$src" rev-parse --git-dir >/dev/null 2>&1 ||
            die "$var=$src is not a git repository; set $var to a bare git repository or a checkout of $url"
        git -C "$src" cat-file -e "$commit^{commit}" 2>/dev/null ||
            die "$var=$src does not hold commit $commit; set $var to a repository of $url that has it"
        log "fetching $commit from $src"
        git -C "$repo" fetch -q "$(cd "$src" && pwd)" "$commit" 2>/dev/null ||
            git -C "$repo" fetch -q "$(cd "$src" && pwd)" '+refs/*:refs/remotes/src/*' ||
            die "fetching from $var=$src failed"
    else
        log "cloning $url ($var is not set)"
        git -C "$repo" fetch -q "$url" "$commit" 2>/dev/null ||
            git -C "$repo" fetch -q "$url" '+refs/heads/*:refs/remotes/origin/*' 2>/dev/null ||
            die "cannot reach $url and $var is not set; set $var to a bare git repository or a checkout of $url"
    fi
    git -C "$repo" cat-file -e "$commit^{commit}" 2>/dev/null ||
        die "commit $commit is not in what was fetched for $var; set $var to a repository of $url that has it"
}

tree=$cache/src/cloud-hypervisor
mhtree=$cache/src/micro-http
obtain ISM_CH_SRC "$tree" "$CH_COMMIT" "$CH_URL"
# The micro_http commit is the one cloud-hypervisor's Cargo.lock names.
MICRO_HTTP_COMMIT=$(git -C "$tree" show "$CH_COMMIT:Cargo.lock" |
    sed -n 's|^source = "git+https://github.com/firecracker-microvm/micro-http[^#]*#\([0-9a-f]\{40\}\)"|\1|p' | head -n1)
[ -n "$MICRO_HTTP_COMMIT" ] || die "no micro_http commit in cloud-hypervisor's Cargo.lock at $CH_COMMIT"
obtain ISM_MICRO_HTTP_SRC "$mhtree" "$MICRO_HTTP_COMMIT" "$MICRO_HTTP_URL"

# Reset to the pinned commits (files that do not change keep their mtimes: cargo rebuilds little),
# then apply the series as commits.
git -C "$mhtree" checkout -q --force --detach "$MICRO_HTTP_COMMIT"
git -C "$tree" checkout -q --force --detach "$CH_COMMIT"
git -C "$tree" clean -q -fdx
ln -sfn "$top" "$cache/src/ism"
n=0
while read -r p; do
    [ -n "$p" ] || continue
    git -C "$tree" -c user.name=ism -c user.email=ism@invalid am -q --keep-cr "$p" ||
        { git -C "$tree" am --abort 2>/dev/null || true; die "patch $(basename "$p") does not apply to cloud-hypervisor $CH_COMMIT"; }
    n=$((n + 1))
done < <(patches)
log "applied $n patches to cloud-hypervisor ${CH_COMMIT:0:12}"

# micro_http from the local copy instead of its git URL.
mkdir -p "$tree/.cargo"
cat >"$tree/.cargo/config.toml" <<CFG
[patch."$MICRO_HTTP_URL"]
micro_http = { path = "$mhtree" }
CFG

log "building (about 5 minutes on 2 cores the first time)"
(cd "$tree" && CARGO_TARGET_DIR=$cache/target cargo build --release --quiet \
    --bin cloud-hypervisor --bin ch-remote) >&2 || die "cargo build of patched cloud-hypervisor failed (see above)"

tmp=$out.tmp.$$
rm -rf "$tmp"
mkdir -p "$tmp"
cp "$cache/target/release/cloud-hypervisor" "$cache/target/release/ch-remote" "$tmp/"
rm -rf "$out"
mv "$tmp" "$out"
# Keep the three newest builds (a test run may still use the one before).
ls -1dt "$cache"/bin-* 2>/dev/null | tail -n +4 | xargs -r rm -rf
echo "$out"
