#!/usr/bin/env bash
# Fetch Debian's linux-headers for a cloud kernel series other than the one
# fetch-debian-kernel.sh boots (e.g. 6.12 from bookworm-backports), for build checks of
# out-of-tree modules (guest-driver/linux/build-ci.sh).
#
# Resolves, at run time, the newest linux-headers-SERIES.*-cloud-amd64 apt knows
# (`apt-cache search`; bookworm-backports must be in the apt sources), downloads it and
# the -common and linux-kbuild packages it depends on with `apt-get download`, and
# unpacks them into ${ISM_CACHE:-$HOME/.cache/ism}/debian-headers/<release>_<version>/,
# like fetch-debian-kernel.sh does for its headers. A second run only prints the path.
#
# Usage: fetch-debian-headers.sh SERIES        e.g. 6.12
# Prints KEY=VALUE lines on stdout: DEBIAN_HEADERS_RELEASE, DEBIAN_HEADERS (the tree for
# `make -C ... M=...`), DEBIAN_HEADERS_CC (the compiler the headers were built with).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$here/lib.sh"

case "${1:-}" in
    "") die "Usage: $0 SERIES (e.g. 6.12)" ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) series="$1" ;;
esac
[[ "$series" =~ ^[0-9]+\.[0-9]+$ ]] || die "SERIES must look like 6.12, not $series"

need_tools "dpkg-deb:dpkg" "flock:util-linux"

# find_pkg: the newest linux-headers-SERIES.*-cloud-amd64 apt knows, or nothing.
find_pkg() {
    apt-cache search --names-only "^linux-headers-${series//./\\.}\\.[0-9.]+\\+[a-z0-9.]+-cloud-amd64\$" 2>/dev/null |
        awk '{ print $1 }' | sort -V | tail -n1
}
pkg="$(find_pkg)"
if [ -z "$pkg" ]; then
    apt_update_once
    pkg="$(find_pkg)"
fi
[ -n "$pkg" ] || die "No linux-headers-$series.*-cloud-amd64 in the apt sources (bookworm-backports?)"
release="${pkg#linux-headers-}"
ver="$(apt_candidate "$pkg")"
[ -n "$ver" ] || die "No candidate version for $pkg"

out="$ISM_CACHE/debian-headers/${release}_${ver}"
stamp="$out/.done"
mkdir -p "$ISM_CACHE/debian-headers"
with_lock "$ISM_CACHE/debian-headers/.lock"

tree="$out/headers-root/usr/src/linux-headers-$release"
if [ ! -f "$stamp" ]; then
    rm -rf "$out"
    mkdir -p "$out"
    pkgs=("$pkg")
    while read -r dep; do
        pkgs+=("$dep")
    done < <(apt-cache depends "$pkg" | awk '/^ *Depends: linux-(headers|kbuild)-/ { print $2 }')
    for p in "${pkgs[@]}"; do
        v="$(apt_candidate "$p")"
        [ -n "$v" ] || die "No candidate version for $p"
        deb="$(apt_download "$p" "$v" "$ISM_CACHE/debs")"
        dpkg-deb -x "$deb" "$out/headers-root" || die "Could not unpack $deb"
    done
    [ -f "$tree/Makefile" ] || die "Unpacked headers have no usr/src/linux-headers-$release/Makefile"
    # The flavour Makefile includes the -common one by absolute path: point it into the cache.
    sed -i "s#^include /usr/src/#include $out/headers-root/usr/src/#" "$tree/Makefile"
    # linux-kbuild's scripts live under /usr/lib/linux-kbuild-X.Y, linked by absolute path.
    while read -r link; do
        target="$(readlink "$link")"
        case "$target" in
            /usr/*) ln -sfn "$out/headers-root$target" "$link" ;;
        esac
    done < <(find "$out/headers-root/usr/src" -type l)
    touch "$stamp"
fi

compiler="$(sed -n 's/^CONFIG_CC_VERSION_TEXT="\([a-z0-9_]*-\)*\(gcc-[0-9]*\) .*/\2/p' "$tree/.config" 2>/dev/null || true)"
if [ -n "$compiler" ]; then
    need_tools "$compiler:$compiler"
fi

echo "DEBIAN_HEADERS_RELEASE=$release"
echo "DEBIAN_HEADERS=$tree"
echo "DEBIAN_HEADERS_CC=${compiler:-gcc}"
