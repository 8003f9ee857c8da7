"""What this Python process is: os, arch (of the process, not the host), libc, GPU runtimes.

Standard library only, nothing runs at import time, and every probe is cached per process.
``detect()`` is what ``nexabind fetch`` and ``nexabind info`` use to pick an artifact;
``target()`` is the cheap part of it (no libc or GPU probing).

The arch is the one the *process* runs as: ``sysconfig.get_platform()``, because an x86_64
Python emulated on an arm64 machine (Rosetta 2 on macOS, x64 emulation on Windows) must load
x86_64 libraries even though the hardware is arm64. Such cases are reported in ``notes``.

GPU runtimes are probed in a child Python process with a timeout, the way conda detects its
``__cuda`` virtual package: a broken or hanging driver then costs a few seconds, never the
caller's process. The child dlopens the Vulkan loader and the CUDA driver library
(``libcuda.so.1`` / ``nvcuda.dll``), calls ``cuInit(0)`` and ``cuDriverGetVersion`` and prints
one line per finding (see :func:`parse_probe_output`).
"""

from __future__ import annotations

import functools
import os
import platform as _stdplatform
import re
import subprocess
import sys
import sysconfig
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

__all__ = [
    "PROBE_TIMEOUT",
    "Platform",
    "cpu_flags",
    "detect",
    "format_cuda_version",
    "parse_musl_version",
    "parse_probe_output",
    "run_probe",
    "target",
]

#: Seconds the GPU probe child may run before it is killed and no GPU runtime is assumed.
PROBE_TIMEOUT = 10.0

_ARCH_ALIASES = {
    "x86_64": "x86_64",
    "amd64": "x86_64",
    "x64": "x86_64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "i386": "x86",
    "i486": "x86",
    "i586": "x86",
    "i686": "x86",
    "win32": "x86",
}


@dataclass(frozen=True)
class Platform:
    """This process as far as choosing a llama.cpp build is concerned.

    Attributes:
        os: ``linux``, ``macos`` or ``windows`` (another ``sys.platform`` value passes through).
        arch: The process's architecture: ``x86_64`` or ``arm64`` (others pass through, e.g.
            ``x86``, ``armv7l``, ``ppc64le``).
        libc: ``glibc`` or ``musl`` on Linux, None elsewhere or when unknown.
        libc_version: The libc version, e.g. ``"2.36"``; None when unknown.
        macos_version: The macOS version, e.g. ``"14.5"``; None elsewhere.
        cuda_driver: The CUDA driver API version, e.g. ``"12.4"``; None without a usable
            driver (or when GPU probing was skipped).
        vulkan: A Vulkan loader can be loaded.
        metal: Metal is available (macOS on arm64).
        notes: Warnings worth showing the user (emulation, musl, a driver that failed...).
    """

    os: str
    arch: str
    libc: str | None = None
    libc_version: str | None = None
    macos_version: str | None = None
    cuda_driver: str | None = None
    vulkan: bool = False
    metal: bool = False
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-ready dict (``notes`` as a list)."""
        data = asdict(self)
        data["notes"] = list(self.notes)
        return data


def _os_name() -> str:
    if sys.platform == "darwin":
        return "macos"
    if sys.platform in ("win32", "cygwin"):
        return "windows"
    if sys.platform.startswith("linux"):
        return "linux"
    return sys.platform


def _normalize_arch(machine: str) -> str:
    machine = machine.lower()
    return _ARCH_ALIASES.get(machine, machine)


def _process_arch(os_name: str) -> str:
    plat = sysconfig.get_platform().lower()  # linux-x86_64, macosx-11.0-arm64, win-amd64, win32
    machine = plat.rsplit("-", 1)[-1]
    if os_name == "macos" and machine in ("universal2", "universal", "intel", "fat", "fat3"):
        # A fat binary runs as one of its slices; under Rosetta uname reports x86_64 too.
        machine = _stdplatform.machine()
    arch = _normalize_arch(machine)
    if os_name == "linux" and sys.maxsize <= 2**32:
        # Linux's sysconfig reports the kernel's machine: a 32-bit Python on a 64-bit kernel.
        arch = {"x86_64": "x86", "arm64": "arm"}.get(arch, arch)
    return arch


@functools.cache
def cpu_flags() -> set[str] | None:
    """The CPU's feature flags as Linux names them (``/proc/cpuinfo``), or None elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        return None
    return None


