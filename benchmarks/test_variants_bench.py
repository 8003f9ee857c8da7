"""CPU variants side by side: prompt processing (512 tokens) and decode of quantized models.

ggml's pick for this CPU against the best variant without its newest extension: on an AMX Xeon,
``sapphirerapids`` (AMX tiles) against the best variant without AMX; elsewhere the pick against
``haswell`` (AVX2), so the row still says what the wider kernels are worth. Each contender is a
nexabind worker with ``NEXABIND_CPU_VARIANT`` set, on the same library folder; rounds are
interleaved.
"""

from __future__ import annotations

from typing import Any

import harness
import pytest

from nexabind import _variants

N_PROMPT = 512
N_GEN = 64
TEXT = (
    "The harbour master kept a ledger of every ship that came in: its name, its cargo, the "
    "weather on the day it arrived and the number of gulls that followed it. "
)


def _contenders(bench: Any) -> tuple[list[str], str]:
    ranked = [v for v, s in _variants.scores(bench.libdir).items() if s > 0]
    pick = ranked[0]
    if pick == "sapphirerapids":
        other = next(v for v in ranked if v != "sapphirerapids")
        return [pick, other], f"AMX ({pick}) against the best variant without AMX ({other})"
    other = "haswell" if "haswell" in ranked and pick != "haswell" else ranked[-1]
    why = f"no AMX on this CPU: ggml's pick ({pick}) against {other}"
    return [pick, other], why


@pytest.mark.parametrize("model_name", ["100mb-q8_0", "100mb-q4_0"])
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_variants(benchmark: Any, rows: Any, bench: Any, model_name: str, phase: str) -> None:
    variants, why = _contenders(bench)
    prompt = bench.tokenize(TEXT * 30, model_name)[:N_PROMPT]
    n_gen = 1 if phase == "prefill" else N_GEN
    cfg = bench.cfg(model_name, prompt=prompt if phase == "prefill" else prompt[:16], n_gen=n_gen)
    kind = "nexabind-completion" if phase == "prefill" else "nexabind-generate"
    workers = []
    for v in variants:
        w = harness.Worker(v, bench.worker(kind, cfg), {**bench.env, "NEXABIND_CPU_VARIANT": v})
        bench.started.append(w)
        workers.append(w)
    inter = harness.Interleaved(workers)
    benchmark.pedantic(inter.round, rounds=harness.rounds(5), iterations=1)
    results = inter.results
    n = N_PROMPT if phase == "prefill" else N_GEN
    what = f"{N_PROMPT}-token prompt" if phase == "prefill" else f"{N_GEN} greedy tokens"
    for v in variants:
        t = harness.median(results[v])
        rows(
            "CPU variants",
            f"{model_name} model, {what}",
            f"CPU variant {v}",
            n / t,
            "tok/s",
            baseline=f"CPU variant {variants[1]}",
            ratio=harness.ratio(results[variants[1]], results[v]),
            note=f"{why}; spread {harness.spread(results[v]):.0%}",
        )
