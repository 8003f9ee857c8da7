"""nexabind._build: the pinned source, the cached build, the ABI probe, artifact and manifest.

The real build runs once per build cache (``.ci/run`` does it before the tests); here every
build of the pinned source is a cache hit. Failure paths use tiny fake CMake projects.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from nexabind import _cdef, pin
from nexabind._artifact import pack, probe_source
from nexabind._build import build
from nexabind._source import build_cache_dir
from nexabind.cli import cli
from nexabind.errors import BuildError
from nexabind.platform import target

ROOT = Path(__file__).resolve().parent.parent
needs_tools = pytest.mark.skipif(
    shutil.which("cmake") is None or shutil.which("cc") is None, reason="needs cmake and cc"
)


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An artifact + manifest of the pinned source (a cache hit after the first build)."""
    out = tmp_path_factory.mktemp("dist")
    build(out=out)
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pin_is_consistent() -> None:
    assert pin.LLAMA_COMMIT == _cdef.LLAMA_COMMIT
    assert f"llama-{pin.LLAMA_COMMIT}-r2" == pin.RELEASE
    assert pin.DEFAULT_BASE_URL.startswith("https://")


def test_build_cache_is_not_the_user_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("NEXABIND_BUILD_CACHE", raising=False)
    assert not build_cache_dir().is_relative_to(Path(os.environ["NEXABIND_CACHE_DIR"]))
    monkeypatch.setenv("NEXABIND_BUILD_CACHE", str(tmp_path / "b"))
    assert build_cache_dir() == tmp_path / "b"
    assert build_cache_dir(tmp_path / "c") == tmp_path / "c"


def test_manifest_schema_and_digests(dist: Path) -> None:
    manifest = json.loads((dist / "manifest.json").read_text())
    assert manifest["schema"] == 1
    assert manifest["release"] == pin.RELEASE
    assert manifest["llama_commit"] == pin.LLAMA_COMMIT
    assert manifest["llama_build"] == pin.LLAMA_BUILD
    assert manifest["abi_fingerprint"] == _cdef.CDEF_SHA256
    os_name, arch = target()
    (art,) = [a for a in manifest["artifacts"] if (a["os"], a["arch"]) == (os_name, arch)]
    keys = {"name", "os", "arch", "variant", "min_glibc", "min_macos", "requires", "url"}
    assert keys | {"size", "sha256"} <= set(art)
    assert art["name"] == f"nexabind-llama-{pin.ARTIFACT_VERSION}-{os_name}-{arch}-cpu.tar.gz"
    archive = dist / art["url"]
    assert archive.stat().st_size == art["size"]
    assert _sha256(archive) == art["sha256"]
    if os_name == "linux":
        assert art["min_glibc"] and art["min_glibc"][0].isdigit()


