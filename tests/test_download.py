"""nexabind._download: real downloads from a loopback server that stalls, drops and redirects.

The server (tests/_server.py) serves the real artifact (``release_mirror``), misbehaves on
request and logs every byte it sends.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

import _artifacts as art
import pytest
from _child import in_thread, ok, run_child
from _server import Server

from nexabind import cache
from nexabind._download import URLRefusedError, download, open_session, read_manifest
from nexabind._http import unresolvable
from nexabind.errors import (
    ChecksumMismatchError,
    DownloadError,
    DownloadTimeoutError,
    ManifestError,
)

pytestmark = pytest.mark.usefixtures("no_lib_path")


def test_a_stalled_response_times_out_and_resumes(
    mirror_server: Server, release_mirror: Path, _isolated_cache: Path
) -> None:
    entry, asset = art.entry(release_mirror), art.asset(release_mirror)
    mirror_server.plan(asset, "stall:3")
    path = download(mirror_server.url + asset, _isolated_cache / "downloads",
                    size=entry["size"], sha256=entry["sha256"], timeout=(5, 0.5),
                    backoff=0.1)  # fmt: skip
    assert cache.sha256_file(path) == entry["sha256"]
    stalled, second = mirror_server.requests_for(asset)
    assert stalled.action == "stall:3" and second.action is None
    assert stalled.sent == 0  # given up on (still stalled) rather than waited for


def test_every_attempt_timing_out_is_a_download_error(
    mirror_server: Server, release_mirror: Path, _isolated_cache: Path
) -> None:
    entry, asset = art.entry(release_mirror), art.asset(release_mirror)
    mirror_server.always("stall:2")
    with pytest.raises(DownloadError, match=r"failed after 3 attempts: .*timed out"):
        download(mirror_server.url + asset, _isolated_cache / "downloads",
                 size=entry["size"], sha256=entry["sha256"], timeout=(5, 0.3), retries=2,
                 backoff=0.05, name=entry["name"])  # fmt: skip


def test_a_failed_download_keeps_its_bytes_for_the_next_call(
    mirror_server: Server, release_mirror: Path, _isolated_cache: Path
) -> None:
    entry, asset = art.entry(release_mirror), art.asset(release_mirror)
    half = entry["size"] // 2
    mirror_server.plan(asset, f"truncate:{half}", "500", "500")
    args = (mirror_server.url + asset, _isolated_cache / "downloads")
    kw = {"size": entry["size"], "sha256": entry["sha256"], "backoff": 0.05, "prefix": "a+b+"}
    with pytest.raises(DownloadError, match=f"the {half} bytes received are kept"):
        download(*args, retries=2, **kw)
    path = download(*args, **kw)
    assert cache.sha256_file(path) == entry["sha256"]
    assert mirror_server.requests_for(asset)[-1].headers["Range"] == f"bytes={half}-"
    assert art.served(mirror_server, asset) == entry["size"]


def test_credentials_do_not_follow_a_redirect_to_another_host(
    release_mirror: Path, _isolated_cache: Path
) -> None:
    entry = art.entry(release_mirror)
    with Server(release_mirror) as target, Server(release_mirror) as front:
        asset = art.asset(release_mirror)
        other = target.url.replace("127.0.0.1", "localhost")
        front.plan(asset, "redirect:" + other + "{path}")
        url = front.url.replace("://", "://user:secret@") + asset
        path = download(url, _isolated_cache / "downloads", size=entry["size"],
                        sha256=entry["sha256"])  # fmt: skip
        assert cache.sha256_file(path) == entry["sha256"]
        assert "Authorization" in front.requests_for(asset)[0].headers
        (hop,) = target.requests_for(asset)
        assert "Authorization" not in hop.headers and hop.status == 200


def test_a_name_that_does_not_resolve_is_not_retried() -> None:
    """A failed DNS lookup (RFC 2606 `.invalid`) ends the manifest request at once."""
    import requests

    with pytest.raises(requests.ConnectionError) as e:
        requests.get("https://releases.nexabind.invalid/manifest.json", timeout=10)
    assert unresolvable(e.value)
    server_down = requests.ConnectionError(OSError("connection refused"))
    assert not unresolvable(server_down)


def _partial(folder: Path, prefix: str, data: bytes, sha256: str) -> Path:
    """A partial download as an interrupted earlier call leaves it."""
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / f"{prefix}0123456789ab.part"
    part.write_bytes(data)
    part.with_name(part.name + ".json").write_text(json.dumps({"sha256": sha256}))
    return part


def test_a_refused_resume_range_restarts_from_zero(tmp_path: Path, caplog) -> None:
    """A partial longer than the file the server now has: 416, then the whole file again."""
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "a.bin").write_bytes(b"x" * 1000)
    want = b"y" * 2000
    sha = hashlib.sha256(want).hexdigest()
    _partial(tmp_path / "dl", "a+b+", want[:1500], sha)
    caplog.set_level(logging.WARNING, logger="nexabind")
    with Server(tmp_path / "www") as server, pytest.raises(DownloadError) as e:
        download(f"{server.url}/a.bin", tmp_path / "dl", size=2000, sha256=sha, prefix="a+b+",
                 retries=1, backoff=0.01)  # fmt: skip
    first, second = server.requests_for("/a.bin")
    assert first.headers["Range"] == "bytes=1500-" and first.status == 416
    assert "Range" not in second.headers and second.sent == 1000
    assert "the server refused the resume range; restarting; retrying in" in caplog.text
    assert "failed after 2 attempts: the connection closed after 1000 of 2000 bytes" in str(e.value)
    assert "the 1000 bytes received are kept" in str(e.value)
    (kept,) = (tmp_path / "dl").glob("*.part")
    assert kept.read_bytes() == b"x" * 1000


def test_a_file_url_is_copied_and_checked(tmp_path: Path) -> None:
    src = tmp_path / "a.bin"
    src.write_bytes(b"z" * 3000)
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    _partial(tmp_path / "dl", "a+b+", b"z" * 100, sha)  # a file:// copy starts over
    path = download(src.as_uri(), tmp_path / "dl", size=3000, sha256=sha, prefix="a+b+")
    assert path.read_bytes() == src.read_bytes()
    with pytest.raises(ChecksumMismatchError, match="size expected 2000 bytes, got more"):
        download(src.as_uri(), tmp_path / "dl2", size=2000, sha256=sha)
    with pytest.raises(ChecksumMismatchError, match="size expected 4000 bytes, got 3000"):
        download(src.as_uri(), tmp_path / "dl3", size=4000, sha256=sha)
    assert list((tmp_path / "dl3").iterdir()) == []  # deleted
    with pytest.raises(DownloadError, match="cannot read"):
        download((tmp_path / "nope").as_uri(), tmp_path / "dl4", size=1, sha256=sha)


# --- deadlines: a server that drips never trips a read timeout ---------------------------------


def _artifact_download(server: Server, mirror: Path, cache_root: Path, **kw):
    entry, asset = art.entry(mirror), art.asset(mirror)
    kw = {"size": entry["size"], "sha256": entry["sha256"], "name": entry["name"], **kw}
    return in_thread(lambda: download(server.url + asset, cache_root / "downloads", **kw))


@pytest.mark.parametrize("action", ["drip:0.2", "drip-headers:0.2"])
def test_a_server_that_drips_is_cut_at_the_deadline(
    action: str, mirror_server: Server, release_mirror: Path, _isolated_cache: Path
) -> None:
    """One byte every 0.2 s, of the body or of the status line and headers: each read comes
    well within the read timeout, and the deadline ends the download."""
    entry, asset = art.entry(release_mirror), art.asset(release_mirror)
    mirror_server.plan(asset, action)
    with pytest.raises(DownloadTimeoutError) as e:
        _artifact_download(mirror_server, release_mirror, _isolated_cache, timeout=(5, 5),
                           deadline=1.5)  # fmt: skip
    msg = str(e.value)
    assert f"downloading {entry['name']} from {mirror_server.url}{asset} did not finish" in msg
    came = re.search(rf"within 1\.5 s \((\d+) of {entry['size']} bytes received\)", msg)
    assert came, msg
    assert msg.endswith("allow more time with --download-timeout / NEXABIND_DOWNLOAD_TIMEOUT")
    assert isinstance(e.value, TimeoutError)
    (dripped,) = mirror_server.requests_for(asset)  # not retried: the time is up
    assert dripped.action == action
    kept = [p.stat().st_size for p in (_isolated_cache / "downloads").glob("*.part")]
    if action.startswith("drip-headers"):
        assert came.group(1) == "0" and kept == []
    else:  # what came is kept, for the next call to resume
        assert 0 < int(came.group(1)) <= dripped.sent and kept == [int(came.group(1))]
        assert "the bytes received are kept and the next `nexabind fetch` resumes" in msg


def test_the_deadline_bounds_the_retries(
    mirror_server: Server, release_mirror: Path, _isolated_cache: Path
) -> None:
    mirror_server.always("500")
    with pytest.raises(DownloadTimeoutError, match=r"within 1 s .*; last error: .* answered 500"):
        _artifact_download(mirror_server, release_mirror, _isolated_cache, retries=50,
                           backoff=0.1, max_backoff=0.2, deadline=1)  # fmt: skip
    assert 2 < len(mirror_server.log) < 50


def test_a_redirect_to_a_file_url_is_refused(
    mirror_server: Server, release_mirror: Path, _isolated_cache: Path
) -> None:
    secret = _isolated_cache.parent / "secret.txt"
    secret.write_text("not for the mirror")
    asset = art.asset(release_mirror)
    mirror_server.plan(asset, "redirect:" + secret.as_uri())
    with pytest.raises(URLRefusedError) as e:
        _artifact_download(mirror_server, release_mirror, _isolated_cache)
    assert str(e.value).startswith(
        f"{mirror_server.url}{asset} redirected to {secret.as_uri()}: a redirect may lead to"
        " https:// (or http://) only; not followed"
    )
    assert art.leftovers(_isolated_cache) == []


# --- file:// mirrors: a regular file inside the release folder, nothing else ------------------


def test_a_file_url_cannot_leave_its_release_folder(tmp_path: Path) -> None:
    release = tmp_path / "mirror" / "r1"
    (release / "sub").mkdir(parents=True)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"s" * 100)
    (release / "link.bin").symlink_to(secret)
    os.mkfifo(release / "fifo")
    sha, root = hashlib.sha256(secret.read_bytes()).hexdigest(), release.as_uri()
    kw = {"size": 100, "sha256": sha, "root": root}
    for url in (f"{root}/%2e%2e/%2e%2e/secret.bin", f"{root}/sub/..%2f..%2f../secret.bin",
                f"{root}/../../secret.bin", f"{root}/link.bin"):  # fmt: skip
        with pytest.raises(URLRefusedError) as e:
            download(url, tmp_path / "dl", **kw)
        assert f"{url} resolves to {secret}, outside the release folder {release}" in str(e.value)
    for url, inside in ((f"{root}/fifo", root), (f"{root}/sub", root),
                        ("file:///dev/zero", "file:///dev")):  # fmt: skip
        with pytest.raises(URLRefusedError, match="is not a regular file .*; not read"):
            download(url, tmp_path / "dl", **{**kw, "root": inside})
    with pytest.raises(URLRefusedError, match="climbs out of its folder with '..'; not read"):
        download(f"{root}/%2E%2E/%2E%2E/secret.bin", tmp_path / "dl", size=100, sha256=sha)
    assert list((tmp_path / "dl").iterdir()) == []  # nothing copied


@pytest.mark.parametrize("system", ["/etc/hostname", "/dev/zero"])
def test_a_file_url_climbing_to_a_system_file_is_refused(system: str, tmp_path: Path) -> None:
    """``%2e%2e`` up from the release folder to /etc/hostname (a readable file outside it, which
    was copied) or /dev/zero (which never ends, and filled the disk): refused, nothing copied."""
    target = Path(system)
    if not target.exists():
        pytest.skip(f"{system} does not exist here")
    release = tmp_path / "mirror" / "r1"
    release.mkdir(parents=True)
    root = release.as_uri()
    url = f"{root}/{'%2e%2e/' * len(release.parts)}{system.lstrip('/')}"
    data = target.read_bytes() if target.is_file() else bytes(1 << 20)
    kw = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "root": root}
    with pytest.raises(URLRefusedError) as e:
        download(url, tmp_path / "dl", **kw)
    assert f"{url} resolves to {target.resolve()}, outside the release folder" in str(e.value)
    assert str(e.value).endswith("not read. The mirror's manifest names a file it must not:"
                                 " check --base-url / NEXABIND_BASE_URL")  # fmt: skip
    assert list((tmp_path / "dl").iterdir()) == []  # nothing copied


# --- a full disk ---------------------------------------------------------------------------------

_DOWNLOAD_WITH_A_FILE_SIZE_LIMIT = """
    import resource, signal, sys
    from nexabind._download import download
    from nexabind.errors import NexabindError
    url, folder, size, sha256, limit = sys.argv[1:]
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), int(limit)))
    try:
        download(url, folder, size=int(size), sha256=sha256, prefix="a+b+", name="the.tar.gz")
    except NexabindError as e:
        print(type(e).__name__, e)
