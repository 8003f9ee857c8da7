"""The OpenAI shapes the server adds (pure functions, no model)."""

from __future__ import annotations

import base64

import numpy as np

from nexabind import openai
from nexabind.tokens import Outcome, Token


def test_with_usage_nulls_every_chunk_then_adds_the_usage_chunk() -> None:
    outcome = Outcome()
    toks = [Token(5, "Hi"), Token(6, " there")]

    def gen():
        for t in toks:
            outcome.completion_tokens += 1
            yield t
        outcome.prompt_tokens, outcome.finish_reason = 7, "stop"

    chunks = list(openai.with_usage(openai.chat_chunks(gen(), outcome, model="m", id="x"), outcome))
    assert [c["usage"] for c in chunks[:-1]] == [None] * 4
    assert chunks[-1]["choices"] == [] and chunks[-1]["id"] == "x"
    assert chunks[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


def test_error_model_list_rerank_and_base64_embeddings() -> None:
    assert openai.error("bad", param="temperature") == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "temperature",
                  "code": None}
    }  # fmt: skip
    model = {"id": "a", "object": "model", "created": 1, "owned_by": "nexabind"}
    assert openai.model_list(["a"], created=1) == {"object": "list", "data": [model]}
    r = openai.rerank_list([0.1, 0.9, 0.5], model="m", prompt_tokens=3, documents=["a", "b", "c"],
                           top_n=2)  # fmt: skip
    assert [(x["index"], x["document"]["text"]) for x in r["results"]] == [(1, "b"), (2, "c")]
    vecs = np.array([[0.5, -1.25], [3.0, 0.0]], dtype=np.float32)
    e = openai.embedding_list(vecs, model="m", prompt_tokens=4, encoding_format="base64")
    back = np.frombuffer(base64.b64decode(e["data"][1]["embedding"]), dtype="<f4")
    assert back.tolist() == [3.0, 0.0]
    assert openai.embedding_list(vecs, model="m", prompt_tokens=4)["data"][0]["embedding"] == [
        0.5, -1.25
    ]  # fmt: skip
