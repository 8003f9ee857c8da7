"""nexabind._download: real downloads from a loopback server that stalls, drops and redirects.

The server (tests/_server.py) serves the real artifact (``release_mirror``), misbehaves on
request and logs every byte it sends.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import _artifacts as art
import pytest
from _server import Server

from nexabind import cache
from nexabind._download import _unresolvable, download
from nexabind.errors import ChecksumMismatchError, DownloadError

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
    assert _unresolvable(e.value)
    server_down = requests.ConnectionError(OSError("connection refused"))
    assert not _unresolvable(server_down)


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