"""


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="RLIMIT_FSIZE is POSIX")
def test_a_full_disk_keeps_what_came_and_says_what_to_do(
    mirror_server: Server, release_mirror: Path, _isolated_cache: Path
) -> None:
    """The disk fills up halfway (a file size limit in a child): a CacheError that says so, the
    bytes written kept; with room again, the next download resumes from them."""
    entry, asset = art.entry(release_mirror), art.asset(release_mirror)
    folder, limit = _isolated_cache / "downloads", entry["size"] // 2
    args = (mirror_server.url + asset, folder, entry["size"], entry["sha256"], limit)
    out = ok(run_child(_DOWNLOAD_WITH_A_FILE_SIZE_LIMIT, *args))
    (part,) = folder.glob("a+b+*.part")
    assert out.startswith(
        f"CacheError downloading the.tar.gz: cannot write {part} (File too large); the disk is"
        " full (or a size limit was reached): free some space there, or set NEXABIND_CACHE_DIR"
    )
    assert f"the {limit} bytes received are kept and the next `nexabind fetch` resumes" in out
    assert part.stat().st_size == limit
    path = download(mirror_server.url + asset, folder, size=entry["size"],
                    sha256=entry["sha256"], prefix="a+b+")  # fmt: skip
    assert cache.sha256_file(path) == entry["sha256"]
    assert mirror_server.requests_for(asset)[-1].headers["Range"] == f"bytes={limit}-"


# --- the release manifest: capped, within its deadline -----------------------------------------

_READ_MANIFEST = """
    import sys
    from nexabind._download import open_session, read_manifest
    from nexabind.errors import NexabindError
    try:
        with open_session() as s:
            read_manifest(sys.argv[1], False, (10, 30), s, limit=4 << 20)
    except NexabindError as e:
        print(type(e).__name__, e)
