"""`nexabind serve` under load against llama-server, in the same run, on loopback.

64 clients each send 8 streamed chat requests (/v1/chat/completions) one after another, to
`nexabind serve` (the gateway and the in-process Engine) and to llama-server built from the
same commit (`nexabind build --with-server`) with the same slots, context and threads and no
gateway in front. The two run in turns, round after round. Goals: at least 0.9x llama-server's
aggregate tokens/s, a p99 time to first token at most 1.2x its, no error (the gateway's queue
holds every waiting client, so no 429 is intended here). A second case sends 10,000 short
requests through the gateway and reads its RSS every 1,000: it must stay flat.
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
CLIENTS, REQUESTS, N_PARALLEL, N_CTX = 64, 8, 4, 4096
N_GEN = {"tiny": 64, "100mb": 32, "gemma": 16}


def _eog(model: Path, libdir: Path) -> list[int]:
    lowlevel.lib(libdir)
    with lowlevel.Model(model, vocab_only=True) as m:
        return [t for t in range(m.n_vocab) if m.is_eog(t)]


def _spawn(bench: Any, kind: str, cfg: dict[str, Any]) -> harness.Worker:
    return bench.spawn(kind, [sys.executable, str(SERVING), kind, json.dumps(cfg)])


def _model(bench: Any, name: str) -> Path:
    if name != "gemma":
        return bench.models[name]  # type: ignore[no-any-return]
    path, why = harness.gemma_path()
    if path is None:
        pytest.skip(why)
    return path


def _server() -> str:
    found = server_binary()
    if found is None:
        pytest.fail("no llama-server in the build cache: run `nexabind build --with-server`")
    return str(found)


@pytest.mark.parametrize("model_name", ["tiny", "100mb", "gemma"])
def test_serve_load(benchmark: Any, rows: Any, bench: Any, model_name: str) -> None:
    model = _model(bench, model_name)
    cfg = {
        "model": str(model), "libdir": str(bench.libdir), "threads": harness.THREADS,
        "n_batch": harness.N_BATCH, "server": _server(), "n_parallel": N_PARALLEL,
        "n_ctx": N_CTX, "ban": _eog(model, bench.libdir), "chat_template": "chatml",
        "mode": "load", "clients": CLIENTS, "requests": REQUESTS, "n_gen": N_GEN[model_name],
    }  # fmt: skip
    workers = [_spawn(bench, "llama-server", cfg), _spawn(bench, "gateway", cfg)]
    inter = harness.Interleaved(workers, warmup=0)
    benchmark.pedantic(inter.round, rounds=max(1, round(2 * harness.ROUNDS_SCALE)), iterations=1)
    theirs, ours = inter.results["llama-server"], inter.results["gateway"]
    want = CLIENTS * REQUESTS * N_GEN[model_name]
    for side, res in (("llama-server", theirs), ("nexabind serve", ours)):
        for r in res:
            assert r["errors"] == {}, (side, r["errors"])
            assert r["tokens"] == want, (side, r["tokens"], want)
    case = (
        f"{model_name}, {CLIENTS} clients x {REQUESTS} streamed chats of {N_GEN[model_name]} "
        f"tokens, -np {N_PARALLEL}"
    )
    # Both produce the same tokens, so llama-server's time over ours is our tok/s over its.
    ratio = harness.ratio(theirs, ours, key="seconds")
    note = (
        f"{len(ours)} round(s); CPU-time ratio {harness.ratio(theirs, ours, key='cpu_s'):.3f}; "
        f"RSS {ours[-1]['rss_kib'] // 1024} MiB vs {theirs[-1]['rss_kib'] // 1024} MiB; 0 errors"
    )
    rows("serving", case, "llama-server (no gateway)", harness.median(theirs, "tok_per_s"),
         "tok/s", note=f"spread {harness.spread(theirs):.0%}")  # fmt: skip
    rows("serving", case, "nexabind serve", harness.median(ours, "tok_per_s"), "tok/s",
         baseline="llama-server (no gateway)", ratio=ratio, goal=0.9, note=note)  # fmt: skip
    for q in ("p50", "p99"):
        key = f"ttft_{q}"
        rows("serving", case, f"llama-server TTFT {q}", harness.median(theirs, key) * 1000, "ms")
        rows(
            "serving", case, f"nexabind serve TTFT {q}", harness.median(ours, key) * 1000, "ms",
            baseline=f"llama-server TTFT {q}", ratio=harness.ratio(theirs, ours, key=key),
            goal=1 / 1.2 if q == "p99" else None,
            note="ratio >= 0.833: at most 1.2x llama-server's" if q == "p99" else "",
        )  # fmt: skip


def test_serve_rss_is_flat_over_10000_requests(benchmark: Any, rows: Any, bench: Any) -> None:
    model = bench.models["tiny"]
    cfg = bench.cfg(
        "tiny", n_parallel=N_PARALLEL, n_ctx=N_CTX, ban=_eog(model, bench.libdir), mode="rss",
        total=10_000, clients=8, every=1000, n_gen=4,
    )  # fmt: skip
    w = _spawn(bench, "gateway", cfg)
    res = benchmark.pedantic(w.run, rounds=1, iterations=1)
    assert res["requests"] == 10_000 and res["errors"] == 0
    samples = res["samples"]
    after_warmup = samples[1][1]
    growth = samples[-1][1] - after_warmup
    rows(
        "serving", "tiny model, 10,000 streamed chats of 4 tokens from 8 clients",
        "nexabind serve RSS growth, requests 1,000-10,000", growth / 1024, "MiB",
        note="RSS (MiB) every 1,000: " + ", ".join(str(kib // 1024) for _, kib in samples)
        + f"; {res['seconds']:.0f} s",
    )  # fmt: skip
    assert growth < 16 * 1024, samples  # flat: no per-request leak (16 MiB over 9,000)