def target() -> tuple[str, str]:
    """Return ``(os, arch)`` of this process in the names artifacts use; probes no GPU.

    Returns:
        ``os`` in {linux, macos, windows} and ``arch`` in {x86_64, arm64} on supported systems.
    """
    os_name = _os_name()
    return os_name, _process_arch(os_name)


# --- libc -------------------------------------------------------------------------------------


def _elf_interpreter(path: str) -> str | None:
    """Return the PT_INTERP (dynamic loader path) of an ELF file, or None."""
    import struct

    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if len(head) < 52 or head[:4] != b"\x7fELF":
                return None
            is64, little = head[4] == 2, head[5] == 1
            end = "<" if little else ">"
            if is64:
                (phoff,) = struct.unpack_from(end + "Q", head, 32)
                phentsize, phnum = struct.unpack_from(end + "HH", head, 54)
            else:
                (phoff,) = struct.unpack_from(end + "I", head, 28)
                phentsize, phnum = struct.unpack_from(end + "HH", head, 42)
            for i in range(phnum):
                f.seek(phoff + i * phentsize)
                ph = f.read(phentsize)
                if struct.unpack_from(end + "I", ph, 0)[0] != 3:  # PT_INTERP
                    continue
                if is64:
                    (offset,) = struct.unpack_from(end + "Q", ph, 8)
                    (size,) = struct.unpack_from(end + "Q", ph, 32)
                else:
                    (offset,) = struct.unpack_from(end + "I", ph, 4)
                    (size,) = struct.unpack_from(end + "I", ph, 16)
                f.seek(offset)
                return f.read(size).rstrip(b"\0").decode("utf-8", "replace")
    except (OSError, struct.error):
        return None
    return None


def parse_musl_version(text: str) -> str | None:
    """Return the version the musl dynamic loader prints when run without arguments.

    Args:
        text: Its stderr, e.g. ``"musl libc (x86_64)\\nVersion 1.2.4\\n..."``.

    Returns:
        ``"1.2.4"``, or None when ``text`` is not musl's banner.
    """
    if not text.lstrip().startswith("musl libc"):
        return None
    m = re.search(r"^Version\s+(\d+(?:\.\d+)+)", text, re.MULTILINE)
    return m.group(1) if m else None


def _musl_libc(executable: str) -> tuple[str | None, str | None]:
    """``("musl", version)`` when ``executable`` is linked against musl, else ``(None, None)``."""
    interp = _elf_interpreter(executable)
    if interp is None:  # unreadable (e.g. a frozen app): go by the loader on the system
        candidates = sorted(Path("/lib").glob("ld-musl-*.so.1"))
        interp = str(candidates[0]) if candidates else None
    if interp is None or "ld-musl" not in interp:
        return None, None
    try:
        # musl's loader prints its banner to stderr and exits 1 when run without a program.
        out = subprocess.run([interp], capture_output=True, text=True, timeout=5).stderr
    except (OSError, subprocess.SubprocessError):
        return "musl", None
    return "musl", parse_musl_version(out)


def _libc() -> tuple[str | None, str | None]:
    try:
        gnu = os.confstr("CS_GNU_LIBC_VERSION")  # "glibc 2.36"
    except (AttributeError, ValueError, OSError):
        gnu = None
    if gnu:
        name, _, version = gnu.partition(" ")
        return ("glibc" if name == "glibc" else name), (version or None)
    return _musl_libc(sys.executable)


# --- macOS and Windows emulation ----------------------------------------------------------------


def _macos_version() -> str | None:
    version = _stdplatform.mac_ver()[0] or None
    if version == "10.16":
        # A Python built against an old SDK is told "10.16" for every macOS 11+ (compat shim);
        # sw_vers asked from a clean environment reports the real version.
        try:
            env = {**os.environ, "SYSTEM_VERSION_COMPAT": "0"}
            out = subprocess.run(
                ["sw_vers", "-productVersion"], capture_output=True, text=True, timeout=5, env=env
            ).stdout.strip()
            version = out or version
        except (OSError, subprocess.SubprocessError):
            pass
    return version


