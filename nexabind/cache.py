"""The user cache of installed llama.cpp libraries: layout, listing, verification, cleaning,
and which library folder this process loads (:func:`library_dir`).

::

    <root>/                                  NEXABIND_CACHE_DIR or user_cache_dir("nexabind")
      libs/<release>/<os>-<arch>-<variant>/  complete, verified installs (never modified in place)
        lib/ include/ abi.json build-info.json LICENSE .nexabind-install.json
      downloads/                             partial downloads: <release>+<key>+<unique>.part
      tmp/                                   staging folders:   <release>+<key>+<unique>/
      .locks/                                one file lock per artifact: <release>+<key>.lock
      CACHEDIR.TAG

An entry in ``libs/`` exists only once it is complete: installs are staged in ``tmp/`` and
renamed into place. Its install record (``.nexabind-install.json``,
:mod:`nexabind._install_record`) holds the sha256 of every file, so :func:`verify` can tell
whether anything changed since.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nexabind import pin, settings, targets
from nexabind._files import removable, remove_within
from nexabind._install_record import INSTALL_RECORD, compare, sha256_file, write_record
from nexabind.errors import CacheError, LibraryNotFoundError
from nexabind.platform import target

__all__ = [
    "INSTALL_RECORD",
    "Install",
    "VerifyReport",
    "best_installed",
    "cache_root",
    "clean",
    "disk_error",
    "entry_dir",
    "file_lock",
    "find",
    "installed",
    "library_dir",
    "prepare",
    "remove_stale",
    "sha256_file",
    "verify",
    "write_record",
]

# https://bford.info/cachedir/ : backup and archiving tools skip folders holding this file.
_CACHEDIR_TAG = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file is a cache directory tag created by nexabind.\n"
    "# For information about cache directory tags, see https://bford.info/cachedir/\n"
)

#: Separates release, artifact key and a unique part in download and staging names.
SEP = "+"


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the cache root, without creating it.

    Args:
        cache_dir: Explicit folder; else ``NEXABIND_CACHE_DIR``; else
            ``platformdirs.user_cache_dir("nexabind")``.

    Returns:
        The absolute cache root.
    """
    cache_dir = settings.CACHE_DIR.get(cache_dir)
    if cache_dir is None:
        from platformdirs import user_cache_dir

        cache_dir = user_cache_dir("nexabind")
    return Path(cache_dir).expanduser().absolute()


