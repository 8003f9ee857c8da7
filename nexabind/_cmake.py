"""CMake and the C compiler: finding them, and configuring and building llama.cpp with them,
the output appended to a log and ninja's progress shown as a bar on a terminal, or as a log
line at each tenth of the steps elsewhere."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
from collections import deque
from pathlib import Path

from nexabind.errors import BuildError

log = logging.getLogger("nexabind.build")

__all__ = ["cmake_build", "compiler_version", "require_tools", "run_logged"]

_PROGRESS = r"^\[(\d+)/(\d+)\]"  # ninja's [done/total]
# Ninja targets named like files (a .dll, an import library) rather than modules.
_FILE_TARGETS = (".so", ".dylib", ".dll", ".lib", ".a")


def require_tools() -> tuple[str, str, str | None]:
    """CMake, the C compiler and ninja (None when absent).

    Raises:
        BuildError: CMake or a C compiler is missing (the message says how to install one).
    """
    cmake = shutil.which("cmake")
    if cmake is None:
        msg = "cmake not found on PATH; install it (pip install cmake, or apt/brew install cmake)"
        raise BuildError(msg)
    cc = os.environ.get("CC") or next(
        (c for c in ("cc", "gcc", "clang", "cl") if shutil.which(c)), None
    )
    if cc is None or shutil.which(cc) is None:
        msg = (
            "no C compiler found (looked for $CC, cc, gcc, clang, cl); install one "
            "(apt install build-essential, xcode-select --install, or Visual Studio Build Tools)"
        )
        raise BuildError(msg)
    return cmake, cc, shutil.which("ninja")


def compiler_version(cc: str) -> str:
    """The first line of the compiler's ``--version`` (its name when it does not say)."""
    args = [cc] if Path(cc).stem.lower() == "cl" else [cc, "--version"]
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return cc
    out = (r.stdout or r.stderr).strip().splitlines()
    return out[0] if out else cc


def _log_progress(
    label: str, line: str, done: int, total: int, last: tuple[int, float, float]
) -> tuple[int, float, float]:
    """Without a terminal for a bar: a log line at each tenth of the steps or every 30 s, with
    what is being built and the time left estimated from the steps done so far.

    ``last``: (tenth last logged, monotonic time of the start, of the last line).
    """
    tenth, start, logged = last
    now = time.monotonic()
    if done * 10 // max(total, 1) <= tenth and now - logged < 30:
        return last
    m = re.search(r"CMakeFiles/([\w.+-]+?)\.dir/", line)
    what = f" building {m.group(1)}," if m else ""
    elapsed = now - start
    left = elapsed / done * (total - done) if done else 0.0
    log.info("%s: [%d/%d]%s %dm%02ds so far, about %dm%02ds left", label, done, total, what,
             elapsed // 60, elapsed % 60, left // 60, left % 60)  # fmt: skip
    return done * 10 // max(total, 1), start, now


def run_logged(cmd: list[str], log: Path, *, label: str, progress: bool) -> None:
    """Run ``cmd`` appending to ``log``, drive a bar from ninja's ``[n/N]``, raise on failure."""
    tail: deque[str] = deque(maxlen=40)
    bar = None
    last = (-1, time.monotonic(), time.monotonic())  # for _log_progress
    with log.open("a", encoding="utf-8") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                f.write(line)
                tail.append(line.rstrip("\n"))
                m = re.match(_PROGRESS, line)
                if m and not progress:
                    last = _log_progress(label, line, int(m.group(1)), int(m.group(2)), last)
                if m and progress:
                    if bar is None:
                        from tqdm import tqdm

                        bar = tqdm(total=int(m.group(2)), desc=label, unit="step", leave=False)
                    bar.total = int(m.group(2))
                    bar.n = int(m.group(1))
                    bar.refresh()
        finally:
            code = proc.wait()
            if bar is not None:
                bar.close()
    if code != 0:
        msg = (
            f"{label} failed (exit code {code}); last lines of the log:\n"
            + "\n".join(tail)
            + f"\nFull log: {log}"
        )
        raise BuildError(msg)


def cmake_build(
    cmake: str,
    ninja: str | None,
    src: Path,
    cdir: Path,
    flags: list[str],
    log_path: Path,
    *,
    jobs: int | None,
    progress: bool,
    build_targets: list[str] | None = None,
) -> None:
    """Configure llama.cpp with CMake (Ninja when there) and build it, appending to ``log_path``.

    ``build_targets``: what to build (None: the library and its ggml backend modules).
    """
    gen = ["-G", "Ninja"] if ninja else []
    configure = [cmake, "-S", str(src), "-B", str(cdir), *gen, *flags]
    run_logged(configure, log_path, label="cmake configure", progress=False)
    cmd = [cmake, "--build", str(cdir), "--config", "Release"]
    if build_targets is None:
        build_targets = _library_targets(cmake, cdir, bool(ninja))
    if build_targets:
        cmd += ["--target", *build_targets]
    if jobs:
        cmd += ["--parallel", str(jobs)]
    run_logged(cmd, log_path, label="cmake build", progress=progress)


def _library_targets(cmake: str, bdir: Path, have_ninja: bool) -> list[str]:
    """``llama`` plus the ggml backend modules (not the feature-probe helpers)."""
    if not have_ninja:
        return []
    r = subprocess.run(["ninja", "-C", str(bdir), "-t", "targets", "all"],
                       capture_output=True, text=True)  # fmt: skip
    names = {line.split(":")[0] for line in r.stdout.splitlines()}
    # Module names hold dots and underscores (ggml-cpu-armv8.2_1); file targets (foo.dll) are
    # left out.
    backends = sorted(
        n for n in names
        if re.fullmatch(r"ggml-[a-z0-9._-]+", n) and not n.endswith(("-feats", *_FILE_TARGETS))
    )  # fmt: skip
    return ["llama", *backends] if "llama" in names else []
