"""Safe extraction of artifact archives (``.tar.gz``, ``.zip``): nothing lands outside the folder.

:func:`safe_extract` checks every member before it is written (paths, links, kinds, sizes),
inflates gzip with ISA-L in a second thread when the ``isal`` package is there, and hashes each
file as it writes it, for the install record.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, cast

from nexabind.errors import DownloadError, UnsafeArchiveError

if TYPE_CHECKING:
    import tarfile
    import zipfile

__all__ = ["MAX_MEMBER_SIZE", "MAX_TOTAL_SIZE", "safe_extract"]

#: Largest single file an artifact archive may hold (bytes).
MAX_MEMBER_SIZE = 2 << 30
#: Largest total unpacked size of an artifact archive (bytes).
MAX_TOTAL_SIZE = 8 << 30


def _check_name(name: str, archive: Path) -> str:
    """Return the normalized relative path of a member, or raise if it could leave the folder."""
    if "\x00" in name:
        raise UnsafeArchiveError(f"{archive}: member name {name!r} holds a NUL byte; not installed")
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (parts and len(parts[0]) >= 2 and parts[0][1] == ":"):
        msg = f"{archive}: member {name!r} has an absolute path; not installed"
        raise UnsafeArchiveError(msg)
    if ".." in parts:
        msg = f"{archive}: member {name!r} climbs out of the folder with '..'; not installed"
        raise UnsafeArchiveError(msg)
    clean = [p for p in parts if p not in ("", ".")]
    if not clean:
        return ""
    return "/".join(clean)


def _inside(base: str, target: str) -> bool:
    """Whether ``target``, relative to the folder of member ``base``, stays inside the root."""
    if target.startswith(("/", "\\")) or (len(target) >= 2 and target[1] == ":"):
        return False
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(base), target.replace("\\", "/")))
    return joined != ".." and not joined.startswith("../")


class _Checked:
    """What the member checks have seen so far: links, names and the total size."""

    __slots__ = ("links", "names", "total")

    def __init__(self) -> None:
        self.links: set[str] = set()
        self.names: set[str] = set()
        self.total = 0


def _check_common(
    name: str, seen: _Checked, archive: Path, size: int, max_member: int, max_total: int
) -> str:
    rel = _check_name(name, archive)
    parents = rel.split("/")[:-1]
    for i in range(len(parents)):
        if "/".join(parents[: i + 1]) in seen.links:
            msg = f"{archive}: member {name!r} is inside a symbolic link; not installed"
            raise UnsafeArchiveError(msg)
    if rel in seen.names and rel:
        msg = f"{archive}: member {name!r} appears twice; not installed"
        raise UnsafeArchiveError(msg)
    seen.names.add(rel)
    if size > max_member:
        msg = f"{archive}: member {name!r} is {size} bytes, over the {max_member} limit"
        raise UnsafeArchiveError(msg + "; not installed")
    seen.total += size
    if seen.total > max_total:
        msg = f"{archive}: unpacks to over {max_total} bytes; not installed"
        raise UnsafeArchiveError(msg)
    return rel


def _check_tar_member(
    m: tarfile.TarInfo, seen: _Checked, archive: Path, max_member: int, max_total: int
) -> str:
    rel = _check_common(m.name, seen, archive, m.size, max_member, max_total)
    if m.issym():
        if not _inside(rel, m.linkname):
            msg = (
                f"{archive}: symbolic link {m.name!r} -> {m.linkname!r} points outside the "
                "folder; not installed"
            )
            raise UnsafeArchiveError(msg)
        seen.links.add(rel)
    elif m.islnk():
        msg = f"{archive}: member {m.name!r} is a hard link; not installed"
        raise UnsafeArchiveError(msg)
    elif not (m.isfile() or m.isdir()):
        msg = f"{archive}: member {m.name!r} is a device or special file; not installed"
        raise UnsafeArchiveError(msg)
    return rel


# Extraction reads 64 KiB at a time: blocks over glibc's 128 KiB mmap threshold are mapped and
# unmapped on every read, and a fresh process page-faults its way through each of them (twice
# the extraction time for the 26 MB CPU artifact).
_CHUNK = 1 << 16


def _write_member(src: IO[bytes], target: Path, mode: int, size: int, what: str) -> str:
    """Copy one member of ``size`` bytes into a new file; return its sha256, taken on the way.

    One byte more than ``size`` is refused (a zip member may inflate past what it declares).
    """
    import hashlib

    digest = hashlib.sha256()
    left = size + 1
    with target.open("xb") as out:
        while chunk := src.read(min(_CHUNK, left)):
            left -= len(chunk)
            if left <= 0:
                raise UnsafeArchiveError(f"{what} is larger than it says; not installed")
            out.write(chunk)
            digest.update(chunk)
    if mode:
        target.chmod(mode & 0o755 | 0o600)
    return digest.hexdigest()


def _gunzip(archive: Path) -> tuple[io.BufferedIOBase, tuple[type[Exception], ...]]:
    """The inflated stream of a gzip file, and the errors its decoder raises besides OSError.

    ISA-L's inflate (the ``isal`` package: about 3x zlib's speed) runs in a second thread that
    releases the GIL, so inflating overlaps writing and hashing; without ``isal``, zlib's.
    """
    try:
        from isal import igzip_threaded, isal_zlib
    except ImportError:
        import gzip
        import zlib

        return gzip.open(archive, "rb"), (zlib.error,)
    error = cast("type[Exception]", isal_zlib.error)  # a class; its stub says an instance
    opened = igzip_threaded.open(archive, "rb", threads=1)  # type: ignore[no-untyped-call]
    return opened, (error,)


@contextlib.contextmanager
def _tar_stream(archive: Path) -> Iterator[tarfile.TarFile]:
    """The archive as a streaming tar reader; a gzip stream is read to its end.

    A tar reader stops at the end-of-archive blocks, before the gzip trailer: the stream is
    drained after the last member so that the trailer's CRC-32 and size are checked too.
    """
    import tarfile

    with archive.open("rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    if not gzipped:
        with tarfile.open(archive, mode="r|*", bufsize=_CHUNK) as tar:
            yield tar
        return
    raw, errors = _gunzip(archive)
    try:
        with raw, tarfile.open(fileobj=raw, mode="r|", bufsize=_CHUNK) as tar:
            yield tar
            while raw.read(_CHUNK):
                pass
    except errors as e:  # corrupt deflate data
        raise tarfile.ReadError(str(e)) from e


def _extract_tar(archive: Path, dest: Path, max_member: int, max_total: int) -> dict[str, str]:
    """One streaming pass: check each member, then write it; return each file's sha256."""
    import tarfile

    seen = _Checked()
    hashes: dict[str, str] = {}
    with _tar_stream(archive) as tar:
        for m in tar:
            rel = _check_tar_member(m, seen, archive, max_member, max_total)
            if hasattr(tarfile, "data_filter"):  # tar's own filter, as a second layer
                m = tarfile.data_filter(m, str(dest))
            target = dest.joinpath(*rel.split("/")) if rel else dest
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if m.issym():
                os.symlink(m.linkname, target)
                continue
            src = tar.extractfile(m)
            assert src is not None  # a regular file: the checks refused everything else
            what = f"{archive}: member {m.name!r}"
            hashes[rel] = _write_member(src, target, m.mode, m.size, what)
    return hashes


