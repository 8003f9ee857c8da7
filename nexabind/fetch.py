"""Download, verify and install the llama.cpp library for this process into the user cache.

:func:`fetch` is ``nexabind fetch``: choose the artifact of the release for this platform
(:mod:`nexabind.manifest`), download it (streaming, resumable with ``Range``/``If-Range``,
retried with capped backoff, size and sha256 checked while streaming), and install it with
:func:`install_archive`: extract safely into a staging folder, check the tree, load it in a
child process, then rename it into ``libs/<release>/<os>-<arch>-<variant>/``
(:mod:`nexabind.cache`). One file lock per artifact makes concurrent fetches download once.
When nothing can be downloaded it builds from source (:func:`nexabind.build.build`).

``requests`` and ``tqdm`` are imported only when something is downloaded, so a fetch of an
installed library returns in the time it takes to start Python.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import os
import posixpath
import shutil
import stat
import subprocess
import sys
import tarfile
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast
from urllib.parse import unquote, urljoin, urlsplit

from nexabind import cache, pin
from nexabind.errors import (
    AbiMismatchError,
    CacheError,
    ChecksumMismatchError,
    DownloadError,
    LibraryNotFoundError,
    ManifestError,
    NexabindError,
    UnsafeArchiveError,
)

__all__ = [
    "MAX_MEMBER_SIZE",
    "MAX_TOTAL_SIZE",
    "download",
    "fetch",
    "install_archive",
    "safe_extract",
]

#: Largest single file an artifact archive may hold (bytes).
MAX_MEMBER_SIZE = 2 << 30
#: Largest total unpacked size of an artifact archive (bytes).
MAX_TOTAL_SIZE = 8 << 30

_BUILD_MINUTES = 5


def _say(msg: str, quiet: bool | None) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


# --- safe extraction -----------------------------------------------------------------------------


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


@dataclass
class _Checked:
    links: set[str]
    names: set[str]
    total: int = 0


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
    return igzip_threaded.open(archive, "rb", threads=1), (error,)


@contextlib.contextmanager
def _tar_stream(archive: Path) -> Iterator[tarfile.TarFile]:
    """The archive as a streaming tar reader; a gzip stream is read to its end.

    A tar reader stops at the end-of-archive blocks, before the gzip trailer: the stream is
    drained after the last member so that the trailer's CRC-32 and size are checked too.
    """
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
    seen = _Checked(set(), set())
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
    seen = _Checked(set(), set())
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


# --- install -------------------------------------------------------------------------------------


def _field(entry: Any, name: str) -> Any:
    return entry.get(name) if isinstance(entry, dict) else getattr(entry, name, None)


def _key(entry: Any) -> str:
    return f"{_field(entry, 'os')}-{_field(entry, 'arch')}-{_field(entry, 'variant')}"


def _check_tree(tree: Path, name: str, os_name: str | None = None) -> None:
    """The libraries (named as on the artifact's os), abi.json and build-info.json are there."""
    from nexabind.loader import LIBRARY_NAMES, library_names

    names = LIBRARY_NAMES.get(os_name or "", library_names())
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
    "code = smoke.main([folder]) if folder else 2\n"
    "gc.freeze()\n"
    "sys.exit(code)\n"
)


