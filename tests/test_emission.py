"""One emission path: ``Llama``, the ``Engine`` and ``nexabind serve`` (streamed and not) give
byte-identical text for the same tokens, on outputs whose characters are split across byte
tokens and whose bytes are not always UTF-8.

The tiny model's SPM vocabulary falls back to one token per byte for characters it does not
hold (``𝔘`` is four byte tokens). Its greedy output after ``"Hello the"`` holds an invalid
sequence (a lead byte followed by a whole character); a logit bias forces one on any model; a
JSON schema forces valid characters split across byte tokens. Every path must read each as the
whole output decoded with ``errors="replace"`` reads, an unfinished character at the end left
out (tests/test_emit.py checks the emitter alone).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from _serve import Served, events

from nexabind import Engine, Llama
from nexabind._emit import text_of

N_CTX = 512  # the same context for all three: the same greedy tokens
SPLIT = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"const": "𝔘ż €"}}}


def _byte_token(llm: Llama, byte: int) -> int:
    return next(t for t in range(3, 300) if llm.detokenize([t]) == bytes([byte]))


@pytest.fixture(scope="module")
def paths(libdir: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with (
        Llama(tiny_model, n_ctx=N_CTX, n_threads=1, lib_path=libdir, verbose=False) as llm,
        Engine(tiny_model, n_parallel=1, n_ctx=N_CTX, n_threads=1, lib_path=libdir) as eng,
        Served(tiny_model, "-np", "1", "-c", str(N_CTX), log=log) as served,
    ):
        yield llm, eng, served


def _cases(llm: Llama) -> dict[str, dict[str, Any]]:
    lead = _byte_token(llm, 0xC5)  # the first byte of "ż", alone
    return {
        "greedy byte fallback": {"prompt": "Hello the", "max_tokens": 32},
        "forced lead bytes": {"prompt": "Hi", "max_tokens": 5, "logit_bias": {lead: 100.0}},
        "split characters": {"prompt": "Hi", "max_tokens": 24, "response_format": SPLIT},
    }


@pytest.mark.parametrize("case", ["greedy byte fallback", "forced lead bytes", "split characters"])
def test_llama_engine_and_serve_give_the_same_text(paths: Any, case: str) -> None:
    llm, eng, served = paths
    opts = {**_cases(llm)[case], "temperature": 0}

    # Llama: its tokens, and the text of create_completion, streamed and not
    llama_opts = dict(opts)
    fmt = llama_opts.pop("response_format", None)
    if fmt is not None:
        from nexabind.grammar import response_format_grammar

        llama_opts["grammar"] = response_format_grammar(fmt)
    prompt, rest = llama_opts.pop("prompt"), llama_opts
    toks = list(llm.generate(prompt, **rest))
    ids = [int(t) for t in toks]
    data = b"".join(llm.detokenize([t]) for t in ids)
    # one policy: invalid sequences replaced, an unfinished character at the end left out
    expected = text_of(data)
    assert "".join(t.text for t in toks) == expected
    assert llm(prompt, **rest)["choices"][0]["text"] == expected
    chunks = llm(prompt, stream=True, **rest)
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected

    # what the case is about
    if case == "split characters":
        assert json.loads(expected) == "𝔘ż €"
        pieces = [llm.detokenize([t]) for t in ids]
        assert sum(len(p) == 1 and p[0] >= 0x80 for p in pieces) >= 4  # 𝔘 at least
    else:
        assert "\ufffd" in expected, expected
        assert "\ufffd" not in data.decode("utf-8", "ignore")

    # the Engine: the same tokens, the same text (its tokens, its result and its OpenAI shape)
    tid = eng.create_task(**opts)
    r = eng.result(tid, timeout=120)
    assert [(int(t), t.text) for t in r["tokens"]] == [(int(t), t.text) for t in toks]
    assert r["text"] == expected
    assert eng.completion(eng.create_task(**opts))["choices"][0]["text"] == expected

    # nexabind serve, not streamed and streamed
    body = {k: v for k, v in opts.items() if k != "logit_bias"}
    if "logit_bias" in opts:
        body["logit_bias"] = {str(k): v for k, v in opts["logit_bias"].items()}
    status, _, got = served.post("/v1/completions", body)
    assert status == 200, got
    assert got["choices"][0]["text"] == expected
    conn, resp = served.open_stream("/v1/completions", body)
    try:
        assert resp.status == 200
        streamed = [e for e in events(resp) if e != "[DONE]"]
    finally:
        conn.close()
    assert "".join(e["choices"][0]["text"] for e in streamed) == expected
