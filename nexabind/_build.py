"""Build llama.cpp's shared libraries from source for this host, the way CI builds them.

``build()`` gets the pinned source (:mod:`nexabind._source`), configures and builds it with
CMake using the flags of this (os, arch, variant) (:mod:`nexabind.targets`), stages an artifact
folder (``lib/``, ``include/``, ``abi.json``, ``build-info.json``, ``LICENSE``) and, on request,
packs it with a ``manifest.json`` entry (``out``) or installs it into the cache the way
``nexabind fetch`` does (``install``, :mod:`nexabind.install`). Builds are cached outside
``NEXABIND_CACHE_DIR`` under a key of commit, target, variant, flags and compiler, so a second
run is a cache hit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from nexabind import _cross, _source, pin, settings, targets
from nexabind._artifact import (
    BUILD_MARKER,
    artifact_entry,
    min_glibc,
    pack,
    probe_source,
    rpc_protocol,
    stage_artifact,
    stage_server,
    update_manifest,
    write_abi_json,
)
from nexabind._cmake import cmake_build, compiler_version, require_tools
from nexabind.errors import BuildError
from nexabind.install import install_archive
from nexabind.platform import cpu_flags
from nexabind.platform import target as host_target

__all__ = ["build", "probe_source", "server_binary"]

log = logging.getLogger(__name__)


def _key_parts(
    source: str | os.PathLike[str] | None,
    src: Path,
    os_name: str,
    arch: str,
    variant: str,
    flags: list[str],
    compiler: str,
) -> list[Any]:
    """What a build's cache key hashes: the source (the pinned commit and its patches, or a
    tree's path), target, variant, flags and compiler."""
    pinned = _source.origin(src) is not None or source is None
    source_id = [pin.LLAMA_COMMIT, _source.patches()] if pinned else str(src)
    return [source_id, os_name, arch, variant, flags, compiler]


def _local_cpu_variants(all_variants: bool | None, out: object) -> list[str] | None:
    """The CPU variants a build for this machine makes: ggml's pick for this CPU and the
    baseline (``x64``, ``armv8.0_1``: for ``doctor --all-variants`` and the install's
    fallback), on Linux x86_64 and arm64; None: all."""
    if all_variants or (all_variants is None and out is not None):
        return None
    os_name, arch = host_target()
    flags = cpu_flags()
    ranked = list(targets.cpu_variant_scores(arch, flags or set())) if os_name == "linux" else []
    if not ranked:  # not a Linux the table knows: every variant
        return None
    return sorted({ranked[0], ranked[-1]})  # the best and the baseline (x64, armv8.0_1)


def _build_dir(
    build_cache: str | os.PathLike[str] | None,
    target: tuple[str, str, str],
    key_parts: list[Any],
    kind: str = "",
) -> tuple[str, Path]:
    """A build's cache key and its folder (created): <commit>-<target key><kind>-<key>."""
    key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:12]
    name = f"{pin.LLAMA_COMMIT}-{targets.key(*target)}{kind}-{key}"
    bdir = _source.build_cache_dir(build_cache) / name
    bdir.mkdir(parents=True, exist_ok=True)
    return key, bdir


