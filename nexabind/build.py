"""Build llama.cpp's shared libraries from source for this host, the way CI builds them.

``build()`` gets the pinned source (:func:`ensure_source`), configures and builds it with CMake
using the flag table of this (os, arch, variant), stages an artifact folder (``lib/``,
``include/``, ``abi.json``, ``build-info.json``, ``LICENSE``) and, on request, packs it with a
``manifest.json`` entry (``out``) or installs it into the cache through the same code path as
``nexabind fetch`` (``install``). Builds are cached outside ``NEXABIND_CACHE_DIR`` under a key
of commit, target, variant, flags and compiler, so a second run is a cache hit.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform as _platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections import deque
from pathlib import Path
from typing import Any

from nexabind import _cross, pin
from nexabind.errors import BuildError

__all__ = [
    "FLAGS",
    "build",
    "build_cache_dir",
    "ensure_source",
    "host_target",
    "parse_target",
    "probe_source",
]

_SOURCE_MARKER = ".nexabind-source.json"
_BUILD_MARKER = "nexabind-build.json"

#: CMake flags every build gets.
COMMON_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_COMMON=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_CURL=OFF",
    f"-DLLAMA_BUILD_COMMIT={pin.LLAMA_COMMIT}",
)

_CPU_ALL = ("-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON", "-DGGML_NATIVE=OFF")
_CUDA = ("-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON", "-DGGML_NATIVE=OFF",
         "-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=61;70;75;80;86;89;90")  # fmt: skip
_VULKAN = (*_CPU_ALL, "-DGGML_VULKAN=ON")

#: Extra CMake flags per (os, arch, variant); a missing key is an unsupported combination.
FLAGS: dict[tuple[str, str, str], tuple[str, ...]] = {
    ("linux", "x86_64", "cpu"): _CPU_ALL,
    ("linux", "x86_64", "vulkan"): _VULKAN,
    ("linux", "x86_64", "cuda"): _CUDA,
    ("linux", "arm64", "cpu"): _CPU_ALL,
    ("linux", "arm64", "vulkan"): _VULKAN,
    ("windows", "x86_64", "cpu"): _CPU_ALL,
    ("windows", "x86_64", "vulkan"): _VULKAN,
    ("windows", "x86_64", "cuda"): _CUDA,
    # llama.cpp has no runtime-dispatch CPU variants for Windows on arm64 yet.
    ("windows", "arm64", "cpu"): ("-DGGML_BACKEND_DL=ON", "-DGGML_NATIVE=OFF"),
    ("macos", "x86_64", "cpu"): ("-DGGML_METAL=OFF", *_CPU_ALL),
    ("macos", "arm64", "metal"): (
        "-DGGML_METAL=ON",
        "-DGGML_METAL_EMBED_LIBRARY=ON",
        "-DGGML_BACKEND_DL=ON",
        "-DGGML_NATIVE=OFF",
    ),  # fmt: skip
}

#: Rpath flags so the libraries in ``lib/`` find each other wherever the folder lands.
_RPATH = {
    "linux": ("-DCMAKE_INSTALL_RPATH=$ORIGIN", "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON"),
    "macos": ("-DCMAKE_INSTALL_RPATH=@loader_path", "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON"),
    "windows": (),
}

_LIB_SUFFIXES = (".so", ".dylib", ".dll")
_FILE_SUFFIXES = (*_LIB_SUFFIXES, ".lib", ".a")
_PROGRESS = re.compile(r"^\[(\d+)/(\d+)\]")


def host_target() -> tuple[str, str]:
    """Return this process's ``(os, arch)`` in the names artifacts use (:func:`platform.target`).

    Returns:
        ``os`` in {linux, macos, windows} and ``arch`` in {x86_64, arm64}.
    """
    from nexabind.platform import target

    return target()


def parse_target(text: str) -> tuple[str, str]:
    """Split a target name such as ``linux-arm64`` into ``(os, arch)``, checking it is known.

    Raises:
        BuildError: Not an ``os-arch`` pair that any variant is built for.
    """
    known = sorted({f"{o}-{a}" for (o, a, _v) in FLAGS})
    os_name, _, arch = text.partition("-")
    if f"{os_name}-{arch}" not in known:
        msg = f"unknown target {text!r}; choose one of {known}"
        raise BuildError(msg)
    return os_name, arch


def build_cache_dir(build_cache: str | os.PathLike[str] | None = None) -> Path:
    """Return the root of the build cache (source trees and finished builds).

    Args:
        build_cache: Explicit folder; else ``NEXABIND_BUILD_CACHE``; else
            ``user_cache_dir("nexabind")/builds``. Deliberately not under ``NEXABIND_CACHE_DIR``.

    Returns:
        The folder (not created).
    """
    if build_cache is not None:
        return Path(build_cache)
    env = os.environ.get("NEXABIND_BUILD_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("nexabind")) / "builds"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- source


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _from_git(dest: Path, timeout: float) -> None:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    # An unreachable host fails within `timeout`; a slow but live one may take its time.
    git = ["git", "-C", str(dest), "-c", "http.lowSpeedLimit=1000",
           "-c", f"http.lowSpeedTime={int(timeout)}"]  # fmt: skip
    subprocess.run(["git", "init", "-q", str(dest)], check=True, capture_output=True)
    for cmd in (
        [*git, "fetch", "-q", "--depth", "1", pin.GIT_URL, pin.LLAMA_COMMIT_FULL],
        [*git, "checkout", "-q", "FETCH_HEAD"],
    ):
        subprocess.run(cmd, check=True, capture_output=True, timeout=600, env=env)
    shutil.rmtree(dest / ".git", ignore_errors=True)


def _extract_tar(archive: Path, dest: Path, subdir: str | None) -> None:
    """Extract the one top folder (or ``<top>/<subdir>``) of ``archive`` to ``dest``."""
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp, tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(tmp, filter="data")
        else:  # Python < 3.12 without the backported filter
            tar.extractall(tmp)  # noqa: S202 - pinned archive, sha256 checked first
        (top,) = Path(tmp).iterdir()
        (top / subdir if subdir else top).rename(dest)


def _from_archive(dest: Path, timeout: float) -> None:
    import requests

    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        archive = Path(tmp) / "src.tar.gz"
        with requests.get(pin.ARCHIVE_URL, stream=True, timeout=(timeout, 60)) as r:
            r.raise_for_status()
            with archive.open("wb") as f:
                for chunk in r.iter_content(1 << 20):
                    f.write(chunk)
        _extract_tar(archive, dest, None)


def _from_sdist(dest: Path, timeout: float) -> None:
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        local = os.environ.get("NEXABIND_LLAMA_SDIST")
        if local:
            sdist = Path(local)
        else:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--timeout", str(int(timeout)), "--retries", "1", "-d", tmp,
                   f"{pin.SDIST_NAME}=={pin.SDIST_VERSION}"]  # fmt: skip
            subprocess.run(cmd, check=True, capture_output=True, timeout=600)
            sdist = Path(tmp) / pin.SDIST_FILE
        got = _sha256(sdist)
        if got != pin.SDIST_SHA256:
            msg = f"{sdist}: sha256 is {got}, expected {pin.SDIST_SHA256}; not using it"
            raise BuildError(msg)
        _extract_tar(sdist, dest, pin.SDIST_SUBDIR)


def ensure_source(
    source: str | os.PathLike[str] | None = None,
    *,
    build_cache: str | os.PathLike[str] | None = None,
    timeout: float = 10.0,
) -> Path:
    """Return the pinned llama.cpp source tree, fetching it into the build cache once.

    Tried in order, each failing fast: git (GitHub), the GitHub archive of the commit, the
    llama-cpp-python sdist (``pip download``, or the file named by ``NEXABIND_LLAMA_SDIST``),
    whose sha256 is pinned. The tree is cached under ``<build cache>/src/``.

    Args:
        source: An existing source tree to use instead (or ``NEXABIND_LLAMA_SOURCE``).
        build_cache: Root of the build cache (see :func:`build_cache_dir`).
        timeout: Connect timeout in seconds for each network source.

    Returns:
        The folder holding llama.cpp's ``CMakeLists.txt``.

    Raises:
        BuildError: ``source`` is not a CMake project, or no source location worked.
    """
    source = source if source is not None else os.environ.get("NEXABIND_LLAMA_SOURCE") or None
    if source is not None:
        path = Path(source).expanduser().resolve()
        if not (path / "CMakeLists.txt").is_file():
            msg = (
                f"--source {path} is not a llama.cpp source tree (no CMakeLists.txt there); "
                "pass the folder that holds llama.cpp's CMakeLists.txt, or omit --source to "
                "use the pinned source"
            )
            raise BuildError(msg)
        return path
    root = build_cache_dir(build_cache) / "src"
    dest = root / f"llama.cpp-{pin.LLAMA_COMMIT}"
    if (dest / _SOURCE_MARKER).is_file():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(root / f".{dest.name}.lock")):
        if (dest / _SOURCE_MARKER).is_file():
            return dest
        shutil.rmtree(dest, ignore_errors=True)
        failures = []
        for name, fetch in (("git", _from_git), ("archive", _from_archive),
                            ("sdist", _from_sdist)):  # fmt: skip
            try:
                _log(f"nexabind: fetching llama.cpp {pin.LLAMA_COMMIT} source ({name})")
                fetch(dest, timeout)
            except Exception as e:  # noqa: BLE001 - every failure is reported below
                shutil.rmtree(dest, ignore_errors=True)
                detail = getattr(e, "stderr", None) or e
                if isinstance(detail, bytes):
                    detail = detail.decode(errors="replace").strip()
                failures.append(f"{name}: {str(detail)[-300:]}")
                continue
            if not (dest / "include" / "llama.h").is_file():
                failures.append(f"{name}: no include/llama.h in the fetched tree")
                shutil.rmtree(dest, ignore_errors=True)
                continue
            marker = {"commit": pin.LLAMA_COMMIT, "from": name}
            (dest / _SOURCE_MARKER).write_text(json.dumps(marker) + "\n")
            _log(f"nexabind: llama.cpp source from {name} in {dest}")
            return dest
    msg = (
        f"could not get llama.cpp {pin.LLAMA_COMMIT} source; tried:\n  "
        + "\n  ".join(failures)
        + "\nPass a source tree with --source DIR, or set NEXABIND_LLAMA_SDIST to a local "
        f"{pin.SDIST_FILE}"
    )
    raise BuildError(msg)


# --------------------------------------------------------------------------- ABI probe


def probe_source(
    structs: dict[str, tuple[str, ...]],
    enums: dict[str, tuple[str, ...]],
) -> str:
    """Return a C program that prints sizes, offsets and enum values as abi.json (minus ids).

    Args:
        structs: Struct tag -> field names (``nexabind._cdef.STRUCTS``).
        enums: Enum tag -> constant names (``nexabind._cdef.ENUMS``).

    Returns:
        C source that includes ``llama.h`` and prints one JSON object.
    """
    lines = [
        "/* Generated by nexabind.build.probe_source - do not edit. */",
        "#include <stddef.h>",
        "#include <stdio.h>",
        '#include "llama.h"',
        "int main(void) {",
        '    printf("{\\"pointer_size\\": %zu, \\"structs\\": {", sizeof(void *));',
    ]
    for i, (tag, fields) in enumerate(structs.items()):
        sep = ", " if i else ""
        lines.append(
            f'    printf("{sep}\\"{tag}\\": {{\\"size\\": %zu, \\"offsets\\": {{", '
            f"sizeof(struct {tag}));"
        )
        for j, field in enumerate(fields):
            fsep = ", " if j else ""
            lines.append(
                f'    printf("{fsep}\\"{field}\\": %zu", offsetof(struct {tag}, {field}));'
            )
        lines.append('    printf("}}");')
    lines.append('    printf("}, \\"enums\\": {");')
    names = [name for consts in enums.values() for name in consts]
    for i, name in enumerate(names):
        sep = ", " if i else ""
        lines.append(f'    printf("{sep}\\"{name}\\": %lld", (long long){name});')
    lines += ['    printf("}}\\n");', "    return 0;", "}", ""]
    return "\n".join(lines)


def _write_abi_json(
    src: Path, work: Path, dest: Path, cc: str, cross: _cross.Cross | None = None
) -> None:
    """Compile the probe for the target and run it (under its emulator when cross-built)."""
    from nexabind import _cdef

    probe_c = work / "abi_probe.c"
    probe_c.write_text(probe_source(_cdef.STRUCTS, _cdef.ENUMS))
    native_exe = ".exe" if sys.platform == "win32" else ""
    exe = work / ("abi_probe" + (cross.exe_suffix if cross else native_exe))
    incs = [src / "include", src / "ggml" / "include"]
    if Path(cc).stem.lower() == "cl":
        cmd = [cc, "/nologo", *[f"/I{p}" for p in incs], str(probe_c), f"/Fe{exe}"]
    else:
        extra = cross.cc_args if cross else ()
        cmd = [cc, *extra, *[f"-I{p}" for p in incs], str(probe_c), "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
    if r.returncode != 0:
        msg = f"the ABI probe {probe_c} did not compile ({' '.join(cmd)}):\n{r.stderr[-2000:]}"
        raise BuildError(msg)
    run = [*cross.runner, str(exe)] if cross else [str(exe)]
    env = {**os.environ, **cross.env} if cross else None
    r = subprocess.run(run, capture_output=True, text=True, env=env, cwd=work)
    if r.returncode != 0:
        msg = f"the ABI probe {exe} failed with exit code {r.returncode}: {r.stderr[-1000:]}"
        raise BuildError(msg)
    abi = {"llama_commit": pin.LLAMA_COMMIT, "cdef_sha256": _cdef.CDEF_SHA256}
    abi.update(json.loads(r.stdout))
    dest.write_text(json.dumps(abi, indent=1, sort_keys=False) + "\n")


# --------------------------------------------------------------------------- build


def _require_tools() -> tuple[str, str, str | None]:
    cmake = shutil.which("cmake")
    if cmake is None:
        msg = "cmake not found on PATH; install it (pip install cmake, or apt/brew install cmake)"
        raise BuildError(msg)
    cc = os.environ.get("CC") or next(
        (c for c in ("cc", "gcc", "clang", "cl") if shutil.which(c)), None
    )
    if cc is None or shutil.which(cc) is None:
        msg = (
            "no C compiler found (looked for $CC, cc, gcc, clang, cl); install one "
            "(apt install build-essential, xcode-select --install, or Visual Studio Build Tools)"
        )
        raise BuildError(msg)
    return cmake, cc, shutil.which("ninja")


def _compiler_version(cc: str) -> str:
    args = [cc] if Path(cc).stem.lower() == "cl" else [cc, "--version"]
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return cc
    out = (r.stdout or r.stderr).strip().splitlines()
    return out[0] if out else cc


def _run_logged(cmd: list[str], log: Path, *, label: str, progress: bool) -> None:
    """Run ``cmd`` appending to ``log``, drive a bar from ninja's ``[n/N]``, raise on failure."""
    tail: deque[str] = deque(maxlen=40)
    bar = None
    with log.open("a", encoding="utf-8") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                f.write(line)
                tail.append(line.rstrip("\n"))
                m = _PROGRESS.match(line)
                if m and progress:
                    if bar is None:
                        from tqdm import tqdm

                        bar = tqdm(total=int(m.group(2)), desc=label, unit="step", leave=False)
                    bar.total = int(m.group(2))
                    bar.n = int(m.group(1))
                    bar.refresh()
        finally:
            code = proc.wait()
            if bar is not None:
                bar.close()
    if code != 0:
        msg = (
            f"{label} failed (exit code {code}); last lines of the log:\n"
            + "\n".join(tail)
            + f"\nFull log: {log}"
        )
        raise BuildError(msg)


