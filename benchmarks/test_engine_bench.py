"""Engine against llama-server: aggregate decode tokens/s at 1, 2, 4 and 8 concurrent streams.

The same client load on both (benchmarks/serving.py): N greedy streams of N_GEN tokens each,
started together, distinct prompts, the end-of-generation tokens banned so every stream makes
exactly N_GEN tokens. nexabind's Engine runs in the worker process, its clients are threads
there; llama-server (built from the same commit, `nexabind build --with-server`) runs with the
same slots (-np 4), context, batch, threads and flash attention, its clients are threads
speaking its streaming /completion API. The two run in turns, round after round.

A second case is the time to first token of a request that arrives while three others decode
(a 78-token prompt that was seen before, as a chat's next turn is). Goals: at least 0.95x
llama-server's aggregate tokens/s at every concurrency, and a time to first token no worse.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import harness
import pytest

from nexabind import lowlevel
from nexabind._build import server_binary

SERVING = harness.HERE / "serving.py"
N_PARALLEL, N_CTX = 4, 4 * 1024
N_GEN = {"tiny": 256, "100mb": 96, "gemma": 32}
STREAMS = (1, 2, 4, 8)
PROMPT = "Story number {}: once upon a time, in a land far away, there lived"
PROBE = " ".join(["the quick brown fox jumps over the lazy dog"] * 7)


def _setup(bench: Any, name: str) -> tuple[Path, dict[str, Any]]:
    if name == "gemma":
        path, why = harness.gemma_path()
        if path is None:
            pytest.skip(why)
        model = path
    else:
        model = bench.models[name]
    server = server_binary()
    if server is None:
        pytest.fail("no llama-server in the build cache: run `nexabind build --with-server`")
    lowlevel.lib(bench.libdir)
    with lowlevel.Model(model, vocab_only=True) as m:
        ban = [t for t in range(m.n_vocab) if m.is_eog(t)]
        prompts = [m.tokenize(PROMPT.format(i), add_special=True) for i in range(max(STREAMS))]
        probe = m.tokenize(PROBE, add_special=True)
    cfg = {
        "model": str(model), "libdir": str(bench.libdir), "threads": harness.THREADS,
        "n_batch": harness.N_BATCH, "server": str(server), "n_parallel": N_PARALLEL,
        "n_ctx": N_CTX, "ban": ban, "prompts": prompts, "probe": probe,
    }  # fmt: skip
    return model, cfg


def _pair(bench: Any, cfg: dict[str, Any]) -> harness.Interleaved:
    workers = [
        bench.spawn(kind, [sys.executable, str(SERVING), kind, json.dumps(cfg)])
        for kind in ("llama-server", "engine")
    ]
    return harness.Interleaved(workers, warmup=1)


# The tiny model's steps are short: there Python's share of a step shows.
@pytest.mark.parametrize("model_name", ["tiny", "100mb", "gemma"])
def test_engine_throughput_by_concurrency(
    benchmark: Any, rows: Any, bench: Any, model_name: str
) -> None:
    _, base = _setup(bench, model_name)
    n_gen = N_GEN[model_name]
    runs: dict[int, harness.Interleaved] = {}

    def measure() -> None:
        for streams in STREAMS:
            cfg = {**base, "mode": "throughput", "streams": streams, "n_gen": n_gen}
            inter = runs[streams] = _pair(bench, cfg)
            for _ in range(harness.rounds(3)):
                inter.round()
            for w in inter.workers:
                w.close()

    benchmark.pedantic(measure, rounds=1, iterations=1)
    for streams, inter in runs.items():
        theirs, ours = inter.results["llama-server"], inter.results["engine"]
        for res in (theirs, ours):
            assert all(r["tokens"] == streams * n_gen for r in res), res
        case = f"{model_name}, {streams} stream(s) x {n_gen} tokens, -np {N_PARALLEL}"
        rows("engine", case, "llama-server", harness.median(theirs, "tok_per_s"), "tok/s",
             note=f"spread {harness.spread(theirs):.0%}")  # fmt: skip
        rows(
            "engine", case, "nexabind Engine", harness.median(ours, "tok_per_s"), "tok/s",
            baseline="llama-server", ratio=harness.ratio(theirs, ours), goal=0.95,
            note=f"CPU-time ratio {harness.ratio(theirs, ours, key='cpu_s'):.3f}; spread "
            f"{harness.spread(ours):.0%}",
        )  # fmt: skip


@pytest.mark.parametrize("model_name", ["100mb", "gemma"])
def test_engine_time_to_first_token_while_others_decode(
    benchmark: Any, rows: Any, bench: Any, model_name: str
) -> None:
    _, base = _setup(bench, model_name)
    inter = _pair(bench, {**base, "mode": "ttft", "busy": 3, "n_gen": 4000})
    benchmark.pedantic(inter.round, rounds=harness.rounds(5), iterations=1)
    theirs, ours = inter.results["llama-server"], inter.results["engine"]
    case = f"{model_name}, a {len(base['probe'])}-token prompt seen before, 3 streams decoding"
    rows("engine TTFT", case, "llama-server", harness.median(theirs) * 1000, "ms")
    rows(
        "engine TTFT", case, "nexabind Engine", harness.median(ours) * 1000, "ms",
        baseline="llama-server", ratio=harness.ratio(theirs, ours), goal=1.0,
        note=f"spread {harness.spread(ours):.0%}; ratio >= 1: no slower than llama-server",
    )  # fmt: skip