def test_artifact_contents(dist: Path) -> None:
    (archive,) = dist.glob("nexabind-llama-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        info = json.load(tar.extractfile("build-info.json"))
        abi = json.load(tar.extractfile("abi.json"))
    assert names == sorted(names)
    libs = {n.split("/", 1)[1] for n in names if n.startswith("lib/")}
    ext = ".dylib" if sys.platform == "darwin" else ".so"
    for stem in ("libllama", "libggml", "libggml-base"):
        assert f"{stem}{ext}" in libs
    assert any(n.startswith("libggml-cpu") for n in libs), libs
    if target() == ("linux", "x86_64"):
        assert {"libggml-cpu-x64.so", "libggml-cpu-haswell.so"} <= libs
    assert {"include/llama.h", "include/ggml.h", "LICENSE"} <= set(names)
    assert info["llama_commit"] == pin.LLAMA_COMMIT
    assert "-DGGML_BACKEND_DL=ON" in info["cmake_flags"]
    assert info["compiler"]
    assert abi["cdef_sha256"] == _cdef.CDEF_SHA256
    assert abi["pointer_size"] == 8
    assert set(abi["structs"]) == set(_cdef.STRUCTS)
    batch = abi["structs"]["llama_batch"]
    assert batch["offsets"]["n_tokens"] == 0
    assert set(batch["offsets"]) == set(_cdef.STRUCTS["llama_batch"])
    assert abi["enums"]["LLAMA_VOCAB_TYPE_NONE"] == 0


def test_libraries_find_each_other_in_lib(dist: Path, tmp_path: Path) -> None:
    """The $ORIGIN rpath lets libllama load from wherever lib/ is extracted."""
    (archive,) = dist.glob("nexabind-llama-*.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path, filter="data")
    code = (
        "import ctypes, sys; l = ctypes.CDLL(sys.argv[1]); "
        "l.llama_print_system_info.restype = ctypes.c_char_p; "
        "print(l.llama_print_system_info().decode())"
    )
    ext = ".dylib" if sys.platform == "darwin" else ".so"
    lib = tmp_path / "lib" / f"libllama{ext}"
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    r = subprocess.run([sys.executable, "-c", code, str(lib)], capture_output=True, env=env)
    assert r.returncode == 0, r.stderr.decode()


def test_second_build_is_a_cache_hit(dist: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nexabind")
    stage = build(all_variants=True)  # as an artifact for --out is: every CPU variant
    log = stage.parent / "build.log"
    before = log.stat().st_mtime_ns
    again = build(out=dist)
    assert again == stage
    assert "cache hit" in caplog.text
    assert log.stat().st_mtime_ns == before  # cmake did not run: nothing was logged


def test_second_variant_adds_to_manifest(dist: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    other = {"name": "x.tar.gz", "os": "plan9", "arch": "mips", "variant": "cpu"}
    seed = {"schema": 1, "release": pin.RELEASE, "artifacts": [other]}
    (out / "manifest.json").write_text(json.dumps(seed))
    build(out=out)
    arts = json.loads((out / "manifest.json").read_text())["artifacts"]
    assert len(arts) == 2
    assert other in arts


def test_archives_are_deterministic(dist: Path, tmp_path: Path) -> None:
    stage = build()
    pack(stage, tmp_path / "a.tar.gz")
    pack(stage, tmp_path / "b.tar.gz")
    assert _sha256(tmp_path / "a.tar.gz") == _sha256(tmp_path / "b.tar.gz")


def test_zip_artifact_holds_links_as_copies(tmp_path: Path) -> None:
    """Windows artifacts are zips, which hold no links: a link in the staged folder is packed
    as a copy of the file it names, and extracts as a plain file."""
    from nexabind._archive import safe_extract

    stage = tmp_path / "stage"
    (stage / "lib").mkdir(parents=True)
    (stage / "lib" / "libx.so.0").write_bytes(b"library bytes")
    (stage / "lib" / "libx.so").symlink_to("libx.so.0")
    archive = tmp_path / "a.zip"
    pack(stage, archive)
    with zipfile.ZipFile(archive) as z:
        assert z.namelist() == ["lib/libx.so", "lib/libx.so.0"]
        assert z.read("lib/libx.so") == b"library bytes"
        assert {stat.S_IFMT(i.external_attr >> 16) for i in z.infolist()} <= {0, stat.S_IFREG}
    safe_extract(archive, tmp_path / "x")
    copy = tmp_path / "x" / "lib" / "libx.so"
    assert not copy.is_symlink() and copy.read_bytes() == b"library bytes"


def test_pack_writes_through_a_temp_name_nobody_planted(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    canary.write_text("keep")
    stage = tmp_path / "stage"
    (stage / "lib").mkdir(parents=True)
    (stage / "lib" / "libx.so").write_bytes(b"library bytes")
    for name in ("a.zip", "a.tar.gz"):
        (tmp_path / f"{name}.part").symlink_to(canary)  # the temp name pack used before
        pack(stage, tmp_path / name)
    assert canary.read_text() == "keep"
    with zipfile.ZipFile(tmp_path / "a.zip") as z, tarfile.open(tmp_path / "a.tar.gz") as t:
        assert (z.namelist(), t.getnames()) == (["lib/libx.so"], ["lib", "lib/libx.so"])


def test_bad_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="not a llama.cpp source tree"):
        build(source=tmp_path, build_cache=tmp_path / "bc")


def test_cli_bad_source(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["build", "--source", str(tmp_path)])
    assert result.exit_code == 1
    assert "no CMakeLists.txt" in result.output


def test_unknown_variant(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="variant 'opencl' is not built for"):
        build("opencl", build_cache=tmp_path)


@needs_tools
def test_failing_compile_is_reported(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.14)\nproject(fake C)\n"
        "add_library(llama SHARED broken.c)\n"
    )
    (src / "broken.c").write_text("int broken(void) { return this is not C; }\n")
    with pytest.raises(BuildError) as info:
        build(source=src, build_cache=tmp_path / "bc")
    msg = str(info.value)
    assert "cmake build failed" in msg
    assert "broken.c" in msg
    log = Path(msg.rsplit("Full log: ", 1)[1].strip())
    assert log.is_file() and "broken.c" in log.read_text()


@needs_tools
def test_probe_compiles_against_headers(tmp_path: Path) -> None:
    inc = tmp_path / "include"
    inc.mkdir()
    (inc / "llama.h").write_text(
        "#include <stdint.h>\nstruct pair { int8_t a; int64_t b; };\n"
        "enum color { RED = 3, BLUE = -1 };\n"
    )
    (tmp_path / "probe.c").write_text(
        probe_source({"pair": ("a", "b")}, {"color": ("RED", "BLUE")})
    )
    exe = tmp_path / "probe"
    subprocess.run(["cc", f"-I{inc}", str(tmp_path / "probe.c"), "-o", str(exe)], check=True)
    out = json.loads(subprocess.run([str(exe)], capture_output=True, check=True).stdout)
    assert out["structs"] == {"pair": {"size": 16, "offsets": {"a": 0, "b": 8}}}
    assert out["enums"] == {"RED": 3, "BLUE": -1}


def test_stale_cdef_is_detected(tmp_path: Path, llama_source: Path) -> None:
    pytest.importorskip("pycparser")
    for sub in ("include", "ggml/include"):
        shutil.copytree(llama_source / sub, tmp_path / sub)
    gen = [sys.executable, str(ROOT / "build_scripts" / "gen_cdef.py"), "--check", "--source"]
    fresh = subprocess.run([*gen, str(tmp_path)], capture_output=True, text=True)
    assert fresh.returncode == 0, fresh.stderr
    header = tmp_path / "include" / "llama.h"
    text = header.read_text()
    assert "int32_t n_tokens;" in text
    header.write_text(
        text.replace("int32_t n_tokens;", "int32_t n_tokens;\n        int32_t n_new;", 1)
    )
    stale = subprocess.run([*gen, str(tmp_path)], capture_output=True, text=True)
    assert stale.returncode == 1
    assert "stale" in stale.stderr and "gen_cdef.py" in stale.stderr


def test_cli_prints_the_build_folder(dist: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "nexabind", "build"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert (Path(r.stdout.strip()) / "abi.json").is_file()
    assert "cache hit" in r.stderr


def test_install_goes_the_way_fetch_installs(dist: Path) -> None:
    installed = Path(build(install=True))
    cache = Path(os.environ["NEXABIND_CACHE_DIR"])
    assert installed.is_relative_to(cache)
    assert pin.RELEASE in installed.parts
    assert any(installed.rglob("libllama*"))
    # The install record fetch writes, for the archive the build packed.
    record = json.loads((installed.parent / ".nexabind-install.json").read_text())
    assert record["artifact"].startswith("nexabind-llama-") and len(record["sha256"]) == 64
    assert record["files"] and record["source"].endswith(record["artifact"])


def test_extracted_artifact_loads_with_abi_check(dist: Path, tmp_path: Path) -> None:
    """The binding's own loader accepts the artifact: its abi.json matches the declarations."""
    (archive,) = dist.glob("nexabind-llama-*.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path, filter="data")
    r = subprocess.run(
        [sys.executable, "-m", "nexabind.lowlevel", str(tmp_path / "lib")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] is True
    assert report["abi_checked"] is True


def test_missing_cmake_says_what_to_install(tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "CMakeLists.txt").write_text("project(fake C)\n")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(
        BuildError, match=r"cmake not found on PATH; install it \(pip install cmake"
    ):
        build(source=src, build_cache=tmp_path / "bc")


def test_a_server_build_is_found_only_when_finished(tmp_path: Path) -> None:
    from nexabind._build import server_binary
    from nexabind.targets import SERVER_FLAGS

    assert "-DLLAMA_BUILD_SERVER=ON" in SERVER_FLAGS and "-DGGML_CPU=OFF" in SERVER_FLAGS
    os_name, arch = target()
    stage = tmp_path / f"{pin.LLAMA_COMMIT}-{os_name}-{arch}-cpu-server-0123456789ab" / "artifact"
    exe = stage / "bin" / ("llama-server.exe" if os_name == "windows" else "llama-server")
    exe.parent.mkdir(parents=True)
    exe.write_text("")
    assert server_binary(tmp_path) is None  # no marker: an unfinished build
    (stage / "nexabind-build.json").write_text("{}")
    assert server_binary(tmp_path) == exe
    with pytest.raises(BuildError, match="--with-server builds llama-server alone"):
        build(with_server=True, install=True, build_cache=tmp_path)


def test_ensure_sdist_checks_the_file_it_is_given(tmp_path: Path, monkeypatch) -> None:
    from nexabind._source import ensure_sdist

    fake = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    fake.write_bytes(b"not the sdist")
    with pytest.raises(BuildError, match="sha256 is .*; not using it"):
        ensure_sdist(tmp_path / "cache", sdist=fake)
    monkeypatch.setenv("NEXABIND_LLAMA_SDIST", str(fake))
    with pytest.raises(BuildError, match="sha256 is .*; not using it"):
        ensure_sdist(tmp_path / "cache")


@pytest.mark.parametrize(
    ("cc", "cxx"),
    [
        ("/usr/bin/clang", "/usr/bin/clang++"),
        ("/opt/llvm-19/bin/clang-19", "/opt/llvm-19/bin/clang++-19"),
        ("clang", "clang++"),
    ],
)
def test_the_arm64_toolchain_names_clang_plus_plus_on_this_cmake(
    tmp_path: Path, cc: str, cxx: str
) -> None:
    """The toolchain file is read again inside try_compile; CMake 3.25 (Debian 12) refused its
    old regex back-reference ("out-of-range escape") when the compiler had no version suffix."""
    import nexabind

    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("no cmake")
    toolchain = Path(nexabind.__file__).parent / "toolchains" / "linux-arm64.cmake"
    script = tmp_path / "probe.cmake"
    script.write_text(
        f'set(CMAKE_C_COMPILER "{cc}")\ninclude("{toolchain}")\n'
        'message(STATUS "CXX=${CMAKE_CXX_COMPILER}")\n'
    )
    r = subprocess.run([cmake, "-P", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"CXX={cxx}" in r.stdout


def test_the_wheel_carries_the_patches_and_toolchains(tmp_path: Path) -> None:
    """A build from an installed nexabind (the release workflow's, a user's fallback build)
    applies the same patches as one from this checkout."""
    import zipfile

    from nexabind import _source

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(tmp_path), str(root)], capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("nexabind-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for p in _source.patches():
        assert f"nexabind/patches/{p['file']}" in names
    assert "nexabind/toolchains/linux-arm64.cmake" in names


def test_a_patch_that_does_not_apply_is_a_build_error(tmp_path: Path) -> None:
    from nexabind import _source
    from nexabind.errors import BuildError

    tree = tmp_path / "llama.cpp"
    (tree / "ggml" / "src").mkdir(parents=True)  # the files the patches change are missing
    with pytest.raises(BuildError, match=r"patch 0001-amx-tile-config-static-storage\.patch "
                       r"does not apply to .*llama\.cpp"):  # fmt: skip
        _source._apply_patches(tree)
