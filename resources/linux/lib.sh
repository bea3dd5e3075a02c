# Helpers shared by the resources/linux scripts. Source it; do not run it.
# shellcheck shell=bash

ISM_CACHE="${ISM_CACHE:-$HOME/.cache/ism}"

die() {
    echo "error: $*" >&2
    exit 1
}

log() {
    echo "[$(basename "$0")] $*" >&2
}

# Run apt-get update once per call of a script, and only when apt has no package lists yet
# or a look-up failed.
apt_updated=0
apt_update_once() {
    if [ "$apt_updated" = 0 ]; then
        log "apt-get update"
        apt-get update -qq >/dev/null || die "apt-get update failed"
        apt_updated=1
    fi
}

# install_missing pkg ...: install these Debian packages (none: nothing to do), as root.
install_missing() {
    [ "$#" = 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "Missing packages $* and not root to install them"
    apt_update_once
    log "installing $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null ||
        die "apt-get install $* failed"
}

# need_tools "tool:package" ...: install the Debian packages of tools that are missing.
need_tools() {
    local missing=() pair tool pkg
    for pair in "$@"; do
        tool="${pair%%:*}"
        pkg="${pair#*:}"
        command -v "$tool" >/dev/null 2>&1 || missing+=("$pkg")
    done
    install_missing ${missing[@]+"${missing[@]}"}
}

# need_packages pkg ...: install Debian packages (libraries, headers) that are not installed.
need_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" ||
            missing+=("$pkg")
    done
    install_missing ${missing[@]+"${missing[@]}"}
}

# apt_candidate PKG: the version apt would install, or nothing.
apt_candidate() {
    apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { if ($2 != "(none)") print $2 }'
}

# apt_candidate_or_update PKG: like apt_candidate, running apt-get update first if needed.
apt_candidate_or_update() {
    local v
    v="$(apt_candidate "$1")"
    if [ -z "$v" ]; then
        apt_update_once
        v="$(apt_candidate "$1")"
    fi
    [ -n "$v" ] || die "Debian package $1 not found (apt-cache policy has no candidate)"
    echo "$v"
}

# apt_download PKG VERSION DIR: download PKG_VERSION's .deb into DIR (once); print its path.
apt_download() {
    local pkg="$1" ver="$2" dir="$3" deb
    mkdir -p "$dir"
    deb="$(find "$dir" -maxdepth 1 -name "${pkg}_${ver//:/%3a}_*.deb" | head -n1)"
    if [ -z "$deb" ]; then
        log "downloading $pkg=$ver"
        # Download as root into a root-owned dir without apt's _apt sandbox warning.
        (cd "$dir" && apt-get download -qq -o APT::Sandbox::User=root "$pkg=$ver") >&2 ||
            die "apt-get download $pkg=$ver failed"
        deb="$(find "$dir" -maxdepth 1 -name "${pkg}_${ver//:/%3a}_*.deb" | head -n1)"
    fi
    [ -n "$deb" ] || die "Downloaded .deb for $pkg=$ver not found in $dir"
    echo "$deb"
}

# with_lock FILE: hold an exclusive lock on FILE for the rest of the script.
with_lock() {
    mkdir -p "$(dirname "$1")"
    exec 9>"$1"
    if ! flock -n 9; then
        log "waiting for another run holding $1"
        flock 9
    fi
}
