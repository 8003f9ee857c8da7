"""nexabind.fetch: real downloads from a loopback mirror, safe extraction, atomic installs.

The mirror serves the real artifact and manifest that ``nexabind build --out`` made
(``release_mirror``); the server (tests/_server.py) drops connections, answers 500, ignores
ranges, tampers with bytes and stalls on request, and logs every byte it sends.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from _server import Server

from nexabind import cache, pin
from nexabind.errors import (
    CacheError,
    ChecksumMismatchError,
    DownloadError,
    LibraryNotFoundError,
    ManifestError,
    UnsafeArchiveError,
)
from nexabind.fetch import download, fetch, install_archive, safe_extract

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _no_lib_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests install into the isolated cache: NEXABIND_LIB_PATH must not short-cut them."""
    monkeypatch.delenv("NEXABIND_LIB_PATH", raising=False)


def _manifest(mirror: Path) -> dict:
    return json.loads((mirror / pin.RELEASE / "manifest.json").read_text())


def _entry(mirror: Path) -> dict:
    (entry,) = _manifest(mirror)["artifacts"]
    return entry


def _archive(mirror: Path) -> Path:
    return mirror / pin.RELEASE / _entry(mirror)["url"]


def _asset(mirror: Path) -> str:
    return f"/{pin.RELEASE}/{_entry(mirror)['url']}"


def _leftovers(cache_root: Path) -> list[str]:
    found = []
    for sub in ("downloads", "tmp"):
        folder = cache_root / sub
        found += [p.name for p in folder.iterdir()] if folder.is_dir() else []
    return found


def _served(server: Server, path: str) -> int:
    return sum(r.sent for r in server.requests_for(path))


# --- install_archive (the path `nexabind build --install` takes) --------------------------------


def test_install_archive_installs_atomically_and_records_hashes(
    release_mirror: Path, _isolated_cache: Path
) -> None:
    entry = _entry(release_mirror)
    lib = install_archive(_archive(release_mirror), entry, pin.RELEASE)
    key = f"{entry['os']}-{entry['arch']}-{entry['variant']}"
    assert lib == _isolated_cache / "libs" / pin.RELEASE / key / "lib"
    for name in ("abi.json", "build-info.json", "include/llama.h", cache.INSTALL_RECORD):
        assert (lib.parent / name).is_file(), name
    record = json.loads((lib.parent / cache.INSTALL_RECORD).read_text())
    assert record["sha256"] == entry["sha256"] and record["artifact"] == entry["name"]
    libllama = next(k for k in record["files"] if k.startswith("lib/libllama"))
    assert record["files"][libllama] == cache.sha256_file(lib.parent / libllama)
    assert (
        (_isolated_cache / "CACHEDIR.TAG")
        .read_text()
        .startswith("Signature: 8a477f597d28d172789f06886806bc55")
    )
    assert _leftovers(_isolated_cache) == []
    assert all(r.ok for r in cache.verify())
    # The same archive again keeps the entry as it is (no second extraction).
    mtime = (lib.parent / cache.INSTALL_RECORD).stat().st_mtime_ns
    assert install_archive(_archive(release_mirror), entry, pin.RELEASE) == lib
    assert (lib.parent / cache.INSTALL_RECORD).stat().st_mtime_ns == mtime


