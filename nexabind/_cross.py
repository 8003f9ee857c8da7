"""Cross builds on a Linux x86_64 host: linux-arm64 and windows-x86_64, run under emulation.

``nexabind build --target`` builds the artifact of another target here with a CMake toolchain
file shipped in ``nexabind/toolchains/`` and compilers found on PATH, and runs the ABI probe it
compiles for that target under qemu-user (arm64) or wine (Windows). The release workflow builds
every target natively; cross builds are for checking a target on this machine and for users
without a runner of their own.

=====================  ==========================================  ===========================
target                 compilers (Debian/Ubuntu packages)           runs target programs with
=====================  ==========================================  ===========================
linux-arm64            clang + gcc-aarch64-linux-gnu,               qemu-aarch64(-static) -L
                       g++-aarch64-linux-gnu (sysroot, libstdc++)   /usr/aarch64-linux-gnu
windows-x86_64         g++-mingw-w64-x86-64-posix                   wine64 / wine
=====================  ==========================================  ===========================
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from nexabind.errors import BuildError

__all__ = ["HOSTS", "TARGETS", "Cross", "resolve"]

#: The toolchain files (package data).
TOOLCHAINS = Path(__file__).with_name("toolchains")

#: The hosts cross builds run on (TARGETS, below: what they build).
HOSTS = (("linux", "x86_64"),)

_AARCH64_SYSROOT = Path("/usr/aarch64-linux-gnu")
_CLANGS = ("clang", *(f"clang-{v}" for v in range(19, 13, -1)))
_MINGW = "x86_64-w64-mingw32"


@dataclass(frozen=True)
class Cross:
    """How to build for, and run programs of, one cross target on this host.

    Attributes:
        os: Target os (``linux``, ``windows``).
        arch: Target arch (``arm64``, ``x86_64``).
        toolchain: The CMake toolchain file.
        cc: C compiler (passed to CMake and used for the ABI probe).
        cxx: C++ compiler.
        cc_args: Extra arguments to compile the probe for the target.
        runner: The command prefix that runs a target program on this host.
        env: Environment for ``runner`` (added to this process's).
        exe_suffix: ``.exe`` on Windows.
        cmake_flags: Extra CMake flags of the cross build.
        included: Other files of ``nexabind/toolchains`` the toolchain file pulls in.
    """

    os: str
    arch: str
    toolchain: Path
    cc: str
    cxx: str
    cc_args: tuple[str, ...]
    runner: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    exe_suffix: str = ""
    cmake_flags: tuple[str, ...] = ()
    included: tuple[str, ...] = ()

    def flags(self) -> list[str]:
        """The CMake arguments that select the toolchain and compilers."""
        return [
            f"-DCMAKE_TOOLCHAIN_FILE={self.toolchain}",
            f"-DCMAKE_C_COMPILER={self.cc}",
            f"-DCMAKE_CXX_COMPILER={self.cxx}",
            *self.cmake_flags,
        ]

    def fingerprint(self) -> str:
        """sha256 of this target's toolchain files, for the build cache key (not their path)."""
        digest = hashlib.sha256()
        for f in (self.toolchain, *(TOOLCHAINS / name for name in self.included)):
            digest.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
        return digest.hexdigest()[:16]


def _which(names: tuple[str, ...], *extra: Path) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return next((str(p) for p in extra if p.is_file() and os.access(p, os.X_OK)), None)


def _missing(what: str, packages: str) -> BuildError:
    return BuildError(f"{what}; install it (Debian/Ubuntu: apt-get install {packages})")


_Tools = tuple[str, str, tuple[str, ...], dict[str, str]]  # cc, cxx, runner, runner env


def _linux_arm64(build_cache: Path) -> _Tools:
    cc = _which(_CLANGS)
    if cc is None:
        raise _missing(
            "no clang on PATH (llama.cpp's armv9.2 CPU variants need clang, or GCC 14+)", "clang"
        )
    cxx = str(Path(cc).with_name(Path(cc).name.replace("clang", "clang++", 1)))
    if shutil.which(cxx) is None:
        raise _missing(f"{cc} has no clang++ next to it ({cxx})", "clang")
    gcc_cross = Path("/usr/lib/gcc-cross/aarch64-linux-gnu")
    if not (_AARCH64_SYSROOT / "lib" / "libc.so.6").is_file() or not gcc_cross.is_dir():
        raise _missing(
            f"no aarch64-linux-gnu sysroot ({_AARCH64_SYSROOT}, {gcc_cross})",
            "gcc-aarch64-linux-gnu g++-aarch64-linux-gnu",
        )
    qemu = _which(("qemu-aarch64-static", "qemu-aarch64"))
    if qemu is None:
        raise _missing("no qemu-aarch64 to run the arm64 ABI probe", "qemu-user-static")
    return cc, cxx, (qemu, "-L", str(_AARCH64_SYSROOT)), {}


def _windows_x86_64(build_cache: Path) -> _Tools:
    cc = _which((f"{_MINGW}-gcc-posix", f"{_MINGW}-gcc"))
    cxx = _which((f"{_MINGW}-g++-posix", f"{_MINGW}-g++"))
    if cc is None or cxx is None:
        raise _missing("no mingw-w64 cross compiler on PATH", "g++-mingw-w64-x86-64-posix")
    # Debian keeps wine64 out of PATH (the `wine` package adds the wrapper).
    wine = _which(("wine64", "wine"), Path("/usr/lib/wine/wine64"))
    if wine is None:
        raise _missing("no wine to run the Windows ABI probe", "wine64")
    env = {
        # A prefix of our own (created on first use, ~10 s), not the user's ~/.wine.
        "WINEPREFIX": os.environ.get("WINEPREFIX") or str(build_cache / "wine"),
        "WINEDEBUG": "-all",
        # No Mono or Gecko install prompt when the prefix is created.
        "WINEDLLOVERRIDES": "mscoree=;mshtml=",
    }
    return cc, cxx, (wine,), env


# target -> (tool finder, flags that compile the probe for it, executable suffix, the files
# of nexabind/toolchains its toolchain file includes)
_FINDERS = {
    ("linux", "arm64"): (_linux_arm64, ("--target=aarch64-linux-gnu",), "", ()),
    ("windows", "x86_64"): (_windows_x86_64, (), ".exe", ("windows-names.cmake", "mingw-compat.h")),
}
#: The targets that can be cross-built.
TARGETS = tuple(_FINDERS)


def resolve(target: tuple[str, str], host: tuple[str, str], build_cache: Path) -> Cross:
    """Find the tools to cross-build ``target`` on ``host``.

    Args:
        target: ``(os, arch)`` to build for, one of :data:`TARGETS`.
        host: ``(os, arch)`` of this process.
        build_cache: The build cache root (the wine prefix lives there).

    Returns:
        The :class:`Cross` description.

    Raises:
        BuildError: The target cannot be cross-built on this host, or a tool is missing (the
            message says which package to install).
    """
    if target not in TARGETS:
        names = ", ".join(f"{o}-{a}" for o, a in TARGETS)
        msg = f"{target[0]}-{target[1]} cannot be cross-built; cross targets are {names}"
        raise BuildError(msg)
    if host not in HOSTS:
        hosts = ", ".join(f"{o}-{a}" for o, a in HOSTS)
        msg = (
            f"cross builds run on {hosts}, not on {host[0]}-{host[1]}; build "
            f"{target[0]}-{target[1]} on such a machine, or natively on the target"
        )
        raise BuildError(msg)
    find, cc_args, exe_suffix, included = _FINDERS[target]
    cc, cxx, runner, env = find(build_cache)
    return Cross(
        os=target[0],
        arch=target[1],
        toolchain=TOOLCHAINS / f"{target[0]}-{target[1]}.cmake",
        cc=cc,
        cxx=cxx,
        cc_args=cc_args,
        runner=runner,
        env=env,
        exe_suffix=exe_suffix,
        included=included,
        # No OpenMP: clang has no aarch64 libomp here, and mingw's libgomp would need
        # libgomp-1.dll beside the DLLs; ggml's own thread pool needs no runtime library.
        cmake_flags=("-DGGML_OPENMP=OFF",),
    )
