"""Platform detection, checked against independent sources on the machine running the tests."""

from __future__ import annotations

import os
import platform as stdplatform
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from _tools import require

from nexabind import platform as nplatform
from nexabind.platform import (
    Platform,
    detect,
    format_cuda_version,
    parse_musl_version,
    parse_probe_output,
    run_probe,
    target,
)

# What sysconfig.get_platform() says on each supported kind of process, and the target name.
SYSCONFIG_NAMES = {
    "linux-x86_64": ("linux", "x86_64"),
    "linux-aarch64": ("linux", "arm64"),
    "win-amd64": ("windows", "x86_64"),
    "win-arm64": ("windows", "arm64"),
    "macosx-11.0-arm64": ("macos", "arm64"),
    "macosx-10.9-x86_64": ("macos", "x86_64"),
}


def _ldconfig_has(name: str) -> bool:
    """Whether the dynamic linker would find ``name`` (ld.so cache or LD_LIBRARY_PATH)."""
    dirs = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    if any((Path(d) / name).exists() for d in dirs):
        return True
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    out = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, check=True).stdout
    return any(line.strip().startswith(name + " ") for line in out.splitlines())


def test_target_is_the_process_arch_from_sysconfig() -> None:
    plat = sysconfig.get_platform()
    if plat not in SYSCONFIG_NAMES and not plat.startswith("macosx-"):
        pytest.fail(f"add {plat!r} to SYSCONFIG_NAMES")
    if plat in SYSCONFIG_NAMES:
        assert target() == SYSCONFIG_NAMES[plat]
    assert target()[0] == {"linux": "linux", "darwin": "macos", "win32": "windows"}[sys.platform]


def test_detect_without_gpu_probes_nothing_and_is_cached() -> None:
    p = detect(gpu=False)
    assert (p.os, p.arch) == target()
    assert p.cuda_driver is None and p.vulkan is False
    assert detect(gpu=False) is p
    assert detect() is detect() is detect(gpu=True)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc/musl are Linux libcs")
def test_libc_matches_ldd_and_the_interpreter_binary() -> None:
    p = detect(gpu=False)
    ldd = subprocess.run(["ldd", "--version"], capture_output=True, text=True)
    banner = ldd.stdout + ldd.stderr
    if p.libc == "glibc":
        # "ldd (Debian GLIBC 2.36-9+deb12u14) 2.36" / "ldd (GNU libc) 2.39"
        first = banner.splitlines()[0]
        assert first.rstrip().endswith(" " + str(p.libc_version)), first
        lib, version = stdplatform.libc_ver()
        assert (lib, version) == ("glibc", p.libc_version)
        assert p.notes == () or not any("musl" in n for n in p.notes)
    else:
        assert p.libc == "musl"
        assert parse_musl_version(banner) == p.libc_version
        assert any("musl" in n for n in p.notes)
    assert p.macos_version is None and p.metal is False


@pytest.mark.skipif(sys.platform != "linux", reason="ELF")
def test_elf_interpreter_matches_readelf() -> None:
    readelf = shutil.which("readelf")
    require(readelf is not None, "readelf (binutils) is not installed")
    assert readelf is not None
    exe = os.path.realpath(sys.executable)
    out = subprocess.run([readelf, "-l", exe], capture_output=True, text=True, check=True).stdout
    m = re.search(r"\[Requesting program interpreter: (.+?)\]", out)
    assert m is not None
    assert nplatform._elf_interpreter(exe) == m.group(1)
    assert nplatform._elf_interpreter(__file__) is None  # not an ELF file


def test_musl_banner_is_parsed() -> None:
    # What /lib/ld-musl-x86_64.so.1 prints to stderr when run without arguments.
    banner = (
        "musl libc (x86_64)\nVersion 1.2.4\nDynamic Program Loader\n"
        "Usage: /lib/ld-musl-x86_64.so.1 [options] [--] pathname [args]\n"
    )
    assert parse_musl_version(banner) == "1.2.4"
    assert parse_musl_version("musl libc (aarch64)\nVersion 1.2.5_git20240512\n") == "1.2.5"
    assert parse_musl_version("ldd (GNU libc) 2.39\n") is None


def test_a_musl_binary_is_recognised_with_its_version(tmp_path: Path) -> None:
    require(shutil.which("musl-gcc") is not None, "needs musl-gcc (apt install musl-tools)")
    (tmp_path / "hello.c").write_text("int main(void) { return 0; }\n")
    exe = tmp_path / "hello"
    subprocess.run(["musl-gcc", "-o", str(exe), str(tmp_path / "hello.c")], check=True)
    interp = nplatform._elf_interpreter(str(exe))
    assert interp is not None and "ld-musl-" in interp
    banner = subprocess.run([interp], capture_output=True, text=True).stderr
    version = re.search(r"Version (\S+)", banner)
    assert version is not None
    assert nplatform._musl_libc(str(exe)) == ("musl", version.group(1))
    if detect(gpu=False).libc == "glibc":
        assert nplatform._musl_libc(sys.executable) == (None, None)


