#!/usr/bin/env bash
# Build the small Linux guest kernel that boots on PVM hosts (see docs/linux-guests.md).
#
# Source: Debian's linux-source-6.1 (version resolved through apt at run time).
# Config: `make tinyconfig` + pvm-guest.config. Source change: pvm-guest.patch.
# Output: vmlinux and bzImage in a built tree kept for out-of-tree module builds, plus a
# busybox initramfs. Cached by source version + hash of the config fragment and patch:
# a second run only prints the paths.
#
# Usage: build-pvm-kernel.sh [-j JOBS]      (takes ~5 min on 2 cores; run it in the background)
# Prints KEY=VALUE lines on stdout: PVM_KERNEL_VERSION, PVM_KERNEL_TREE, PVM_VMLINUX,
# PVM_BZIMAGE, PVM_INITRAMFS (gzip), PVM_INITRAMFS_UNCOMPRESSED (same content, plain cpio).
# Progress goes to stderr, the build log to the tree's build.log.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$here/lib.sh"

jobs=2
while [ $# -gt 0 ]; do
    case "$1" in
        -j) jobs="${2:?-j needs a number}"; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) die "Unknown argument $1 (see --help)" ;;
    esac
done

fragment="$here/pvm-guest.config"
patchfile="$here/pvm-guest.patch"
[ -f "$fragment" ] || die "Config fragment $fragment missing"
[ -f "$patchfile" ] || die "Patch $patchfile missing"

need_tools "gcc:gcc" "make:make" "flex:flex" "bison:bison" "bc:bc" "xz:xz-utils" \
    "cpio:cpio" "gzip:gzip" "perl:perl" "patch:patch" "flock:util-linux"
need_packages libelf-dev libc6-dev

# The patch is written against 6.1: pin the source series, let apt pick the newest 6.1 upload.
src_pkg="linux-source-6.1"
src_ver="$(apt_candidate_or_update "$src_pkg")"
recipe_hash="$(cat "$fragment" "$patchfile" | sha256sum | cut -c1-12)"
build_dir="$ISM_CACHE/pvm-kernel/${src_ver}-${recipe_hash}"
stamp="$build_dir/.built"

with_lock "$ISM_CACHE/pvm-kernel/.lock"

if [ ! -f "$stamp" ]; then
    deb="$(apt_download "$src_pkg" "$src_ver" "$ISM_CACHE/debs")"
    log "building $src_pkg $src_ver (recipe $recipe_hash) in $build_dir"
    rm -rf "$build_dir"
    mkdir -p "$build_dir/unpack"
    dpkg-deb -x "$deb" "$build_dir/unpack" || die "Could not unpack $deb"
    tarball="$(find "$build_dir/unpack/usr/src" -maxdepth 1 -name 'linux-source-*.tar.xz' | head -n1)"
    [ -n "$tarball" ] || die "No linux-source tarball inside $deb"
    log "extracting $(basename "$tarball")"
    tar -C "$build_dir" -xJf "$tarball" || die "Could not extract $tarball"
    rm -rf "$build_dir/unpack"
    tree_tmp="$(find "$build_dir" -mindepth 1 -maxdepth 1 -type d -name 'linux-source-*' | head -n1)"
    [ -n "$tree_tmp" ] || die "Extracted tarball has no linux-source-* directory"
    mv "$tree_tmp" "$build_dir/linux"
    tree="$build_dir/linux"

    log "applying $(basename "$patchfile")"
    patch -d "$tree" -p1 --forward --quiet <"$patchfile" || die "Patch $patchfile does not apply"

    log "configuring: tinyconfig + $(basename "$fragment")"
    make -C "$tree" -s tinyconfig >"$build_dir/build.log" 2>&1 || die "make tinyconfig failed (see $build_dir/build.log)"
    (cd "$tree" && scripts/kconfig/merge_config.sh -m .config "$fragment") >>"$build_dir/build.log" 2>&1 ||
        die "merge_config.sh failed (see $build_dir/build.log)"
    make -C "$tree" -s olddefconfig >>"$build_dir/build.log" 2>&1 || die "make olddefconfig failed"

    # Every symbol the fragment sets must have survived olddefconfig (dependencies can drop them).
    bad=0
    while IFS= read -r line; do
        case "$line" in
            CONFIG_*=*) want="$line"; sym="${line%%=*}" ;;
            "# CONFIG_"*" is not set") sym="${line#\# }"; sym="${sym%% *}"; want="# $sym is not set" ;;
            *) continue ;;
        esac
        if ! grep -qxF "$want" "$tree/.config"; then
            # A disabled symbol that does not exist at all in the final config is also off.
            if [ "${want:0:1}" = "#" ] && ! grep -q "^$sym=" "$tree/.config"; then
                continue
            fi
            echo "error: config $sym: wanted '$want', got '$(grep -E "^(# )?${sym}[= ]" "$tree/.config" || echo absent)'" >&2
            bad=1
        fi
    done <"$fragment"
    [ "$bad" = 0 ] || die "Config fragment not applied as written (see above)"

    log "make -j$jobs vmlinux bzImage modules_prepare (log: $build_dir/build.log)"
    start=$(date +%s)
    make -C "$tree" -j"$jobs" vmlinux bzImage modules modules_prepare >>"$build_dir/build.log" 2>&1 ||
        { tail -n 30 "$build_dir/build.log" >&2; die "Kernel build failed (see $build_dir/build.log)"; }
    log "kernel built in $(($(date +%s) - start)) s"

    touch "$stamp"
fi

# The initramfs is cheap: rebuild it whenever the builder changed.
for image in initramfs.cpio.gz initramfs.cpio; do
    if [ ! -f "$build_dir/$image" ] || [ "$here/make-initramfs.sh" -nt "$build_dir/$image" ]; then
        flag=""
        [ "$image" = initramfs.cpio ] && flag=--uncompressed
        # shellcheck disable=SC2086
        "$here/make-initramfs.sh" --output "$build_dir/$image" $flag >&2 ||
            die "Could not build $image"
    fi
done

tree="$build_dir/linux"
echo "PVM_KERNEL_VERSION=$(make -C "$tree" -s kernelrelease 2>/dev/null || echo "$src_ver")"
echo "PVM_KERNEL_TREE=$tree"
echo "PVM_VMLINUX=$tree/vmlinux"
echo "PVM_BZIMAGE=$tree/arch/x86/boot/bzImage"
echo "PVM_INITRAMFS=$build_dir/initramfs.cpio.gz"
echo "PVM_INITRAMFS_UNCOMPRESSED=$build_dir/initramfs.cpio"
