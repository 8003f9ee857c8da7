"""Prefill tokens/s: a 512-token prompt through nexabind, llama-cpp-python and the C program.

A round clears the KV cache, decodes the 512 prompt tokens in one batch and samples one token
(``max_tokens=1``), the same in every contender; rounds are interleaved.
"""

from __future__ import annotations

from typing import Any

import harness
import pytest

N_PROMPT = 512
ROUNDS = {"tiny": 15, "100mb": 5}
TEXT = (
    "The harbour master kept a ledger of every ship that came in: its name, its cargo, the "
    "weather on the day it arrived and the number of gulls that followed it. Over forty years "
    "the ledger grew into a history of the town, read by children and sailors alike. "
)
NAMES = {
    "native": "native C (llama_decode of the prompt)",
    "nexabind-completion": "nexabind create_completion(max_tokens=1)",
    "lcpp-completion": "llama-cpp-python create_completion(max_tokens=1)",
}


@pytest.mark.parametrize("model_name", ["tiny", "100mb"])
def test_prefill(benchmark: Any, rows: Any, bench: Any, model_name: str) -> None:
    prompt = bench.tokenize(TEXT * 40, model_name)[:N_PROMPT]
    assert len(prompt) == N_PROMPT
    cfg = bench.cfg(model_name, prompt=prompt, n_gen=1)
    workers = [bench.spawn("native", bench.native("generate", model_name, 1, prompt))]
    kinds = ["nexabind-completion"] + (["lcpp-completion"] if bench.lcpp_missing is None else [])
    workers += [bench.spawn(k, bench.worker(k, cfg)) for k in kinds]
    inter = harness.Interleaved(workers)
    benchmark.pedantic(inter.round, rounds=harness.rounds(ROUNDS[model_name]), iterations=1)
    results = inter.results

    native = results["native"][0]
    assert native["n_prompt"] == N_PROMPT
    first = harness.text_of(native["tokens"], bench.models[model_name], bench.libdir)
    for name, res in results.items():
        assert all(r["n_gen"] == 1 for r in res), name
        if name.startswith("nexabind"):
            assert res[0]["text"] == first, name
    for name, res in results.items():
        t = harness.median(res)
        rows(
            "prefill",
            f"{model_name} model, {N_PROMPT}-token prompt",
            NAMES[name],
            N_PROMPT / t,
            "tok/s",
            baseline=NAMES["native"],
            ratio=harness.ratio(results["native"], res),
            note=(
                f"{t * 1e3:.2f} ms; CPU-time ratio "
                f"{harness.ratio(results['native'], res, 'cpu_s'):.3f}; "
                f"spread {harness.spread(res):.0%}"
            ),
        )
    if bench.lcpp_missing is not None:
        rows("prefill", f"{model_name} model", "llama-cpp-python", 0, "-", note=bench.lcpp_missing)
