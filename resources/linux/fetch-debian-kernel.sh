#!/usr/bin/env bash
# Fetch Debian's cloud kernel (linux-image-cloud-amd64) and make a bootable guest of it.
#
# Resolves, at run time, the versioned image package the metapackage depends on, downloads
# it with `apt-get download`, turns its vmlinuz into an uncompressed ELF vmlinux, copies
# out the virtio modules (and their dependencies, uncompressed), builds a busybox initramfs
# that loads them (make-initramfs.sh), and unpacks the matching linux-headers (+ -common and
# linux-kbuild) for out-of-tree module builds. Everything goes to
# ${ISM_CACHE:-$HOME/.cache/ism}/debian-kernel/<release>_<version>/; a second run only
# prints the paths.
#
# Usage: fetch-debian-kernel.sh
# Prints KEY=VALUE lines on stdout: DEBIAN_KERNEL_RELEASE, DEBIAN_VMLINUZ, DEBIAN_VMLINUX,
# DEBIAN_MODULES, DEBIAN_INITRAMFS (gzip), DEBIAN_INITRAMFS_UNCOMPRESSED (plain cpio),
# DEBIAN_HEADERS (the tree for `make -C ... M=...`).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$here/lib.sh"

case "${1:-}" in
    "") ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) die "Unknown argument $1 (see --help)" ;;
esac

# Modules the guest wants; their dependencies are added from modules.dep. Names that are
# built into the kernel (modules.builtin) are skipped.
wanted_modules=(virtio_pci virtio_rng virtio_net virtio_blk virtio_console)

need_tools "depmod:kmod" "lz4:lz4" "xz:xz-utils" "zstd:zstd" "cpio:cpio" "gzip:gzip" "flock:util-linux" \
    "dpkg-deb:dpkg"

meta="linux-image-cloud-amd64"
apt_candidate_or_update "$meta" >/dev/null
image_pkg="$(apt-cache depends "$meta" | awk '/^ *Depends: linux-image-/ { print $2; exit }')"
[ -n "$image_pkg" ] || die "Could not resolve the image package $meta depends on"
release="${image_pkg#linux-image-}"
image_ver="$(apt_candidate "$image_pkg")"
[ -n "$image_ver" ] || die "No candidate version for $image_pkg"

out="$ISM_CACHE/debian-kernel/${release}_${image_ver}"
stamp="$out/.done"
with_lock "$ISM_CACHE/debian-kernel/.lock"

# extract_vmlinux VMLINUZ OUT: find a compressed payload in a bzImage and decompress it to
# an ELF file. Debian's 6.1 kernels use LZ4 (legacy frame); the others are tried too.
extract_vmlinux() {
    local img="$1" dest="$2" tmp="$2.tmp" magic tool offset
    for pair in '\x02\x21\x4c\x18:lz4 -dc' '\x28\xb5\x2f\xfd:zstd -dcq' \
        '\xfd\x37\x7a\x58\x5a\x00:xz -dcq' '\x1f\x8b\x08:gzip -dcq'; do
        magic="${pair%%:*}"
        tool="${pair#*:}"
        while IFS=: read -r offset _; do
            # Decompressors complain about the bytes that follow the payload; the check that
            # matters is that an ELF file came out.
            tail -c "+$((offset + 1))" "$img" | $tool >"$tmp" 2>/dev/null || true
            if [ "$(head -c 4 "$tmp" | od -An -tx1 | tr -d ' \n')" = "7f454c46" ]; then
                mv "$tmp" "$dest"
                log "vmlinux: ${tool%% *} payload at offset $offset"
                return 0
            fi
        done < <(LC_ALL=C grep -obUaP "$magic" "$img" || true)
    done
    rm -f "$tmp"
    return 1
}