def _rosetta() -> bool:
    """True when this (x86_64) process is translated by Rosetta 2."""
    import ctypes

    try:
        libc = ctypes.CDLL("/usr/lib/libc.dylib")
        value = ctypes.c_int(0)
        size = ctypes.c_size_t(ctypes.sizeof(value))
        rc = libc.sysctlbyname(
            b"sysctl.proc_translated", ctypes.byref(value), ctypes.byref(size), None, 0
        )
    except (OSError, AttributeError):
        return False
    return rc == 0 and value.value == 1


def _windows_native_arch() -> str | None:
    """The machine's native arch on Windows (IsWow64Process2), or None when unknown."""
    import ctypes
    from ctypes import wintypes

    try:
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
        fn = kernel32.IsWow64Process2
    except (OSError, AttributeError):
        return None
    process_machine, native_machine = wintypes.USHORT(0), wintypes.USHORT(0)
    fn.argtypes = [
        wintypes.HANDLE,
        ctypes.POINTER(wintypes.USHORT),
        ctypes.POINTER(wintypes.USHORT),
    ]
    fn.restype = wintypes.BOOL
    kernel32.GetCurrentProcess.restype = wintypes.HANDLE
    current = kernel32.GetCurrentProcess()
    if not fn(current, ctypes.byref(process_machine), ctypes.byref(native_machine)):
        return None
    # IMAGE_FILE_MACHINE_* values.
    return {0x8664: "x86_64", 0xAA64: "arm64", 0x014C: "x86"}.get(native_machine.value)


# --- GPU probe ---------------------------------------------------------------------------------

# Runs in a child process: dlopen failures, a hanging cuInit or a crash stay there.
_PROBE_CODE = r"""
import ctypes, sys
def out(*words):
    print(*words, flush=True)
if sys.platform == "win32":
    vk, cu, loader = ("vulkan-1.dll",), ("nvcuda.dll",), ctypes.WinDLL
elif sys.platform == "darwin":
    # dlopen does not search Homebrew's prefixes; the Vulkan SDK installs into /usr/local/lib.
    vk = tuple(p + n for p in ("", "/opt/homebrew/lib/", "/usr/local/lib/")
               for n in ("libvulkan.1.dylib", "libMoltenVK.dylib"))
    cu, loader = (), ctypes.CDLL
else:
    vk, cu, loader = ("libvulkan.so.1",), ("libcuda.so.1", "libcuda.so"), ctypes.CDLL
for name in vk:
    try:
        loader(name)
    except OSError:
        continue
    out("vulkan", name)
    break
else:
    out("vulkan", "none")
lib = None
for name in cu:
    try:
        lib = loader(name)
    except OSError:
        continue
    break
if lib is None:
    out("cuda", "none")
else:
    rc = lib.cuInit(0)
    if rc != 0:
        out("cuda", "init-error", rc)
    else:
        v = ctypes.c_int(0)
        rc = lib.cuDriverGetVersion(ctypes.byref(v))
        out("cuda", v.value) if rc == 0 else out("cuda", "version-error", rc)
"""

# CUresult values a user may meet here (cuda.h).
_CU_ERRORS = {
    3: "not initialized",
    34: "CUDA stub library loaded instead of the driver",
    35: "driver older than the CUDA runtime",
    100: "no CUDA-capable device",
    101: "invalid device",
    304: "operating system call failed",
    999: "unknown error",
}


def format_cuda_version(value: int) -> str:
    """Turn ``cuDriverGetVersion``'s integer into ``"major.minor"``.

    Args:
        value: e.g. ``12040`` (1000 * major + 10 * minor).

    Returns:
        e.g. ``"12.4"``.
    """
    return f"{value // 1000}.{(value % 1000) // 10}"


def parse_probe_output(text: str) -> tuple[str | None, bool, tuple[str, ...]]:
    """Read what the GPU probe child printed.

    Lines are ``vulkan <library name>`` / ``vulkan none``, and ``cuda <version int>`` /
    ``cuda none`` / ``cuda init-error <CUresult>`` / ``cuda version-error <CUresult>``.
    Missing lines (a child that crashed or timed out part way) mean "not found".

    Args:
        text: The child's stdout.

    Returns:
        ``(cuda_driver, vulkan, notes)``: e.g. ``("12.4", True, ())``.
    """
    cuda: str | None = None
    vulkan = False
    notes: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 2:
            continue
        if words[0] == "vulkan":
            vulkan = words[1] != "none"
        elif words[0] == "cuda" and words[1].isdigit():
            value = int(words[1])
            if value > 0:
                cuda = format_cuda_version(value)
        elif words[0] == "cuda" and words[1].endswith("-error") and len(words) > 2:
            code = int(words[2]) if words[2].lstrip("-").isdigit() else None
            what = _CU_ERRORS.get(code, "see cuda.h CUresult") if code is not None else words[2]
            call = "cuInit" if words[1] == "init-error" else "cuDriverGetVersion"
            notes.append(
                f"a CUDA driver library is installed but {call} failed (error {words[2]}: {what});"
                " the cuda variant will not be chosen"
            )
    return cuda, vulkan, tuple(notes)


