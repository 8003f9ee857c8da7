#!/usr/bin/env bash
# linux-arm64 under emulation, from an x86_64 Linux host: one command.
#
#   sudo build_scripts/arm64-run.sh [PYTEST ARGS...]
#
# 1. the Debian 12 arm64 root (build_scripts/arm64-root.sh: built once, then cached);
# 2. `nexabind build --target linux-arm64 --out MIRROR/<release>` (cross-built once, then a
#    build cache hit), served by a loopback HTTP server;
# 3. in the root, under qemu-aarch64: nexabind installed from this checkout (pip, with its
#    dependencies from PyPI), `nexabind info` (arch arm64, glibc), `nexabind fetch` from the
#    mirror, `nexabind doctor` (tokens generated, an arm64 CPU variant chosen), and the platform,
#    loader, lowlevel, Llama and doctor tests (or the pytest arguments given) against the fetched
#    library;
# 4. greedy tokens of the tiny test model, arm64 under emulation against x86_64 on this host
#    (build_scripts/compare_greedy.py).
#
# Needs root (chroot, bind mounts), the packages arm64-root.sh names, the cross toolchain
# (clang, gcc-aarch64-linux-gnu, g++-aarch64-linux-gnu; see README "Targets"), and a venv of this
# checkout (PYTHON, default .venv/bin/python) with a linux-x86_64 library for step 4
# (NEXABIND_LIB_PATH, else what `nexabind which` finds). QEMU_CPU picks the emulated CPU (default
# qemu's "max", which has SVE2 and SME: the armv9.2 variant; cortex-a53 gives armv8.0).
set -euo pipefail
exec </dev/null
cd "$(dirname "$0")/.."
HERE="$PWD"
PYTHON="${PYTHON:-.venv/bin/python}"
step() { printf '\n== arm64-run: %s (%ss)\n' "$1" "$SECONDS" >&2; }
die() { echo "arm64-run.sh: $*" >&2; exit 1; }

[ -x "$PYTHON" ] || die "$PYTHON not found: make the venv first (README), or set PYTHON"
[ "$(id -u)" = 0 ] || die "needs root (chroot and bind mounts): run it with sudo"

# The x86_64 library is this host's (step 4); inside the root, the fetched one.
X86_LIB="${NEXABIND_LIB_PATH:-$("$PYTHON" -m nexabind which)}"
unset NEXABIND_LIB_PATH

step "arm64 root"
ROOT="$(build_scripts/arm64-root.sh)"
echo "$ROOT" >&2

RELEASE="$("$PYTHON" -c 'from nexabind import pin; print(pin.RELEASE)')"
SOURCE="$("$PYTHON" -c 'from nexabind._source import ensure_source; print(ensure_source())')"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/nexabind-arm64.XXXXXX")"
SERVER_PID=""
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null
    rm -rf "$WORK"
    return 0
}
trap cleanup EXIT

step "cross build (cached after the first)"
"$PYTHON" -m nexabind build --target linux-arm64 --out "$WORK/mirror/$RELEASE" >&2

step "loopback mirror"
"$PYTHON" -u -c '
import functools, http.server, sys
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])
handler.log_message = lambda *a: None
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
print(server.server_address[1], flush=True)
server.serve_forever()
' "$WORK/mirror" >"$WORK/port" &
SERVER_PID=$!
for _ in $(seq 50); do [ -s "$WORK/port" ] && break; sleep 0.1; done
URL="http://127.0.0.1:$(cat "$WORK/port")"
echo "$URL" >&2

step "checkout into the root"
rm -rf "$ROOT/work/nexabind"
mkdir -p "$ROOT/work/nexabind"
git ls-files -z --cached --others --exclude-standard \
    | tar --null -T - -cf - | tar -xf - -C "$ROOT/work/nexabind"
rm -rf "$ROOT/tmp/nexabind-cache"

# pip in the root trusts what pip on the host trusts (a TLS-intercepting proxy's CA, say).
CA="${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}"
export BIND_RO="$SOURCE:/llama.cpp $CA:/etc/nexabind-host-ca.crt"
export PIP_CERT=/etc/nexabind-host-ca.crt
export NEXABIND_CACHE_DIR=/tmp/nexabind-cache NEXABIND_LLAMA_SOURCE=/llama.cpp
in_root() { build_scripts/arm64-root.sh --enter -- "$@"; }

step "pip install the checkout (and its dependencies, the first time)"
in_root sh -c 'cd /tmp && pip install -q --disable-pip-version-check --root-user-action=ignore "/work/nexabind[test]" && rm -rf /work/nexabind/build'

step "nexabind info"
in_root nexabind info --json >"$WORK/info.json"
"$PYTHON" - "$WORK/info.json" <<'EOF'
import json, sys
p = json.load(open(sys.argv[1]))["platform"]
print(f"platform: {p['os']} {p['arch']} {p['libc']} {p['libc_version']}", file=sys.stderr)
assert (p["os"], p["arch"], p["libc"]) == ("linux", "arm64", "glibc"), p
EOF

step "nexabind fetch from the loopback mirror"
in_root nexabind fetch --base-url "$URL" --json >"$WORK/fetch.json"
LIB="$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["lib"])' "$WORK/fetch.json")"
echo "$LIB" >&2

step "nexabind doctor"
in_root nexabind doctor --json >"$WORK/doctor.json"
"$PYTHON" - "$WORK/doctor.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
print(f"cpu variant: {d['cpu_variant']}; tokens: {d['tokens']}; {d['tok_per_s']} tok/s", file=sys.stderr)
assert d["cpu_variant"] and d["cpu_variant"].startswith("armv"), d["cpu_variant"]
assert len(d["tokens"]) > 0
EOF

step "tests in the root"
if [ $# -eq 0 ]; then
    set -- -q tests/test_platform.py tests/test_loader.py tests/test_lowlevel.py tests/test_llama.py \
        tests/test_doctor.py
fi
in_root env NEXABIND_LIB_PATH="$LIB" sh -c 'cd /work/nexabind && exec python -m pytest -p no:cacheprovider "$@"' pytest "$@"

step "greedy tokens: arm64 (emulated) against x86_64"
"$PYTHON" build_scripts/compare_greedy.py model "$SOURCE" "$ROOT/tmp/tiny.gguf"
"$PYTHON" build_scripts/compare_greedy.py run "$X86_LIB" "$ROOT/tmp/tiny.gguf" "$ROOT/tmp/greedy-x86_64"
in_root python /work/nexabind/build_scripts/compare_greedy.py run "$LIB" /tmp/tiny.gguf \
    /tmp/greedy-arm64 --force /tmp/greedy-x86_64.json
"$PYTHON" build_scripts/compare_greedy.py compare "$ROOT/tmp/greedy-x86_64.json" "$ROOT/tmp/greedy-arm64.json"

step "done"
cd "$HERE"