if [ ! -f "$stamp" ]; then
    rm -rf "$out"
    mkdir -p "$out"
    deb="$(apt_download "$image_pkg" "$image_ver" "$ISM_CACHE/debs")"
    log "unpacking $(basename "$deb")"
    dpkg-deb -x "$deb" "$out/image" || die "Could not unpack $deb"
    vmlinuz="$out/image/boot/vmlinuz-$release"
    [ -f "$vmlinuz" ] || die "$deb has no boot/vmlinuz-$release"
    extract_vmlinux "$vmlinuz" "$out/vmlinux" ||
        die "No decompressible ELF payload found in $vmlinuz"

    moddir="$out/image/lib/modules/$release"
    [ -d "$moddir" ] || die "$deb has no lib/modules/$release"
    # Debian generates modules.dep at install time; do the same for the unpacked copy.
    depmod -b "$out/image" "$release" || die "depmod for the unpacked $release failed"
    mkdir -p "$out/modules"
    : >"$out/modules/load-order"
    declare -A added=()
    # add_module PATH_IN_MODULES_DEP: add a module after its dependencies.
    add_module() {
        local path="$1" deps dep name ko
        [ -z "${added[$path]:-}" ] || return 0
        added[$path]=1
        deps="$(awk -v m="$path:" '$1 == m { $1 = ""; print; exit }' "$moddir/modules.dep")"
        for dep in $deps; do
            add_module "$dep"
        done
        name="$(basename "$path")"
        ko="${name%.xz}"
        ko="${ko%.zst}"
        ko="${ko%.gz}"
        case "$name" in
            *.ko.xz) xz -dc "$moddir/$path" >"$out/modules/$ko" ;;
            *.ko.zst) zstd -dcq "$moddir/$path" >"$out/modules/$ko" ;;
            *.ko.gz) gzip -dc "$moddir/$path" >"$out/modules/$ko" ;;
            *.ko) cp "$moddir/$path" "$out/modules/$ko" ;;
            *) die "Unknown module file type $path" ;;
        esac
        echo "$ko" >>"$out/modules/load-order"
    }
    for mod in "${wanted_modules[@]}"; do
        # modules.dep spells names with '-' or '_' as in the file name; match both.
        pattern="/(${mod}|${mod//_/-})\\.ko(\\.xz|\\.zst|\\.gz)?:"
        path="$(grep -E "$pattern" "$moddir/modules.dep" | head -n1 | cut -d: -f1 || true)"
        if [ -n "$path" ]; then
            add_module "$path"
        elif grep -qE "/(${mod}|${mod//_/-})\\.ko$" "$moddir/modules.builtin"; then
            log "module $mod is built in"
        else
            die "Module $mod neither in modules.dep nor modules.builtin of $release"
        fi
    done
    log "modules: $(tr '\n' ' ' <"$out/modules/load-order")"

    # Headers for out-of-tree modules: the flavour package plus the -common and kbuild
    # packages it depends on, all unpacked into one root so their relative links resolve.
    headers_pkg="linux-headers-$release"
    headers_pkgs=("$headers_pkg")
    while read -r dep; do
        headers_pkgs+=("$dep")
    done < <(apt-cache depends "$headers_pkg" |
        awk '/^ *Depends: linux-(headers|kbuild)-/ { print $2 }')
    for pkg in "${headers_pkgs[@]}"; do
        ver="$(apt_candidate "$pkg")"
        [ -n "$ver" ] || die "No candidate version for $pkg"
        hdeb="$(apt_download "$pkg" "$ver" "$ISM_CACHE/debs")"
        dpkg-deb -x "$hdeb" "$out/headers-root" || die "Could not unpack $hdeb"
    done
    headers_makefile="$out/headers-root/usr/src/linux-headers-$release/Makefile"
    [ -f "$headers_makefile" ] || die "Unpacked headers have no usr/src/linux-headers-$release/Makefile"
    # The flavour Makefile includes the -common one by absolute path: point it into the cache.
    sed -i "s#^include /usr/src/#include $out/headers-root/usr/src/#" "$headers_makefile"
    # The headers' kbuild was built with the compiler the image was built with (gcc-12 on
    # Debian 12); make sure it is there.
    compiler="$(sed -n 's/^CONFIG_CC_VERSION_TEXT="\(gcc-[0-9]*\).*/\1/p' \
        "$out/headers-root/usr/src/linux-headers-$release/.config" 2>/dev/null || true)"
    if [ -n "$compiler" ]; then
        need_tools "$compiler:$compiler"
    fi
    touch "$stamp"
fi

# The initramfs is cheap: rebuild it whenever the builder changed.
for image in initramfs.cpio.gz initramfs.cpio; do
    if [ ! -f "$out/$image" ] || [ "$here/make-initramfs.sh" -nt "$out/$image" ]; then
        flag=""
        [ "$image" = initramfs.cpio ] && flag=--uncompressed
        # shellcheck disable=SC2086
        "$here/make-initramfs.sh" --output "$out/$image" --modules "$out/modules" $flag >&2 ||
            die "Could not build $image"
    fi
done

echo "DEBIAN_KERNEL_RELEASE=$release"
echo "DEBIAN_VMLINUZ=$out/image/boot/vmlinuz-$release"
echo "DEBIAN_VMLINUX=$out/vmlinux"
echo "DEBIAN_MODULES=$out/modules"
echo "DEBIAN_INITRAMFS=$out/initramfs.cpio.gz"
echo "DEBIAN_INITRAMFS_UNCOMPRESSED=$out/initramfs.cpio"
echo "DEBIAN_HEADERS=$out/headers-root/usr/src/linux-headers-$release"
