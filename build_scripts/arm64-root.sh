#!/usr/bin/env bash
# Build (once) a Debian 12 arm64 root with python3 for running nexabind under qemu-user, and
# print its path. Later calls find the finished root and only print the path.
#
#   build_scripts/arm64-root.sh            # prints e.g. ~/.cache/nexabind/roots/debian-12-arm64
#   build_scripts/arm64-root.sh --enter -- CMD...   # run CMD inside it (see below)
#
# Needs root (mmdebstrap's root mode, chroot, bind mounts) and, on Debian/Ubuntu:
#   apt-get install mmdebstrap arch-test qemu-user-static binfmt-support
# The binfmt handler for arm64 must be registered (flags F: the static qemu is opened at
# registration, so it works inside the root); this script enables it when it is not.
#
# --enter runs CMD in the root with /dev, /proc and /sys bound, in a private mount namespace
# (the mounts go away with the command), with a clean environment plus NEXABIND_*, PYTEST_*,
# QEMU_* and the BIND_* variables: BIND_RO="host:inside ..." adds read-only bind mounts.
#
# Where: NEXABIND_ROOTS, else $XDG_CACHE_HOME/nexabind/roots, else ~/.cache/nexabind/roots.
# Never inside a checkout: the root is ~300 MB and is shared by every checkout.
set -euo pipefail

SUITE=bookworm
NAME=debian-12-arm64
PACKAGES=python3,python3-venv,ca-certificates
ROOTS="${NEXABIND_ROOTS:-${XDG_CACHE_HOME:-$HOME/.cache}/nexabind/roots}"
ROOT="$ROOTS/$NAME"
MARKER="$ROOT/.nexabind-root"
STAMP="$SUITE $PACKAGES venv=/opt/venv"

die() { echo "arm64-root.sh: $*" >&2; exit 1; }

need_binfmt() {
    local entry=/proc/sys/fs/binfmt_misc/qemu-aarch64
    if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null \
            || die "binfmt_misc is not mounted and cannot be: run on a host (or privileged container) with it"
    fi
    if [ ! -e "$entry" ] || ! head -1 "$entry" | grep -q enabled; then
        command -v update-binfmts >/dev/null || die "no arm64 binfmt handler: apt-get install qemu-user-static binfmt-support"
        update-binfmts --enable qemu-aarch64 || die "update-binfmts --enable qemu-aarch64 failed"
    fi
    grep -q '^flags: .*F' "$entry" \
        || die "the qemu-aarch64 binfmt handler lacks the F flag; reinstall qemu-user-static"
}

# Run "$@" inside the root (see --enter above).
enter() {
    local env=(PATH=/opt/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 TERM=dumb)
    local name
    for name in $(compgen -e); do
        case "$name" in NEXABIND_*|PYTEST_*|QEMU_*|PIP_CERT|PIP_INDEX_URL) env+=("$name=${!name}") ;; esac
    done
    local binds="" pair
    for pair in ${BIND_RO:-}; do
        local host="${pair%%:*}" inside="${pair#*:}"
        if [ -d "$host" ]; then mkdir -p "$ROOT$inside"; else touch "$ROOT$inside"; fi
        binds+="mount --bind '$host' '$ROOT$inside' && mount -o remount,bind,ro '$ROOT$inside' && "
    done
    # shellcheck disable=SC2016 # expanded by the inner shell
    unshare --mount --propagation private -- sh -c \
        "mount --rbind /dev '$ROOT/dev' && mount --rbind /proc '$ROOT/proc' && mount --rbind /sys '$ROOT/sys' && $binds"'exec chroot "$0" env -i "$@"' \
        "$ROOT" "${env[@]}" "$@"
}

build_root() {
    command -v mmdebstrap >/dev/null || die "mmdebstrap not found: apt-get install mmdebstrap arch-test"
    command -v qemu-aarch64-static >/dev/null || die "qemu-aarch64-static not found: apt-get install qemu-user-static"
    [ "$(id -u)" = 0 ] || die "building the root needs root (mmdebstrap root mode, chroot): run with sudo"
    need_binfmt
    mkdir -p "$ROOTS"
    local tmp="$ROOT.tmp.$$"
    rm -rf "$tmp"
    trap 'rm -rf "$tmp"' EXIT
    echo "arm64-root.sh: building $ROOT (mmdebstrap $SUITE arm64: $PACKAGES)" >&2
    mmdebstrap --quiet --arch=arm64 --variant=apt --include="$PACKAGES" "$SUITE" "$tmp"
    # nexabind's dependencies are installed by the first run (pip install CHECKOUT[test]);
    # the venv's pip, setuptools and wheel only need to be new enough to build it.
    ROOT="$tmp" enter python3 -m venv /opt/venv
    rm -rf "$ROOT"
    mv "$tmp" "$ROOT"
    trap - EXIT
    echo "$STAMP" >"$MARKER"
}

if [ ! -f "$MARKER" ] || [ "$(cat "$MARKER")" != "$STAMP" ]; then
    build_root
fi

if [ "${1:-}" = "--enter" ]; then
    shift
    [ "${1:-}" = "--" ] && shift
    need_binfmt
    enter "$@"
else
    echo "$ROOT"
fi
