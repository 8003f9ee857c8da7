"""The harness itself: the native program builds and decodes what nexabind decodes, and
llama-cpp-python really runs on the library folder it is pointed at."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import harness
import pytest

N = 64


def test_native_program_matches_nexabind_greedy(bench: Any) -> None:
    from nexabind import Llama

    prompt = bench.tokenize(harness.DECODE_PROMPT, "tiny")
    native = bench.spawn("native", bench.native("generate", "tiny", N, prompt))
    first, second = native.run(), native.run()
    assert first["n_prompt"] == len(prompt)
    assert first["n_gen"] == N
    assert first["tokens"] == second["tokens"]  # the KV cache is cleared between runs
    assert 0 < first["decode_s"] < first["seconds"]
    with Llama(
        bench.models["tiny"],
        n_ctx=harness.N_CTX,
        n_batch=harness.N_BATCH,
        n_threads=harness.THREADS,
        lib_path=bench.libdir,
    ) as llm:
        ours = [t.id for t in llm.generate(prompt, max_tokens=N, temperature=0.0)]
    assert ours == first["tokens"]
    assert native.close()["peak_rss_kib"] > 0


def test_native_program_reports_a_bad_model(bench: Any) -> None:
    bad = bench.tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    bench.models = {**bench.models, "bad": bad}
    with pytest.raises(harness.WorkerError, match="cannot load"):
        bench.one_shot(bench.native("startup", "bad", 0))


def test_llama_cpp_python_runs_on_our_library(bench: Any) -> None:
    if bench.lcpp_missing is not None:
        pytest.skip(bench.lcpp_missing)
    prompt = bench.tokenize(harness.DECODE_PROMPT, "tiny")
    cfg = bench.cfg("tiny", prompt=prompt, n_gen=N)
    w = bench.spawn("lcpp-completion", bench.worker("lcpp-completion", cfg))
    assert {Path(p).parent for p in w.ready["libllama"]} == {bench.libdir.resolve()}
    native = bench.spawn("native", bench.native("generate", "tiny", N, prompt))
    expected = harness.text_of(native.run()["tokens"], bench.models["tiny"], bench.libdir)
    res = w.run()
    assert res["n_gen"] == N
    assert res["text"] == expected
