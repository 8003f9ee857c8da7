"""nexabind._fetch: fetch() over loopback HTTP, its fall-back build, concurrent and killed fetches.

The mirror serves the real artifact and manifest that ``nexabind build --out`` made
(``release_mirror``); the server (tests/_server.py) drops connections, answers 500, ignores
ranges, tampers with bytes and stalls on request, and logs every byte it sends.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import _artifacts as art
import pytest
from _server import Server

from nexabind import cache, pin
from nexabind._fetch import fetch
from nexabind.errors import (
    CacheError,
    ChecksumMismatchError,
    DownloadError,
    ManifestError,
)

pytestmark = pytest.mark.usefixtures("no_lib_path")


def test_fetch_installs_then_needs_no_network(
    mirror_server: Server, release_mirror: Path, _isolated_cache: Path, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="nexabind")
    lib = fetch(base_url=mirror_server.url)
    assert "unpinned manifest" in caplog.text and "installed" in caplog.text
    assert "retrying" not in caplog.text
    entry = art.entry(release_mirror)
    assert lib.parent.name == f"{entry['os']}-{entry['arch']}-{entry['variant']}"
    assert art.served(mirror_server, art.asset(release_mirror)) == entry["size"]
    # The manifest and the artifact came over one connection (one TLS handshake on https).
    assert [r.path for r in mirror_server.log] == [f"/{pin.RELEASE}/manifest.json",
                                                   art.asset(release_mirror)]  # fmt: skip
    assert len({r.port for r in mirror_server.log}) == 1
    assert [r.ok for r in cache.verify()] == [True]
    assert art.leftovers(_isolated_cache) == []
    seen = len(mirror_server.log)
    assert fetch(base_url=mirror_server.url, offline=True) == lib
    mirror_server.stop()
    assert fetch(base_url=mirror_server.url) == lib
    assert len(mirror_server.log) == seen


def test_dropped_connection_resumes_with_the_remaining_bytes(
    mirror_server: Server, release_mirror: Path
) -> None:
    asset, size = art.asset(release_mirror), art.entry(release_mirror)["size"]
    half = size // 2
    mirror_server.plan(asset, f"truncate:{half}")
    fetch(base_url=mirror_server.url, progress=False)
    first, second = mirror_server.requests_for(asset)
    assert first.sent == half
    assert second.headers["Range"] == f"bytes={half}-" and "If-Range" in second.headers
    assert second.status == 206 and second.sent == size - half
    assert [r.ok for r in cache.verify()] == [True]


def test_server_ignoring_the_range_restarts_the_download(
    mirror_server: Server, release_mirror: Path
) -> None:
    asset, size = art.asset(release_mirror), art.entry(release_mirror)["size"]
    mirror_server.plan(asset, f"truncate:{size // 3}", "ignore-range")
    fetch(base_url=mirror_server.url, progress=False)
    first, second = mirror_server.requests_for(asset)
    assert "Range" in second.headers and second.status == 200 and second.sent == size
    assert [r.ok for r in cache.verify()] == [True]


def test_500_twice_then_success(mirror_server: Server, release_mirror: Path) -> None:
    asset = art.asset(release_mirror)
    mirror_server.plan(asset, "500", "503")
    fetch(base_url=mirror_server.url, progress=False)
    assert [r.status for r in mirror_server.requests_for(asset)] == [500, 503, 200]


def test_persistent_404_names_the_url_and_the_artifact(
    mirror_server: Server, release_mirror: Path
) -> None:
    asset, name = art.asset(release_mirror), art.entry(release_mirror)["name"]
    mirror_server.plan(asset, *["404"] * 10)
    with pytest.raises(DownloadError) as e:
        fetch(base_url=mirror_server.url, build=False, progress=False)
    msg = str(e.value)
    assert f"{mirror_server.url}{asset} answered 404" in msg and name in msg
    assert "nexabind build --install" in msg and "about 5 minutes" in msg
    assert len(mirror_server.requests_for(asset)) == 1  # a 404 is not retried
    assert art.leftovers(Path(os.environ["NEXABIND_CACHE_DIR"])) == []


def test_tampered_artifact_is_rejected_and_nothing_is_installed(
    mirror_server: Server, release_mirror: Path, _isolated_cache: Path
) -> None:
    entry, asset = art.entry(release_mirror), art.asset(release_mirror)
    mirror_server.plan(asset, "tamper")
    with pytest.raises(ChecksumMismatchError) as e:
        fetch(base_url=mirror_server.url, progress=False)
    msg = str(e.value)
    assert f"expected {entry['sha256']}, got " in msg and "deleted the download" in msg
    assert not (_isolated_cache / "libs" / pin.RELEASE).exists()
    assert art.leftovers(_isolated_cache) == []


def test_no_artifact_for_this_platform_lists_what_exists(
    release_mirror: Path, tmp_path: Path
) -> None:
    mirror = tmp_path / "mirror"
    (mirror / pin.RELEASE).mkdir(parents=True)
    data = art.manifest(release_mirror)
    entry = data["artifacts"][0]
    data["artifacts"] = [
        {**entry, "os": "windows", "arch": "arm64", "name": "w.zip", "url": "w.zip"},
        {**entry, "os": "macos", "arch": "arm64", "variant": "metal", "name": "m.tar.gz",
         "url": "m.tar.gz", "min_glibc": None},
    ]  # fmt: skip
    (mirror / pin.RELEASE / "manifest.json").write_text(json.dumps(data))
    with Server(mirror) as server, pytest.raises(ManifestError) as e:
        fetch(base_url=server.url, build=False, progress=False)
    msg = str(e.value)
    assert "windows-arm64-cpu" in msg and "macos-arm64-metal" in msg
    assert "nexabind build --install" in msg
    assert [r.path for r in server.log] == [f"/{pin.RELEASE}/manifest.json"]


def test_offline_and_not_cached_says_what_to_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEXABIND_OFFLINE", "1")
    with pytest.raises(CacheError, match="offline.*run `nexabind fetch` with network access"):
        fetch(base_url="https://mirror.invalid/releases")


def test_lib_path_setting_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NEXABIND_LIB_PATH", str(tmp_path))
    assert fetch(base_url="https://mirror.invalid/releases") == tmp_path


def test_plain_http_to_a_remote_host_is_refused() -> None:
    with pytest.raises(DownloadError, match="refusing plain http:// to mirror.invalid.*allow-http"):
        fetch(base_url="http://mirror.invalid/releases", build=False, progress=False)


def test_file_url_mirror(release_mirror: Path) -> None:
    lib = fetch(base_url=release_mirror.as_uri(), progress=False)
    assert [r.ok for r in cache.verify()] == [True]
    assert lib.parent.parent.name == pin.RELEASE


def test_unreachable_host_builds_from_source(
    release_mirror: Path, _isolated_cache: Path, caplog
) -> None:
    """Nothing to download: fetch says so and installs `nexabind build` (a build cache hit)."""
    server = Server(release_mirror).start()
    url = server.url
    server.stop()  # the port now refuses connections
    caplog.set_level(logging.INFO, logger="nexabind")
    lib = fetch(base_url=url)
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
    assert warning.getMessage().startswith("nothing could be downloaded")
    assert "about 5 minutes" in caplog.text
    assert lib.is_relative_to(_isolated_cache)
    assert json.loads((lib.parent / cache.INSTALL_RECORD).read_text())["source"] == (
        "nexabind build"
    )


# --- concurrency and crashes -------------------------------------------------------------------


def _fetch_cmd(url: str) -> list[str]:
    return [sys.executable, "-m", "nexabind", "fetch", "--base-url", url, "--quiet", "--no-build"]


def test_two_processes_fetch_once_and_agree(
    mirror_server: Server, release_mirror: Path, _isolated_cache: Path
) -> None:
    asset, size = art.asset(release_mirror), art.entry(release_mirror)["size"]
    mirror_server.plan(asset, f"slow:{size * 2}")  # the first download takes ~0.5 s
    procs = [
        subprocess.Popen(_fetch_cmd(mirror_server.url), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    assert outs[0][0] == outs[1][0] and Path(outs[0][0].strip()).is_dir()
    assert len(mirror_server.requests_for(asset)) == 1
    assert [r.ok for r in cache.verify()] == [True]
    assert art.leftovers(_isolated_cache) == []


def _wait_for(cond, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting")
        time.sleep(0.002)


def test_killed_mid_download_then_next_fetch_resumes(
    mirror_server: Server, release_mirror: Path, _isolated_cache: Path
) -> None:
    asset, size = art.asset(release_mirror), art.entry(release_mirror)["size"]
    mirror_server.plan(asset, f"slow:{size / 10}")
    proc = subprocess.Popen(_fetch_cmd(mirror_server.url), stderr=subprocess.DEVNULL)
    downloads = _isolated_cache / "downloads"

    def partial_size() -> int:
        parts = list(downloads.glob("*.part")) if downloads.is_dir() else []
        return parts[0].stat().st_size if parts else 0

    _wait_for(lambda: partial_size() > size // 4)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = partial_size()
    assert 0 < kept < size
    fetch(base_url=mirror_server.url, progress=False)
    resumed = mirror_server.requests_for(asset)[-1]
    assert resumed.headers["Range"] == f"bytes={kept}-" and resumed.sent == size - kept
    assert [r.ok for r in cache.verify()] == [True]
    assert art.leftovers(_isolated_cache) == []


def test_killed_mid_install_then_next_fetch_recovers(
    mirror_server: Server, release_mirror: Path, _isolated_cache: Path
) -> None:
    asset, size = art.asset(release_mirror), art.entry(release_mirror)["size"]
    proc = subprocess.Popen(_fetch_cmd(mirror_server.url), stderr=subprocess.DEVNULL)
    tmp = _isolated_cache / "tmp"
    _wait_for(lambda: tmp.is_dir() and any(tmp.rglob("lib/*")))  # extracting
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(tmp.iterdir()), "killed after the install finished"
    assert cache.installed() == []  # nothing half-done is visible
    assert art.served(mirror_server, asset) == size
    lib = fetch(base_url=mirror_server.url, progress=False)
    assert lib.is_dir() and [r.ok for r in cache.verify()] == [True]
    assert art.leftovers(_isolated_cache) == []
    # The complete download was kept: it is verified again, not fetched again.
    assert art.served(mirror_server, asset) == size
