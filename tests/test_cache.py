"""nexabind.cache: layout, install records, verify, clean, and which entry the loader picks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nexabind import cache, pin
from nexabind.errors import CacheError, LibraryNotFoundError
from nexabind.install import install_archive

pytestmark = pytest.mark.usefixtures("no_lib_path")


def _install(mirror: Path) -> Path:
    (entry,) = json.loads((mirror / pin.RELEASE / "manifest.json").read_text())["artifacts"]
    return install_archive(mirror / pin.RELEASE / entry["url"], entry, pin.RELEASE)


def test_root_comes_from_the_argument_then_the_environment(
    tmp_path: Path, _isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cache.cache_root() == _isolated_cache
    assert cache.cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("NEXABIND_CACHE_DIR")
    from platformdirs import user_cache_dir

    assert cache.cache_root() == Path(user_cache_dir("nexabind"))


def test_prepare_lays_out_the_cache_and_tags_it(_isolated_cache: Path) -> None:
    root = cache.prepare()
    assert sorted(p.name for p in root.iterdir()) == [
        ".locks", "CACHEDIR.TAG", "downloads", "libs", "tmp"
    ]  # fmt: skip
    tag = (root / "CACHEDIR.TAG").read_text()
    assert tag.splitlines()[0] == "Signature: 8a477f597d28d172789f06886806bc55"


def test_unusable_cache_dir_says_what_to_do(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(CacheError, match="cannot create the nexabind cache.*NEXABIND_CACHE"):
        cache.prepare(blocker / "cache")


def test_verify_reports_every_kind_of_change(release_mirror: Path) -> None:
    lib = _install(release_mirror)
    entry = lib.parent
    (report,) = cache.verify()
    assert report.ok and report.to_dict()["ok"] is True
    with (entry / "abi.json").open("a") as f:
        f.write(" ")
    (entry / "include" / "llama.h").unlink()
    (entry / "lib" / "extra.so").write_bytes(b"x")
    link = next(p for p in (entry / "lib").iterdir() if p.is_symlink())
    target = os.readlink(link)
    link.unlink()
    link.symlink_to(target + ".other")
    (report,) = cache.verify()
    assert not report.ok
    assert report.changed == sorted(["abi.json", link.relative_to(entry).as_posix()])
    assert report.missing == ["include/llama.h"]
    assert report.added == ["lib/extra.so"]


def test_verify_without_a_record_is_an_error_not_a_crash(release_mirror: Path) -> None:
    lib = _install(release_mirror)
    (lib.parent / cache.INSTALL_RECORD).unlink()
    (report,) = cache.verify()
    assert not report.ok and "unreadable install record" in report.error
    assert "nexabind fetch --force" in report.error


def test_clean_removes_leftovers_that_no_fetch_is_using(_isolated_cache: Path) -> None:
    root = cache.prepare()
    stale = [
        root / "downloads" / f"{pin.RELEASE}+linux-x86_64-cpu+abc.part",
        root / "downloads" / f"{pin.RELEASE}+linux-x86_64-cpu+abc.part.json",
    ]
    for p in stale:
        p.write_text("partial")
    staging = root / "tmp" / f"{pin.RELEASE}+linux-x86_64-cpu+def"
    (staging / "entry" / "lib").mkdir(parents=True)
    busy = root / "downloads" / f"{pin.RELEASE}+linux-x86_64-cuda+ghi.part"
    busy.write_text("being written")
    # A running fetch holds the cuda artifact's lock (another process, as in real life).
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from filelock import FileLock; l = FileLock(sys.argv[1]); l.acquire(); "
         "print('locked', flush=True); sys.stdin.read()",
         str(root / ".locks" / f"{pin.RELEASE}+linux-x86_64-cuda.lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        removed = cache.clean()
    finally:
        holder.communicate("")
    assert sorted(removed) == sorted([*stale, staging])
    assert busy.exists() and not staging.exists()


def test_clean_removes_links_as_links_and_nothing_outside(
    _isolated_cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = cache.prepare()
    out = tmp_path / "outside"
    canaries = [
        out / "staged" / "c",
        out / "part",
        out / "r" / "linux-x86_64-cpu" / "c",
        out / "e" / "c",
    ]
    for c in canaries:
        c.parent.mkdir(parents=True, exist_ok=True)
        c.write_text("keep")
    staged = root / "tmp" / f"{pin.RELEASE}+linux-x86_64-cpu+abc"
    part = root / "downloads" / f"{pin.RELEASE}+linux-x86_64-cpu+abc.part"
    staged.symlink_to(out / "staged")
    part.symlink_to(out / "part")
    (root / "libs" / pin.RELEASE).symlink_to(out / "r")  # a linked release folder
    (root / "libs" / "other").mkdir()
    (root / "libs" / "other" / "linux-x86_64-cpu").symlink_to(out / "e")  # a linked entry
    removed = cache.clean(all=True)
    assert sorted(removed) == sorted([part, staged, root / "libs" / "other" / "linux-x86_64-cpu"])
    assert all(c.read_text() == "keep" for c in canaries)
    assert sorted(p.name for p in (root / "tmp").iterdir()) == []
    assert [p.name for p in (root / "libs").iterdir()] == [pin.RELEASE]  # left, not followed
    where = _isolated_cache.resolve() / "libs" / pin.RELEASE
    assert f"left {out / 'r' / 'linux-x86_64-cpu'} in place: it lies outside {where}" in caplog.text


def test_clean_all_removes_installs_but_never_the_build_cache(
    release_mirror: Path, _isolated_cache: Path
) -> None:
    lib = _install(release_mirror)
    builds = _isolated_cache / "builds" / "some-build"
    builds.mkdir(parents=True)
    assert cache.clean() == []  # no flag: installs stay
    assert lib.is_dir()
    assert cache.clean(all=True) == [lib.parent]
    assert not (_isolated_cache / "libs" / pin.RELEASE).exists()
    assert builds.is_dir()


def test_clean_release_keeps_the_entry_in_use(release_mirror: Path) -> None:
    lib = _install(release_mirror)
    assert cache.clean(release=pin.RELEASE, keep=lib.parent) == []
    assert lib.is_dir()
    assert cache.clean(release=pin.RELEASE) == [lib.parent]


def test_list_describes_installs(release_mirror: Path) -> None:
    lib = _install(release_mirror)
    (inst,) = cache.installed()
    info = inst.to_dict()
    assert info["lib"] == str(lib) and info["release"] == pin.RELEASE
    assert info["artifact"].startswith("nexabind-llama-") and info["files"] > 5


def test_best_installed_follows_the_variant_setting(
    release_mirror: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lib = _install(release_mirror)
    assert cache.library_dir() == lib
    monkeypatch.setenv("NEXABIND_VARIANT", "vulkan")
    with pytest.raises(LibraryNotFoundError, match=r"-vulkan/lib \(cache entry"):
        cache.library_dir()
    monkeypatch.setenv("NEXABIND_VARIANT", lib.parent.name.rsplit("-", 1)[1])
    assert cache.library_dir() == lib


def test_best_installed_asks_the_order_only_among_several(release_mirror: Path) -> None:
    lib = _install(release_mirror)
    installed = lib.parent
    os_name, arch, _ = installed.name.split("-")

    def unused() -> list[str]:
        raise AssertionError("the order was asked with one variant installed")

    assert cache.best_installed(pin.RELEASE, variant=None, order=unused).lib == lib
    other = installed.with_name(f"{os_name}-{arch}-vulkan")
    shutil.copytree(installed, other, symlinks=True)
    best = cache.best_installed(pin.RELEASE, variant=None, order=lambda: ["vulkan", "cpu"])
    assert best.path == other
    best = cache.best_installed(pin.RELEASE, variant=None, order=lambda: ["cpu"])
    assert best.path == installed
    assert cache.best_installed(pin.RELEASE, variant="metal", order=unused) is None


def test_missing_library_lists_every_attempt(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("NEXABIND_LIB_PATH", str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LibraryNotFoundError) as e:
        cache.library_dir()
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "NEXABIND_LIB_PATH" in msg
    assert "cache entry" in msg and pin.RELEASE in msg
    assert msg.rstrip().endswith("or set NEXABIND_LIB_PATH") and "run `nexabind fetch`" in msg
    with pytest.raises(LibraryNotFoundError, match="missing .*llama"):
        cache.library_dir(empty)