def _targets(cmake: str, bdir: Path, have_ninja: bool) -> list[str]:
    """``llama`` plus the ggml backend modules (not the feature-probe helpers)."""
    if not have_ninja:
        return []
    r = subprocess.run(["ninja", "-C", str(bdir), "-t", "targets", "all"],
                       capture_output=True, text=True)  # fmt: skip
    names = {line.split(":")[0] for line in r.stdout.splitlines()}
    # Module names hold dots and underscores (ggml-cpu-armv8.2_1); file targets (foo.dll) are
    # left out.
    backends = sorted(
        n for n in names
        if re.fullmatch(r"ggml-[a-z0-9._-]+", n) and not n.endswith(("-feats", *_FILE_SUFFIXES))
    )  # fmt: skip
    return ["llama", *backends] if "llama" in names else []


def _min_glibc(lib: Path) -> str | None:
    best: tuple[int, ...] = ()
    for f in lib.iterdir():
        if f.is_file() and not f.is_symlink():
            for m in re.finditer(rb"GLIBC_(\d+)\.(\d+)", f.read_bytes()):
                best = max(best, (int(m.group(1)), int(m.group(2))))
    return ".".join(map(str, best)) or None


def _stage(src: Path, bdir: Path, stage: Path) -> None:
    """Copy libraries, headers and the license into the artifact layout."""
    lib = stage / "lib"
    lib.mkdir(parents=True)
    for folder in (bdir / "bin", bdir / "lib", bdir / "src", bdir / "ggml" / "src"):
        if not folder.is_dir():
            continue
        for f in sorted(folder.rglob("*")):
            name = f.name
            is_lib = name.endswith(_LIB_SUFFIXES) or ".so." in name or name.endswith(".lib")
            if not is_lib or (lib / name).exists() or (lib / name).is_symlink():
                continue
            if f.is_symlink():
                (lib / name).symlink_to(os.readlink(f))
            elif f.is_file():
                shutil.copy2(f, lib / name)
    inc = stage / "include"
    inc.mkdir()
    for folder in (src / "include", src / "ggml" / "include"):
        for h in sorted(folder.glob("*.h")) if folder.is_dir() else ():
            shutil.copy2(h, inc / h.name)
    if (src / "LICENSE").is_file():
        shutil.copy2(src / "LICENSE", stage / "LICENSE")