def run_probe(
    code: str = _PROBE_CODE, timeout: float | None = None
) -> tuple[str | None, bool, tuple[str, ...]]:
    """Run a GPU probe in a child Python process and read its findings.

    A child that hangs is killed after ``timeout`` seconds and one that crashes (a broken driver)
    only loses what it had not printed yet; either is reported in the notes.

    Args:
        code: The probe program (default: the CUDA and Vulkan probe).
        timeout: Seconds to wait; default :data:`PROBE_TIMEOUT`.

    Returns:
        ``(cuda_driver, vulkan, notes)`` as :func:`parse_probe_output` reads them.
    """
    timeout = PROBE_TIMEOUT if timeout is None else timeout
    cmd = [sys.executable, "-I", "-S", "-c", code]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        cuda, vulkan, notes = parse_probe_output(out)
        note = f"the GPU probe did not finish within {timeout:g} s (a hanging driver?)"
        return cuda, vulkan, (*notes, note)
    except OSError as e:
        return None, False, (f"the GPU probe could not start {sys.executable}: {e}",)
    cuda, vulkan, notes = parse_probe_output(proc.stdout)
    if proc.returncode != 0:
        notes = (*notes, f"the GPU probe exited with status {proc.returncode} (a crashing driver?)")
    return cuda, vulkan, notes


# --- detect ------------------------------------------------------------------------------------


@functools.cache
def _detect_base() -> Platform:
    os_name, arch = target()
    libc = libc_version = macos_version = None
    notes: list[str] = []
    if os_name == "linux":
        libc, libc_version = _libc()
        if libc == "musl":
            notes.append(
                "musl libc: the prebuilt Linux libraries need glibc; build from source with"
                " `nexabind build --install`"
            )
    elif os_name == "macos":
        macos_version = _macos_version()
        if arch == "x86_64" and _rosetta():
            notes.append(
                "x86_64 Python under Rosetta 2 on Apple silicon: llama.cpp gets no AVX and no"
                " Metal and runs slowly; use an arm64 Python (python.org's universal2 installer"
                " runs natively, or start it with `arch -arm64`)"
            )
    elif os_name == "windows" and arch != "arm64" and _windows_native_arch() == "arm64":
        notes.append(
            f"{arch} Python emulated on Windows arm64: llama.cpp runs slowly; install the"
            " arm64 build of Python to use the native arm64 libraries"
        )
    if arch not in ("x86_64", "arm64"):
        notes.append(
            f"no prebuilt libraries exist for {arch}; build from source with `nexabind build`"
        )
    return Platform(
        os=os_name,
        arch=arch,
        libc=libc,
        libc_version=libc_version,
        macos_version=macos_version,
        metal=os_name == "macos" and arch == "arm64",
        notes=tuple(notes),
    )


def detect(*, gpu: bool = True) -> Platform:
    """Describe this process: os, arch, libc, macOS version, GPU runtimes and warnings.

    Cached per process (``gpu=True`` and ``gpu=False`` separately).

    Args:
        gpu: Probe for a CUDA driver and a Vulkan loader (a child process, up to
            :data:`PROBE_TIMEOUT` seconds); False leaves ``cuda_driver`` None and
            ``vulkan`` False.

    Returns:
        The :class:`Platform`.
    """
    return _detect(bool(gpu))


@functools.cache
def _detect(gpu: bool) -> Platform:
    base = _detect_base()
    if not gpu or base.os not in ("linux", "windows", "macos"):
        return base
    cuda, vulkan, notes = run_probe()
    return replace(base, cuda_driver=cuda, vulkan=vulkan, notes=(*base.notes, *notes))