def build(
    variant: str = "cpu",
    *,
    source: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    install: bool = False,
    build_cache: str | os.PathLike[str] | None = None,
    sdist: str | os.PathLike[str] | None = None,
    cmake_args: tuple[str, ...] = (),
    jobs: int | None = None,
    progress: bool | None = None,
    target: str | None = None,
    with_server: bool = False,
    all_variants: bool | None = None,
) -> Path:
    """Build llama.cpp for this host (or reuse the cached build) and stage an artifact.

    Args:
        variant: ``cpu``, ``cuda``, ``vulkan`` or ``metal`` (see :data:`nexabind.targets.FLAGS`).
        source: llama.cpp source tree; default ``NEXABIND_LLAMA_SOURCE``, else the pinned source
            (:func:`nexabind._source.ensure_source`).
        out: Folder to write the artifact archive and ``manifest.json`` into (added to an
            existing manifest).
        install: Install the artifact into the cache exactly as ``nexabind fetch`` does.
        build_cache: Root of the build cache (``NEXABIND_BUILD_CACHE``).
        sdist: A local llama-cpp-python sdist to take the pinned source from
            (``NEXABIND_LLAMA_SDIST``; see :func:`nexabind._source.ensure_source`).
        cmake_args: Extra CMake arguments (part of the cache key).
        jobs: Parallel build jobs (default: CMake's choice).
        progress: Show a progress bar; default: only on a terminal.
        target: Build for another ``os-arch`` (``linux-arm64``, ``windows-x86_64``) with a
            cross toolchain, the ABI probe run under qemu-user or wine (see
            :mod:`nexabind._cross`); default: this host. Only the ``cpu`` variant, and not
            with ``install``.
        with_server: Build llama-server instead (after the library, with
            :data:`nexabind.targets.SERVER_FLAGS`, a build of its own in the cache) and return
            its folder: ``bin/llama-server`` beside the library build's libraries (see
            :func:`server_binary`). Not with ``out``, ``install`` or ``target``.
        all_variants: Build every CPU variant of the target (what a release artifact needs to
            run on every CPU), or only this CPU's best and the baseline ``x64`` (a build for
            this machine: a third of the compile). Default: every variant with ``out`` (an
            artifact to publish), this CPU's otherwise. Only x86_64 Linux hosts know their
            CPU's variants; other builds make every variant.

    Returns:
        The staged artifact folder (``lib/``, ``include/``, ``abi.json``, ...); with
        ``install``, the installed ``lib`` folder instead.

    Raises:
        BuildError: Missing tools, unsupported variant or target, bad source or a failed build.
    """
    if with_server:
        if out is not None or install or target:
            msg = "--with-server builds llama-server alone; drop --out, --install and --target"
            raise BuildError(msg)
        return _build_server(variant, source, build_cache, sdist, cmake_args, jobs, progress)
    host = host_target()
    os_name, arch = targets.parse_target(target) if target else host
    flags = [*targets.cmake_flags(os_name, arch, variant), *cmake_args]
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
        cross = _cross.resolve((os_name, arch), host, _source.build_cache_dir(build_cache))
    source = settings.LLAMA_SOURCE.get(source)
    src = _source.ensure_source(source, build_cache=build_cache, sdist=sdist)
    cmake, cc, ninja = require_tools()
    if cross is not None:
        cc = cross.cc
    compiler = compiler_version(cc)
    fetched = _source.origin(src)
    # The subset needs patches/0002, so a --source tree (built as it is) makes every variant.
    pinned = fetched is not None and cross is None
    cpu_variants = _local_cpu_variants(all_variants, out) if pinned else None
    if cpu_variants is not None:  # patches/0002: only these of GGML_CPU_ALL_VARIANTS
        flags.append(f"-DGGML_CPU_VARIANTS={';'.join(cpu_variants)}")
    key_parts = _key_parts(source, src, os_name, arch, variant, flags, compiler)
    if cross is not None:
        # The toolchain's content is part of the key, not its path (one per checkout).
        key_parts.append(["cross", *cross.cmake_flags, cross.fingerprint()])
        flags = [*cross.flags(), *flags]
    key, bdir = _build_dir(build_cache, (os_name, arch, variant), key_parts)
    stage = bdir / "artifact"
    marker = stage / BUILD_MARKER
    import datetime
    import platform

    from filelock import FileLock

    with FileLock(str(bdir / ".lock")):
        if marker.is_file():
            log.info("cache hit, build in %s", stage)
        else:
            log.info("building llama.cpp %s (%s) in %s", pin.LLAMA_COMMIT, variant, bdir)
            shutil.rmtree(stage, ignore_errors=True)
            log_path = bdir / "build.log"
            log_path.write_text("")
            cdir = bdir / "cmake"
            if progress is None:
                progress = sys.stderr.isatty()
            cmake_build(cmake, ninja, src, cdir, flags, log_path, jobs=jobs, progress=progress)
            stage_artifact(src, cdir, stage)
            write_abi_json(src, bdir, stage / "abi.json", cc, cross)
            info = {
                "llama_commit": pin.LLAMA_COMMIT,
                "llama_build": pin.LLAMA_BUILD,
                "os": os_name,
                "arch": arch,
                "variant": variant,
                "cmake_flags": flags,
                "compiler": compiler,
                "source": fetched or str(src),
                # A --source tree is built as it is; the pinned source carries our patches.
                "patches": _source.patches() if fetched else [],
                "cpu_variants": cpu_variants or "all",
                "rpc_protocol": rpc_protocol(src),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "host": platform.node(),
                "min_glibc": min_glibc(stage / "lib") if os_name == "linux" else None,
                "min_macos": os.environ.get("MACOSX_DEPLOYMENT_TARGET")
                if os_name == "macos"
                else None,
                "requires": {"cuda_driver": ">=12.4"} if variant == "cuda" else {},
                "cross_built_on": f"{host[0]}-{host[1]}" if cross else None,
            }
            (stage / "build-info.json").write_text(json.dumps(info, indent=2) + "\n")
            marker.write_text(json.dumps({"key": key}) + "\n")
            log.info("build finished; log in %s", log_path)
    if out is None and not install:
        return stage
    info = json.loads((stage / "build-info.json").read_text())
    dist = Path(out) if out is not None else bdir / "dist"
    dist.mkdir(parents=True, exist_ok=True)
    archive = dist / targets.artifact_name(os_name, arch, variant)
    pack(stage, archive)
    entry = artifact_entry(archive, info)
    if out is not None:
        path = update_manifest(dist, entry)
        log.info("wrote %s and %s", archive, path)
    if install:
        return install_archive(archive, entry, pin.RELEASE)
    return stage


