"""Per-token cost in Python: bytes allocated and kept per token, and where the time goes.

The time outside llama_decode is in the decode table (us/token against the C loop); this suite
measures memory with tracemalloc and writes a cProfile of ``Llama.generate`` to
benchmarks/results/profile-<model>.txt.
"""

from __future__ import annotations

from typing import Any

import harness
import pytest
from conftest import RESULTS

N_WARM = 100  # tokens generated before measuring: caches, free lists and the decoder settle


@pytest.mark.parametrize("model_name", ["tiny"])
def test_bytes_per_token(benchmark: Any, rows: Any, bench: Any, model_name: str) -> None:
    prompt = bench.tokenize(harness.DECODE_PROMPT, model_name)
    cfg = bench.cfg(model_name, prompt=prompt, n_gen=harness.N_GEN, warm=N_WARM)
    out: dict[str, Any] = {}

    def measure() -> None:
        out.update(bench.one_shot(bench.worker("pertoken", cfg)))

    benchmark.pedantic(measure, rounds=1, iterations=1)
    assert out["n_measured"] == harness.N_GEN - N_WARM
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"profile-{model_name}.txt").write_text(out["profile"])
    benchmark.extra_info["top_growth"] = out["top_growth"]
    where = "; ".join(
        f"{g['where'].split('/')[-1]} {g['size_diff']:+d} B" for g in out["top_growth"][:3]
    )
    kept = out["kept_bytes_per_token"]
    case = f"Llama.generate, tokens {N_WARM}-{harness.N_GEN}, {model_name} model"
    rows(
        "per-token cost in Python",
        case,
        "bytes kept per token (tracemalloc)",
        kept,
        "B/token",
        # Anything kept per token is at least one Python object (>= 16 B) per token; what
        # is left below 1 B/token is a fixed few hundred bytes over the whole window.
        note=(
            f"goal 0 per token: {'met' if kept < 1 else 'missed'} "
            f"({out['kept_bytes']:+d} B in all over {out['n_window']} tokens)"
            + (f"; {where}" if where else "")
        ),
    )
    rows(
        "per-token cost in Python",
        f"Llama.generate, {out['split_n']} tokens, {model_name} model",
        "time outside llama_decode and sampling",
        out["us_outside"],
        "us/token",
        note=(
            f"{out['us_outside'] / out['us_per_token']:.2%} of {out['us_per_token']:.0f} "
            f"us/token; llama_decode {out['us_in_decode']:.0f} us, sampling "
            f"{out['us_in_sample']:.1f} us (timed around the loop's steps)"
        ),
    )
    rows(
        "per-token cost in Python",
        case,
        "peak growth over the loop (tracemalloc)",
        out["peak_growth_bytes"],
        "B",
        note="temporaries of one token, and list growth",
    )
