#!/usr/bin/env bash
# The other targets, run here: cross-build linux-arm64 and windows-x86_64 (cached), run the
# tests that need those artifacts (pytest -m emulation: layout, the ABI probe run on the
# target, generation under qemu-user and wine against this host's tokens, the loader's Windows
# rules on the real DLLs), then linux-arm64 end to end in a Debian arm64 root
# (build_scripts/arm64-run.sh: info, fetch from a loopback mirror, doctor, the test suite's
# platform/loader/lowlevel/Llama tests) and the DLLs under wine (build_scripts/windows-run.sh).
#
# Needs, besides what .ci/run needs (Debian/Ubuntu packages; README "Targets"):
#   clang gcc-aarch64-linux-gnu g++-aarch64-linux-gnu g++-mingw-w64-x86-64-posix wine64
#   qemu-user-static binfmt-support mmdebstrap arch-test debian-archive-keyring
# Run after .ci/run (its venv and library build); the arm64 root needs root (sudo otherwise).
set -euo pipefail
exec </dev/null
cd "$(dirname "$0")/.."
export CI="${CI:-true}"

step() { printf '\n== %s (%ss)\n' "$1" "$SECONDS" >&2; }

[ -x .venv/bin/nexabind ] || { echo "emulation-run.sh: run .ci/run first (it makes .venv)" >&2; exit 2; }
NEXABIND_LIB_PATH="$(.venv/bin/nexabind which)"
NEXABIND_BUILD_CACHE="$(.venv/bin/python -c 'from nexabind._source import build_cache_dir as d; print(d())')"
export NEXABIND_LIB_PATH NEXABIND_BUILD_CACHE

step "cross builds: linux-arm64, windows-x86_64"
.venv/bin/nexabind build --target linux-arm64 >/dev/null
.venv/bin/nexabind build --target windows-x86_64 >/dev/null

step "tests on the cross-built artifacts (pytest -m emulation)"
.venv/bin/python -m pytest -m emulation

step "windows-x86_64 under wine"
build_scripts/windows-run.sh

step "linux-arm64 under emulation"
if [ "$(id -u)" = 0 ]; then
    build_scripts/arm64-run.sh
else
    sudo --preserve-env=NEXABIND_LIB_PATH,NEXABIND_BUILD_CACHE,NEXABIND_ROOTS,PIP_CERT,CI \
        build_scripts/arm64-run.sh
fi
step "done"
