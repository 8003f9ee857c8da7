"""HTTP for artifacts: a checked URL, redirects by hand, resumable downloads with retries.

:func:`download` streams one file into a uniquely named partial in the cache's ``downloads/``,
hashing it on the way, resumes an earlier partial of the same file with ``Range``/``If-Range``,
and retries network errors, timeouts, 5xx and short bodies with capped backoff, all within one
overall deadline (a server that sends a byte every few seconds never trips a read timeout).
A ``file://`` URL is read only when it resolves to a regular file inside its release folder.
``requests`` and ``tqdm`` are imported only when something is downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import posixpath
import stat
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import unquote, urljoin, urlsplit

from nexabind import cache, pin
from nexabind.errors import (
    CacheError,
    ChecksumMismatchError,
    DownloadError,
    DownloadTimeoutError,
    ManifestError,
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
#: Most seconds a manifest read may take (a manifest is a few KiB).
MANIFEST_DEADLINE = 120.0
#: Where to look for more time, in timeout messages.
_MORE_TIME = "allow more time with --download-timeout / NEXABIND_DOWNLOAD_TIMEOUT"


class URLRefusedError(DownloadError):
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


def _check_url(url: str, allow_http: bool, redirected_from: str | None = None) -> None:
    """Raise URLRefusedError unless ``url`` may be requested; a redirect (from
    ``redirected_from``) may lead to http(s) only, never to a local file."""
    parts = urlsplit(url)
    if redirected_from is not None and parts.scheme not in ("https", "http"):
        msg = (
            f"{redirected_from} redirected to {url}: a redirect may lead to https:// (or"
            " http://) only; not followed. The mirror is misconfigured or hostile: check"
            " --base-url / NEXABIND_BASE_URL"
        )
        raise URLRefusedError(msg)
    if parts.scheme in ("https", "file"):
        return
    if parts.scheme == "http":
        if allow_http or _is_loopback(parts.hostname):
            return
        msg = (
            f"refusing plain http:// to {parts.hostname} ({url}): use https://, or pass "
            "--allow-http (NEXABIND_ALLOW_HTTP=1) if this mirror is trusted"
        )
        raise URLRefusedError(msg)
    msg = f"unsupported URL {url!r}: the base URL must be https://, http:// or file://"
    raise URLRefusedError(msg)


class _Retryable(DownloadError):
    """A failure worth another attempt (connection, timeout, 5xx, short body)."""


class _Deadline:
    """The overall time one download (or manifest read) may take, and its watchdog.

    Read timeouts bound each wait for a byte, not a server that sends one byte every few
    seconds, in the body or in the headers. When the time is up the watchdog shuts down the
    connections of the session (see :func:`open_session`): a read blocked in them returns at
    once, and the transfer raises :class:`DownloadTimeoutError`. Without such a session the
    deadline is checked between reads, and each read timeout is cut to the time left.
    """

    def __init__(self, seconds: float, session: Any = None) -> None:
        self.seconds, self.session = seconds, session
        self.end = time.monotonic() + seconds
        self.expired = False  # the watchdog ran
        self.timer = threading.Timer(seconds, self._expire)
        self.timer.daemon = True

    def __enter__(self) -> _Deadline:
        self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timer.cancel()

    def _expire(self) -> None:
        self.expired = True
        adapters = getattr(self.session, "adapters", {})
        for adapter in {id(a): a for a in adapters.values()}.values():
            if isinstance(adapter, _cuttable_adapter()):
                adapter.cut()

    @property
    def passed(self) -> bool:
        """The time is up."""
        return self.expired or time.monotonic() >= self.end

    def timeouts(self, timeout: tuple[float, float]) -> tuple[float, float]:
        """``(connect, read)`` timeouts, each cut to the time left."""
        left = max(self.end - time.monotonic(), 0.01)
        return min(timeout[0], left), min(timeout[1], left)

    def allows(self, wait: float) -> bool:
        """Whether waiting ``wait`` seconds leaves time for another attempt."""
        return time.monotonic() + wait < self.end


_ADAPTER: list[type[Any]] = []


def _cuttable_adapter() -> type[Any]:
    """A requests ``HTTPAdapter`` that can shut down every connection it opened (``cut()``),
    made on first use (``requests`` is imported only when something is downloaded)."""
    if _ADAPTER:
        return _ADAPTER[0]
    import weakref

    import requests.adapters
    from urllib3 import connection, connectionpool

    class Adapter(requests.adapters.HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            self.live: weakref.WeakSet[Any] = weakref.WeakSet()
            self.lock = threading.Lock()  # the watchdog's thread reads `live`
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = _pools(self.live, self.lock)

        def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
            manager = super().proxy_manager_for(proxy, **kwargs)
            if not proxy.lower().startswith("socks"):  # SOCKS pools are its own
                manager.pool_classes_by_scheme = _pools(self.live, self.lock)
            return manager

        def cut(self) -> None:
            """Shut down every open connection: a read blocked in one returns at once."""
            import socket  # here: a fetch of an installed library imports no socket

            with self.lock:
                live = list(self.live)
            for conn in live:
                sock = getattr(conn, "sock", None)
                if sock is not None:
                    with contextlib.suppress(OSError):
                        socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def _pools(live: weakref.WeakSet[Any], lock: threading.Lock) -> dict[str, type]:
        """Connection pool classes whose connections are added to ``live`` when they open."""

        def watched(base: Any) -> Any:
            class Watched(base):  # type: ignore[misc]
                def _new_conn(self) -> Any:
                    sock = super()._new_conn()
                    with lock:
                        live.add(self)
                    return sock

            return Watched

        http = type("Pool", (connectionpool.HTTPConnectionPool,),
                    {"ConnectionCls": watched(connection.HTTPConnection)})  # fmt: skip
        https = type("TLSPool", (connectionpool.HTTPSConnectionPool,),
                     {"ConnectionCls": watched(connection.HTTPSConnection)})  # fmt: skip
        return {"http": http, "https": https}

    _ADAPTER.append(Adapter)
    return Adapter


def _get(
    session: Any, url: str, headers: dict[str, str], allow_http: bool, deadline: _Deadline,
    timeout: tuple[float, float],
) -> Any:  # fmt: skip
    """GET following redirects by hand: each hop is checked, credentials stay with their host."""
    import requests

    first_host = urlsplit(url).hostname
    came_from = None
    for _ in range(10):
        _check_url(url, allow_http, came_from)
        same_host = urlsplit(url).hostname == first_host
        hop_headers = dict(headers)
        try:
            prep = session.prepare_request(requests.Request("GET", url, headers=hop_headers))
            if not same_host:
                prep.headers.pop("Authorization", None)
            r = session.send(
                prep, stream=True, timeout=deadline.timeouts(timeout), allow_redirects=False
            )
        except requests.RequestException as e:
            if _network_error(e):
                raise
            msg = f"cannot request {url}: {e}; check --base-url / NEXABIND_BASE_URL"
            raise DownloadError(msg) from e
        if r.is_redirect:
            r.close()
            came_from, location = url, r.headers["Location"]
            try:
                url = urljoin(url, location)
            except ValueError as e:
                msg = f"{came_from} redirected to an invalid URL {location!r} ({e}); not followed"
                raise URLRefusedError(msg) from e
            continue
        return r
    msg = f"{url}: more than 10 redirects"
    raise DownloadError(msg)


def open_session() -> Any:
    """A requests session for downloads; a deadline can cut its connections (see _Deadline)."""
    import requests

    s = requests.Session()
    adapter = _cuttable_adapter()()
    s.mount("https://", adapter)
    s.mount("http://", adapter)
    s.headers["User-Agent"] = f"nexabind-fetch ({pin.RELEASE})"
    # Artifacts are gzip already; a transparently decoded body would not match its sha256.
    s.headers["Accept-Encoding"] = "identity"
    return s


def _local_file(url: str, root: str | None) -> IO[bytes]:
    """Open the file a ``file://`` URL names, once it is known to be a regular file inside
    ``root`` (a ``file://`` URL of a folder; default: the URL's own folder, and no ``..``).

    The path is resolved (``%2e%2e``, ``..`` and links followed) before it is compared, so a
    URL cannot read outside the release folder, and a device or FIFO is refused (``/dev/zero``
    would never end).
    """
    from urllib.request import url2pathname

    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        msg = f"{url}: a file:// URL must name a local path (file:///...), not host {parts.netloc}"
        raise URLRefusedError(msg)
    path = Path(url2pathname(parts.path))
    if root is None:
        if ".." in PurePosixPath(unquote(parts.path)).parts:
            raise URLRefusedError(f"{url} climbs out of its folder with '..'; not read")
        folder = path.parent
    else:
        folder = Path(url2pathname(urlsplit(root).path))
    try:
        real, inside = path.resolve(strict=True), folder.resolve()
    except (OSError, RuntimeError) as e:  # missing, or a loop of links
        msg = f"cannot read {path}: {e}"
        raise DownloadError(msg) from e
    if not real.is_relative_to(inside):
        msg = (
            f"{url} resolves to {real}, outside the release folder {inside}; not read. The"
            " mirror's manifest names a file it must not: check --base-url / NEXABIND_BASE_URL"
        )
        raise URLRefusedError(msg)
    try:
        # Non-blocking: opening a FIFO would wait for a writer; reading a file is not affected.
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        msg = f"cannot read {path}: {e}"
        raise DownloadError(msg) from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        msg = f"{url}: {real} is not a regular file (a device, FIFO or folder); not read"
        raise URLRefusedError(msg)
    return os.fdopen(fd, "rb")


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

    def write(self, chunks: Iterable[bytes], deadline: _Deadline) -> None:
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

    def too_slow(self, deadline: _Deadline, last: str = "") -> DownloadTimeoutError:
        """The error to raise when the deadline passed; says what came and what to do."""
        msg = (
            f"downloading {self.name} from {self.url} did not finish within"
            f" {deadline.seconds:g} s ({self.have} of {self.size} bytes received)"
        )
        if last:
            msg += f"; last error: {last}"
        if self.have:
            msg += "; the bytes received are kept and the next `nexabind fetch` resumes"
        return DownloadTimeoutError(f"{msg}; on a slow link, {_MORE_TIME}")

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
            with _Deadline(deadline) as dl:
                _copy_local(url, root, transfer, dl)
        else:
            owned = open_session() if session is None else contextlib.nullcontext(session)
            with owned as s, _Deadline(deadline, s) as dl:
                _with_retries(transfer, s, allow_http, timeout, retries, backoff, max_backoff, dl)
        return transfer.verified()
    finally:
        transfer.close()


def _copy_local(url: str, root: str | None, transfer: _Transfer, deadline: _Deadline) -> None:
    """A ``file://`` mirror: copy the file whole (a regular file inside ``root`` only)."""
    with _local_file(url, root) as f:
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
    deadline: _Deadline,
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
            if not _network_error(e):
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
    transfer: _Transfer, session: Any, allow_http: bool, timeout: Any, deadline: _Deadline
) -> None:
    """One request: resume (or restart) the transfer and stream the body into it."""
    url, headers = transfer.url, transfer.resume_headers()
    with _get(session, url, headers, allow_http, deadline, timeout) as r:
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


