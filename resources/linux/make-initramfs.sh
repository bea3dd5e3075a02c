#!/usr/bin/env bash
# Build a busybox-static initramfs (cpio newc, gzip) for ism's Linux test guests.
#
# Usage: make-initramfs.sh --output FILE [--uncompressed] [--modules DIR] [--root DIR]
#                          [--add SRC:DEST]...
#   --uncompressed write a plain cpio instead of gzip (the guest kernel then spends no time
#                  inflating it: ~7 s of emulated ring-0 work on PVM hosts for a gzip image).
#   --modules DIR  DIR holds uncompressed .ko files and a file `load-order` listing them
#                  (one file name a line, dependencies first); /init insmods them in that order.
#   --root DIR     copy the tree DIR into the image root (e.g. a lib/modules/RELEASE tree made
#                  by `make install INSTALL_MOD_PATH=DIR` or dkms, for busybox's modprobe).
#   --add SRC:DEST copy host file SRC to DEST inside the image (e.g. a test program or a .ko).
#
# The image's /init mounts proc, sys and devtmpfs, loads the listed modules, prints
#     ISM-LINUX booted cpus=N kernel=RELEASE uptime=SECONDS
# on the console, then either runs the command written after ` -- ` on the kernel command
# line (printing `ISM-LINUX command exit=STATUS`) or nothing, and finally powers off
# (`poweroff -f`). Kernel parameter ism_exit=reboot|halt|shell picks another ending.
# Every guest system call is slow on PVM hosts (~10 ms), so /init forks as little as it can:
# the applet links are made here, not by `busybox --install` at boot.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$here/lib.sh"

output=""
compress=1
modules_dir=""
adds=()
root_trees=()
while [ $# -gt 0 ]; do
    case "$1" in
        --output) output="${2:?--output needs a file}"; shift 2 ;;
        --uncompressed) compress=0; shift ;;
        --modules) modules_dir="${2:?--modules needs a directory}"; shift 2 ;;
        --add) adds+=("${2:?--add needs SRC:DEST}"); shift 2 ;;
        --root) root_trees+=("${2:?--root needs a directory}"); shift 2 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) die "Unknown argument $1 (see --help)" ;;
    esac
done
[ -n "$output" ] || die "--output is required"

need_tools "cpio:cpio" "gzip:gzip"
# The initramfs has no libc: it needs Debian's statically linked busybox.
need_packages busybox-static
busybox_bin=/bin/busybox

root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,run,etc,lib/modules,usr/bin,usr/sbin}
cp "$busybox_bin" "$root/bin/busybox"
# One symlink per applet, made on the host (`busybox --list-full` gives e.g. usr/bin/tr).
while IFS= read -r applet; do
    if [ -z "$applet" ] || [ "$applet" = "bin/busybox" ]; then
        continue
    fi
    ln -sf /bin/busybox "$root/$applet"
done < <("$busybox_bin" --list-full)

if [ -n "$modules_dir" ]; then
    [ -f "$modules_dir/load-order" ] || die "$modules_dir/load-order missing"
    while IFS= read -r ko; do
        [ -n "$ko" ] || continue
        [ -f "$modules_dir/$ko" ] || die "Module $modules_dir/$ko listed in load-order is missing"
        cp "$modules_dir/$ko" "$root/lib/modules/"
    done <"$modules_dir/load-order"
    cp "$modules_dir/load-order" "$root/etc/ism-modules"
fi

for tree in "${root_trees[@]}"; do
    [ -d "$tree" ] || die "--root directory $tree missing"
    cp -a "$tree/." "$root/"
done

for pair in "${adds[@]}"; do
    src="${pair%%:*}"
    dest="${pair#*:}"
    [ -f "$src" ] || die "--add source $src missing"
    mkdir -p "$root/$(dirname "$dest")"
    cp "$src" "$root/$dest"
done

cat >"$root/init" <<'INIT'
#!/bin/sh
# ism Linux test guest init (built by resources/linux/make-initramfs.sh).
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

if [ -f /etc/ism-modules ]; then
    while read -r ko; do
        [ -n "$ko" ] || continue
        insmod "/lib/modules/$ko" || echo "ISM-LINUX insmod-failed $ko"
    done </etc/ism-modules
fi

cmdline="$(cat /proc/cmdline)"
cpus="$(grep -c '^processor' /proc/cpuinfo)"
uptime="$(cat /proc/uptime)"
echo "ISM-LINUX booted cpus=$cpus kernel=$(uname -r) uptime=${uptime%% *}"

case " $cmdline " in
    *" -- "*)
        command="${cmdline#* -- }"
        sh -c "$command"
        status=$?
        echo "ISM-LINUX command exit=$status"
        # The kernel reports a crashed program (segfault, trap) at KERN_INFO, which `quiet`
        # keeps off the console: show those lines when the command failed.
        if [ "$status" != 0 ]; then
            dmesg | grep -E "segfault|traps:|general protection|Oops|BUG:" | sed 's/^/ISM-LINUX kmsg /'
        fi
        ;;
esac

case " $cmdline " in
    *" ism_exit=shell "*) exec setsid cttyhack sh ;;
    *" ism_exit=reboot "*) reboot -f ;;
    *" ism_exit=halt "*) halt -f ;;
    *) poweroff -f ;;
esac
INIT
chmod 755 "$root/init"

mkdir -p "$(dirname "$output")"
tmp_out="$output.tmp.$$"
(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --owner=0:0 --quiet) |
    if [ "$compress" = 1 ]; then gzip -9 -n; else cat; fi >"$tmp_out" ||
    die "Could not write the initramfs"
mv "$tmp_out" "$output"
log "initramfs $output ($(du -h "$output" | cut -f1))"