def prepare(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Create the cache layout (``libs``, ``downloads``, ``tmp``, ``.locks``, ``CACHEDIR.TAG``).

    Args:
        cache_dir: See :func:`cache_root`.

    Returns:
        The cache root.

    Raises:
        CacheError: The folders cannot be created.
    """
    root = cache_root(cache_dir)
    try:
        for sub in ("libs", "downloads", "tmp", ".locks"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        tag = root / "CACHEDIR.TAG"
        if not tag.is_file():
            tag.write_text(_CACHEDIR_TAG)
    except OSError as e:
        msg = f"cannot create the nexabind cache in {root}: {e}; set NEXABIND_CACHE_DIR elsewhere"
        raise CacheError(msg) from e
    return root


#: What errno says when a disk (or a quota, or a file size limit) has no room left.
_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def disk_error(path: Path, e: OSError, doing: str) -> CacheError:
    """The error to raise when writing ``path`` failed with ``e``: what, and what to do.

    Args:
        path: The file or folder that could not be written (or moved).
        e: The operating system's error.
        doing: What was being done, e.g. ``"extracting x.tar.gz"``.
    """
    why = e.strerror or str(e)
    if e.errno in _FULL:
        hint = (
            "the disk is full (or a size limit was reached): free some space there, or set"
            " NEXABIND_CACHE_DIR (--cache-dir) to a folder on a disk with room, and try again"
        )
    elif e.errno == errno.EXDEV:
        hint = (
            "the staged install cannot be renamed into place: the cache's tmp/ and libs/ are"
            " on different filesystems (a link or a mount point); make tmp/ a plain folder"
            " beside libs/, or set NEXABIND_CACHE_DIR (--cache-dir) to a folder on one disk"
        )
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = (
            "check that you may write there, or set NEXABIND_CACHE_DIR (--cache-dir) to a"
            " folder you can write"
        )
    else:
        hint = "run `nexabind clean` and try again, or set NEXABIND_CACHE_DIR (--cache-dir)"
    return CacheError(f"{doing}: cannot write {path} ({why}); {hint}")


def entry_dir(release: str, key: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return ``libs/<release>/<key>`` (``key`` is ``os-arch-variant``) of the cache."""
    return cache_root(cache_dir) / "libs" / release / key


def file_lock(root: Path, release: str, key: str, timeout: float = -1) -> Any:
    """Return the cross-process lock of one artifact (a ``filelock.FileLock``, not acquired).

    Args:
        root: The cache root (prepared).
        release: Release tag.
        key: ``os-arch-variant``.
        timeout: Seconds to wait on ``acquire``; -1 waits for ever.
    """
    from filelock import FileLock

    return FileLock(str(root / ".locks" / f"{release}{SEP}{key}.lock"), timeout=timeout)


@dataclass(frozen=True)
class Install:
    """One installed entry ``libs/<release>/<key>/``.

    Attributes:
        release: Release tag the libraries belong to.
        key: ``os-arch-variant``.
        path: The entry folder.
    """

    release: str
    key: str
    path: Path

    @property
    def lib(self) -> Path:
        """The ``lib`` folder the loader opens."""
        return self.path / "lib"

    @property
    def variant(self) -> str:
        """The variant (last part of the key)."""
        return self.key.rsplit("-", 1)[-1]

    def record(self) -> dict[str, Any]:
        """Return the install record.

        Raises:
            CacheError: The record is missing or unreadable.
        """
        path = self.path / INSTALL_RECORD
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            msg = (
                f"{path}: unreadable install record ({e}); reinstall with `nexabind fetch --force`"
            )
            raise CacheError(msg) from e

    def complete(self) -> bool:
        """Cheap check (no hashing): the record and the three libraries are there."""
        return (self.path / INSTALL_RECORD).is_file() and all(
            (self.lib / name).exists() for name in targets.library_names()
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (release, key, paths and what the record says)."""
        out: dict[str, Any] = {"release": self.release, "key": self.key, "path": str(self.path)}
        out["lib"] = str(self.lib)
        try:
            rec = self.record()
        except CacheError as e:
            out["error"] = str(e)
            return out
        for name in ("artifact", "sha256", "source", "installed"):
            out[name] = rec.get(name)
        out["files"] = len(rec.get("files", {}))
        return out


def find(release: str, key: str, cache_dir: str | os.PathLike[str] | None = None) -> Install | None:
    """Return the installed entry ``release``/``key`` when it is complete, else None."""
    inst = Install(release, key, entry_dir(release, key, cache_dir))
    return inst if inst.complete() else None


def installed(
    cache_dir: str | os.PathLike[str] | None = None, release: str | None = None
) -> list[Install]:
    """List the installed entries (complete or not), sorted by release and key.

    Args:
        cache_dir: See :func:`cache_root`.
        release: Only this release.
    """
    libs = cache_root(cache_dir) / "libs"
    out = []
    releases = [libs / release] if release else sorted(libs.iterdir()) if libs.is_dir() else []
    for rdir in releases:
        if not rdir.is_dir():
            continue
        for edir in sorted(rdir.iterdir()):
            if edir.is_dir() and not edir.name.startswith("."):
                out.append(Install(rdir.name, edir.name, edir))
    return out


def best_installed(
    release: str,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    variant: str | None,
    order: Callable[[], Iterable[str]],
) -> Install | None:
    """The installed entry of ``release`` for this process, or None.

    ``variant`` picks that one. Otherwise a single installed variant is used as it is; among
    several, the first in ``order()``, which is called only then (working out the order may
    probe the GPU runtimes, see :func:`nexabind.targets.variant_order`).

    Args:
        release: Release tag.
        cache_dir: See :func:`cache_root`.
        variant: The variant asked for, or None to choose.
        order: Returns the variants, best first.
    """
    os_name, arch = target()
    if variant:
        return find(release, targets.key(os_name, arch, variant), cache_dir)
    found = {
        i.variant: i
        for i in installed(cache_dir, release)
        if i.key.startswith(f"{os_name}-{arch}-") and i.complete()
    }
    if len(found) <= 1:
        return next(iter(found.values()), None)
    return next((found[v] for v in order() if v in found), None)


def library_dir(lib_path: str | os.PathLike[str] | None = None) -> Path:
    """Resolve the folder holding the llama.cpp libraries, without loading anything.

    Order: ``lib_path``, then ``NEXABIND_LIB_PATH``, then the best installed entry of the pinned
    release for this process (:func:`best_installed`; ``NEXABIND_VARIANT`` picks one).

    Args:
        lib_path: An explicit folder; when given, nothing else is tried.

    Returns:
        The absolute folder that holds ``libllama`` and its ggml libraries.

    Raises:
        LibraryNotFoundError: No candidate holds the libraries; lists every place tried and why.
    """
    tried = []
    for label, folder in _candidates(lib_path):
        folder = folder.expanduser().resolve()
        why = _missing(folder)
        if why is None:
            return folder
        tried.append(f"  {folder} ({label}): {why}")
    msg = (
        "no llama.cpp library found; tried:\n"
        + "\n".join(tried)
        + "\nrun `nexabind fetch` (or `nexabind build --install`), or set "
        + settings.LIB_PATH.env
    )
    raise LibraryNotFoundError(msg)


def _candidates(lib_path: str | os.PathLike[str] | None) -> list[tuple[str, Path]]:
    if lib_path is not None:
        return [("explicit lib_path", Path(lib_path))]
    out = []
    env = settings.LIB_PATH.get()
    if env:
        out.append((settings.LIB_PATH.env, Path(env)))
    out.append(("cache entry for this release and platform", _best_lib()))
    return out


def _best_lib() -> Path:
    """The ``lib`` folder of the best installed entry, else the one `nexabind fetch` would fill."""
    variant = settings.VARIANT.get()
    found = best_installed(pin.RELEASE, variant=variant, order=targets.variant_order_here)
    if found is not None:
        return found.lib
    os_name, arch = target()
    return entry_dir(pin.RELEASE, targets.key(os_name, arch, variant or "cpu")) / "lib"


def _missing(folder: Path) -> str | None:
    if not folder.is_dir():
        return "no such folder"
    absent = [n for n in targets.library_names() if not (folder / n).exists()]
    return f"missing {', '.join(absent)}" if absent else None


@dataclass
class VerifyReport:
    """What :func:`verify` found in one installed entry.

    Attributes:
        install: The entry.
        changed: Files whose sha256 differs from the record (or a link whose target changed).
        missing: Recorded files that are gone.
        added: Files that the record does not list.
        error: Why the entry could not be checked at all (no or bad record), else None.
    """

    install: Install
    changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when nothing differs from the install record."""
        return not (self.changed or self.missing or self.added or self.error)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {
            "release": self.install.release,
            "key": self.install.key,
            "path": str(self.install.path),
            "ok": self.ok,
            "changed": self.changed,
            "missing": self.missing,
            "added": self.added,
            "error": self.error,
        }


def verify(
    cache_dir: str | os.PathLike[str] | None = None, release: str | None = None
) -> list[VerifyReport]:
    """Re-hash every installed file and compare it with the install record.

    Args:
        cache_dir: See :func:`cache_root`.
        release: Only entries of this release.

    Returns:
        One report per installed entry (empty when nothing is installed).
    """
    reports = []
    for inst in installed(cache_dir, release):
        rep = VerifyReport(inst)
        reports.append(rep)
        try:
            rec = inst.record()
        except CacheError as e:
            rep.error = str(e)
            continue
        rep.changed, rep.missing, rep.added = compare(inst.path, rec)
    return reports


def _parse_name(name: str) -> tuple[str, str] | None:
    parts = name.split(SEP)
    return (parts[0], parts[1]) if len(parts) == 3 else None


def _unlocked(root: Path, release: str, key: str) -> Any:
    """The lock of an artifact when no other process holds it, acquired; else None."""
    from filelock import Timeout

    lock = file_lock(root, release, key, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return None
    return lock


def remove_stale(root: Path, release: str, key: str, keep: Path | None = None) -> list[Path]:
    """Remove the staging folders and partial downloads of one artifact, except ``keep``.

    The caller must hold that artifact's lock, so nobody else is using them.

    Args:
        root: The cache root.
        release: Release tag.
        key: ``os-arch-variant``.
        keep: A file (with its ``.json`` sidecar) or a folder in use, kept with its parents.

    Returns:
        What was removed. Each must lie in the cache's own ``tmp/`` or ``downloads/``: a link
        is removed as a link, and nothing is removed through a linked folder.
    """
    removed = []
    prefix = f"{release}{SEP}{key}{SEP}"
    real = root.resolve()
    for p in sorted((root / "tmp").glob(f"{prefix}*")):
        if (keep is None or not keep.is_relative_to(p)) and _remove(p, real / "tmp"):
            removed.append(p)
    for p in sorted((root / "downloads").glob(f"{prefix}*")):
        keeps = keep is not None and p.name in (keep.name, keep.name + ".json")
        if not keeps and _remove(p, real / "downloads"):
            removed.append(p)
    return removed


def _remove(path: Path, tree: Path) -> bool:
    """:func:`nexabind._files.remove_within`, best effort (what cannot be removed stays)."""
    try:
        return remove_within(path, tree)
    except OSError:
        return False


def clean(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    all: bool = False,  # noqa: A002 - mirrors the --all flag
    release: str | None = None,
    keep: Path | None = None,
) -> list[Path]:
    """Remove leftovers of interrupted fetches and, on request, installed entries.

    Partial downloads and staging folders are removed only when no running fetch holds their
    artifact's lock. The build cache is never touched. Nothing is removed outside the cache's
    own ``libs/``, ``tmp/`` and ``downloads/``: a link is removed as a link, and an entry in a
    linked release folder stays.

    Args:
        cache_dir: See :func:`cache_root`.
        all: Also remove every installed entry.
        release: Also remove the installed entries of this release, except ``keep``.
        keep: An entry folder not to remove with ``release`` (the one in use).

    Returns:
        The paths removed.
    """
    root = cache_root(cache_dir)
    if not root.is_dir():
        return []
    removed: list[Path] = []
    artifacts = set()
    for sub in ("downloads", "tmp"):
        folder = root / sub
        for p in sorted(folder.iterdir()) if folder.is_dir() else ():
            parsed = _parse_name(p.name.removesuffix(".json").removesuffix(".part"))
            if parsed is None:
                continue
            artifacts.add(parsed)
    for rel, key in sorted(artifacts):
        lock = _unlocked(root, rel, key)
        if lock is None:
            continue
        try:
            removed += remove_stale(root, rel, key)
        finally:
            lock.release()
    targets = installed(root) if all else installed(root, release) if release else []
    real = root.resolve()
    for inst in targets:
        if not all and keep is not None and inst.path.resolve() == keep.resolve():
            continue
        entry = removable(inst.path, real / "libs" / inst.release)
        if entry is None:
            continue
        lock = file_lock(root, inst.release, inst.key)
        with lock:
            # Move away first so the entry disappears at once, then delete.
            trash = real / "tmp" / f"{inst.release}{SEP}{inst.key}{SEP}removed-{os.getpid()}"
            try:
                os.replace(entry, trash)
            except OSError as e:
                msg = f"cannot remove {inst.path}: {e}"
                raise CacheError(msg) from e
            _remove(trash, real / "tmp")
        removed.append(inst.path)
    for rdir in (root / "libs").iterdir() if (root / "libs").is_dir() else ():
        if rdir.is_dir() and not rdir.is_symlink() and not any(rdir.iterdir()):
            rdir.rmdir()
    return removed
