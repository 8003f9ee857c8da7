"""The pinned llama.cpp source tree, fetched once into the build cache.

:func:`ensure_source` tries git, then GitHub's archive of the commit, then the
llama-cpp-python sdist (which vendors llama.cpp at the pinned commit; its sha256 is pinned),
each failing fast, applies this package's patches (``nexabind/patches/*.patch``, see
:func:`patches`) and keeps the tree under ``<build cache>/src/``, named by commit and patch
set. The build cache (:func:`build_cache_dir`) also holds the builds; it is deliberately not the
user cache of installed libraries.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from nexabind import pin, settings
from nexabind.cache import sha256_file
from nexabind.errors import BuildError

__all__ = ["build_cache_dir", "ensure_sdist", "ensure_source", "origin", "patches"]

log = logging.getLogger(__name__)

_SOURCE_MARKER = ".nexabind-source.json"
_PATCHES = Path(__file__).parent / "patches"


def patches() -> list[dict[str, str]]:
    """The patches applied to the pinned source, in order: ``{"file", "sha256"}`` each.

    They live in ``nexabind/patches/`` (each file says what it fixes and why); builds of the
    pinned source record them in ``build-info.json``, and they are part of the build's cache
    key. A ``--source`` tree is built as it is, unpatched.
    """
    return [{"file": p.name, "sha256": sha256_file(p)} for p in sorted(_PATCHES.glob("*.patch"))]


def _patch_set_id() -> str:
    import hashlib

    digest = hashlib.sha256(json.dumps(patches()).encode()).hexdigest()
    return digest[:8]


def _apply_patches(dest: Path) -> None:
    """Apply :func:`patches` to the fresh tree ``dest`` with ``git apply`` (else ``patch``)."""
    git, patch = shutil.which("git"), shutil.which("patch")
    if git is None and patch is None:
        msg = "applying nexabind's patches to the llama.cpp source needs git or patch: install one"
        raise BuildError(msg)
    # No repository above the tree is ever consulted: git apply inside one would take the
    # patch's paths relative to that repository's top.
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(dest.parent)}
    gitlink = dest / ".git"  # the sdist's vendor/llama.cpp holds a submodule's .git file
    if gitlink.is_file():
        gitlink.unlink()
    for p in patches():
        path = _PATCHES / p["file"]
        cmd = ([git, "apply", "--whitespace=nowarn", str(path)] if git else
               [str(patch), "-p1", "--forward", "--batch", "-i", str(path)])  # fmt: skip
        r = subprocess.run(cmd, cwd=dest, env=env, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            msg = f"patch {p['file']} does not apply to {dest}: {(r.stderr or r.stdout).strip()}"
            raise BuildError(msg)
        log.info("applied %s", p["file"])


def build_cache_dir(build_cache: str | os.PathLike[str] | None = None) -> Path:
    """Return the root of the build cache (source trees and finished builds).

    Args:
        build_cache: Explicit folder; else ``NEXABIND_BUILD_CACHE``; else
            ``user_cache_dir("nexabind")/builds``. Deliberately not under ``NEXABIND_CACHE_DIR``.

    Returns:
        The folder (not created).
    """
    build_cache = settings.BUILD_CACHE.get(build_cache)
    if build_cache is not None:
        return Path(build_cache)
    import platformdirs

    return Path(platformdirs.user_cache_dir("nexabind")) / "builds"


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
    import tarfile
    import tempfile

    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp, tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(tmp, filter="data")
        else:  # Python < 3.12 without the backported filter
            tar.extractall(tmp)  # noqa: S202 - pinned archive, sha256 checked first
        (top,) = Path(tmp).iterdir()
        (top / subdir if subdir else top).rename(dest)


def _from_archive(dest: Path, timeout: float) -> None:
    import tempfile

    import requests

    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        archive = Path(tmp) / "src.tar.gz"
        with requests.get(pin.ARCHIVE_URL, stream=True, timeout=(timeout, 60)) as r:
            r.raise_for_status()
            with archive.open("wb") as f:
                for chunk in r.iter_content(1 << 20):
                    f.write(chunk)
        _extract_tar(archive, dest, None)


def _sdist_in(root: Path, timeout: float, local: str | os.PathLike[str] | None) -> Path:
    """The pinned sdist (``local``, else the copy in ``root``, downloaded there once)."""
    path = Path(local) if local is not None else root / pin.SDIST_FILE
    if local is None and not path.is_file():
        import tempfile

        from filelock import FileLock

        root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root / f".{pin.SDIST_FILE}.lock")):
            if not path.is_file():
                with tempfile.TemporaryDirectory(dir=root) as tmp:
                    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                           ":all:", "--timeout", str(int(timeout)), "--retries", "1", "-d", tmp,
                           f"{pin.SDIST_NAME}=={pin.SDIST_VERSION}"]  # fmt: skip
                    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
                    got = sha256_file(Path(tmp) / pin.SDIST_FILE)
                    if got != pin.SDIST_SHA256:
                        msg = f"{pin.SDIST_FILE}: sha256 is {got}, expected {pin.SDIST_SHA256}"
                        raise BuildError(msg + "; not using it")
                    os.replace(Path(tmp) / pin.SDIST_FILE, path)
                return path
    got = sha256_file(path)
    if got != pin.SDIST_SHA256:
        msg = f"{path}: sha256 is {got}, expected {pin.SDIST_SHA256}; not using it"
        raise BuildError(msg)
    return path


def ensure_sdist(
    build_cache: str | os.PathLike[str] | None = None,
    *,
    timeout: float = 10.0,
    sdist: str | os.PathLike[str] | None = None,
) -> Path:
    """Return the pinned llama-cpp-python sdist, sha256-checked, downloading it once.

    It is kept in the build cache (``<build cache>/src/``), where the llama.cpp source comes
    from when GitHub is unreachable; ``sdist`` (else ``NEXABIND_LLAMA_SDIST``) names a local
    copy instead.

    Raises:
        BuildError: The file's sha256 is not the pinned one.
        subprocess.CalledProcessError: ``pip download`` failed.
    """
    sdist = settings.LLAMA_SDIST.get(sdist)
    return _sdist_in(build_cache_dir(build_cache) / "src", timeout, sdist)


def _from_sdist(dest: Path, timeout: float, local: str | os.PathLike[str] | None) -> None:
    _extract_tar(_sdist_in(dest.parent, timeout, local), dest, pin.SDIST_SUBDIR)


def ensure_source(
    source: str | os.PathLike[str] | None = None,
    *,
    build_cache: str | os.PathLike[str] | None = None,
    timeout: float = 10.0,
    sdist: str | os.PathLike[str] | None = None,
) -> Path:
    """Return the pinned llama.cpp source tree, fetching it into the build cache once.

    Tried in order, each failing fast: git (GitHub), the GitHub archive of the commit, the
    llama-cpp-python sdist (``sdist``, else ``NEXABIND_LLAMA_SDIST``, else ``pip download``),
    whose sha256 is pinned. The fetched tree gets :func:`patches` applied and is cached under
    ``<build cache>/src/llama.cpp-<commit>-p<patch set>``.

    Args:
        source: An existing source tree to use instead (or ``NEXABIND_LLAMA_SOURCE``).
        build_cache: Root of the build cache (see :func:`build_cache_dir`).
        timeout: Connect timeout in seconds for each network source.
        sdist: A local llama-cpp-python sdist file (its sha256 is checked).

    Returns:
        The folder holding llama.cpp's ``CMakeLists.txt``.

    Raises:
        BuildError: ``source`` is not a CMake project, or no source location worked.
    """
    source = settings.LLAMA_SOURCE.get(source)
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
    dest = root / f"llama.cpp-{pin.LLAMA_COMMIT}-p{_patch_set_id()}"
    if (dest / _SOURCE_MARKER).is_file():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(root / f".{dest.name}.lock")):
        if (dest / _SOURCE_MARKER).is_file():
            return dest
        shutil.rmtree(dest, ignore_errors=True)
        failures = []
        sdist = settings.LLAMA_SDIST.get(sdist)
        sources: tuple[tuple[str, Callable[[Path, float], None]], ...] = (
            ("git", _from_git),
            ("archive", _from_archive),
            ("sdist", lambda dest, timeout: _from_sdist(dest, timeout, sdist)),
        )
        for name, fetch in sources:
            try:
                log.info("fetching llama.cpp %s source (%s)", pin.LLAMA_COMMIT, name)
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
            _apply_patches(dest)
            marker = {"commit": pin.LLAMA_COMMIT, "from": name, "patches": patches()}
            (dest / _SOURCE_MARKER).write_text(json.dumps(marker) + "\n")
            log.info("llama.cpp source from %s in %s", name, dest)
            return dest
    msg = (
        f"could not get llama.cpp {pin.LLAMA_COMMIT} source; tried:\n  "
        + "\n  ".join(failures)
        + "\nPass a source tree with --source DIR, or set NEXABIND_LLAMA_SDIST to a local "
        f"{pin.SDIST_FILE}"
    )
    raise BuildError(msg)


def origin(src: Path) -> str | None:
    """How the pinned tree ``src`` was fetched (``git``, ``archive``, ``sdist``); None for a tree
    that :func:`ensure_source` did not fetch (``--source``)."""
    marker = src / _SOURCE_MARKER
    return json.loads(marker.read_text()).get("from") if marker.is_file() else None
