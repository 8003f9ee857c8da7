#!/usr/bin/env bash
# Cold build of llama.cpp from the pinned sdist, every CPU variant against a build for this
# machine (its best variant and x64), each in an empty build cache: wall and CPU time.
#   benchmarks/build_time.sh [SDIST]     (default: the copy in the user build cache)
set -euo pipefail
cd "$(dirname "$0")/.."
sdist="${1:-$HOME/.cache/nexabind/builds/src/llama_cpp_python-0.3.36.tar.gz}"
nb="${NEXABIND:-.venv/bin/nexabind}"
lscpu | grep -E "Model name|^CPU\(s\)"
for kind in all-variants this-cpu; do
    cache="$(mktemp -d)"
    mkdir -p "$cache/src" && cp "$sdist" "$cache/src/"
    flag=""; [ "$kind" = all-variants ] && flag="--all-variants"
    /usr/bin/time -f "$kind: wall %e s, CPU %U s user + %S s sys" \
        "$nb" build --build-cache "$cache" $flag >/dev/null 2>"$cache.log" || { tail "$cache.log"; exit 1; }
    tail -n 1 "$cache.log"
    rm -rf "$cache" "$cache.log"
done
