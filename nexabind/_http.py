"""The HTTP (and ``file://``) side of a fetch: which URLs may be read, a session whose
connections an overall deadline can cut, GET with redirects followed by hand, local files read
only inside their release folder, and the release manifest's bounded read
(:func:`read_manifest`; artifacts are downloaded by :mod:`nexabind._download`).

``requests`` is imported only when something is requested.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import stat
import threading
import time
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import unquote, urljoin, urlsplit

from nexabind import pin
from nexabind.errors import DownloadError, DownloadTimeoutError, ManifestError

__all__ = [
    "MANIFEST_DEADLINE",
    "MORE_TIME",
    "Deadline",
    "URLRefusedError",
    "check_url",
    "get",
    "local_file",
    "network_error",
    "open_session",
    "read_manifest",
    "unresolvable",
]

#: Most seconds a manifest read may take (a manifest is a few KiB).
MANIFEST_DEADLINE = 120.0
#: Where to look for more time, in timeout messages.
MORE_TIME = "allow more time with --download-timeout / NEXABIND_DOWNLOAD_TIMEOUT"


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


def check_url(url: str, allow_http: bool, redirected_from: str | None = None) -> None:
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


class Deadline:
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

    def __enter__(self) -> Deadline:
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


def get(
    session: Any, url: str, headers: dict[str, str], allow_http: bool, deadline: Deadline,
    timeout: tuple[float, float],
) -> Any:  # fmt: skip
    """GET following redirects by hand: each hop is checked, credentials stay with their host."""
    import requests

    first_host = urlsplit(url).hostname
    came_from = None
    for _ in range(10):
        check_url(url, allow_http, came_from)
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
            if network_error(e):
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
    """A requests session for downloads; a deadline can cut its connections (see Deadline)."""
    import requests

    s = requests.Session()
    adapter = _cuttable_adapter()()
    s.mount("https://", adapter)
    s.mount("http://", adapter)
    s.headers["User-Agent"] = f"nexabind-fetch ({pin.RELEASE})"
    # Artifacts are gzip already; a transparently decoded body would not match its sha256.
    s.headers["Accept-Encoding"] = "identity"
    return s


def local_file(url: str, root: str | None) -> IO[bytes]:
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


def network_error(e: Exception) -> bool:
    import requests
    import urllib3

    return isinstance(
        e,
        (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
         urllib3.exceptions.HTTPError, ConnectionError, TimeoutError),
    )  # fmt: skip


def unresolvable(e: Exception) -> bool:
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
        with local_file(url, root) as f:
            try:
                data = f.read(limit + 1)
            except OSError as e:
                msg = f"cannot read the manifest {url}: {e}"
                raise DownloadError(msg) from e
        if len(data) > limit:
            raise _too_long(limit, url)
        return data
    last = ""
    with Deadline(deadline, session) as dl:
        for attempt in range(3):
            if attempt:
                wait = 0.5 * 2**attempt
                if not dl.allows(wait):
                    break
                time.sleep(wait)
            try:
                with get(session, url, {}, allow_http, dl, timeout) as r:
                    if r.status_code >= 500:
                        last = f"{url} answered {r.status_code} {r.reason}"
                        continue
                    if r.status_code != 200:
                        msg = f"{url} answered {r.status_code} {r.reason} for the release manifest"
                        raise DownloadError(msg)
                    return _read_body(r, limit, url, dl)
            except (DownloadError, ManifestError):
                raise
            except Exception as e:  # noqa: BLE001 - network errors, see network_error
                if not network_error(e):
                    raise
                last = f"{type(e).__name__}: {e}"
                if dl.passed or unresolvable(e):
                    break  # the name will not resolve a second later either
        if dl.passed:
            msg = (
                f"reading the release manifest {url} did not finish within {dl.seconds:g} s;"
                f" the mirror is stalled or too slow: check --base-url / NEXABIND_BASE_URL, or"
                f" {MORE_TIME}"
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


def _read_body(r: Any, limit: int, url: str, deadline: Deadline) -> bytes:
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
