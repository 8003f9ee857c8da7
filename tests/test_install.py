"""nexabind.install: the staged, checked, smoke-loaded, atomic install of an artifact archive.

``install_archive`` is the path ``nexabind build --install`` takes, and ``fetch`` installs the
same way; the archive is the real artifact ``nexabind build --out`` made (``release_mirror``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import _artifacts as art
import pytest

from nexabind import cache, pin
from nexabind._archive import safe_extract
from nexabind.errors import (
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
