"""HTTP for artifacts: a checked URL, redirects by hand, resumable downloads with retries.

:func:`download` streams one file into a uniquely named partial in the cache's ``downloads/``,
hashing it on the way, resumes an earlier partial of the same file with ``Range``/``If-Range``,
and retries network errors, timeouts, 5xx and short bodies with capped backoff.
``requests`` and ``tqdm`` are imported only when something is downloaded.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import posixpath
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

from nexabind import pin
from nexabind.errors import ChecksumMismatchError, DownloadError

__all__ = ["URLRefusedError", "download", "open_session", "read_manifest"]

log = logging.getLogger(__name__)


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
        raise URLRefusedError(msg)
    msg = f"unsupported URL {url!r}: the base URL must be https://, http:// or file://"
    raise URLRefusedError(msg)


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


def open_session() -> Any:
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
    session = session or open_session()
    last = ""
    try:
        for attempt in range(retries + 1):
            if attempt:
                wait = min(max_backoff, backoff * 2 ** (attempt - 1))
                log.warning("%s; retrying in %g s", last, wait)
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
                            log.warning("%s ignored the resume range; restarting", url)
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


def read_manifest(url: str, allow_http: bool, timeout: tuple[float, float], session: Any) -> bytes:
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
