"""Safe extraction of artifact archives (``.tar.gz``, ``.zip``): nothing lands outside the folder.

:func:`safe_extract` checks every member before it is written (paths, links, kinds, sizes),
inflates gzip with ISA-L in a second thread when the ``isal`` package is there, and hashes each
file as it writes it, for the install record. Its size limits count what is actually read, not
what the members declare: tar's long-name, long-link, pax and sparse headers are read into memory
by :mod:`tarfile`, so every byte it reads goes through a meter that refuses a header (or an
archive) over its limit before the memory is taken.
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
from typing import IO, TYPE_CHECKING, Any, cast

from nexabind import cache
from nexabind.errors import DownloadError, NexabindError, UnsafeArchiveError

if TYPE_CHECKING:
    import tarfile
    import zipfile

__all__ = [
    "MAX_HEADER_SIZE",
    "MAX_MEMBERS",
    "MAX_MEMBER_SIZE",
    "MAX_NAME",
    "MAX_TOTAL_SIZE",
    "safe_extract",
]

#: Largest single file an artifact archive may hold (bytes).
MAX_MEMBER_SIZE = 2 << 30
#: Largest total unpacked size of an artifact archive (bytes), headers included.
MAX_TOTAL_SIZE = 8 << 30
#: Most bytes the headers of one tar member may take (its own block and any long-name,
#: long-link, pax or sparse headers before it). A real one takes a few blocks.
MAX_HEADER_SIZE = 1 << 20
#: Most members an artifact archive may hold (a real one holds a few dozen).
MAX_MEMBERS = 10_000
#: Longest member name or link target, in characters.
MAX_NAME = 4096


def _check_name(name: str, archive: Path) -> str:
    """Return the normalized relative path of a member, or raise if it could leave the folder."""
    if len(name) > MAX_NAME:
        msg = f"{archive}: a member name is {len(name)} characters long, over {MAX_NAME}"
        raise UnsafeArchiveError(msg + "; not installed")
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


class _Limits:
    """The limits of one extraction (see :func:`safe_extract`)."""

    __slots__ = ("header", "member", "members", "total")

    def __init__(self, member: int, total: int, header: int, members: int) -> None:
        self.member, self.total, self.header, self.members = member, total, header, members


class _Checked:
    """What the member checks have seen so far: links, names and the total size."""

    __slots__ = ("links", "names", "total")

    def __init__(self) -> None:
        self.links: set[str] = set()
        self.names: set[str] = set()
        self.total = 0


def _check_common(name: str, seen: _Checked, archive: Path, size: int, limits: _Limits) -> str:
    if len(seen.names) >= limits.members:
        msg = f"{archive}: holds over {limits.members} members; not installed"
        raise UnsafeArchiveError(msg)
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
    if size > limits.member:
        msg = f"{archive}: member {name!r} is {size} bytes, over the {limits.member} limit"
        raise UnsafeArchiveError(msg + "; not installed")
    seen.total += size
    if seen.total > limits.total:
        raise _too_big(archive, limits.total)
    return rel


def _too_big(archive: Path, max_total: int) -> UnsafeArchiveError:
    return UnsafeArchiveError(f"{archive}: unpacks to over {max_total} bytes; not installed")


def _check_tar_member(m: tarfile.TarInfo, seen: _Checked, archive: Path, limits: _Limits) -> str:
    rel = _check_common(m.name, seen, archive, m.size, limits)
    if len(m.linkname) > MAX_NAME:
        msg = f"{archive}: member {m.name!r} links to a name over {MAX_NAME} characters"
        raise UnsafeArchiveError(msg + "; not installed")
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


@contextlib.contextmanager
def _writing(target: Path, archive: Path) -> Iterator[None]:
    """Report a failed write (a full disk, a read-only folder) as such, not as a bad archive."""
    try:
        yield
    except OSError as e:
        raise cache.disk_error(target, e, f"extracting {archive.name}") from e


def _write_member(
    src: IO[bytes], target: Path, mode: int, size: int, what: str, archive: Path
) -> str:
    """Copy one member of ``size`` bytes into a new file; return its sha256, taken on the way.

    One byte more than ``size`` is refused (a zip member may inflate past what it declares).
    Reading ``src`` may fail as a bad archive; writing fails as :func:`cache.disk_error`.
    """
    import hashlib

    digest = hashlib.sha256()
    left = size + 1
    with _writing(target, archive):
        out = target.open("xb")
    try:
        while chunk := src.read(min(_CHUNK, left)):
            left -= len(chunk)
            if left <= 0:
                raise UnsafeArchiveError(f"{what} is larger than it says; not installed")
            with _writing(target, archive):
                out.write(chunk)
            digest.update(chunk)
    finally:
        with _writing(target, archive):
            out.close()
    if mode:
        with _writing(target, archive):
            target.chmod(mode & 0o755 | 0o600)
    return digest.hexdigest()


def _make_dir(target: Path, archive: Path) -> None:
    with _writing(target, archive):
        target.mkdir(parents=True, exist_ok=True)


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


class _Meter:
    """The tar stream as :mod:`tarfile` reads it, counted: in all, and per member's headers.

    tarfile reads a long-name, long-link, pax or sparse header whole into memory, however large
    it says it is; counting here, in the reads of at most one buffer each, refuses a header over
    ``limits.header`` (or an archive over ``limits.total``) before that memory is taken.
    """

    __slots__ = ("archive", "count", "header_from", "limits", "member", "raw")

    def __init__(self, raw: io.BufferedIOBase | IO[bytes], archive: Path, limits: _Limits) -> None:
        self.raw, self.archive, self.limits = raw, archive, limits
        self.count = 0
        self.header_from: int | None = None  # where the headers being read began
        self.member = ""  # the last member read, for messages

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(_CHUNK if n < 0 else n)
        self.count += len(data)
        if self.count > self.limits.total:
            raise _too_big(self.archive, self.limits.total)
        if self.header_from is not None and self.count - self.header_from > self.limits.header:
            after = f" after {self.member!r}" if self.member else ""
            msg = (
                f"{self.archive}: the header of a member{after} is over {self.limits.header}"
                " bytes (a long name, long link, pax or sparse header); not installed"
            )
            raise UnsafeArchiveError(msg)
        return data

    @contextlib.contextmanager
    def headers(self) -> Iterator[None]:
        """What is read meanwhile is one member's headers, under the header limit."""
        self.header_from = self.count
        try:
            yield
        finally:
            self.header_from = None

    def open_tar(self) -> tarfile.TarFile:
        """A streaming tar reader of this stream (opening reads the first member's headers)."""
        import tarfile

        with self.headers():
            return tarfile.open(fileobj=cast("IO[bytes]", self), mode="r|", bufsize=_CHUNK)

    def next(self, tar: tarfile.TarFile) -> tarfile.TarInfo | None:
        """The next member, its headers read under the header limit."""
        with self.headers():
            m = tar.next()
        # A streaming reader keeps every member it read (and its pax headers): drop them.
        cast("Any", tar).members.clear()
        if m is not None:
            self.member = m.name
        return m


