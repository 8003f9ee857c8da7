"""nexabind._archive: safe extraction of real and malicious archives, with ISA-L and with zlib."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import _artifacts as art
import _bombs
import pytest
from _child import ok, run_child

from nexabind import cache, pin
from nexabind._archive import _check_extracted, safe_extract
from nexabind.errors import (
    DownloadError,
    UnsafeArchiveError,
)
from nexabind.install import install_archive

pytestmark = pytest.mark.usefixtures("no_lib_path")


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
    assert art.leftovers(_isolated_cache) == [], "the staging folder was not removed"


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
    hashes = safe_extract(art.archive(release_mirror), ours)
    theirs.mkdir()
    subprocess.run(["tar", "-xzf", str(art.archive(release_mirror)), "-C", str(theirs)], check=True)
    assert _tree(ours) == _tree(theirs)
    files = {rel: what for rel, what, _ in _tree(ours) if what and not what.startswith("->")}
    assert hashes == files
    assert len(files) > 20 and any(rel.startswith("lib/libllama") for rel in files)


def test_corrupt_deflate_data_is_refused(
    inflater: str, release_mirror: Path, tmp_path: Path
) -> None:
    """Bytes flipped inside the compressed stream: an error that says to fetch again, and the
    half-written folder removed (the sha256 check before it would catch this in a fetch)."""
    raw = bytearray(art.archive(release_mirror).read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 64] = bytes(64)
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(DownloadError, match="not a readable artifact archive.*fetch it again"):
        safe_extract(bad, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_the_last_check_refuses_a_link_out_of_the_folder(tmp_path: Path) -> None:
    """The member checks refuse such links before anything is written; the walk over the
    extracted tree catches one that got there another way (planted while extracting)."""
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


# --- limits on what is read, not on what members declare ---------------------------------------

_EXTRACT_EACH = """
    import json, resource, sys
    from pathlib import Path
    from nexabind._archive import safe_extract
    from nexabind.errors import NexabindError
    for archive in sys.argv[1:]:
        dest = Path(archive + ".x")
        try:
            safe_extract(archive, dest)
            print(json.dumps([archive, "extracted", ""]))
        except NexabindError as e:
            print(json.dumps([archive, type(e).__name__, str(e), dest.exists()]))
    print(json.dumps(["maxrss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]))
"""


def test_headers_that_hold_a_gibibyte_are_refused_as_they_are_read(tmp_path: Path) -> None:
    """A 1 MiB archive whose long-name (long-link, pax, global pax, sparse) header holds 1 GiB:
    refused once 1 MiB of header is read, in a child that may not map 512 MiB (it would need
    several GiB to read the header whole)."""
    archives = [_bombs.header_bomb(tmp_path / f"{kind}.tar.gz", kind) for kind in _bombs.KINDS]
    assert max(a.stat().st_size for a in archives) < 8 << 20
    r = run_child(_EXTRACT_EACH, *archives, memory=512 << 20)
    *results, (_, maxrss_kib) = [json.loads(line) for line in ok(r).splitlines()]
    assert [Path(a).stem for a, *_ in results] == [f"{k}.tar" for k in _bombs.KINDS]
    for _archive, kind, msg, dest_left in results:
        assert kind == "UnsafeArchiveError", msg
        assert "the header of a member is over 1048576 bytes" in msg and "not installed" in msg
        assert not dest_left
    assert maxrss_kib < 200 << 10  # KiB: what was read stayed small


def _pax_padded(path: Path, n: int, pad: int) -> Path:
    """``n`` small files, each with a pax header of ``pad`` bytes: small members, big headers."""
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for i in range(n):
            info = _info(f"lib/f{i}.txt")
            info.pax_headers = {"comment": "x" * pad}
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    return path


def test_the_total_limit_counts_headers_and_what_follows_the_archive(tmp_path: Path) -> None:
    """Members that declare 40 bytes in all, under 40 pax headers of 100 KB: over a 1 MB total
    as read. And a gzip stream that goes on after the end of the tar: drained under the limit."""
    padded = _pax_padded(tmp_path / "padded.tar.gz", 40, 100_000)
    with pytest.raises(UnsafeArchiveError, match="unpacks to over 1000000 bytes; not installed"):
        safe_extract(padded, tmp_path / "x", max_total=1_000_000)
    assert not (tmp_path / "x").exists()
    safe_extract(padded, tmp_path / "y", max_total=5_000_000)  # within the limit it extracts
    assert len(list((tmp_path / "y" / "lib").iterdir())) == 40

    trailing = tmp_path / "trailing.tar.gz"
    tail = gzip.compress(bytes(16 << 20), mtime=0)  # 16 MiB of zeros after the archive
    trailing.write_bytes(_tar(tmp_path / "t.tar.gz", [(_info("lib/a"), b"a")]).read_bytes() + tail)
    with pytest.raises(UnsafeArchiveError, match="unpacks to over 1000000 bytes"):
        safe_extract(trailing, tmp_path / "z", max_total=1_000_000)


def test_too_many_members_or_too_long_a_name_is_refused(tmp_path: Path) -> None:
    many = _tar(tmp_path / "many.tar.gz", [(_info(f"lib/{i}"), b"") for i in range(60)])
    with pytest.raises(UnsafeArchiveError, match="holds over 50 members; not installed"):
        safe_extract(many, tmp_path / "x", max_members=50)
    path = tmp_path / "many.zip"
    with zipfile.ZipFile(path, "w") as z:
        for i in range(60):
            z.writestr(f"lib/{i}", b"")
    with pytest.raises(UnsafeArchiveError, match="holds over 50 members"):
        safe_extract(path, tmp_path / "y", max_members=50)
    long = _tar(tmp_path / "long.tar.gz", [(_info("lib/" + "n" * 5000), b"x")])
    with pytest.raises(UnsafeArchiveError, match="is 5004 characters long, over 4096"):
        safe_extract(long, tmp_path / "z")
    link = _tar(tmp_path / "link.tar.gz", [(_info("lib/l", tarfile.SYMTYPE, "t" * 5000), None)])
    with pytest.raises(UnsafeArchiveError, match="links to a name over 4096 characters"):
        safe_extract(link, tmp_path / "w")
