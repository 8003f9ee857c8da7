"""Cross builds (nexabind._cross): linux-arm64 and windows-x86_64 artifacts built on this host,
then loaded and run under qemu-user and wine.

The artifacts come from ``nexabind build --target`` (``.ci/run`` builds them before the tests, so
here each is a build cache hit). build_scripts/greedy.c, compiled for each target, loads an
artifact's libraries the way the loader does, lets ggml pick its CPU variant, and decodes the
tiny test model greedily; its tokens are compared with the same program's on this host.
"""

from __future__ import annotations

import json
import stat
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from _greedy import greedy_exe, run_greedy
from conftest import CrossBuild

from nexabind import _cdef, _cross, build, loader
from nexabind._source import ensure_source
from nexabind.errors import BuildError
from nexabind.targets import LIBRARY_NAMES, parse_target

# What ggml picks on qemu's "max" arm64 CPU: SVE2 (armv8.6_2), plus SME from qemu 7.1 (armv9.2_2).
MAX_VARIANTS = {"libggml-cpu-armv8.6_2.so", "libggml-cpu-armv9.2_2.so"}


@pytest.fixture(scope="session", params=["linux-arm64", "windows-x86_64"])
def cross(request: pytest.FixtureRequest, cross_build: Callable[[str], CrossBuild]) -> CrossBuild:
    """Each cross target's artifact (see conftest.cross_build)."""
    return cross_build(request.param)


def test_artifact_layout(cross: CrossBuild) -> None:
    target, out, entry, extracted = cross.target, cross.out, cross.entry, cross.tree
    os_name, arch = parse_target(target)
    assert (entry["os"], entry["arch"], entry["variant"]) == (os_name, arch, "cpu")
    libs = {p.name for p in (extracted / "lib").iterdir()}
    assert set(LIBRARY_NAMES[os_name]) <= libs
    info = json.loads((extracted / "build-info.json").read_text())
    assert info["cross_built_on"] == "linux-x86_64" and info["os"] == os_name
    if os_name == "windows":
        assert entry["name"].endswith(f"-{target}-cpu.zip") and entry["min_glibc"] is None
        # Every CPU variant, named as ggml_backend_load_all_from_path looks for them on Windows.
        assert {"ggml-cpu-x64.dll", "ggml-cpu-haswell.dll", "ggml-cpu-skylakex.dll"} <= libs
        with zipfile.ZipFile(out / entry["url"]) as z:
            kinds = {stat.S_IFMT(i.external_attr >> 16) for i in z.infolist()}
        assert kinds <= {0, stat.S_IFREG}  # plain files only: no links in a Windows artifact
    else:
        variants = {n for n in libs if n.startswith("libggml-cpu-")}
        assert {"libggml-cpu-armv8.0_1.so", "libggml-cpu-armv8.2_2.so"} <= variants
        assert "libggml-cpu-armv9.2_2.so" in variants and len(variants) == 8
        assert entry["min_glibc"] and entry["min_glibc"] <= "2.36"  # Debian 12, Ubuntu 22.04+


def test_probe_ran_on_the_target(cross: CrossBuild) -> None:
    """abi.json comes from the probe compiled for the target and run under its emulator; the
    declarations' layouts are the same on LP64 Linux and LLP64 Windows, so it checks here."""
    abi = json.loads((cross.tree / "abi.json").read_text())
    assert abi["cdef_sha256"] == _cdef.CDEF_SHA256 and abi["pointer_size"] == 8
    loader.check_abi(abi, str(cross.tree / "abi.json"))


def test_generates_under_emulation_like_this_host(
    cross: CrossBuild, libdir: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    target, tools, out, extracted = cross.target, cross.tools, cross.out, cross.tree
    src = ensure_source()
    here = run_greedy(
        greedy_exe(None, src, tmp_path_factory.mktemp("native")), libdir, tiny_model, {}
    )
    there = run_greedy(greedy_exe(tools, src, out), extracted / "lib", tiny_model, tools.env)
    assert there["backends"] == ["CPU"] and there["devices"]
    if target == "windows-x86_64":
        assert there["cpu_variant"].startswith("ggml-cpu-")
        assert there["cpu_variant"].endswith(".dll")
    else:  # qemu's "max" CPU has SVE2 (and SME from qemu 7.1): a top variant wins
        assert there["cpu_variant"] in MAX_VARIANTS
    assert there["prompt_tokens"] == here["prompt_tokens"]
    # Same model, same settings, a different SIMD path: the greedy tokens match (measured on
    # this model; a near tie could flip one, and then this says where).
    assert there["tokens"] == here["tokens"]


def test_arm64_dispatch_follows_the_cpu(
    cross_build: Callable[[str], CrossBuild], tiny_model: Path
) -> None:
    """ggml_backend_load_all_from_path picks the variant the (emulated) CPU can run."""
    arm = cross_build("linux-arm64")
    extracted = arm.tree
    exe = greedy_exe(arm.tools, ensure_source(), arm.out)
    picked = {
        cpu: run_greedy(exe, extracted / "lib", tiny_model, {"QEMU_CPU": cpu})["cpu_variant"]
        for cpu in ("cortex-a53", "cortex-a76", "max")
    }
    assert picked["cortex-a53"] == "libggml-cpu-armv8.0_1.so"  # armv8.0: no dotprod
    assert picked["cortex-a76"] == "libggml-cpu-armv8.2_2.so"  # dotprod + fp16
    assert picked["max"] in MAX_VARIANTS


def test_cross_install_is_refused(tmp_path: Path) -> None:
    with pytest.raises(
        BuildError, match="makes the cpu variant and does not install.*--install.*--out DIR"
    ):
        build(target="windows-x86_64", install=True, build_cache=tmp_path)
    with pytest.raises(
        BuildError, match="makes the cpu variant and does not install.*--variant vulkan"
    ):
        build("vulkan", target="linux-arm64", build_cache=tmp_path)


def test_unknown_target_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=r"unknown target 'plan9-mips'.*'linux-arm64'"):
        build(target="plan9-mips", build_cache=tmp_path)


def test_cross_from_another_host_says_where_it_runs(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="cross builds run on linux-x86_64, not on macos-arm64"):
        _cross.resolve(("linux", "arm64"), ("macos", "arm64"), tmp_path)
    with pytest.raises(BuildError, match="macos-arm64 cannot be cross-built"):
        _cross.resolve(("macos", "arm64"), ("linux", "x86_64"), tmp_path)


def test_missing_cross_compiler_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(BuildError, match=r"no clang on PATH.*apt-get install clang"):
        _cross.resolve(("linux", "arm64"), ("linux", "x86_64"), tmp_path)
    with pytest.raises(BuildError, match=r"mingw-w64.*install g\+\+-mingw-w64-x86-64-posix"):
        _cross.resolve(("windows", "x86_64"), ("linux", "x86_64"), tmp_path)


def test_cli_cross_target_errors_cleanly(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from nexabind.cli import cli

    r = CliRunner().invoke(cli, ["build", "--target", "windows-x86_64", "--install"])
    assert r.exit_code == 1 and "does not install" in r.output