def test_installed_library_loads_in_a_new_process(release_mirror: Path) -> None:
    lib = install_archive(_archive(release_mirror), _entry(release_mirror), pin.RELEASE)
    env = {k: v for k, v in os.environ.items() if k != "NEXABIND_LIB_PATH"}
    r = subprocess.run(
        [sys.executable, "-m", "nexabind", "which"], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == lib
    r = subprocess.run(
        [sys.executable, "-m", "nexabind.lowlevel"], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, r.stdout
    assert json.loads(r.stdout)["libdir"] == str(lib)


def test_install_archive_refuses_a_wrong_digest(
    release_mirror: Path, _isolated_cache: Path
) -> None:
    entry = {**_entry(release_mirror), "sha256": "0" * 64}
    with pytest.raises(ChecksumMismatchError, match="expected 0{64}, got [0-9a-f]{64}"):
        install_archive(_archive(release_mirror), entry, pin.RELEASE)
    assert not (_isolated_cache / "libs" / pin.RELEASE).exists()


def test_a_library_that_does_not_load_is_not_installed(
    release_mirror: Path, tmp_path: Path, _isolated_cache: Path
) -> None:
    """The staged tree is loaded in a child process first: a broken libllama is refused."""
    tree = tmp_path / "tree"
    safe_extract(_archive(release_mirror), tree)
    (tree / "lib" / "libllama.so").unlink()
    (tree / "lib" / "libllama.so").write_bytes(b"\x7fELF garbage, not a library")
    broken = tmp_path / "broken.tar.gz"
    with tarfile.open(broken, "w:gz") as tar:
        for p in sorted(tree.rglob("*")):
            tar.add(p, p.relative_to(tree).as_posix(), recursive=False)
    entry = {**_entry(release_mirror), "sha256": cache.sha256_file(broken)}
    with pytest.raises(LibraryNotFoundError, match="does not load on this machine; not installed"):
        install_archive(broken, entry, pin.RELEASE)
    assert not (_isolated_cache / "libs" / pin.RELEASE).exists()
    assert _leftovers(_isolated_cache) == []


def test_a_zip_artifact_installs_too(
    release_mirror: Path, tmp_path: Path, _isolated_cache: Path
) -> None:
    """Windows artifacts are zips (no links): the same checks, extraction and smoke load."""
    tree = tmp_path / "tree"
    safe_extract(_archive(release_mirror), tree)
    archive = tmp_path / "artifact.zip"
    # The artifact's files carry mtime 0 (reproducible packing); zip starts at 1980.
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED, strict_timestamps=False) as z:
        for p in sorted(tree.rglob("*")):
            if p.is_file():  # links are followed: a zip holds copies
                z.write(p, p.relative_to(tree).as_posix())
    entry = {**_entry(release_mirror), "name": archive.name,
             "sha256": cache.sha256_file(archive)}  # fmt: skip
    lib = install_archive(archive, entry, pin.RELEASE)
    assert not any(p.is_symlink() for p in lib.iterdir())
    assert [r.ok for r in cache.verify()] == [True]


# --- malicious archives ------------------------------------------------------------------------


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o644
    return info


def _bad_tar(kind: str, tmp: Path, outside: Path) -> Path:
    ok = (_info("lib/ok.txt"), b"fine")
    cases = {
        "traversal": [ok, (_info("lib/../../escaped.txt"), b"x")],
        "absolute": [ok, (_info(str(outside / "escaped.txt")), b"x")],
        "symlink-escape": [ok, (_info("lib/out", tarfile.SYMTYPE, "../../.."), None)],
        "symlink-absolute": [ok, (_info("lib/out", tarfile.SYMTYPE, str(outside)), None)],
        "through-symlink": [
            (_info("lib/d", tarfile.SYMTYPE, "."), None),
            (_info("lib/d/escaped.txt"), b"x"),
        ],
        "hardlink": [ok, (_info("lib/hard", tarfile.LNKTYPE, "lib/ok.txt"), None)],
        "device": [ok, (_info("lib/dev", tarfile.CHRTYPE), None)],
        "fifo": [ok, (_info("lib/fifo", tarfile.FIFOTYPE), None)],
    }
    return _tar(tmp / f"{kind}.tar.gz", cases[kind])


def _bad_zip(kind: str, tmp: Path, outside: Path) -> Path:
    path = tmp / f"{kind}.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("lib/ok.txt", b"fine")
        if kind == "zip-slip":
            z.writestr("../../escaped.txt", b"x")
        elif kind == "zip-absolute":
            z.writestr(str(outside / "escaped.txt"), b"x")
        elif kind == "zip-symlink":
            info = zipfile.ZipInfo("lib/out")
            info.external_attr = (0o120777) << 16
            z.writestr(info, str(outside))
    return path


@pytest.mark.parametrize(
    "kind",
    ["traversal", "absolute", "symlink-escape", "symlink-absolute", "through-symlink",
     "hardlink", "device", "fifo", "zip-slip", "zip-absolute", "zip-symlink"],
)  # fmt: skip
def test_malicious_archive_is_refused_and_nothing_is_written(
    kind: str, tmp_path: Path, _isolated_cache: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    make = _bad_zip if kind.startswith("zip") else _bad_tar
    archive = make(kind, tmp_path, outside)
    entry = {"name": archive.name, "os": "linux", "arch": "x86_64", "variant": "cpu",
             "sha256": cache.sha256_file(archive)}  # fmt: skip

    def outside_cache() -> list[Path]:
        return sorted(p for p in tmp_path.rglob("*") if not p.is_relative_to(_isolated_cache))

    before = outside_cache()
    with pytest.raises(UnsafeArchiveError, match="not installed"):
        install_archive(archive, entry, pin.RELEASE)
    assert outside_cache() == before, "something was written outside the cache"
    assert not list(outside.iterdir())
    assert not (_isolated_cache / "libs" / pin.RELEASE).exists()
    assert _leftovers(_isolated_cache) == [], "the staging folder was not removed"


def test_oversize_member_is_refused(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "big.tar.gz", [(_info("lib/big.bin"), b"\0" * 5000)])
    with pytest.raises(UnsafeArchiveError, match="5000 bytes, over the 4096 limit"):
        safe_extract(archive, tmp_path / "x", max_member=4096)
    assert not (tmp_path / "x").exists()
    with pytest.raises(UnsafeArchiveError, match="unpacks to over 4096 bytes"):
        safe_extract(archive, tmp_path / "y", max_total=4096)


def test_zip_member_larger_than_it_says_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "lying.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("lib/a.bin", b"\0" * 100_000)
    # Patch the declared size in the central directory to 10 bytes.
    raw = bytearray(path.read_bytes())
    cd = raw.rfind(b"PK\x01\x02")
    raw[cd + 24 : cd + 28] = (10).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises((UnsafeArchiveError, DownloadError)):
        safe_extract(path, tmp_path / "x")
    assert not (tmp_path / "x" / "lib" / "a.bin").exists() or (
        (tmp_path / "x" / "lib" / "a.bin").stat().st_size <= 10
    )


@pytest.fixture(params=["isal", "zlib"])
def inflater(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """ISA-L's inflate, or zlib's as on a platform without an isal wheel (Windows arm64)."""
    if request.param == "zlib":
        monkeypatch.setitem(sys.modules, "isal", None)  # `from isal import ...` fails
    return request.param


def _tree(root: Path) -> list[tuple[str, str, int]]:
    """Each path under ``root`` with what it holds (a link's target, a file's sha256) and mode."""
    return [
        (p.relative_to(root).as_posix(),
         f"-> {os.readlink(p)}" if p.is_symlink() else "" if p.is_dir() else cache.sha256_file(p),
         p.lstat().st_mode & (0o777 if not p.is_symlink() else 0))
        for p in sorted(root.rglob("*"))
    ]  # fmt: skip


def test_extraction_matches_tar_and_hashes_what_it_wrote(
    inflater: str, release_mirror: Path, tmp_path: Path
) -> None:
    """The real artifact, extracted here and by the system's tar: the same tree; and the
    sha256 taken while writing (the install record's) is that of each file on disk."""
    if not shutil.which("tar"):
        pytest.skip("needs tar")
    ours, theirs = tmp_path / "ours", tmp_path / "tar"
    hashes = safe_extract(_archive(release_mirror), ours)
    theirs.mkdir()
    subprocess.run(["tar", "-xzf", str(_archive(release_mirror)), "-C", str(theirs)], check=True)
    assert _tree(ours) == _tree(theirs)
    files = {rel: what for rel, what, _ in _tree(ours) if what and not what.startswith("->")}
    assert hashes == files
    assert len(files) > 20 and any(rel.startswith("lib/libllama") for rel in files)


def test_corrupt_deflate_data_is_refused(
    inflater: str, release_mirror: Path, tmp_path: Path
) -> None:
    """Bytes flipped inside the compressed stream: an error that says to fetch again, and the
    half-written folder removed (the sha256 check before it would catch this in a fetch)."""
    raw = bytearray(_archive(release_mirror).read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 64] = bytes(64)
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(DownloadError, match="not a readable artifact archive.*fetch it again"):
        safe_extract(bad, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_the_last_check_refuses_a_link_out_of_the_folder(tmp_path: Path) -> None:
    """The member checks refuse such links before anything is written; the walk over the
    extracted tree catches one that got there another way (planted while extracting)."""
    from nexabind.fetch import _check_extracted

    tree = tmp_path / "tree"
    (tree / "lib").mkdir(parents=True)
    (tree / "lib" / "libx.so.1").write_bytes(b"lib")
    (tree / "lib" / "libx.so").symlink_to("libx.so.1")
    _check_extracted(tree, tmp_path / "a.tar.gz")
    (tree / "lib" / "up").symlink_to(tmp_path)  # a folder link: what lies under it leaves too
    with pytest.raises(UnsafeArchiveError, match="lib/up resolves outside the folder"):
        _check_extracted(tree, tmp_path / "a.tar.gz")


def test_soname_links_inside_the_folder_are_kept(tmp_path: Path) -> None:
    archive = _tar(
        tmp_path / "links.tar.gz",
        [(_info("lib/libx.so.1"), b"lib"), (_info("lib/libx.so", tarfile.SYMTYPE, "libx.so.1"),
                                            None)],
    )  # fmt: skip
    safe_extract(archive, tmp_path / "x")
    assert (tmp_path / "x" / "lib" / "libx.so").is_symlink()
    assert (tmp_path / "x" / "lib" / "libx.so").read_bytes() == b"lib"


# --- fetch over loopback HTTP ------------------------------------------------------------------


def test_fetch_installs_then_needs_no_network(
    mirror_server: Server, release_mirror: Path, _isolated_cache: Path, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="nexabind")
    lib = fetch(base_url=mirror_server.url)
    assert "unpinned manifest" in caplog.text and "installed" in caplog.text
    assert "retrying" not in caplog.text
    entry = _entry(release_mirror)
    assert lib.parent.name == f"{entry['os']}-{entry['arch']}-{entry['variant']}"
    assert _served(mirror_server, _asset(release_mirror)) == entry["size"]
    # The manifest and the artifact came over one connection (one TLS handshake on https).
    assert [r.path for r in mirror_server.log] == [f"/{pin.RELEASE}/manifest.json",
                                                   _asset(release_mirror)]  # fmt: skip
    assert len({r.port for r in mirror_server.log}) == 1
    assert [r.ok for r in cache.verify()] == [True]
    assert _leftovers(_isolated_cache) == []
    seen = len(mirror_server.log)
    assert fetch(base_url=mirror_server.url, offline=True) == lib
    mirror_server.stop()
    assert fetch(base_url=mirror_server.url) == lib
    assert len(mirror_server.log) == seen


def test_dropped_connection_resumes_with_the_remaining_bytes(
    mirror_server: Server, release_mirror: Path
) -> None:
    asset, size = _asset(release_mirror), _entry(release_mirror)["size"]
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
    asset, size = _asset(release_mirror), _entry(release_mirror)["size"]
    mirror_server.plan(asset, f"truncate:{size // 3}", "ignore-range")
    fetch(base_url=mirror_server.url, progress=False)
    first, second = mirror_server.requests_for(asset)
    assert "Range" in second.headers and second.status == 200 and second.sent == size
    assert [r.ok for r in cache.verify()] == [True]


def test_500_twice_then_success(mirror_server: Server, release_mirror: Path) -> None:
    asset = _asset(release_mirror)
    mirror_server.plan(asset, "500", "503")
    fetch(base_url=mirror_server.url, progress=False)
    assert [r.status for r in mirror_server.requests_for(asset)] == [500, 503, 200]


def test_persistent_404_names_the_url_and_the_artifact(
    mirror_server: Server, release_mirror: Path
) -> None:
    asset, name = _asset(release_mirror), _entry(release_mirror)["name"]
    mirror_server.plan(asset, *["404"] * 10)
    with pytest.raises(DownloadError) as e:
        fetch(base_url=mirror_server.url, build=False, progress=False)
    msg = str(e.value)
    assert f"{mirror_server.url}{asset} answered 404" in msg and name in msg
    assert "nexabind build --install" in msg and "about 5 minutes" in msg
    assert len(mirror_server.requests_for(asset)) == 1  # a 404 is not retried
    assert _leftovers(Path(os.environ["NEXABIND_CACHE_DIR"])) == []


def test_a_stalled_response_times_out_and_resumes(
    mirror_server: Server, release_mirror: Path, _isolated_cache: Path
) -> None:
    entry, asset = _entry(release_mirror), _asset(release_mirror)
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
    entry, asset = _entry(release_mirror), _asset(release_mirror)
    mirror_server.always("stall:2")
    with pytest.raises(DownloadError, match=r"failed after 3 attempts: .*timed out"):
        download(mirror_server.url + asset, _isolated_cache / "downloads",
                 size=entry["size"], sha256=entry["sha256"], timeout=(5, 0.3), retries=2,
                 backoff=0.05, name=entry["name"])  # fmt: skip


def test_a_failed_download_keeps_its_bytes_for_the_next_call(
    mirror_server: Server, release_mirror: Path, _isolated_cache: Path
) -> None:
    entry, asset = _entry(release_mirror), _asset(release_mirror)
    half = entry["size"] // 2
    mirror_server.plan(asset, f"truncate:{half}", "500", "500")
    args = (mirror_server.url + asset, _isolated_cache / "downloads")
    kw = {"size": entry["size"], "sha256": entry["sha256"], "backoff": 0.05, "prefix": "a+b+"}
    with pytest.raises(DownloadError, match=f"the {half} bytes received are kept"):
        download(*args, retries=2, **kw)
    path = download(*args, **kw)
    assert cache.sha256_file(path) == entry["sha256"]
    assert mirror_server.requests_for(asset)[-1].headers["Range"] == f"bytes={half}-"
    assert _served(mirror_server, asset) == entry["size"]


def test_tampered_artifact_is_rejected_and_nothing_is_installed(
    mirror_server: Server, release_mirror: Path, _isolated_cache: Path
) -> None:
    entry, asset = _entry(release_mirror), _asset(release_mirror)
    mirror_server.plan(asset, "tamper")
    with pytest.raises(ChecksumMismatchError) as e:
        fetch(base_url=mirror_server.url, progress=False)
    msg = str(e.value)
    assert f"expected {entry['sha256']}, got " in msg and "deleted the download" in msg
    assert not (_isolated_cache / "libs" / pin.RELEASE).exists()
    assert _leftovers(_isolated_cache) == []


def test_no_artifact_for_this_platform_lists_what_exists(
    release_mirror: Path, tmp_path: Path
) -> None:
    mirror = tmp_path / "mirror"
    (mirror / pin.RELEASE).mkdir(parents=True)
    data = _manifest(release_mirror)
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


def test_credentials_do_not_follow_a_redirect_to_another_host(
    release_mirror: Path, _isolated_cache: Path
) -> None:
    entry = _entry(release_mirror)
    with Server(release_mirror) as target, Server(release_mirror) as front:
        asset = _asset(release_mirror)
        other = target.url.replace("127.0.0.1", "localhost")
        front.plan(asset, "redirect:" + other + "{path}")
        url = front.url.replace("://", "://user:secret@") + asset
        path = download(url, _isolated_cache / "downloads", size=entry["size"],
                        sha256=entry["sha256"])  # fmt: skip
        assert cache.sha256_file(path) == entry["sha256"]
        assert "Authorization" in front.requests_for(asset)[0].headers
        (hop,) = target.requests_for(asset)
        assert "Authorization" not in hop.headers and hop.status == 200


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


def test_a_name_that_does_not_resolve_is_not_retried() -> None:
    """A failed DNS lookup (RFC 2606 `.invalid`) ends the manifest request at once."""
    import requests

    from nexabind.fetch import _unresolvable

    with pytest.raises(requests.ConnectionError) as e:
        requests.get("https://releases.nexabind.invalid/manifest.json", timeout=10)
    assert _unresolvable(e.value)
    server_down = requests.ConnectionError(OSError("connection refused"))
    assert not _unresolvable(server_down)


# --- concurrency and crashes -------------------------------------------------------------------


def _fetch_cmd(url: str) -> list[str]:
    return [sys.executable, "-m", "nexabind", "fetch", "--base-url", url, "--quiet", "--no-build"]


def test_two_processes_fetch_once_and_agree(
    mirror_server: Server, release_mirror: Path, _isolated_cache: Path
) -> None:
    asset, size = _asset(release_mirror), _entry(release_mirror)["size"]
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
    assert _leftovers(_isolated_cache) == []


def _wait_for(cond, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting")
        time.sleep(0.002)


def test_killed_mid_download_then_next_fetch_resumes(
    mirror_server: Server, release_mirror: Path, _isolated_cache: Path
) -> None:
    asset, size = _asset(release_mirror), _entry(release_mirror)["size"]
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
    assert _leftovers(_isolated_cache) == []


def test_killed_mid_install_then_next_fetch_recovers(
    mirror_server: Server, release_mirror: Path, _isolated_cache: Path
) -> None:
    asset, size = _asset(release_mirror), _entry(release_mirror)["size"]
    proc = subprocess.Popen(_fetch_cmd(mirror_server.url), stderr=subprocess.DEVNULL)
    tmp = _isolated_cache / "tmp"
    _wait_for(lambda: tmp.is_dir() and any(tmp.rglob("lib/*")))  # extracting
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(tmp.iterdir()), "killed after the install finished"
    assert cache.installed() == []  # nothing half-done is visible
    assert _served(mirror_server, asset) == size
    lib = fetch(base_url=mirror_server.url, progress=False)
    assert lib.is_dir() and [r.ok for r in cache.verify()] == [True]
    assert _leftovers(_isolated_cache) == []
    # The complete download was kept: it is verified again, not fetched again.
    assert _served(mirror_server, asset) == size