def _check_zip(z: zipfile.ZipFile, archive: Path, max_member: int, max_total: int) -> None:
    seen = _Checked()
    for info in z.infolist():
        _check_common(info.filename, seen, archive, info.file_size, max_member, max_total)
        kind = stat.S_IFMT(info.external_attr >> 16)
        if kind == stat.S_IFLNK:
            msg = f"{archive}: member {info.filename!r} is a symbolic link; not installed"
            raise UnsafeArchiveError(msg)
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            msg = f"{archive}: member {info.filename!r} is a device or special file; not installed"
            raise UnsafeArchiveError(msg)


def _extract_zip(z: zipfile.ZipFile, dest: Path, archive: Path) -> dict[str, str]:
    hashes: dict[str, str] = {}
    for info in z.infolist():
        rel = _check_name(info.filename, archive)
        target = dest.joinpath(*rel.split("/")) if rel else dest
        if info.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with z.open(info) as src:
            what = f"{archive}: member {info.filename!r}"
            mode = (info.external_attr >> 16) & 0o777
            hashes[rel] = _write_member(src, target, mode, info.file_size, what)
    return hashes


def _check_extracted(dest: Path, archive: Path) -> None:
    """Defense in depth: every extracted link resolves inside ``dest``.

    A path that is not a link leaves the folder only through a link above it, which the walk
    (it does not follow links) meets and checks first.
    """
    real = dest.resolve()
    for dirpath, dirnames, filenames in os.walk(dest):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            if p.is_symlink() and not p.resolve().is_relative_to(real):
                msg = f"{archive}: {p.relative_to(dest)} resolves outside the folder; not installed"
                raise UnsafeArchiveError(msg)


def safe_extract(
    archive: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    max_member: int = MAX_MEMBER_SIZE,
    max_total: int = MAX_TOTAL_SIZE,
) -> dict[str, str]:
    """Extract a ``.tar.gz`` or ``.zip`` into ``dest``, refusing anything that could escape it.

    Each member is checked before it is written, so nothing lands outside ``dest``: absolute
    paths, ``..``, symbolic links leaving the folder (or members beneath a link), hard links,
    devices and FIFOs, duplicate names and oversize members are refused. Tar archives are read
    in one streaming pass and written with the ``data`` filter as a second layer; zip members
    are written one by one, capped at their stated size. On refusal, a ``dest`` created here is
    removed again.

    Args:
        archive: The archive file.
        dest: The folder to extract into (created; should be empty).
        max_member: Largest member in bytes.
        max_total: Largest total unpacked size in bytes.

    Returns:
        The sha256 of every regular file written, by its ``/``-separated path in ``dest``
        (hashed as it was written, for the install record).

    Raises:
        UnsafeArchiveError: A member is unsafe.
        DownloadError: The file is not a readable archive.
    """
    # tarfile and zipfile are imported here, not at the top: a fetch of an installed library
    # imports this module but extracts nothing (~12 M instructions of its start-up).
    import tarfile
    import zipfile

    archive, dest = Path(archive), Path(dest)
    created = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        try:
            if zipfile.is_zipfile(archive):
                with zipfile.ZipFile(archive) as z:
                    _check_zip(z, archive, max_member, max_total)
                    hashes = _extract_zip(z, dest, archive)
            else:
                hashes = _extract_tar(archive, dest, max_member, max_total)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
            if isinstance(e, tarfile.FilterError):
                msg = f"{archive}: {e}; not installed"
                raise UnsafeArchiveError(msg) from e
            msg = f"{archive} is not a readable artifact archive ({e}); fetch it again"
            raise DownloadError(msg) from e
        _check_extracted(dest, archive)
    except DownloadError:
        if created:
            shutil.rmtree(dest, ignore_errors=True)
        raise
    return hashes