def test_cuda_driver_versions_are_formatted() -> None:
    assert format_cuda_version(12040) == "12.4"
    assert format_cuda_version(11080) == "11.8"
    assert format_cuda_version(12090) == "12.9"
    assert format_cuda_version(13000) == "13.0"


def test_probe_output_formats() -> None:
    assert parse_probe_output("vulkan libvulkan.so.1\ncuda 12040\n") == ("12.4", True, ())
    assert parse_probe_output("vulkan none\ncuda none\n") == (None, False, ())
    # A child that died before printing anything, or after the Vulkan line.
    assert parse_probe_output("") == (None, False, ())
    assert parse_probe_output("vulkan vulkan-1.dll\n") == (None, True, ())
    cuda, vulkan, notes = parse_probe_output("vulkan none\ncuda init-error 100\n")
    assert (cuda, vulkan) == (None, False)
    assert "cuInit failed (error 100: no CUDA-capable device)" in notes[0]
    cuda, _, notes = parse_probe_output("vulkan none\ncuda version-error 999\n")
    assert cuda is None and "cuDriverGetVersion failed (error 999: unknown error)" in notes[0]
    assert parse_probe_output("garbage\ncuda\n\ncuda 0\n") == (None, False, ())


def test_gpu_probe_matches_what_the_dynamic_linker_finds() -> None:
    p = detect()
    if sys.platform == "linux":
        assert p.vulkan == _ldconfig_has("libvulkan.so.1")
        if not _ldconfig_has("libcuda.so.1"):
            assert p.cuda_driver is None
            assert not any("CUDA" in n for n in p.notes)
    if p.cuda_driver is not None:
        assert re.fullmatch(r"\d+\.\d+", p.cuda_driver)
    assert p.to_dict()["notes"] == list(p.notes)
    assert set(p.to_dict()) == {
        "os",
        "arch",
        "libc",
        "libc_version",
        "macos_version",
        "cuda_driver",
        "vulkan",
        "metal",
        "notes",
    }


def _shared_lib(tmp_path: Path, name: str, source: str) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    require(cc is not None, "no C compiler to build a stand-in driver library")
    assert cc is not None
    (tmp_path / "drv.c").write_text(source)
    out = tmp_path / "libs" / name
    out.parent.mkdir(exist_ok=True)
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(out), str(tmp_path / "drv.c")], check=True)
    return out.parent


@pytest.mark.skipif(sys.platform != "linux", reason="builds ELF stand-ins for the driver")
@pytest.mark.parametrize(
    ("init_rc", "expected", "note"),
    [(0, "12.4", None), (100, None, "error 100: no CUDA-capable device")],
)
def test_probe_child_loads_the_driver_and_a_vulkan_loader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, init_rc: int, expected: str, note: str
) -> None:
    # A library exporting the two driver entry points the probe calls, found through the
    # library path exactly as a real libcuda.so.1 would be.
    src = (
        f"int cuInit(unsigned int flags) {{ return {init_rc}; }}\n"
        "int cuDriverGetVersion(int *v) { *v = 12040; return 0; }\n"
    )
    libs = _shared_lib(tmp_path, "libcuda.so.1", src)
    _shared_lib(tmp_path, "libvulkan.so.1", "int vkGetInstanceProcAddr;\n")
    monkeypatch.setenv("LD_LIBRARY_PATH", str(libs))
    cuda, vulkan, notes = run_probe()
    assert (cuda, vulkan) == (expected, True)
    assert (notes == ()) if note is None else (note in notes[0])


def test_probe_child_that_hangs_or_crashes_costs_only_a_note() -> None:
    hang = "print('vulkan libvulkan.so.1', flush=True)\nimport time\ntime.sleep(60)\n"
    cuda, vulkan, notes = run_probe(hang, timeout=2)
    assert (cuda, vulkan) == (None, True)
    assert "did not finish within 2 s" in notes[-1]
    crash = "print('vulkan none', flush=True)\nimport ctypes\nctypes.string_at(0)\n"
    cuda, vulkan, notes = run_probe(crash)
    assert (cuda, vulkan) == (None, False)
    assert "the GPU probe exited with status" in notes[-1]


def test_platform_is_frozen_and_comparable() -> None:
    a = Platform(os="linux", arch="x86_64", libc="glibc", libc_version="2.36")
    assert a == Platform("linux", "x86_64", "glibc", "2.36")
    with pytest.raises(AttributeError):
        a.arch = "arm64"  # type: ignore[misc]
    assert hash(a) == hash(Platform("linux", "x86_64", "glibc", "2.36"))
