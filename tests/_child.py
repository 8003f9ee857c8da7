"""Run a snippet in a child Python process, where a crash cannot take the test run down (or a
call in a thread, where a hang cannot)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

GIB = 1 << 30


def run_child(
    code: str,
    *args: str | Path,
    memory: int | None = 4 * GIB,
    timeout: float = 300,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (dedented) with ``args`` in a fresh interpreter under a memory limit.

    A crash shows as a negative return code (the signal); the test asserts on it.
    """

    def limit() -> None:
        import resource

        if memory is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        preexec_fn=limit,
    )


def ok(r: subprocess.CompletedProcess[str]) -> str:
    """The child's stdout; fails with its stderr when it crashed or raised."""
    assert r.returncode == 0, f"child ended with {r.returncode}:\n{r.stderr[-3000:]}"
    return r.stdout


def in_thread(fn: Callable[[], T], limit: float = 60) -> T:
    """``fn()`` run in a daemon thread, where a hang cannot stop the test run: its result, or
    its exception; an AssertionError when it has not returned within ``limit`` seconds."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"{fn} still runs after {limit} s: it hangs"
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]
