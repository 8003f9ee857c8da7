"""Embeddings/s: a batch of texts through nexabind's embed and llama-cpp-python's embed."""

from __future__ import annotations

from typing import Any

import harness

N_TEXTS = 64
WORDS = [
    "river", "stone", "lantern", "orchard", "harbour", "meadow", "copper", "violin",
    "thunder", "quiet", "ledger", "sparrow", "glacier", "window", "market", "candle",
]  # fmt: skip


def texts() -> list[str]:
    """Texts of 4 to 35 words, deterministic."""
    return [
        " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(4 + i % 32)) for i in range(N_TEXTS)
    ]


def test_embed(benchmark: Any, rows: Any, bench: Any) -> None:
    cfg = bench.cfg("embed", texts=texts())
    workers = [bench.spawn("nexabind-embed", bench.worker("nexabind-embed", cfg))]
    lcpp_note = bench.lcpp_missing
    if lcpp_note is None:
        try:
            w = bench.spawn("lcpp-embed", bench.worker("lcpp-embed", cfg))
            w.run()
            workers.append(w)
        except harness.WorkerError as e:
            lcpp_note = f"llama-cpp-python embed failed: {str(e).strip().splitlines()[-1]}"
    inter = harness.Interleaved(workers)
    benchmark.pedantic(inter.round, rounds=harness.rounds(10), iterations=1)
    results = inter.results

    for res in results.values():
        assert {r["n"] for r in res} == {N_TEXTS}
    ours = harness.median(results["nexabind-embed"])
    case = f"{N_TEXTS} texts of 4-35 words, mean pooling"
    note = f"spread {harness.spread(results['nexabind-embed']):.0%}"
    if "lcpp-embed" not in results:
        rows("embeddings", case, "nexabind embed", N_TEXTS / ours, "texts/s", note=lcpp_note)
        return
    theirs = harness.median(results["lcpp-embed"])
    rows(
        "embeddings",
        case,
        "llama-cpp-python embed",
        N_TEXTS / theirs,
        "texts/s",
        note=f"spread {harness.spread(results['lcpp-embed']):.0%}",
    )
    rows(
        "embeddings",
        case,
        "nexabind embed",
        N_TEXTS / ours,
        "texts/s",
        baseline="llama-cpp-python embed",
        ratio=harness.ratio(results["lcpp-embed"], results["nexabind-embed"]),
        note=note,
    )