def _artifact_name(os_name: str, arch: str, variant: str) -> str:
    ext = "zip" if os_name == "windows" else "tar.gz"
    return f"nexabind-llama-{pin.ARTIFACT_VERSION}-{os_name}-{arch}-{variant}.{ext}"


def _pack(stage: Path, archive: Path) -> None:
    """Pack ``stage`` deterministically: sorted members, fixed mtime/owner/mode."""
    members = sorted(p for p in stage.rglob("*") if p.name != _BUILD_MARKER)
    tmp = archive.with_name(archive.name + ".part")
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            for p in members:
                if p.is_file():
                    info = zipfile.ZipInfo(p.relative_to(stage).as_posix(), (1980, 1, 1, 0, 0, 0))
                    info.external_attr = 0o644 << 16
                    z.writestr(info, p.read_bytes(), zipfile.ZIP_DEFLATED)
    else:
        import gzip

        def clean(ti: tarfile.TarInfo) -> tarfile.TarInfo:
            ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = 0, 0, 0, "", ""
            if ti.isfile():
                ti.mode = 0o755 if ti.name.startswith("lib/") else 0o644
            elif ti.isdir():
                ti.mode = 0o755
            return ti

        with (
            tmp.open("wb") as raw,
            gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz,
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            for p in members:
                tar.add(p, p.relative_to(stage).as_posix(), recursive=False, filter=clean)
    os.replace(tmp, archive)


def _artifact_entry(archive: Path, info: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": archive.name,
        "os": info["os"],
        "arch": info["arch"],
        "variant": info["variant"],
        "min_glibc": info.get("min_glibc"),
        "min_macos": info.get("min_macos"),
        "requires": info.get("requires", {}),
        "url": archive.name,
        "size": archive.stat().st_size,
        "sha256": _sha256(archive),
    }


def _update_manifest(out: Path, entry: dict[str, Any]) -> Path:
    from nexabind import _cdef

    path = out / "manifest.json"
    if path.is_file():
        data = json.loads(path.read_text())
    else:
        data = {
            "schema": 1,
            "release": pin.RELEASE,
            "llama_commit": pin.LLAMA_COMMIT,
            "llama_build": pin.LLAMA_BUILD,
            "abi_fingerprint": _cdef.CDEF_SHA256,
            "artifacts": [],
        }
    keep = [
        a
        for a in data["artifacts"]
        if (a["os"], a["arch"], a["variant"]) != (entry["os"], entry["arch"], entry["variant"])
    ]
    data["artifacts"] = sorted([*keep, entry], key=lambda a: (a["os"], a["arch"], a["variant"]))
    tmp = path.with_name("manifest.json.part")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def build(
    variant: str = "cpu",
    *,
    source: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    install: bool = False,
    build_cache: str | os.PathLike[str] | None = None,
    cmake_args: tuple[str, ...] = (),
    jobs: int | None = None,
    progress: bool | None = None,
    target: str | None = None,
) -> Path:
    """Build llama.cpp for this host (or reuse the cached build) and stage an artifact.

    Args:
        variant: ``cpu``, ``cuda``, ``vulkan`` or ``metal`` (see :data:`FLAGS`).
        source: llama.cpp source tree; default: the pinned source (:func:`ensure_source`).
        out: Folder to write the artifact archive and ``manifest.json`` into (added to an
            existing manifest).
        install: Install the artifact into the cache exactly as ``nexabind fetch`` does.
        build_cache: Root of the build cache (``NEXABIND_BUILD_CACHE``).
        cmake_args: Extra CMake arguments (part of the cache key).
        jobs: Parallel build jobs (default: CMake's choice).
        progress: Show a progress bar; default: only on a terminal.
        target: Build for another ``os-arch`` (``linux-arm64``, ``windows-x86_64``) with a
            cross toolchain, the ABI probe run under qemu-user or wine (see
            :mod:`nexabind._cross`); default: this host. Only the ``cpu`` variant, and not
            with ``install``.

    Returns:
        The staged artifact folder (``lib/``, ``include/``, ``abi.json``, ...); with
        ``install``, the installed ``lib`` folder instead.

    Raises:
        BuildError: Missing tools, unsupported variant or target, bad source or a failed build.
    """
    host = host_target()
    os_name, arch = parse_target(target) if target else host
    key_flags = FLAGS.get((os_name, arch, variant))
    if key_flags is None:
        known = sorted(v for (o, a, v) in FLAGS if (o, a) == (os_name, arch))
        msg = f"variant {variant!r} is not built for {os_name}-{arch}; choose one of {known}"
        raise BuildError(msg)
    cross = None
    if (os_name, arch) != host:
        if variant != "cpu" or install:
            what = f"--variant {variant}" if variant != "cpu" else "--install"
            msg = (
                f"a cross build for {os_name}-{arch} makes the cpu variant and does not install "
                f"(got {what}): its libraries do not load on this {host[0]}-{host[1]} machine; "
                "write the artifact with --out DIR"
            )
            raise BuildError(msg)
        cross = _cross.resolve((os_name, arch), host, build_cache_dir(build_cache))
    src = ensure_source(source, build_cache=build_cache)
    cmake, cc, ninja = _require_tools()
    if cross is not None:
        cc = cross.cc
    flags = [*COMMON_FLAGS, *key_flags, *_RPATH.get(os_name, ()), *cmake_args]
    compiler = _compiler_version(cc)
    source_id = pin.LLAMA_COMMIT if (src / _SOURCE_MARKER).is_file() or source is None else str(src)
    key_parts: list[Any] = [source_id, os_name, arch, variant, flags, compiler]
    if cross is not None:
        # The toolchain's content is part of the key, not its path (one per checkout).
        key_parts.append(["cross", *cross.cmake_flags, cross.fingerprint()])
        flags = [*cross.flags(), *flags]
    key_text = json.dumps(key_parts)
    key = hashlib.sha256(key_text.encode()).hexdigest()[:12]
    root = build_cache_dir(build_cache)
    bdir = root / f"{pin.LLAMA_COMMIT}-{os_name}-{arch}-{variant}-{key}"
    stage = bdir / "artifact"
    marker = stage / _BUILD_MARKER
    if progress is None:
        progress = sys.stderr.isatty()

    bdir.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(bdir / ".lock")):
        if marker.is_file():
            _log(f"nexabind: cache hit, build in {stage}")
        else:
            _log(f"nexabind: building llama.cpp {pin.LLAMA_COMMIT} ({variant}) in {bdir}")
            cdir = bdir / "cmake"
            log = bdir / "build.log"
            log.write_text("")
            shutil.rmtree(stage, ignore_errors=True)
            gen = ["-G", "Ninja"] if ninja else []
            _run_logged(
                [cmake, "-S", str(src), "-B", str(cdir), *gen, *flags],
                log,
                label="cmake configure",
                progress=False,
            )
            targets = _targets(cmake, cdir, bool(ninja))
            cmd = [cmake, "--build", str(cdir), "--config", "Release"]
            if targets:
                cmd += ["--target", *targets]
            if jobs:
                cmd += ["--parallel", str(jobs)]
            _run_logged(cmd, log, label="cmake build", progress=progress)
            _stage(src, cdir, stage)
            _write_abi_json(src, bdir, stage / "abi.json", cc, cross)
            info = {
                "llama_commit": pin.LLAMA_COMMIT,
                "llama_build": pin.LLAMA_BUILD,
                "os": os_name,
                "arch": arch,
                "variant": variant,
                "cmake_flags": flags,
                "compiler": compiler,
                "source": json.loads((src / _SOURCE_MARKER).read_text()).get("from")
                if (src / _SOURCE_MARKER).is_file()
                else str(src),
                "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "host": _platform.node(),
                "min_glibc": _min_glibc(stage / "lib") if os_name == "linux" else None,
                "min_macos": os.environ.get("MACOSX_DEPLOYMENT_TARGET")
                if os_name == "macos"
                else None,
                "requires": {"cuda_driver": ">=12.4"} if variant == "cuda" else {},
                "cross_built_on": f"{host[0]}-{host[1]}" if cross else None,
            }
            (stage / "build-info.json").write_text(json.dumps(info, indent=2) + "\n")
            marker.write_text(json.dumps({"key": key}) + "\n")
            _log(f"nexabind: build finished; log in {log}")
    info = json.loads((stage / "build-info.json").read_text())

    archive = None
    if out is not None or install:
        dist = Path(out) if out is not None else bdir / "dist"
        dist.mkdir(parents=True, exist_ok=True)
        archive = dist / _artifact_name(os_name, arch, variant)
        _pack(stage, archive)
        entry = _artifact_entry(archive, info)
        if out is not None:
            path = _update_manifest(dist, entry)
            _log(f"nexabind: wrote {archive} and {path}")
        if install:
            # The module, not nexabind.fetch (the package attribute is the fetch() function).
            from nexabind.fetch import install_archive

            return install_archive(archive, entry, pin.RELEASE)
    return stage
