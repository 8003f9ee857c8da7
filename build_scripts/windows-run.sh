#!/usr/bin/env bash
# windows-x86_64 under wine, from a Linux x86_64 host: one command.
#
#   build_scripts/windows-run.sh [N_TOKENS]
#
# 1. `nexabind build --target windows-x86_64 --out DIST` (cross-built with mingw-w64 once, then
#    a build cache hit; the ABI probe ran under wine), extracted as fetch extracts it;
# 2. build_scripts/greedy.c compiled with mingw-w64 and run under wine: it loads ggml-base.dll,
#    ggml.dll and llama.dll from the folder the way the loader does (AddDllDirectory, then
#    LoadLibraryExW), lets ggml_backend_load_all_from_path pick a CPU variant DLL, and decodes
#    the tiny test model greedily;
# 3. the same program built for this host on the linux-x86_64 library; the tokens are compared.
#
# Needs the cross toolchain and wine (README "Targets"), and a venv of this checkout (PYTHON,
# default .venv/bin/python) with a linux-x86_64 library (NEXABIND_LIB_PATH, else what
# `nexabind which` finds). The wine prefix lives in the build cache (created on first use).
set -euo pipefail
exec </dev/null
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
N="${1:-24}"
PROMPT="Once upon a time, in a small village by the sea,"
step() { printf '\n== windows-run: %s (%ss)\n' "$1" "$SECONDS" >&2; }

[ -x "$PYTHON" ] || { echo "windows-run.sh: $PYTHON not found (README), or set PYTHON" >&2; exit 1; }
HOST_LIB="${NEXABIND_LIB_PATH:-$("$PYTHON" -m nexabind which)}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/nexabind-windows.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

step "cross build (cached after the first)"
"$PYTHON" -m nexabind build --target windows-x86_64 --out "$WORK/dist" >&2
"$PYTHON" - "$WORK" <<'PY'
import json, sys
from pathlib import Path
from nexabind._archive import safe_extract
work = Path(sys.argv[1])
(entry,) = json.loads((work / "dist" / "manifest.json").read_text())["artifacts"]
safe_extract(work / "dist" / entry["url"], work / "tree")
print(f"{entry['name']}: {entry['size']} bytes", file=sys.stderr)
PY
ls "$WORK/tree/lib" >&2

step "the driver, for Windows and for this host"
SOURCE="$("$PYTHON" -c 'from nexabind._source import ensure_source; print(ensure_source())')"
INC=(-I"$SOURCE/include" -I"$SOURCE/ggml/include")
eval "$("$PYTHON" -c '
from nexabind import _cross
from nexabind._source import build_cache_dir
from nexabind.platform import target as host_target
import shlex
t = _cross.resolve(("windows", "x86_64"), host_target(), build_cache_dir())
print("CC=" + shlex.quote(t.cc))
print("RUNNER=(" + " ".join(map(shlex.quote, t.runner)) + ")")
print("\n".join("export " + k + "=" + shlex.quote(v) for k, v in t.env.items()))
')"
"$CC" -O2 "${INC[@]}" build_scripts/greedy.c -o "$WORK/greedy.exe" -lpsapi
cc -O2 "${INC[@]}" build_scripts/greedy.c -o "$WORK/greedy" -ldl
"$PYTHON" build_scripts/compare_greedy.py model "$SOURCE" "$WORK/tiny.gguf"

step "greedy under wine"
"${RUNNER[@]}" "$WORK/greedy.exe" "$WORK/tree/lib" "$WORK/tiny.gguf" "$N" "$PROMPT" >"$WORK/windows.json"
cat "$WORK/windows.json"

step "greedy on this host"
"$WORK/greedy" "$HOST_LIB" "$WORK/tiny.gguf" "$N" "$PROMPT" >"$WORK/host.json"
cat "$WORK/host.json"

step "compare"
"$PYTHON" - "$WORK/host.json" "$WORK/windows.json" <<'PY'
import json, sys
host, win = (json.load(open(p)) for p in sys.argv[1:])
print(f"windows-x86_64 under wine: backends {win['backends']}, CPU variant {win['cpu_variant']}")
print(f"greedy tokens match linux-x86_64: {host['tokens'] == win['tokens']}")
diff = max(abs(a - b) for a, b in zip(host["top_logits"], win["top_logits"]))
print(f"largest difference of the chosen tokens' logits: {diff:.3g}")
sys.exit(0 if win["backends"] and host["tokens"] == win["tokens"] else 1)
PY
