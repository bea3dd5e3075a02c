# The two documented ways of installing virtio_ism.ko (docs/guest-driver.md), run against a
# kernel tree or headers package KDIR into an image root ROOT instead of the host's /. Source it
# after setting `here` (guest-driver/linux). Used by build-ci.sh (Debian headers, checked only)
# and pair-test.sh (PVM kernel, the image is booted and runs `modprobe virtio_ism`).
#
# install_release KDIR              prints the release KDIR builds modules for (utsrelease.h)
# install_kernel_modules_meta KDIR ROOT
#                                   the kernel's own modules.order/builtin into ROOT, as any
#                                   installed system has them (a built tree only)
# install_with_make KDIR ROOT LOG [MAKE ARGS]
#                                   `make KDIR=... INSTALL_MOD_PATH=ROOT install`
# install_with_dkms KDIR ROOT LOG   `dkms add/build/install -k RELEASE` with dkms's own
#                                   --dkmstree/--sourcetree/--installtree pointing at scratch
#                                   dirs and ROOT/lib/modules, then `depmod -b ROOT RELEASE`
#                                   (dkms's own depmod would look at the host's /lib/modules)
# install_check ROOT RELEASE SUBDIR checks ROOT/lib/modules/RELEASE/SUBDIR/virtio_ism.ko:
#                                   vermagic, modules.dep, and that modprobe resolves the name
# Each returns non-zero with the reason on stderr (and LOG kept) on failure.
# shellcheck shell=bash disable=SC2154

install_release() {
    sed -n 's/^#define UTS_RELEASE "\(.*\)"/\1/p' "$1/include/generated/utsrelease.h"
}

install_kernel_modules_meta() {
    local kdir="$1" root="$2"
    make -C "$kdir" -s INSTALL_MOD_PATH="$root" modules_install >/dev/null 2>&1 ||
        { echo "make modules_install of the kernel in $kdir failed" >&2; return 1; }
}

install_with_make() {
    local kdir="$1" root="$2" log="$3"
    shift 3
    local src
    src="$(mktemp -d)"
    cp -r "$here/." "$src/"
    rm -f "$src"/*.o "$src"/*.ko
    if ! make -C "$src" KDIR="$kdir" INSTALL_MOD_PATH="$root" "$@" install >"$log" 2>&1; then
        echo "make install against $kdir failed:" >&2
        sed 's/^/    /' "$log" >&2
        rm -rf "$src"
        return 1
    fi
    rm -rf "$src"
}

install_with_dkms() {
    local kdir="$1" root="$2" log="$3"
    local release name version scratch dkms
    release="$(install_release "$kdir")"
    name="$(sed -n 's/^PACKAGE_NAME="\(.*\)"/\1/p' "$here/dkms.conf")"
    version="$(sed -n 's/^PACKAGE_VERSION="\(.*\)"/\1/p' "$here/dkms.conf")"
    [[ -n "$release" && -n "$name" && -n "$version" ]] ||
        { echo "No release in $kdir or no name/version in dkms.conf" >&2; return 1; }
    command -v dkms >/dev/null ||
        { echo "dkms missing (resources/setup.sh installs Debian's dkms)" >&2; return 1; }
    scratch="$(mktemp -d)"
    # What `sudo cp -r guest-driver/linux /usr/src/virtio-ism-VERSION` does in the docs.
    mkdir -p "$scratch/src" "$scratch/tree" "$root/lib/modules/$release"
    cp -r "$here/." "$scratch/src/$name-$version/"
    rm -f "$scratch/src/$name-$version"/*.o "$scratch/src/$name-$version"/*.ko
    dkms=(dkms --dkmstree "$scratch/tree" --sourcetree "$scratch/src"
        --installtree "$root/lib/modules")
    if ! { "${dkms[@]}" add -m "$name" -v "$version" &&
        "${dkms[@]}" build -m "$name" -v "$version" -k "$release" --kernelsourcedir "$kdir" &&
        "${dkms[@]}" install --no-depmod -m "$name" -v "$version" -k "$release" \
            --kernelsourcedir "$kdir" &&
        depmod -b "$root" "$release"; } >"$log" 2>&1; then
        echo "dkms install against $kdir failed:" >&2
        sed 's/^/    /' "$log" >&2
        cat "$scratch/tree/$name/$version/build/make.log" >&2 2>/dev/null || true
        rm -rf "$scratch"
        return 1
    fi
    rm -rf "$scratch"
}

install_check() {
    local root="$1" release="$2" subdir="$3"
    local ko="$root/lib/modules/$release/$subdir/virtio_ism.ko" vermagic resolved
    [[ -f "$ko" ]] || { echo "$ko not installed" >&2; return 1; }
    vermagic="$(modinfo -F vermagic "$ko")"
    [[ "$vermagic" == "$release "* ]] ||
        { echo "$ko has vermagic '$vermagic', not for $release" >&2; return 1; }
    grep -q "^$subdir/virtio_ism.ko:" "$root/lib/modules/$release/modules.dep" ||
        { echo "modules.dep of $release in $root does not list $subdir/virtio_ism.ko" >&2; return 1; }
    resolved="$(modprobe -d "$root" -S "$release" --show-depends virtio_ism 2>&1 || true)"
    if [[ "$resolved" != *"/$subdir/virtio_ism.ko"* ]]; then
        echo "modprobe -d $root -S $release does not resolve virtio_ism: $resolved" >&2
        return 1
    fi
}