"""


@pytest.mark.parametrize("action", [f"body:{1 << 30}", "endless"])
def test_a_gibibyte_manifest_is_refused_after_its_limit(action: str, tmp_path: Path) -> None:
    """A 1 GiB body (said in Content-Length, or not said at all): refused in a child that may
    not map 512 MiB, having read at most the limit."""
    with Server(tmp_path) as server:
        server.plan("/r1/manifest.json", action)
        out = ok(run_child(_READ_MANIFEST, f"{server.url}/r1/manifest.json", memory=512 << 20))
        (req,) = server.requests_for("/manifest.json")
    assert out.strip() == (
        f"ManifestError the release manifest {server.url}/r1/manifest.json is over 4194304"
        " bytes (a manifest takes a few KiB); not read. Check --base-url / NEXABIND_BASE_URL"
    )
    assert req.sent < 64 << 20


def test_a_manifest_that_drips_times_out(tmp_path: Path) -> None:
    (tmp_path / "r1").mkdir()
    (tmp_path / "r1" / "manifest.json").write_text('{"schema": 1}')
    with Server(tmp_path) as server, open_session() as s:
        url = f"{server.url}/r1/manifest.json"
        server.plan("/r1/manifest.json", "drip:0.3")
        with pytest.raises(DownloadTimeoutError) as e:
            in_thread(lambda: read_manifest(url, False, (5, 5), s, limit=1000, deadline=1))
        assert str(e.value) == (
            f"reading the release manifest {url} did not finish within 1 s; the mirror is stalled"
            " or too slow: check --base-url / NEXABIND_BASE_URL, or allow more time with"
            " --download-timeout / NEXABIND_DOWNLOAD_TIMEOUT"
        )
        server.plan("/r1/manifest.json", *["big-header:100000"] * 3)  # http.client's own cap
        with pytest.raises(DownloadError, match="got more than 65536 bytes when reading header"):
            read_manifest(url, False, (5, 5), s, limit=1000)
        assert read_manifest(url, False, (5, 5), s, limit=1000) == b'{"schema": 1}'


def test_a_file_manifest_is_capped_and_must_be_a_regular_file(tmp_path: Path) -> None:
    release = tmp_path / "r1"
    release.mkdir()
    (release / "manifest.json").write_bytes(b" " * 101)
    root = release.as_uri()
    with pytest.raises(ManifestError, match=r"manifest\.json is over 100 bytes"):
        read_manifest(f"{root}/manifest.json", False, (5, 5), None, limit=100, root=root)
    assert len(read_manifest(f"{root}/manifest.json", False, (5, 5), None, limit=101)) == 101
    (release / "manifest.json").unlink()
    (release / "manifest.json").symlink_to("/dev/zero")
    with pytest.raises(URLRefusedError, match="resolves to /dev/zero, outside the release folder"):
        read_manifest(f"{root}/manifest.json", False, (5, 5), None, limit=100, root=root)
