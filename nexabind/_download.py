"""Artifact downloads: resumable, hashed on the way, retried, within one deadline.

:func:`download` streams one file into a uniquely named partial in the cache's ``downloads/``,
hashing it on the way, resumes an earlier partial of the same file with ``Range``/``If-Range``,
and retries network errors, timeouts, 5xx and short bodies with capped backoff, all within one
overall deadline (a server that sends a byte every few seconds never trips a read timeout).
A ``file://`` URL is read only when it resolves to a regular file inside its release folder.
The requests themselves (checked URLs, redirects by hand, the deadline's watchdog) and the
manifest's read are :mod:`nexabind._http`. ``requests`` and ``tqdm`` are imported only when
something is downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from nexabind import cache
from nexabind._http import (
    MANIFEST_DEADLINE,
    MORE_TIME,
    Deadline,
    URLRefusedError,
    get,
    local_file,
    network_error,
    open_session,
    read_manifest,
)
from nexabind.errors import (
    CacheError,
    ChecksumMismatchError,
    DownloadError,
    DownloadTimeoutError,
)

__all__ = [
    "DEADLINE",
    "MANIFEST_DEADLINE",
    "URLRefusedError",
    "download",
    "open_session",
    "read_manifest",
]

log = logging.getLogger(__name__)

#: Seconds one download may take by default, from its first request to its last byte.
DEADLINE = 1800.0


class _Retryable(DownloadError):
    """A failure worth another attempt (connection, timeout, 5xx, short body)."""


class _Partial:
    """A partial download and what the server said about it (for If-Range)."""

    __slots__ = ("meta", "path")

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path, self.meta = path, meta

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


class _Transfer:
    """One download in progress: its partial file, the bytes in it and their running sha256.

    ``have`` and the hash cover exactly the bytes written, so a failure at any point leaves a
    partial that the next attempt (or the next process) resumes.
    """

    def __init__(self, url: str, name: str, part: _Partial, size: int, sha256: str, bar: Any):
        self.url, self.name, self.part, self.size, self.sha256 = url, name, part, size, sha256
        self.bar = bar
        self.hasher = hashlib.sha256()
        self.have = 0
        with part.path.open("rb") as f:  # what an earlier attempt left
            while chunk := f.read(1 << 20):
                self.hasher.update(chunk)
                self.have += len(chunk)

    @property
    def complete(self) -> bool:
        """All ``size`` bytes are in the partial."""
        return self.have == self.size

    def resume_headers(self) -> dict[str, str]:
        """``Range`` from the bytes there, ``If-Range`` with the validator the server sent."""
        if not self.have:
            return {}
        headers = {"Range": f"bytes={self.have}-"}
        validator = self.part.meta.get("etag") or self.part.meta.get("last_modified")
        if validator:
            headers["If-Range"] = validator
        return headers

    def restart(self, response: Any = None) -> None:
        """Empty the partial; remember the validators of ``response`` (a full body) if given."""
        self.have, self.hasher = 0, hashlib.sha256()
        with self.disk():
            self.part.path.write_bytes(b"")
        self.bar.reset(total=self.size)
        if response is not None:
            headers = response.headers
            self.part.meta.update(
                etag=headers.get("ETag"), last_modified=headers.get("Last-Modified")
            )
            with self.disk():
                self.part.save()

    def write(self, chunks: Iterable[bytes], deadline: Deadline) -> None:
        """Append ``chunks`` to the partial, hashing and counting them, until the deadline."""
        with self.disk():
            out = self.part.path.open("ab")
        try:
            for chunk in chunks:
                if self.have + len(chunk) > self.size:
                    raise self.mismatch(f"size expected {self.size} bytes, got more")
                with self.disk():
                    out.write(chunk)
                self.hasher.update(chunk)
                self.have += len(chunk)
                self.bar.update(len(chunk))
                if deadline.passed and not self.complete:
                    raise self.too_slow(deadline)
        finally:
            with self.disk():
                out.close()

    @contextlib.contextmanager
    def disk(self) -> Iterator[None]:
        """Report a failed write of the partial (a full disk) as a CacheError that says so."""
        try:
            yield
        except OSError as e:
            err = cache.disk_error(self.part.path, e, f"downloading {self.name}")
            with contextlib.suppress(OSError):
                # What is on disk, part of a failed write included: what the next call resumes.
                kept = self.part.path.stat().st_size
                if kept:
                    err = CacheError(
                        f"{err}; the {kept} bytes received are kept and the next `nexabind"
                        " fetch` resumes (`nexabind clean` removes them)"
                    )
            raise err from e

    def too_slow(self, deadline: Deadline, last: str = "") -> DownloadTimeoutError:
        """The error to raise when the deadline passed; says what came and what to do."""
        msg = (
            f"downloading {self.name} from {self.url} did not finish within"
            f" {deadline.seconds:g} s ({self.have} of {self.size} bytes received)"
        )
        if last:
            msg += f"; last error: {last}"
        if self.have:
            msg += "; the bytes received are kept and the next `nexabind fetch` resumes"
        return DownloadTimeoutError(f"{msg}; on a slow link, {MORE_TIME}")

    def mismatch(self, what: str) -> ChecksumMismatchError:
        """Delete the partial; the error to raise, saying ``what`` differs."""
        self.part.delete()
        return ChecksumMismatchError(f"{self.name} from {self.url}: {what}; deleted the download")

    def verified(self) -> Path:
        """The complete partial, once its size and sha256 are the expected ones."""
        if self.have != self.size:
            raise self.mismatch(f"size expected {self.size} bytes, got {self.have}")
        got = self.hasher.hexdigest()
        if got != self.sha256:
            raise self.mismatch(f"sha256 expected {self.sha256}, got {got}")
        self.bar.close()
        return self.part.path

    def close(self) -> None:
        """Close the bar; remove a partial with nothing in it to resume."""
        self.bar.close()
        with contextlib.suppress(OSError):
            if self.part.path.is_file() and self.part.path.stat().st_size == 0:
                self.part.delete()


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
    deadline: float = DEADLINE,
    root: str | None = None,
    progress: bool = False,
    session: Any = None,
) -> Path:
    """Download ``url`` into ``dest_dir``, resuming a partial of the same file, and verify it.

    The body goes to a uniquely named ``.part`` file (plus a ``.part.json`` holding the
    server's validators) and is hashed as it streams. An earlier partial with the same sha256
    is resumed with ``Range`` + ``If-Range``; a server that answers 200 instead of 206 restarts
    it. Connection errors, timeouts, 5xx and short bodies are retried ``retries`` times with
    exponential backoff capped at ``max_backoff`` seconds, all within ``deadline`` seconds.
    The caller holds the artifact's lock.

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
        timeout: ``(connect, read)`` timeouts in seconds, for each wait on the server.
        deadline: Seconds the whole download may take, retries and waits included.
        root: For a ``file://`` URL, the folder (a ``file://`` URL) it must resolve inside;
            default: its own folder (and the URL may not hold ``..``).
        progress: Show a tqdm bar.
        session: A session from :func:`open_session` to reuse (and its open connections);
            default: a new one, closed on return.

    Returns:
        The verified file (a ``.part`` name; the caller installs and removes it).

    Raises:
        ChecksumMismatchError: Size or sha256 differ; the download was deleted.
        DownloadTimeoutError: The deadline passed; what came is kept for the next call.
        URLRefusedError: A URL or redirect that may not be followed, or a ``file://`` URL
            outside ``root`` or not naming a regular file.
        DownloadError: Every attempt failed, or the server refused (4xx); names URL and artifact.
        CacheError: The partial cannot be written (a full disk); says what to do.
    """
    folder = Path(dest_dir)
    name = name or posixpath.basename(urlsplit(url).path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        part = _resumable(folder, prefix, sha256, size)
        bar = _bar(size, part.path.stat().st_size, name) if progress else _NoBar()
        transfer = _Transfer(url, name, part, size, sha256, bar)
    except OSError as e:
        raise cache.disk_error(folder, e, f"downloading {name}") from e
    try:
        if urlsplit(url).scheme == "file":
            with Deadline(deadline) as dl:
                _copy_local(url, root, transfer, dl)
        else:
            owned = open_session() if session is None else contextlib.nullcontext(session)
            with owned as s, Deadline(deadline, s) as dl:
                _with_retries(transfer, s, allow_http, timeout, retries, backoff, max_backoff, dl)
        return transfer.verified()
    finally:
        transfer.close()


def _copy_local(url: str, root: str | None, transfer: _Transfer, deadline: Deadline) -> None:
    """A ``file://`` mirror: copy the file whole (a regular file inside ``root`` only)."""
    with local_file(url, root) as f:
        transfer.restart()

        def chunks() -> Iterator[bytes]:
            while True:
                try:
                    chunk = f.read(1 << 20)
                except OSError as e:
                    msg = f"cannot read {url}: {e}"
                    raise DownloadError(msg) from e
                if not chunk:
                    return
                yield chunk

        transfer.write(chunks(), deadline)


def _with_retries(
    transfer: _Transfer,
    session: Any,
    allow_http: bool,
    timeout: tuple[float, float],
    retries: int,
    backoff: float,
    max_backoff: float,
    deadline: Deadline,
) -> None:
    """Attempt the transfer until it is complete, waiting longer after each failure."""
    last = ""
    for attempt in range(retries + 1):
        if attempt:
            wait = min(max_backoff, backoff * 2 ** (attempt - 1))
            if not deadline.allows(wait):
                raise transfer.too_slow(deadline, last)
            log.warning("%s; retrying in %g s", last, wait)
            time.sleep(wait)
        if transfer.complete:
            return
        try:
            _attempt(transfer, session, allow_http, timeout, deadline)
            return
        except _Retryable as e:
            last = str(e)
        except DownloadError:
            raise
        except Exception as e:  # noqa: BLE001 - requests' and urllib3's network errors
            if not network_error(e):
                raise
            last = f"{type(e).__name__} from {transfer.url}: {e}"
        if deadline.passed:  # the watchdog cut the connection, or the time ran out
            raise transfer.too_slow(deadline, "" if deadline.expired else last)
    if transfer.complete:
        return
    msg = (
        f"downloading {transfer.name} from {transfer.url} failed after {retries + 1} attempts:"
        f" {last}"
    )
    if transfer.have:
        msg += (
            f"; the {transfer.have} bytes received are kept and the next `nexabind fetch` resumes"
        )
    raise DownloadError(msg)


def _attempt(
    transfer: _Transfer, session: Any, allow_http: bool, timeout: Any, deadline: Deadline
) -> None:
    """One request: resume (or restart) the transfer and stream the body into it."""
    url, headers = transfer.url, transfer.resume_headers()
    with get(session, url, headers, allow_http, deadline, timeout) as r:
        _take_answer(transfer, r)
        # The raw bytes: a server adding Content-Encoding: gzip to a .tar.gz must not get the
        # archive decompressed before it is hashed.
        transfer.write(r.raw.stream(1 << 20, decode_content=False), deadline)
    if not transfer.complete:
        raise _Retryable(f"the connection closed after {transfer.have} of {transfer.size} bytes")


def _take_answer(transfer: _Transfer, r: Any) -> None:
    """Check the status: a resumed body (206 at the right offset), or a full one (200, the
    partial restarts); raise _Retryable for what another attempt may fix, else DownloadError."""
    url, status = transfer.url, r.status_code
    if status == 416 and transfer.have:
        transfer.restart()
        raise _Retryable("the server refused the resume range; restarting")
    if status >= 500 or status in (408, 429):
        raise _Retryable(f"{url} answered {status} {r.reason}")
    if status not in (200, 206):
        msg = (
            f"{url} answered {status} {r.reason} for artifact {transfer.name}; "
            "check --base-url / NEXABIND_BASE_URL and --release"
        )
        raise DownloadError(msg)
    if status == 206:
        start = r.headers.get("Content-Range", "").removeprefix("bytes ")
        if not start.startswith(f"{transfer.have}-"):
            raise _Retryable(f"{url} sent the wrong range ({start or 'none'})")
        return
    if transfer.have:
        log.warning("%s ignored the resume range; restarting", url)
    transfer.restart(r)
