"""build_scripts/greedy.c, the correctness oracle: a small C program that loads an artifact's
libraries the way the loader does and decodes greedily (compiled here, or for a cross target)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GREEDY = ROOT / "build_scripts" / "greedy.c"
PROMPT = "Once upon a time, in a small village by the sea,"
N_TOKENS = 24


def greedy_exe(tools: Any, src: Path, dest: Path) -> list[str]:
    """Compile greedy.c for the target (``tools``: a ``_cross.Cross``; None: this host);
    return how to run it."""
    exe = dest / ("greedy" + (tools.exe_suffix if tools else ""))
    if not exe.exists():
        incs = [f"-I{src / 'include'}", f"-I{src / 'ggml' / 'include'}"]
        cc = [tools.cc, *tools.cc_args] if tools else ["cc"]
        libs = ["-lpsapi"] if tools and tools.os == "windows" else ["-ldl"]
        subprocess.run([*cc, "-O2", *incs, str(GREEDY), "-o", str(exe), *libs], check=True)
    return [*(tools.runner if tools else ()), str(exe)]


def run_greedy(
    cmd: list[str],
    libdir: Path,
    model: Path,
    env: dict[str, str],
    n_tokens: int = N_TOKENS,
    prompt: str = PROMPT,
) -> dict[str, Any]:
    """Run greedy.c; its JSON report (prompt tokens, generated tokens, CPU variant, ...)."""
    r = subprocess.run(
        [*cmd, str(libdir), str(model), str(n_tokens), prompt],
        capture_output=True, text=True, env={**os.environ, **env}, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    report: dict[str, Any] = json.loads(r.stdout)
    return report
