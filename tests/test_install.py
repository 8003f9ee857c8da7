"""nexabind.install: the staged, checked, smoke-loaded, atomic install of an artifact archive.

``install_archive`` is the path ``nexabind build --install`` takes, and ``fetch`` installs the
same way; the archive is the real artifact ``nexabind build --out`` made (``release_mirror``).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import _artifacts as art
import pytest
from _child import ok, run_child

from nexabind import cache, pin
from nexabind._archive import safe_extract
from nexabind.errors import (
    CacheError,
    ChecksumMismatchError,
    LibraryNotFoundError,
)
from nexabind.install import install_archive

pytestmark = pytest.mark.usefixtures("no_lib_path")


def test_install_archive_installs_atomically_and_records_hashes(
    release_mirror: Path, _isolated_cache: Path
) -> None:
    entry = art.entry(release_mirror)
    lib = install_archive(art.archive(release_mirror), entry, pin.RELEASE)
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
    assert art.leftovers(_isolated_cache) == []
    assert all(r.ok for r in cache.verify())
    # The same archive again keeps the entry as it is (no second extraction).
    mtime = (lib.parent / cache.INSTALL_RECORD).stat().st_mtime_ns
    assert install_archive(art.archive(release_mirror), entry, pin.RELEASE) == lib
    assert (lib.parent / cache.INSTALL_RECORD).stat().st_mtime_ns == mtime


def test_installed_library_loads_in_a_new_process(release_mirror: Path) -> None:
    lib = install_archive(art.archive(release_mirror), art.entry(release_mirror), pin.RELEASE)
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
    entry = {**art.entry(release_mirror), "sha256": "0" * 64}
    with pytest.raises(ChecksumMismatchError, match="expected 0{64}, got [0-9a-f]{64}"):
        install_archive(art.archive(release_mirror), entry, pin.RELEASE)
    assert not (_isolated_cache / "libs" / pin.RELEASE).exists()


def test_a_library_that_does_not_load_is_not_installed(
    release_mirror: Path, tmp_path: Path, _isolated_cache: Path
) -> None:
    """The staged tree is loaded in a child process first: a broken libllama is refused."""
    tree = tmp_path / "tree"
    safe_extract(art.archive(release_mirror), tree)
    (tree / "lib" / "libllama.so").unlink()
    (tree / "lib" / "libllama.so").write_bytes(b"\x7fELF garbage, not a library")
    broken = tmp_path / "broken.tar.gz"
    with tarfile.open(broken, "w:gz") as tar:
        for p in sorted(tree.rglob("*")):
            tar.add(p, p.relative_to(tree).as_posix(), recursive=False)
    entry = {**art.entry(release_mirror), "sha256": cache.sha256_file(broken)}
    with pytest.raises(LibraryNotFoundError, match="does not load on this machine; not installed"):
        install_archive(broken, entry, pin.RELEASE)
    assert not (_isolated_cache / "libs" / pin.RELEASE).exists()
    assert art.leftovers(_isolated_cache) == []


def test_a_zip_artifact_installs_too(
    release_mirror: Path, tmp_path: Path, _isolated_cache: Path
) -> None:
    """Windows artifacts are zips (no links): the same checks, extraction and smoke load."""
    tree = tmp_path / "tree"
    safe_extract(art.archive(release_mirror), tree)
    archive = tmp_path / "artifact.zip"
    # The artifact's files carry mtime 0 (reproducible packing); zip starts at 1980.
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED, strict_timestamps=False) as z:
        for p in sorted(tree.rglob("*")):
            if p.is_file():  # links are followed: a zip holds copies
                z.write(p, p.relative_to(tree).as_posix())
    entry = {**art.entry(release_mirror), "name": archive.name,
             "sha256": cache.sha256_file(archive)}  # fmt: skip
    lib = install_archive(archive, entry, pin.RELEASE)
    assert not any(p.is_symlink() for p in lib.iterdir())
    assert [r.ok for r in cache.verify()] == [True]


# --- a full disk, a tmp/ on another filesystem: a CacheError, nothing half-done left -----------

_INSTALL_WITH_A_FILE_SIZE_LIMIT = """
    import json, resource, signal, sys
    from nexabind.errors import NexabindError
    from nexabind.install import install_archive
    archive, limit = sys.argv[1], int(sys.argv[2])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    entry = {"name": "big.tar.gz", "os": "linux", "arch": "x86_64", "variant": "cpu"}
    try:
        install_archive(archive, entry, "r1")
    except NexabindError as e:
        print(type(e).__name__, e)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_full_disk_while_extracting_is_a_cache_error(
    tmp_path: Path, _isolated_cache: Path
) -> None:
    """The disk fills up while a 4 MiB member is written (a file size limit in a child): the
    error says so (it said "not a readable artifact archive"), and nothing is left behind."""
    archive = tmp_path / "big.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("lib/big.bin")
        info.size = 4 << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    out = ok(run_child(_INSTALL_WITH_A_FILE_SIZE_LIMIT, archive, 1 << 20))
    assert out.startswith("CacheError extracting big.tar.gz: cannot write ")
    assert "lib/big.bin (File too large); the disk is full (or a size limit was reached)" in out
    assert "not a readable" not in out
    assert not (_isolated_cache / "libs" / "r1").exists()
    assert art.leftovers(_isolated_cache) == []


def _on_another_filesystem(cache_root: Path) -> Path:
    """A folder on a filesystem other than the cache's (/dev/shm); skips when there is none."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == cache_root.stat().st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's tmp folder")
    return Path(tempfile.mkdtemp(dir=shm, prefix="nexabind-test-"))


def test_a_tmp_on_another_filesystem_is_a_cache_error(
    release_mirror: Path, _isolated_cache: Path
) -> None:
    """The cache's tmp/ links to another filesystem: the staged install cannot be renamed into
    libs/. A CacheError says why and what to do; a library installed before is kept whole."""
    entry = art.entry(release_mirror)
    lib = install_archive(art.archive(release_mirror), entry, pin.RELEASE)
    elsewhere = _on_another_filesystem(_isolated_cache)
    try:
        (_isolated_cache / "tmp").rmdir()
        (_isolated_cache / "tmp").symlink_to(elsewhere)
        with pytest.raises(CacheError) as e:
            install_archive(art.archive(release_mirror), entry, pin.RELEASE, force=True)
        msg = str(e.value)
        assert msg.startswith(f"installing {entry['name']}: cannot write {lib.parent} (")
        assert "the cache's tmp/ and libs/ are on different filesystems" in msg
        assert "set NEXABIND_CACHE_DIR (--cache-dir) to a folder on one disk" in msg
        assert [r.ok for r in cache.verify()] == [True]  # the earlier install, untouched
        assert list(elsewhere.iterdir()) == []  # the staging folder removed
        shutil.rmtree(lib.parent)  # a first install: nothing at all in libs/ afterwards
        with pytest.raises(CacheError, match="different filesystems"):
            install_archive(art.archive(release_mirror), entry, pin.RELEASE)
        assert cache.installed() == [] and list(elsewhere.iterdir()) == []
    finally:
        shutil.rmtree(elsewhere)
