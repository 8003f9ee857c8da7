"""Install an artifact archive into the cache: stage, check, load in a child, rename into place.

Both ``nexabind fetch`` and ``nexabind build --install`` install through here, under the
artifact's lock (:func:`nexabind.cache.file_lock`): the archive is extracted safely into
``tmp/`` (:mod:`nexabind._archive`), checked to hold the libraries, ``abi.json`` and
``build-info.json``, loaded in a child process that also decodes quantized random models (a
library that crashes or whose ABI differs fails there, not here), recorded, and renamed into
``libs/<release>/<key>/`` in one step. When ggml's pick of CPU variant crashes in that decode,
the best variant that decodes is recorded instead (:mod:`nexabind._variants`), and the loader
loads only that one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nexabind import _variants, cache, settings, targets
from nexabind._archive import safe_extract
from nexabind._install_record import read_build_info
from nexabind.errors import (
    AbiMismatchError,
    ChecksumMismatchError,
    DownloadError,
    LibraryNotFoundError,
    NexabindError,
)

__all__ = ["install_archive", "install_locked", "smoke_child"]


def _field(entry: Any, name: str) -> Any:
    return entry.get(name) if isinstance(entry, dict) else getattr(entry, name, None)


def _key(entry: Any) -> str:
    return targets.key(_field(entry, "os"), _field(entry, "arch"), _field(entry, "variant"))


def _check_tree(tree: Path, name: str, os_name: str | None = None) -> None:
    """The libraries (named as on the artifact's os), abi.json and build-info.json are there."""
    names = targets.library_names(os_name)
    missing = [f"lib/{n}" for n in names if not (tree / "lib" / n).exists()]
    missing += [n for n in ("abi.json", "build-info.json") if not (tree / n).is_file()]
    if missing:
        msg = f"artifact {name} lacks {', '.join(missing)}; it is not a nexabind artifact"
        raise DownloadError(msg + "; nothing installed")


# The child imports everything the load needs (the binding, plus ctypes and _cdef, which the
# loader imports lazily) and then waits for the folder on stdin, so its start-up overlaps the
# download; then it does what ``python -m nexabind.lowlevel FOLDER`` does, and exits normally (a
# library that crashes while unloading fails the check). It lives briefly: no collections while
# it imports, and its objects frozen so that the interpreter's last collections skip them.
_SMOKE = (
    "import gc\n"
    "gc.disable()\n"
    "import ctypes, sys\n"
    "from nexabind import _cdef, _ffi\n"
    "from nexabind.lowlevel import __main__ as smoke\n"
    "folder = sys.stdin.readline().rstrip('\\n')\n"
    "workdir = sys.stdin.readline().rstrip('\\n')\n"
    "code = smoke.main([folder]) if folder else 2\n"
    "sys.stdout.flush()\n"
    "if code == 0:\n"
    "    from nexabind import _selfcheck, _variants\n"
    "    code = _selfcheck.main(['decode', folder, workdir, *_variants.CHECK_DTYPES])\n"
    "gc.freeze()\n"
    "sys.exit(code)\n"
)


def _smoke_start() -> subprocess.Popen[str]:
    """Start the child that will load the staged libraries (see :func:`_smoke_load`)."""
    env = {k: v for k, v in os.environ.items() if k != settings.LIB_PATH.env}
    return subprocess.Popen(
        [sys.executable, "-c", _SMOKE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def _smoke_load(proc: subprocess.Popen[str], lib: Path, workdir: Path) -> None:
    """Hand the staged ``lib`` folder (and a folder for the check models) to the child: a
    broken build crashes the child only."""
    assert proc.stdin is not None
    try:
        proc.stdin.write(f"{lib}\n{workdir}\n")
        proc.stdin.flush()  # not closed: communicate() in _smoke_finish closes it
    except OSError:
        pass  # the child died already; _smoke_finish reports how


def _smoke_stop(proc: subprocess.Popen[str]) -> None:
    """End a child that was not needed (or failed to finish)."""
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


@contextlib.contextmanager
def smoke_child() -> Iterator[subprocess.Popen[str]]:
    """A child that will load the staged libraries (for :func:`install_locked`), started now.

    Its start-up overlaps what the caller does next (a download); it is ended on the way out
    if it was not used.
    """
    proc = _smoke_start()
    try:
        yield proc
    finally:
        _smoke_stop(proc)


def _smoke_finish(proc: subprocess.Popen[str], name: str) -> _variants.Check:
    """Wait for :func:`_smoke_start`'s child; raise saying why the library failed to load.

    Returns:
        The decode check of ggml's own pick of CPU variant: failed (``error`` set) when the
        library loaded but the child died decoding, which :func:`_variants.choose` then
        works around.
    """
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired as e:
        _smoke_stop(proc)
        msg = f"loading artifact {name} in a test process did not finish in 300 s; not installed"
        raise LibraryNotFoundError(msg) from e
    lines = _variants.json_lines(out)
    last = lines[-1] if lines else {}
    if proc.returncode == 0:
        return _variants.Check(None, last.get("cpu_variant"), last.get("results", {}))
    error = None if last.get("ok", True) else last.get("error")
    # Loaded, then failed in the decode, or killed by a signal while loading the backends: a
    # CPU variant's fault, which _variants.choose works around.
    if (lines and lines[0].get("ok") is True) or proc.returncode < 0:
        why = _variants.died(proc.returncode) if proc.returncode < 0 else error
        why = why or f"{_variants.died(proc.returncode)}: {err.strip()[-300:]}"
        return _variants.Check(None, error=why)
    if error is None:
        error = f"the test process {_variants.died(proc.returncode)}: {err.strip()[-500:]}"
    msg = f"artifact {name} does not load on this machine; not installed: {error}"
    raise (AbiMismatchError if error.startswith("ABI mismatch") else LibraryNotFoundError)(msg)


@contextlib.contextmanager
def _writing(path: Path, doing: str) -> Iterator[None]:
    """Report a failed write in the cache (a full disk, another filesystem) as a CacheError."""
    try:
        yield
    except OSError as e:
        if isinstance(e, NexabindError):  # LibraryNotFoundError is an OSError too
            raise
        raise cache.disk_error(path, e, doing) from e


def _swap_in(tree: Path, dest: Path, previous: Path) -> None:
    """Rename the staged ``tree`` to ``dest`` in one step; an entry there before is moved to
    ``previous`` first, and moved back if the rename fails (nothing half-done is visible)."""
    if dest.exists():
        os.replace(dest, previous)
    try:
        os.replace(tree, dest)
    except OSError:
        if previous.exists():
            os.replace(previous, dest)
        raise


def install_locked(
    root: Path,
    archive: Path,
    entry: Any,
    release: str,
    *,
    source: str,
    force: bool,
    checked: bool,
    smoke: subprocess.Popen[str] | None = None,
    discard: bool = False,
) -> Path:
    """Install ``archive`` as the cache entry ``entry`` names; the caller holds its lock.

    Args:
        root: The cache root (prepared).
        archive: The ``.tar.gz`` / ``.zip`` artifact.
        entry: Its manifest entry (see :func:`install_archive`).
        release: Release tag.
        source: Where the archive came from, for the install record.
        force: Reinstall even when the entry was installed from an archive of the same sha256.
        checked: The archive's sha256 was checked already (while it was downloaded).
        smoke: A child from :func:`smoke_child` to load the staged libraries in (started
            early, its start-up overlaps the download); default: one started here.
        discard: Delete ``archive`` once it is extracted (a download, needed no more).

    Returns:
        The installed ``lib`` folder.

    Raises:
        The errors of :func:`install_archive`.
    """
    key, name = _key(entry), _field(entry, "name") or archive.name
    digest = _field(entry, "sha256")
    existing = cache.find(release, key, root)
    if existing and not force and digest and existing.record().get("sha256") == digest:
        return existing.lib
    if digest and not checked:
        got = cache.sha256_file(archive)
        if got != digest:
            msg = f"{archive}: sha256 expected {digest}, got {got}; not installed"
            raise ChecksumMismatchError(msg)
    cache.remove_stale(root, release, key, keep=archive)
    staging = root / "tmp" / f"{release}{cache.SEP}{key}{cache.SEP}{uuid.uuid4().hex[:12]}"
    tree = staging / "entry"
    dest = cache.entry_dir(release, key, root)
    smoke = smoke or _smoke_start()
    try:
        hashes = safe_extract(archive, tree)
        _check_tree(tree, name, _field(entry, "os"))
        checks = staging / "check-models"
        checks.mkdir()
        _smoke_load(smoke, tree / "lib", checks)
        with _writing(archive, f"installing {name}"):
            if discard:  # a download, needed no more: deleted while the child loads the library
                archive.unlink()
        choice = _variants.choose(tree / "lib", checks, _smoke_finish(smoke, name))
        built = read_build_info(tree).get("cpu_variants", "all")
        info = {
            "release": release, "key": key, "artifact": name, "sha256": digest, "source": source,
            "cpu_variant": choice.variant, "cpu_variant_checked": choice.loaded,
            "cpu_variants_skipped": choice.skipped, "cpu_variants_built": built,
        }  # fmt: skip
        with _writing(archive, f"installing {name}"):
            cache.write_record(tree, info, hashes)
        with _writing(dest, f"installing {name}"):
            dest.parent.mkdir(parents=True, exist_ok=True)
            _swap_in(tree, dest, staging / "previous")
    finally:
        _smoke_stop(smoke)
        shutil.rmtree(staging, ignore_errors=True)
    return dest / "lib"


def install_archive(
    archive: str | os.PathLike[str],
    entry: Any,
    release: str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    source: str | None = None,
) -> Path:
    """Install an artifact archive into the cache: check, extract, smoke-load, rename into place.

    An entry already installed from an archive with the same sha256 is kept as it is.

    Args:
        archive: The ``.tar.gz`` / ``.zip`` artifact.
        entry: Its manifest entry (a dict or :class:`nexabind.manifest.Artifact`): ``os``,
            ``arch``, ``variant`` name the cache folder, ``sha256`` is checked when present.
        release: Release tag (``libs/<release>/``).
        cache_dir: Cache root (see :func:`nexabind.cache.cache_root`).
        force: Reinstall even when the same archive is installed.
        source: Where the archive came from, for the install record (default: its path).

    Returns:
        The installed ``lib`` folder.

    Raises:
        ChecksumMismatchError: The archive's sha256 differs from ``entry``'s.
        UnsafeArchiveError: A member would land outside the folder.
        DownloadError: Not an artifact archive.
        LibraryNotFoundError: The libraries do not load (checked in a child process).
        AbiMismatchError: Their ABI differs from the binding's.
        CacheError: The cache cannot be written (a full disk, its ``tmp/`` on another
            filesystem than ``libs/``): says what to do; nothing was installed.
    """
    archive = Path(archive)
    root = cache.prepare(cache_dir)
    key = _key(entry)
    with cache.file_lock(root, release, key):
        return install_locked(
            root, archive, entry, release, source=source or str(archive), force=force,
            checked=False,
        )  # fmt: skip
