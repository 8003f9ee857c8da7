"""Memory: peak RSS of a process generating 1,000 tokens; RSS after 1,000 load/free cycles."""

from __future__ import annotations

from typing import Any

import harness
import pytest

N_CYCLES = 1000
NATIVE = "native C loop"


@pytest.mark.parametrize("model_name", ["tiny", "100mb"])
def test_peak_rss_generating(benchmark: Any, rows: Any, bench: Any, model_name: str) -> None:
    """A fresh process per contender: load, generate 1,000 greedy tokens once, report ru_maxrss."""
    n = harness.N_GEN
    prompt = bench.tokenize(harness.DECODE_PROMPT, model_name)
    cfg = bench.cfg(model_name, prompt=prompt, n_gen=n)
    argvs = {
        NATIVE: bench.native("generate", model_name, n, prompt),
        "nexabind create_completion": bench.worker("nexabind-completion", cfg),
    }
    if bench.lcpp_missing is None:
        argvs["llama-cpp-python create_completion"] = bench.worker("lcpp-completion", cfg)
    peaks: dict[str, int] = {}

    def measure() -> None:
        for name, argv in argvs.items():
            w = bench.spawn(name, argv)
            assert w.run()["n_gen"] == n
            peaks[name] = w.close()["peak_rss_kib"]

    benchmark.pedantic(measure, rounds=1, iterations=1)
    base = peaks[NATIVE]
    for name, kib in peaks.items():
        other = name != NATIVE
        rows(
            "memory",
            f"peak RSS, {model_name} model, {n} tokens",
            name,
            kib / 1024,
            "MiB",
            baseline=NATIVE if other else None,
            ratio=base / kib if other else None,
            note=f"{(kib - base) / 1024:+.1f} MiB vs C" if other else "",
        )


def test_rss_after_load_free_cycles(benchmark: Any, rows: Any, bench: Any) -> None:
    """Load and free the tiny model and a context 1,000 times; RSS after 10 and after 1,000."""
    cfg = bench.cfg("tiny", cycles=N_CYCLES)
    argvs = {
        "native C": bench.native("cycles", "tiny", N_CYCLES),
        "nexabind Llama(...).close()": bench.worker("cycles-nexabind", cfg),
    }
    if bench.lcpp_missing is None:
        argvs["llama-cpp-python Llama(...).close()"] = bench.worker("cycles-lcpp", cfg)
    out: dict[str, dict[str, Any]] = {}

    def measure() -> None:
        # RSS does not depend on timing: the contenders run side by side.
        out.update(harness.one_shot_all(argvs, bench.env))

    benchmark.pedantic(measure, rounds=1, iterations=1)
    for name, res in out.items():
        growth = (res["rss_kib"] - res["rss_after_10_kib"]) / 1024
        rows(
            "memory",
            f"RSS after {N_CYCLES} load/free cycles (tiny model)",
            name,
            res["rss_kib"] / 1024,
            "MiB",
            note=f"{growth:+.1f} MiB from cycle 10 to cycle {N_CYCLES}",
        )
