"""Instructions per generated token, counted by valgrind: a ratio that noise cannot move.

On a shared machine two runs of the same C loop differ by 10-20% in wall time, which hides a
few percent of overhead. valgrind (cachegrind, no cache simulation) counts the instructions a
process executes; each contender runs once with N1 and once with N2 generated tokens, and
(I(N2) - I(N1)) / (N2 - N1) is its cost per token, start-up, model load and prompt cancelled
out; a third run with N3 tokens shows whether the cost per token grows with the output.
Instructions are not time (a stalled load costs more than an add), but the same decode
executes the same instructions in every contender, so the difference is the binding's work.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

import harness
import pytest

N1, N2, N3 = 20, 120, 520  # per-token cost over tokens N1-N2, and again over N2-N3
NAMES = {
    "native": "native C loop",
    "nexabind-generate": "nexabind generate",
    "nexabind-completion": "nexabind create_completion",
    "nexabind-stream": "nexabind create_completion(stream=True)",
    "lcpp-completion": "llama-cpp-python create_completion",
    "lcpp-stream": "llama-cpp-python create_completion(stream=True)",
}


def instructions(argv: list[str], env: dict[str, str]) -> int:
    """Instructions executed by ``argv`` answering one RUN, as cachegrind counts them."""
    cmd = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null"]
    proc = subprocess.run(
        cmd + argv, input="RUN\nQUIT\n", capture_output=True, text=True, env=env, timeout=1200
    )
    m = re.search(r"I\s+refs:\s+([\d,]+)", proc.stderr)
    if proc.returncode != 0 or m is None or '"n_gen"' not in proc.stdout:
        msg = f"valgrind run of {argv[:3]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        raise harness.WorkerError(msg)
    return int(m.group(1).replace(",", ""))


def test_instructions_per_token(benchmark: Any, rows: Any, bench: Any) -> None:
    if shutil.which("valgrind") is None:
        rows("per-token instructions", "tiny model", "all", 0, "-", note="valgrind not found")
        pytest.skip("valgrind not found: install it for the instruction counts")
    model = "tiny"
    prompt = bench.tokenize(harness.DECODE_PROMPT, model)
    kinds = list(NAMES)[1:4] + (list(NAMES)[4:] if bench.lcpp_missing is None else [])
    argvs = {}
    for n in (N1, N2, N3):
        argvs[("native", n)] = bench.native("generate", model, n, prompt)
        cfg = bench.cfg(model, prompt=prompt, n_gen=n)
        argvs.update({(k, n): bench.worker(k, cfg) for k in kinds})
    counts: dict[tuple[str, int], int] = {}

    def measure() -> None:
        # Counts do not depend on timing: run side by side on every core.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            futures = {key: pool.submit(instructions, a, bench.env) for key, a in argvs.items()}
            counts.update({key: f.result() for key, f in futures.items()})

    benchmark.pedantic(measure, rounds=1, iterations=1)

    def per_token(k: str, a: int, b: int) -> float:
        return (counts[(k, b)] - counts[(k, a)]) / (b - a)

    base, base_later = per_token("native", N1, N2), per_token("native", N2, N3)
    for k in ["native", *kinds]:
        v = per_token(k, N1, N2)
        later = per_token(k, N2, N3)
        # Attention over a longer KV cache costs more in every contender; the binding's own
        # cost is the difference to the C loop in each window.
        note = f"tokens {N2}-{N3}: {later / 1e3:,.0f} k"
        if k != "native":
            note = (
                f"{(v - base) / 1e3:+.1f} k instr/token vs C; tokens {N2}-{N3}: "
                f"{(later - base_later) / 1e3:+.1f} k vs C"
            )
        rows(
            "per-token instructions (valgrind)",
            f"tiny model, tokens {N1}-{N2}",
            NAMES[k],
            v / 1e3,
            "k instr/token",
            baseline=NAMES["native"] if k != "native" else None,
            ratio=base / v if k != "native" else None,
            note=note,
        )