@contextlib.contextmanager
def _tar_stream(archive: Path, limits: _Limits) -> Iterator[tuple[tarfile.TarFile, _Meter]]:
    """The archive (a gzipped or plain tar) as a streaming tar reader that reads through a
    :class:`_Meter`; a gzip stream is read to its end, through the meter too.

    A tar reader stops at the end-of-archive blocks, before the gzip trailer: the stream is
    drained after the last member so that the trailer's CRC-32 and size are checked too.
    Other compressions are not artifacts: tarfile would inflate them a whole buffer at once.
    """
    import tarfile

    with archive.open("rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    raw: io.BufferedIOBase | IO[bytes]
    if gzipped:
        raw, errors = _gunzip(archive)
    else:
        raw, errors = archive.open("rb"), ()
    meter = _Meter(raw, archive, limits)
    try:
        with raw, meter.open_tar() as tar:
            yield tar, meter
            while meter.read(_CHUNK):
                pass
    except errors as e:  # corrupt deflate data
        raise tarfile.ReadError(str(e)) from e


def _extract_tar(archive: Path, dest: Path, limits: _Limits) -> dict[str, str]:
    """One streaming pass: check each member, then write it; return each file's sha256."""
    import tarfile

    seen = _Checked()
    hashes: dict[str, str] = {}
    with _tar_stream(archive, limits) as (tar, meter):
        while (m := meter.next(tar)) is not None:
            rel = _check_tar_member(m, seen, archive, limits)
            if hasattr(tarfile, "data_filter"):  # tar's own filter, as a second layer
                m = tarfile.data_filter(m, str(dest))
            target = dest.joinpath(*rel.split("/")) if rel else dest
            if m.isdir():
                _make_dir(target, archive)
                continue
            _make_dir(target.parent, archive)
            if m.issym():
                with _writing(target, archive):
                    os.symlink(m.linkname, target)
                continue
            src = tar.extractfile(m)
            assert src is not None  # a regular file: the checks refused everything else
            what = f"{archive}: member {m.name!r}"
            hashes[rel] = _write_member(src, target, m.mode, m.size, what, archive)
    return hashes


def _check_zip(z: zipfile.ZipFile, archive: Path, limits: _Limits) -> None:
    seen = _Checked()
    for info in z.infolist():
        _check_common(info.filename, seen, archive, info.file_size, limits)
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
            _make_dir(target, archive)
            continue
        _make_dir(target.parent, archive)
        with z.open(info) as src:
            what = f"{archive}: member {info.filename!r}"
            mode = (info.external_attr >> 16) & 0o777
            hashes[rel] = _write_member(src, target, mode, info.file_size, what, archive)
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
    max_header: int = MAX_HEADER_SIZE,
    max_members: int = MAX_MEMBERS,
) -> dict[str, str]:
    """Extract a ``.tar.gz`` or ``.zip`` into ``dest``, refusing anything that could escape it.

    Each member is checked before it is written, so nothing lands outside ``dest``: absolute
    paths, ``..``, symbolic links leaving the folder (or members beneath a link), hard links,
    devices and FIFOs, duplicate names and oversize members are refused. Tar archives are read
    in one streaming pass and written with the ``data`` filter as a second layer; zip members
    are written one by one, capped at their stated size. The limits apply to what is read, not
    only to what members declare: a tar header (long name, long link, pax, sparse) over
    ``max_header`` or an inflated stream over ``max_total`` is refused as it is read. On any
    failure, a ``dest`` created here is removed again.

    Args:
        archive: The archive file.
        dest: The folder to extract into (created; should be empty).
        max_member: Largest member in bytes.
        max_total: Largest total unpacked size in bytes (a tar's headers included).
        max_header: Most bytes the headers of one tar member may take.
        max_members: Most members.

    Returns:
        The sha256 of every regular file written, by its ``/``-separated path in ``dest``
        (hashed as it was written, for the install record).

    Raises:
        UnsafeArchiveError: A member is unsafe, or the archive is over a limit.
        DownloadError: The file is not a readable archive.
        CacheError: Writing into ``dest`` failed (a full disk, no permission): says which.
    """
    # tarfile and zipfile are imported here, not at the top: a fetch of an installed library
    # imports this module but extracts nothing (~12 M instructions of its start-up).
    import tarfile
    import zipfile

    archive, dest = Path(archive), Path(dest)
    limits = _Limits(max_member, max_total, max_header, max_members)
    created = not dest.exists()
    _make_dir(dest, archive)
    try:
        try:
            if zipfile.is_zipfile(archive):
                with zipfile.ZipFile(archive) as z:
                    _check_zip(z, archive, limits)
                    hashes = _extract_zip(z, dest, archive)
            else:
                hashes = _extract_tar(archive, dest, limits)
        except NexabindError:
            raise
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
            if isinstance(e, tarfile.FilterError):
                msg = f"{archive}: {e}; not installed"
                raise UnsafeArchiveError(msg) from e
            msg = f"{archive} is not a readable artifact archive ({e}); fetch it again"
            raise DownloadError(msg) from e
        _check_extracted(dest, archive)
    except BaseException:
        if created:
            shutil.rmtree(dest, ignore_errors=True)
        raise
    return hashes
