"""Result shapes field by field against llama-cpp-python's documented ones.

Expected shapes written down from llama-cpp-python's README ("High-level API" example output of
``llm(...)``) and its API reference types (CreateCompletionResponse, CreateChatCompletionResponse,
CreateChatCompletionStreamResponse, CreateEmbeddingResponse), which follow OpenAI's API.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nexabind import Llama

COMPLETION = {
    "id": str,
    "object": "text_completion",
    "created": int,
    "model": str,
    "choices": [{"text": str, "index": int, "logprobs": (dict, type(None)), "finish_reason": str}],
    "usage": {"prompt_tokens": int, "completion_tokens": int, "total_tokens": int},
}
COMPLETION_CHUNK = {
    "id": str,
    "object": "text_completion",
    "created": int,
    "model": str,
    "choices": [
        {
            "text": str,
            "index": int,
            "logprobs": (dict, type(None)),
            "finish_reason": (str, type(None)),
        }
    ],
}
CHAT = {
    "id": str,
    "object": "chat.completion",
    "created": int,
    "model": str,
    "choices": [
        {
            "index": int,
            "message": {"role": "assistant", "content": str},
            "logprobs": (dict, type(None)),
            "finish_reason": str,
        }
    ],
    "usage": {"prompt_tokens": int, "completion_tokens": int, "total_tokens": int},
}
CHAT_CHUNK_KEYS = {"id", "object", "created", "model", "choices"}
CHAT_CHUNK_CHOICE_KEYS = {"index", "delta", "logprobs", "finish_reason"}
LOGPROBS_KEYS = {"tokens", "text_offset", "token_logprobs", "top_logprobs"}
EMBEDDING = {
    "object": "list",
    "data": [{"object": "embedding", "embedding": list, "index": int}],
    "model": str,
    "usage": {"prompt_tokens": int, "total_tokens": int},
}


def check(value, shape, where="result"):
    if isinstance(shape, dict):
        assert isinstance(value, dict), where
        assert set(value) == set(shape), f"{where}: keys {sorted(value)} != {sorted(shape)}"
        for k, sub in shape.items():
            check(value[k], sub, f"{where}.{k}")
    elif isinstance(shape, list):
        assert isinstance(value, list) and value, where
        for i, v in enumerate(value):
            check(v, shape[0], f"{where}[{i}]")
    elif isinstance(shape, (type, tuple)):
        assert isinstance(value, shape), f"{where}: {type(value)} is not {shape}"
    else:
        assert value == shape, f"{where}: {value!r} != {shape!r}"


@pytest.fixture
def llm(libdir: Path, tiny_model: Path):
    with Llama(tiny_model, n_ctx=256, n_threads=1, lib_path=libdir) as m:
        yield m


def test_completion_shape(llm: Llama) -> None:
    res = llm("Hello", max_tokens=4, temperature=0)
    check(res, COMPLETION)
    assert res["id"].startswith("cmpl-")
    assert res["choices"][0]["logprobs"] is None
    u = res["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert u["completion_tokens"] == 4
    assert res["choices"][0]["finish_reason"] == "length"


def test_completion_logprobs_shape(llm: Llama) -> None:
    res = llm("Hello", max_tokens=3, temperature=0, logprobs=1)
    lp = res["choices"][0]["logprobs"]
    assert set(lp) == LOGPROBS_KEYS
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == 3
    assert "".join(lp["tokens"]) == res["choices"][0]["text"]


def test_completion_stream_shape(llm: Llama) -> None:
    chunks = list(llm("Hello", max_tokens=4, temperature=0, stream=True))
    for c in chunks:
        check(c, COMPLETION_CHUNK)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_shape(llm: Llama) -> None:
    res = llm.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=4)
    check(res, CHAT)
    assert res["id"].startswith("chatcmpl-")


def test_chat_stream_shape(llm: Llama) -> None:
    chunks = list(
        llm.create_chat_completion(
            [{"role": "user", "content": "Hi"}], max_tokens=4, stream=True, temperature=0
        )
    )
    for c in chunks:
        assert set(c) == CHAT_CHUNK_KEYS
        assert c["object"] == "chat.completion.chunk"
        assert set(c["choices"][0]) == CHAT_CHUNK_CHOICE_KEYS
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert all(set(c["choices"][0]["delta"]) == {"content"} for c in chunks[1:-1])
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    full = llm.create_chat_completion(
        [{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
    )
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == full["choices"][0]["message"]["content"]


def test_embedding_shape(libdir: Path, embed_model: Path) -> None:
    with Llama(embed_model, embedding=True, n_ctx=128, lib_path=libdir) as m:
        res = m.create_embedding(["Hello", "world"])
        check(res, EMBEDDING)
        assert [d["index"] for d in res["data"]] == [0, 1]
        assert len(res["data"][0]["embedding"]) == m.n_embd()
        assert all(isinstance(x, float) for x in res["data"][0]["embedding"])


def test_completion_top_logprobs_shape(llm: Llama) -> None:
    # OpenAI's documented `logprobs`: the N most likely tokens per position, plus the chosen
    # token, so up to N + 1 entries of text -> log-probability.
    res = llm("Hello", max_tokens=4, temperature=0, logprobs=2, suffix="!")
    lp = res["choices"][0]["logprobs"]
    assert set(lp) == LOGPROBS_KEYS
    assert len(lp["top_logprobs"]) == 4
    for top, chosen in zip(lp["top_logprobs"], lp["token_logprobs"], strict=True):
        assert 1 <= len(top) <= 3
        assert all(isinstance(k, str) and isinstance(v, float) and v <= 0 for k, v in top.items())
        assert max(top.values()) >= chosen
    assert res["choices"][0]["text"].endswith("!")
    for c in llm("Hello", max_tokens=4, temperature=0, logprobs=2, stream=True):
        check(c, COMPLETION_CHUNK)


CHAT_LOGPROB = {"token": str, "logprob": float, "bytes": list}


def test_chat_logprobs_shape(llm: Llama) -> None:
    # OpenAI's chat `logprobs`: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}.
    msgs = [{"role": "user", "content": "Hi"}]
    res = llm.create_chat_completion(
        msgs, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    check(res, CHAT)
    lp = res["choices"][0]["logprobs"]
    assert set(lp) == {"content", "refusal"}
    assert len(lp["content"]) == 4
    for e in lp["content"]:
        check({k: v for k, v in e.items() if k != "top_logprobs"}, CHAT_LOGPROB)
        assert len(e["top_logprobs"]) == 2
        for alt in e["top_logprobs"]:
            check(alt, CHAT_LOGPROB)
        assert all(isinstance(b, int) and 0 <= b < 256 for b in e["bytes"])
    assert "".join(e["token"] for e in lp["content"]) == res["choices"][0]["message"]["content"]
    plain = llm.create_chat_completion(msgs, max_tokens=4, temperature=0)
    assert plain["choices"][0]["logprobs"] is None
    chunks = list(
        llm.create_chat_completion(msgs, max_tokens=4, temperature=0, logprobs=True, stream=True)
    )
    with_lp = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    assert len(with_lp) == 4
    assert all(e["content"][0]["top_logprobs"] == [] for e in with_lp)
    with pytest.raises(ValueError, match="top_logprobs needs logprobs=True"):
        llm.create_chat_completion(msgs, max_tokens=2, top_logprobs=2)
