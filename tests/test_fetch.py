"""nexabind._fetch: fetch() over loopback HTTP, its fall-back build, concurrent and killed fetches.

The mirror serves the real artifact and manifest that ``nexabind build --out`` made
(``release_mirror``); the server (tests/_server.py) drops connections, answers 500, ignores
ranges, tampers with bytes and stalls on request, and logs every byte it sends.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import _artifacts as art
import _bombs
import pytest
from _child import in_thread, ok, run_child
from _server import Server

from nexabind import cache, pin
from nexabind._download import URLRefusedError
from nexabind._fetch import fetch
from nexabind.errors import (
    CacheError,
    ChecksumMismatchError,
    DownloadError,
    DownloadTimeoutError,
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
    assert "nexabind build --install" in msg and "about 3 minutes" in msg
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
    assert "about 3 minutes" in caplog.text
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


# --- hostile mirrors and a full disk: each a NexabindError that says what to do -----------------


def _mirror_with(release_mirror: Path, mirror: Path, artifact: Path, **changes) -> dict:
    """Write the manifest of a mirror: the real entry with ``changes``, and the size and sha256
    of ``artifact`` (which the caller puts in place)."""
    (mirror / pin.RELEASE).mkdir(parents=True, exist_ok=True)
    data = art.manifest(release_mirror)
    entry = {**data["artifacts"][0], **changes}
    entry.update(size=artifact.stat().st_size, sha256=cache.sha256_file(artifact))
    data["artifacts"] = [entry]
    (mirror / pin.RELEASE / "manifest.json").write_text(json.dumps(data))
    return entry


_FETCH = """
    import sys
    from nexabind import fetch
    from nexabind.errors import NexabindError
    try:
        fetch(base_url=sys.argv[1], build=False, progress=False)
    except NexabindError as e:
        print(type(e).__name__, e)
"""


def test_an_artifact_whose_header_holds_a_gibibyte_is_refused(
    release_mirror: Path, tmp_path: Path, _isolated_cache: Path
) -> None:
    """A 1 MiB artifact with a GNU long-name header of 1 GiB, fetched over HTTP in a child that
    may not map 768 MiB: refused as it is read (it took 7.4 GB), nothing installed or left."""
    (tmp_path / "mirror" / pin.RELEASE).mkdir(parents=True)
    bomb = _bombs.header_bomb(tmp_path / "mirror" / pin.RELEASE / "bomb.tar.gz", "longname")
    entry = _mirror_with(release_mirror, tmp_path / "mirror", bomb, url="bomb.tar.gz")
    with Server(tmp_path / "mirror") as server:
        out = ok(run_child(_FETCH, server.url, memory=768 << 20))
        assert art.served(server, f"/{pin.RELEASE}/bomb.tar.gz") == entry["size"]
    assert out.startswith("UnsafeArchiveError ")
    assert "the header of a member is over 1048576 bytes (a long name, long link" in out
    assert not (_isolated_cache / "libs" / pin.RELEASE).exists()
    assert art.leftovers(_isolated_cache) == []


def test_a_file_mirror_cannot_reach_outside_its_release_folder(
    release_mirror: Path, tmp_path: Path, _isolated_cache: Path
) -> None:
    """``%2e%2e`` in an artifact's url is refused with the manifest; a link that leads out of
    the release folder is refused when the file is opened. Neither falls back to a build."""
    outside = tmp_path / "outside.tar.gz"
    shutil.copy(art.archive(release_mirror), outside)
    mirror = tmp_path / "mirror"
    _mirror_with(release_mirror, mirror, outside, url="%2e%2e/%2e%2e/outside.tar.gz")
    with pytest.raises(ManifestError, match=r"url must not contain '\.', '\.\.'"):
        fetch(base_url=str(mirror), progress=False)
    (mirror / pin.RELEASE / "link.tar.gz").symlink_to(outside)
    _mirror_with(release_mirror, mirror, outside, url="link.tar.gz")
    with pytest.raises(URLRefusedError) as e:
        fetch(base_url=str(mirror), progress=False)
    real = mirror.resolve() / pin.RELEASE
    assert f"link.tar.gz resolves to {outside}, outside the release folder {real}" in str(e.value)
    assert cache.installed() == [] and art.leftovers(_isolated_cache) == []


def test_a_dripping_mirror_times_out_as_configured(
    mirror_server: Server, release_mirror: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NEXABIND_DOWNLOAD_TIMEOUT (or download_timeout=, or --download-timeout) bounds the
    download; the error is a DownloadTimeoutError that says how to allow more time."""
    asset = art.asset(release_mirror)
    mirror_server.plan(asset, "drip:0.2")
    monkeypatch.setenv("NEXABIND_DOWNLOAD_TIMEOUT", "1.5")
    with pytest.raises(DownloadTimeoutError) as e:
        in_thread(lambda: fetch(base_url=mirror_server.url, build=False, progress=False))
    msg = str(e.value)
    assert msg.startswith("nothing could be downloaded: downloading ")
    assert "did not finish within 1.5 s" in msg and "--download-timeout" in msg
    mirror_server.plan(asset, "drip:0.2")
    with pytest.raises(DownloadTimeoutError, match="did not finish within 1 s"):
        in_thread(lambda: fetch(base_url=mirror_server.url, build=False, download_timeout=1))
    monkeypatch.setenv("NEXABIND_DOWNLOAD_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="NEXABIND_DOWNLOAD_TIMEOUT must be a number of seconds"):
        fetch(base_url=mirror_server.url, build=False)


def test_a_full_disk_is_one_clear_line_from_the_command(
    mirror_server: Server, release_mirror: Path, _isolated_cache: Path
) -> None:
    """`nexabind fetch` on a disk that fills up (a file size limit): one error line that says
    what to do, no traceback; run again with room, it resumes and installs."""
    import resource

    size = art.entry(release_mirror)["size"]

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 3, size // 3))

    r = subprocess.run(_fetch_cmd(mirror_server.url), capture_output=True, text=True,
                       preexec_fn=small_files, timeout=300)  # fmt: skip
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("Error: downloading nexabind-llama-")
    assert "(File too large); the disk is full" in r.stderr
    assert "bytes received are kept" in r.stderr
    fetch(base_url=mirror_server.url, progress=False)
    assert mirror_server.requests_for(art.asset(release_mirror))[-1].headers["Range"] == (
        f"bytes={size // 3}-"
    )
    assert [r.ok for r in cache.verify()] == [True] and art.leftovers(_isolated_cache) == []