def _smoke_start() -> subprocess.Popen[str]:
    """Start the child that will load the staged libraries (see :func:`_smoke_load`)."""
    env = {k: v for k, v in os.environ.items() if k != "NEXABIND_LIB_PATH"}
    return subprocess.Popen(
        [sys.executable, "-c", _SMOKE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def _smoke_load(proc: subprocess.Popen[str], lib: Path) -> None:
    """Hand the staged ``lib`` folder to the child: a broken build crashes the child only."""
    assert proc.stdin is not None
    try:
        proc.stdin.write(f"{lib}\n")
        proc.stdin.flush()  # not closed: communicate() in _smoke_finish closes it
    except OSError:
        pass  # the child died already; _smoke_finish reports how


def _smoke_stop(proc: subprocess.Popen[str]) -> None:
    """End a child that was not needed (or failed to finish)."""
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


@contextlib.contextmanager
def _smoke_child() -> Iterator[subprocess.Popen[str]]:
    """:func:`_smoke_start`, ended on the way out if it was not used."""
    proc = _smoke_start()
    try:
        yield proc
    finally:
        _smoke_stop(proc)


def _smoke_finish(proc: subprocess.Popen[str], name: str) -> None:
    """Wait for :func:`_smoke_start`'s child; raise saying why it failed."""
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired as e:
        _smoke_stop(proc)
        msg = f"loading artifact {name} in a test process did not finish in 300 s; not installed"
        raise LibraryNotFoundError(msg) from e
    if proc.returncode == 0:
        return
    try:
        error = json.loads(out.strip().splitlines()[-1])["error"]
    except (ValueError, IndexError, KeyError, TypeError):
        code = proc.returncode
        how = f"signal {-code}" if code < 0 else f"exit status {code}"
        error = f"the test process ended with {how}: {err.strip()[-500:]}"
    msg = f"artifact {name} does not load on this machine; not installed: {error}"
    raise (AbiMismatchError if error.startswith("ABI mismatch") else LibraryNotFoundError)(msg)


def _install_locked(
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
    smoke = smoke or _smoke_start()
    try:
        hashes = safe_extract(archive, tree)
        _check_tree(tree, name, _field(entry, "os"))
        _smoke_load(smoke, tree / "lib")
        if discard:  # a download, needed no more: deleted while the child loads the library
            archive.unlink()
        info = {"release": release, "key": key, "artifact": name, "sha256": digest}
        cache.write_record(tree, {**info, "source": source}, hashes)
        _smoke_finish(smoke, name)
        dest = cache.entry_dir(release, key, root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            os.replace(dest, staging / "previous")
        os.replace(tree, dest)
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
    """
    archive = Path(archive)
    root = cache.prepare(cache_dir)
    key = _key(entry)
    with cache.file_lock(root, release, key):
        return _install_locked(
            root, archive, entry, release, source=source or str(archive), force=force,
            checked=False,
        )  # fmt: skip


# --- HTTP ----------------------------------------------------------------------------------------


class _RefusedURL(DownloadError):
    """A URL the settings do not allow (plain http to a remote host, unknown scheme)."""


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_url(url: str, allow_http: bool) -> None:
    parts = urlsplit(url)
    if parts.scheme in ("https", "file"):
        return
    if parts.scheme == "http":
        if allow_http or _is_loopback(parts.hostname):
            return
        msg = (
            f"refusing plain http:// to {parts.hostname} ({url}): use https://, or pass "
            "--allow-http (NEXABIND_ALLOW_HTTP=1) if this mirror is trusted"
        )
        raise _RefusedURL(msg)
    msg = f"unsupported URL {url!r}: the base URL must be https://, http:// or file://"
    raise _RefusedURL(msg)


class _Retryable(Exception):
    """A failure worth another attempt (connection, timeout, 5xx, short body)."""


def _get(session: Any, url: str, headers: dict[str, str], allow_http: bool, timeout: Any) -> Any:
    """GET following redirects by hand: each hop is checked, credentials stay with their host."""
    import requests

    first_host = urlsplit(url).hostname
    for _ in range(10):
        _check_url(url, allow_http)
        same_host = urlsplit(url).hostname == first_host
        hop_headers = dict(headers)
        req = requests.Request("GET", url, headers=hop_headers)
        prep = session.prepare_request(req)
        if not same_host:
            prep.headers.pop("Authorization", None)
        r = session.send(prep, stream=True, timeout=timeout, allow_redirects=False)
        if r.is_redirect:
            url = urljoin(url, r.headers["Location"])
            r.close()
            continue
        return r
    msg = f"{url}: more than 10 redirects"
    raise DownloadError(msg)


def _session() -> Any:
    import requests

    s = requests.Session()
    s.headers["User-Agent"] = f"nexabind-fetch ({pin.RELEASE})"
    # Artifacts are gzip already; a transparently decoded body would not match its sha256.
    s.headers["Accept-Encoding"] = "identity"
    return s


@dataclass
class _Partial:
    """A partial download and what the server said about it (for If-Range)."""

    path: Path
    meta: dict[str, Any]

    @property
    def meta_path(self) -> Path:
        return self.path.with_name(self.path.name + ".json")

    def save(self) -> None:
        self.meta_path.write_text(json.dumps(self.meta))

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)
        self.meta_path.unlink(missing_ok=True)


def _resumable(folder: Path, prefix: str, sha256: str, size: int) -> _Partial:
    """The largest partial of this artifact to resume (others removed), or a new unique name."""
    best: _Partial | None = None
    for p in sorted(folder.glob(f"{prefix}*.part")):
        try:
            meta = json.loads(p.with_name(p.name + ".json").read_text())
        except (OSError, ValueError):
            meta = {}
        part = _Partial(p, meta)
        if meta.get("sha256") != sha256 or p.stat().st_size > size:
            part.delete()
        elif best is None or p.stat().st_size > best.path.stat().st_size:
            if best is not None:
                best.delete()
            best = part
        else:
            part.delete()
    if best is not None:
        return best
    path = folder / f"{prefix}{uuid.uuid4().hex[:12]}.part"
    part = _Partial(path, {"sha256": sha256})
    path.touch()
    part.save()
    return part


def _copy_local(src: Path, part: _Partial, hasher: Any, bar: Any) -> None:
    try:
        with src.open("rb") as f, part.path.open("wb") as out:
            while chunk := f.read(1 << 20):
                out.write(chunk)
                hasher.update(chunk)
                bar.update(len(chunk))
    except OSError as e:
        msg = f"cannot read {src}: {e}"
        raise DownloadError(msg) from e


class _NoBar:
    """Stands in for a tqdm bar when none is shown (tqdm is then not even imported)."""

    def update(self, n: int) -> None:
        pass

    def reset(self, total: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(size: int, initial: int, name: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=size, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                desc=name, leave=False)  # fmt: skip


def download(
    url: str,
    dest_dir: str | os.PathLike[str],
    *,
    size: int,
    sha256: str,
    prefix: str = "",
    name: str | None = None,
    allow_http: bool = False,
    retries: int = 5,
    backoff: float = 0.5,
    max_backoff: float = 8.0,
    timeout: tuple[float, float] = (10.0, 30.0),
    progress: bool = False,
    quiet: bool | None = False,
    session: Any = None,
) -> Path:
    """Download ``url`` into ``dest_dir``, resuming a partial of the same file, and verify it.

    The body goes to a uniquely named ``.part`` file (plus a ``.part.json`` holding the
    server's validators) and is hashed as it streams. An earlier partial with the same sha256
    is resumed with ``Range`` + ``If-Range``; a server that answers 200 instead of 206 restarts
    it. Connection errors, timeouts, 5xx and short bodies are retried ``retries`` times with
    exponential backoff capped at ``max_backoff`` seconds. The caller holds the artifact's lock.

    Args:
        url: ``https://``, loopback ``http://`` (any ``http://`` with ``allow_http``), ``file://``.
        dest_dir: Folder for the partial (the cache's ``downloads/``).
        size: Expected size in bytes.
        sha256: Expected hex digest.
        prefix: Name prefix of the partial, so a later call finds it to resume.
        name: Artifact name for messages (default: the URL's last part).
        allow_http: Allow plain ``http://`` to hosts other than loopback.
        retries: Extra attempts after the first.
        backoff: First wait in seconds; doubled per attempt.
        max_backoff: Longest wait in seconds.
        timeout: ``(connect, read)`` timeouts in seconds.
        progress: Show a tqdm bar.
        quiet: No status lines on stderr.
        session: A ``requests.Session`` to reuse (and its open connections); default: a new
            one, closed on return.

    Returns:
        The verified file (a ``.part`` name; the caller installs and removes it).

    Raises:
        ChecksumMismatchError: Size or sha256 differ; the download was deleted.
        DownloadError: Every attempt failed, or the server refused (4xx); names URL and artifact.
    """
    import hashlib

    name = name or posixpath.basename(urlsplit(url).path)
    folder = Path(dest_dir)
    folder.mkdir(parents=True, exist_ok=True)
    part = _resumable(folder, prefix, sha256, size)
    have = part.path.stat().st_size
    hasher = hashlib.sha256()
    if have:
        with part.path.open("rb") as f:
            while chunk := f.read(1 << 20):
                hasher.update(chunk)
    bar = _bar(size, have, name) if progress else _NoBar()

    def mismatch(what: str) -> ChecksumMismatchError:
        part.delete()
        return ChecksumMismatchError(f"{name} from {url}: {what}; deleted the download")

    def finish() -> Path:
        got = hasher.hexdigest()
        if got != sha256:
            raise mismatch(f"sha256 expected {sha256}, got {got}")
        bar.close()
        return part.path

    if urlsplit(url).scheme == "file":
        hasher = hashlib.sha256()
        _copy_local(Path(unquote(urlsplit(url).path)), part, hasher, bar)
        got_size = part.path.stat().st_size
        if got_size != size:
            raise mismatch(f"size expected {size} bytes, got {got_size}")
        return finish()

    own = session is None
    session = session or _session()
    last = ""
    try:
        for attempt in range(retries + 1):
            if attempt:
                wait = min(max_backoff, backoff * 2 ** (attempt - 1))
                _say(f"nexabind: {last}; retrying in {wait:g} s", quiet)
                time.sleep(wait)
            if have == size:
                return finish()
            headers = {}
            if have:
                headers["Range"] = f"bytes={have}-"
                validator = part.meta.get("etag") or part.meta.get("last_modified")
                if validator:
                    headers["If-Range"] = validator
            try:
                r = _get(session, url, headers, allow_http, timeout)
                with r:
                    if r.status_code == 416 and have:
                        last = "the server refused the resume range; restarting"
                        have, hasher = 0, hashlib.sha256()
                        part.path.write_bytes(b"")
                        continue
                    if r.status_code >= 500 or r.status_code in (408, 429):
                        raise _Retryable(f"{url} answered {r.status_code} {r.reason}")
                    if r.status_code not in (200, 206):
                        msg = (
                            f"{url} answered {r.status_code} {r.reason} for artifact {name}; "
                            "check --base-url / NEXABIND_BASE_URL and --release"
                        )
                        raise DownloadError(msg)
                    if r.status_code == 206:
                        start = r.headers.get("Content-Range", "").removeprefix("bytes ")
                        if not start.startswith(f"{have}-"):
                            raise _Retryable(f"{url} sent the wrong range ({start or 'none'})")
                        mode = "ab"
                    else:
                        if have:
                            _say(f"nexabind: {url} ignored the resume range; restarting", quiet)
                        have, hasher = 0, hashlib.sha256()
                        mode = "wb"
                        bar.reset(total=size)
                        part.meta.update(
                            etag=r.headers.get("ETag"), last_modified=r.headers.get("Last-Modified")
                        )
                        part.save()
                    with part.path.open(mode) as out:
                        # The raw bytes: a server adding Content-Encoding: gzip to a .tar.gz
                        # must not get the archive decompressed before it is hashed.
                        for chunk in r.raw.stream(1 << 20, decode_content=False):
                            have += len(chunk)
                            if have > size:
                                raise mismatch(f"size expected {size} bytes, got more")
                            out.write(chunk)
                            hasher.update(chunk)
                            bar.update(len(chunk))
                if have < size:
                    raise _Retryable(f"the connection closed after {have} of {size} bytes")
                return finish()
            except _Retryable as e:
                last = str(e)
            except DownloadError:
                raise
            except Exception as e:  # noqa: BLE001 - requests' and urllib3's network errors
                if not _network_error(e):
                    raise
                # `have` and `hasher` cover exactly the chunks written before the failure.
                last = f"{type(e).__name__} from {url}: {e}"
        if have == size:
            return finish()
        msg = f"downloading {name} from {url} failed after {retries + 1} attempts: {last}"
        if have:
            msg += f"; the {have} bytes received are kept and the next `nexabind fetch` resumes"
        raise DownloadError(msg)
    finally:
        if own:
            session.close()
        bar.close()
        if part.path.is_file() and part.path.stat().st_size == 0:
            part.delete()  # nothing to resume


def _network_error(e: Exception) -> bool:
    import requests
    import urllib3

    return isinstance(
        e,
        (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
         urllib3.exceptions.HTTPError, ConnectionError, TimeoutError),
    )  # fmt: skip


def _unresolvable(e: Exception) -> bool:
    """Whether a requests error is a failed DNS lookup (no network, or no such host)."""
    import urllib3

    reason = getattr(e.args[0], "reason", None) if e.args else None
    return isinstance(reason, getattr(urllib3.exceptions, "NameResolutionError", ()))


def _read_manifest(url: str, allow_http: bool, timeout: tuple[float, float], session: Any) -> bytes:
    if urlsplit(url).scheme == "file":
        path = Path(unquote(urlsplit(url).path))
        try:
            return path.read_bytes()
        except OSError as e:
            msg = f"cannot read the manifest {path}: {e}"
            raise DownloadError(msg) from e
    last = ""
    for attempt in range(3):
        if attempt:
            time.sleep(0.5 * 2**attempt)
        try:
            with _get(session, url, {}, allow_http, timeout) as r:
                if r.status_code >= 500:
                    last = f"{url} answered {r.status_code} {r.reason}"
                    continue
                if r.status_code != 200:
                    msg = f"{url} answered {r.status_code} {r.reason} for the release manifest"
                    raise DownloadError(msg)
                return r.content[: 4 << 20]
        except DownloadError:
            raise
        except Exception as e:  # noqa: BLE001 - network errors, see _network_error
            if not _network_error(e):
                raise
            last = f"{type(e).__name__}: {e}"
            if _unresolvable(e):
                break  # the name will not resolve a second later either
    msg = f"cannot read the release manifest {url}: {last}"
    raise DownloadError(msg)


# --- fetch ---------------------------------------------------------------------------------------


def _base_url(base_url: str | None) -> str:
    base = base_url or os.environ.get("NEXABIND_BASE_URL") or pin.DEFAULT_BASE_URL
    if "://" not in base:  # a plain folder is a file:// mirror
        base = Path(base).expanduser().absolute().as_uri()
    return base.rstrip("/")


def _build_instead(
    failure: NexabindError,
    variant: str | None,
    release: str,
    root: Path,
    build: bool,
    quiet: bool | None,
) -> Path:
    """Build from source and install (``nexabind build --install``), or raise ``failure``.

    ``failure`` says why nothing can be downloaded; when not building, it is raised with what
    to run added.
    """
    from nexabind.build import FLAGS
    from nexabind.platform import detect, target

    os_name, arch = target()
    if variant is None:
        from nexabind.manifest import variant_order

        order = variant_order(detect())
        variant = next((v for v in order if (os_name, arch, v) in FLAGS), "cpu")
    cmd = "nexabind build --install" + (f" --variant {variant}" if variant != "cpu" else "")
    reason = str(failure)
    if not build or release != pin.RELEASE:
        if release != pin.RELEASE:
            hint = f"(only release {pin.RELEASE} can be built from this nexabind's source pin)"
        elif "nexabind build" in reason:  # the no-artifact message offers the build already
            hint = f"(a build takes about {_BUILD_MINUTES} minutes; or set NEXABIND_LIB_PATH)"
        else:
            hint = (
                f"Build it from source with `{cmd}` (about {_BUILD_MINUTES} minutes; needs "
                "CMake and a C++ compiler), or set NEXABIND_LIB_PATH to a local build"
            )
        raise type(failure)(f"{reason}\n{hint}") from failure
    _say(
        f"{reason}\nnexabind: building llama.cpp {pin.LLAMA_COMMIT} ({variant}) from source "
        f"instead, as `{cmd}` does; this takes about {_BUILD_MINUTES} minutes",
        quiet,
    )
    import tempfile

    from nexabind.build import build as build_from_source

    key = f"{os_name}-{arch}-{variant}"
    # Under the artifact's lock: a concurrent fetch waits and then finds the install, and
    # `nexabind clean` leaves the build folder alone (a killed build's folder it removes).
    with cache.file_lock(root, release, key):
        hit = cache.find(release, key, root)
        if hit is not None:
            return hit.lib
        prefix = f"{release}{cache.SEP}{key}{cache.SEP}build-"
        with tempfile.TemporaryDirectory(dir=root / "tmp", prefix=prefix) as out:
            progress = (not quiet) and sys.stderr.isatty()
            build_from_source(variant, out=out, progress=progress)
            data = json.loads((Path(out) / "manifest.json").read_text())
            entry = next(a for a in data["artifacts"] if a["variant"] == variant)
            archive = Path(out) / entry["name"]
            return _install_locked(
                root, archive, entry, release, source="nexabind build", force=True, checked=False
            )


def fetch(
    variant: str | None = None,
    *,
    release: str | None = None,
    base_url: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    offline: bool | None = None,
    force: bool = False,
    build: bool = True,
    quiet: bool | None = None,
    allow_http: bool | None = None,
) -> Path:
    """Make sure the llama.cpp library for this process is installed, and return its folder.

    ``NEXABIND_LIB_PATH`` wins (nothing is fetched). An installed, complete entry is returned at
    once, without touching the network. Otherwise the release manifest is read (the one shipped
    in the package, else ``<base>/<release>/manifest.json``, said to be unpinned), the best
    artifact for this platform is downloaded, verified and installed. When no artifact fits or
    the host cannot be reached, llama.cpp is built from source unless ``build`` is False.

    Args:
        variant: ``cpu``, ``cuda``, ``vulkan`` or ``metal``; default ``NEXABIND_VARIANT``, else
            the best for this platform.
        release: Release tag; default :data:`nexabind.pin.RELEASE`.
        base_url: Release host or mirror (``<base>/<release>/<asset>``); default
            ``NEXABIND_BASE_URL``, else :data:`nexabind.pin.DEFAULT_BASE_URL`.
        cache_dir: Cache root; default ``NEXABIND_CACHE_DIR``, else the user cache.
        offline: Never touch the network; default ``NEXABIND_OFFLINE``.
        force: Download and reinstall even when installed.
        build: Build from source when nothing can be downloaded.
        quiet: No status lines or progress bar; default: status lines, and a bar on a terminal.
        allow_http: Allow plain ``http://`` to hosts other than loopback; default
            ``NEXABIND_ALLOW_HTTP``.

    Returns:
        The installed ``lib`` folder (or ``NEXABIND_LIB_PATH``).

    Raises:
        CacheError: Offline and nothing installed.
        ManifestError: No artifact fits and ``build`` is False, or the manifest is invalid.
        DownloadError: The host cannot be reached and ``build`` is False; a checksum mismatch
            (``ChecksumMismatchError``) or an unsafe archive (``UnsafeArchiveError``).
        BuildError: The fallback build failed.
    """
    local = os.environ.get("NEXABIND_LIB_PATH")
    if local:
        _say(f"nexabind: NEXABIND_LIB_PATH is set; using {local}, nothing fetched", quiet)
        return Path(local)
    release = release or pin.RELEASE
    variant = variant or os.environ.get("NEXABIND_VARIANT") or None
    offline = _env_flag("NEXABIND_OFFLINE") if offline is None else offline
    allow_http = _env_flag("NEXABIND_ALLOW_HTTP") if allow_http is None else allow_http
    root = cache.prepare(cache_dir)
    if not force:
        hit = cache.best_installed(release, root, variant)
        if hit is not None:
            _say(f"nexabind: {hit.key} of release {release} is installed in {hit.path}", quiet)
            return hit.lib
    from nexabind.platform import target

    os_name, arch = target()
    if offline:
        what = f"{os_name}-{arch}" + (f"-{variant}" if variant else "")
        msg = (
            f"offline (NEXABIND_OFFLINE / --offline) and no llama.cpp library of release {release}"
            f" for {what} is installed in {root}; run `nexabind fetch` with network access, or "
            "`nexabind build --install`, or set NEXABIND_LIB_PATH to a local build"
        )
        raise CacheError(msg)
    try:
        with contextlib.ExitStack() as stack:  # the children and the HTTP session
            base = _base_url(base_url)
            return _fetch_online(variant, release, base, root, force, quiet, allow_http, stack)
    except (ChecksumMismatchError, UnsafeArchiveError, _RefusedURL):
        raise
    except _NothingToDownload as e:
        return _build_instead(ManifestError(str(e)), variant, release, root, build, quiet)
    except DownloadError as e:
        failure = DownloadError(f"nothing could be downloaded: {e}")
        return _build_instead(failure, variant, release, root, build, quiet)


class _NothingToDownload(Exception):
    """No artifact of the manifest fits this process (the message says why)."""


def _fetch_online(
    variant: str | None,
    release: str,
    base: str,
    root: Path,
    force: bool,
    quiet: bool | None,
    allow_http: bool,
    stack: contextlib.ExitStack,
) -> Path:
    from nexabind import manifest as mf
    from nexabind.platform import detect

    timeout = (10.0, 30.0)
    # Two children start first, so that their start-up overlaps importing requests: the one
    # that will smoke-load the new library, and the GPU probe (which detect() runs).
    smoke = stack.enter_context(_smoke_child())
    probe = threading.Thread(target=detect, daemon=True)
    probe.start()
    # One session for the manifest and the artifact: one connection (and TLS handshake) per host.
    session = None if base.startswith("file:") else stack.enter_context(_session())
    manifest = mf.packaged(release)
    if manifest is None:
        url = f"{base}/{release}/manifest.json"
        manifest = mf.Manifest.from_json(
            _read_manifest(url, allow_http, timeout, session), pinned=False, source=url
        )
        _say(f"nexabind: using the unpinned manifest {url} (digests not shipped with nexabind)",
             quiet)  # fmt: skip
    mf.check_compatible(manifest)
    probe.join()
    plat = detect()
    choice = mf.choose(manifest, plat, variant)
    art = choice.artifact
    if art is None:
        raise _NothingToDownload(mf.no_artifact_message(choice, plat))
    if not force:
        hit = cache.find(release, art.key, root)
        if hit is not None:
            _say(f"nexabind: {art.key} of release {release} is installed in {hit.path}", quiet)
            return hit.lib
    url = f"{base}/{release}/{art.url}"
    with cache.file_lock(root, release, art.key):
        if not force:
            hit = cache.find(release, art.key, root)
            if hit is not None:  # another process installed it while we waited
                _say(f"nexabind: {art.key} was installed meanwhile in {hit.path}", quiet)
                return hit.lib
        _say(f"nexabind: downloading {art.name} ({art.size / 2**20:.1f} MiB) from {url}", quiet)
        path = download(
            url,
            root / "downloads",
            size=art.size,
            sha256=art.sha256,
            prefix=f"{release}{cache.SEP}{art.key}{cache.SEP}",
            name=art.name,
            allow_http=allow_http,
            timeout=timeout,
            progress=not quiet and sys.stderr.isatty(),
            quiet=quiet,
            session=session,
        )
        try:
            lib = _install_locked(
                root, path, art, release, source=url, force=True, checked=True, smoke=smoke,
                discard=True,
            )  # fmt: skip
        finally:
            path.unlink(missing_ok=True)
            path.with_name(path.name + ".json").unlink(missing_ok=True)
    _say(f"nexabind: installed {art.key} of release {release} in {lib.parent}", quiet)
    return lib