def _build_server(
    variant: str,
    source: str | os.PathLike[str] | None,
    build_cache: str | os.PathLike[str] | None,
    sdist: str | os.PathLike[str] | None,
    cmake_args: tuple[str, ...],
    jobs: int | None,
    progress: bool | None,
) -> Path:
    """llama-server for ``variant`` on this host, cached under a key of the library's flags
    plus :data:`~nexabind.targets.SERVER_FLAGS`; returns the staged folder (``bin/``)."""
    libs = build(variant, source=source, build_cache=build_cache, sdist=sdist,
                 cmake_args=cmake_args, jobs=jobs, progress=progress) / "lib"  # fmt: skip
    os_name, arch = host_target()
    flags = [*targets.cmake_flags(os_name, arch, variant), *cmake_args, *targets.SERVER_FLAGS]
    source = settings.LLAMA_SOURCE.get(source)
    src = _source.ensure_source(source, build_cache=build_cache, sdist=sdist)
    cmake, cc, ninja = require_tools()
    compiler = compiler_version(cc)
    parts = _key_parts(source, src, os_name, arch, variant, flags, compiler)
    key, bdir = _build_dir(build_cache, (os_name, arch, variant), parts, "-server")
    stage = bdir / "artifact"
    marker = stage / BUILD_MARKER
    from filelock import FileLock

    with FileLock(str(bdir / ".lock")):
        if marker.is_file():
            log.info("cache hit, llama-server in %s", stage / "bin")
            return stage
        log.info("building llama-server %s (%s) in %s", pin.LLAMA_COMMIT, variant, bdir)
        cdir = bdir / "cmake"
        log_path = bdir / "build.log"
        log_path.write_text("")
        shown = sys.stderr.isatty() if progress is None else progress
        cmake_build(cmake, ninja, src, cdir, flags, log_path, jobs=jobs, progress=shown,
                    build_targets=["llama-server"])  # fmt: skip
        stage_server(cdir, libs, stage)
        info = {"llama_commit": pin.LLAMA_COMMIT, "variant": variant, "cmake_flags": flags,
                "compiler": compiler, "libraries": str(libs)}  # fmt: skip
        (stage / "build-info.json").write_text(json.dumps(info, indent=2) + "\n")
        marker.write_text(json.dumps({"key": key}) + "\n")
        log.info("llama-server built; log in %s", log_path)
    return stage


def server_binary(build_cache: str | os.PathLike[str] | None = None) -> Path | None:
    """The llama-server a finished ``build(with_server=True)`` of the pinned commit left in the
    build cache for this host (the newest, when several variants were built), or None."""
    os_name, arch = host_target()
    exe = "llama-server.exe" if os_name == "windows" else "llama-server"
    root = _source.build_cache_dir(build_cache)
    found = [
        p / "artifact" / "bin" / exe
        for p in root.glob(f"{pin.LLAMA_COMMIT}-{os_name}-{arch}-*-server-*")
        if (p / "artifact" / BUILD_MARKER).is_file() and (p / "artifact" / "bin" / exe).is_file()
    ]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None