def read_manifest(
    url: str,
    allow_http: bool,
    timeout: tuple[float, float],
    session: Any,
    *,
    limit: int,
    deadline: float = MANIFEST_DEADLINE,
    root: str | None = None,
) -> bytes:
    """Read a release manifest: at most ``limit`` bytes, within ``deadline`` seconds.

    Args:
        url: ``https://``, loopback ``http://`` (any with ``allow_http``) or ``file://``.
        allow_http: Allow plain ``http://`` to hosts other than loopback.
        timeout: ``(connect, read)`` timeouts in seconds.
        session: A session from :func:`open_session` (None for a ``file://`` URL).
        limit: Largest body in bytes; a longer one is refused without being read.
        deadline: Seconds the read may take, its retries included.
        root: For a ``file://`` URL, see :func:`download`.

    Returns:
        The body, not yet parsed.

    Raises:
        ManifestError: The body is over ``limit``.
        DownloadTimeoutError: The deadline passed.
        DownloadError: The server cannot be reached or refused (names the URL).
    """
    if urlsplit(url).scheme == "file":
        with _local_file(url, root) as f:
            try:
                data = f.read(limit + 1)
            except OSError as e:
                msg = f"cannot read the manifest {url}: {e}"
                raise DownloadError(msg) from e
        if len(data) > limit:
            raise _too_long(limit, url)
        return data
    last = ""
    with _Deadline(deadline, session) as dl:
        for attempt in range(3):
            if attempt:
                wait = 0.5 * 2**attempt
                if not dl.allows(wait):
                    break
                time.sleep(wait)
            try:
                with _get(session, url, {}, allow_http, dl, timeout) as r:
                    if r.status_code >= 500:
                        last = f"{url} answered {r.status_code} {r.reason}"
                        continue
                    if r.status_code != 200:
                        msg = f"{url} answered {r.status_code} {r.reason} for the release manifest"
                        raise DownloadError(msg)
                    return _read_body(r, limit, url, dl)
            except (DownloadError, ManifestError):
                raise
            except Exception as e:  # noqa: BLE001 - network errors, see _network_error
                if not _network_error(e):
                    raise
                last = f"{type(e).__name__}: {e}"
                if dl.passed or _unresolvable(e):
                    break  # the name will not resolve a second later either
        if dl.passed:
            msg = (
                f"reading the release manifest {url} did not finish within {dl.seconds:g} s;"
                f" the mirror is stalled or too slow: check --base-url / NEXABIND_BASE_URL, or"
                f" {_MORE_TIME}"
            )
            raise DownloadTimeoutError(msg)
    msg = f"cannot read the release manifest {url}: {last}"
    raise DownloadError(msg)


def _too_long(limit: int, url: str) -> ManifestError:
    msg = (
        f"the release manifest {url} is over {limit} bytes (a manifest takes a few KiB);"
        " not read. Check --base-url / NEXABIND_BASE_URL"
    )
    return ManifestError(msg)


def _read_body(r: Any, limit: int, url: str, deadline: _Deadline) -> bytes:
    """At most ``limit`` bytes of ``r``'s body (one more is refused), before the deadline."""
    length = r.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > limit:
        raise _too_long(limit, url)
    chunks, n = [], 0
    for chunk in r.raw.stream(1 << 16, decode_content=False):
        n += len(chunk)
        if n > limit:
            raise _too_long(limit, url)
        chunks.append(chunk)
    if deadline.passed:  # cut short by the watchdog: what came is not the whole manifest
        raise ConnectionError("the connection was cut at the deadline")
    return b"".join(chunks)
