"""The corners of OpenAI's contract that clients use by default, against a real `nexabind serve`:
``n`` choices, normalised embeddings of texts or token ids, ``dimensions``, the generation caps
(``max_completion_tokens``, ``n_predict``, ``-n``), the chatml fallback of a model without a
chat template, and errors that name the server's flags."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from _serve import Served, events

openai = pytest.importorskip("openai")

CHAT = [{"role": "user", "content": "Tell me about birds"}]
NO_EOS = {"2": -100}  # the tiny model's end-of-sequence token: generate until told to stop
CAP = 6  # the server's -n


def _client(server: Served) -> Any:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none")


@pytest.fixture(scope="module")
def server(libdir: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with Served(tiny_model, "-np", "4", "-c", "2048", "-n", str(CAP), log=log) as s:
        yield s


# -- n choices ----------------------------------------------------------------------------------


def test_n_choices_with_the_openai_client(server: Served) -> None:
    client = _client(server)
    r = client.chat.completions.create(model="x", messages=CHAT, n=3, max_tokens=4, seed=7,
                                       temperature=1, logit_bias=NO_EOS)  # fmt: skip
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" and c.message.content for c in r.choices)
    assert r.usage.completion_tokens == 12
    one = client.chat.completions.create(model="x", messages=CHAT, max_tokens=4, logit_bias=NO_EOS)
    assert r.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    assert len({c.message.content for c in r.choices}) > 1  # seed, seed + 1, seed + 2
    c = client.completions.create(model="x", prompt="Once", n=2, max_tokens=3, logit_bias=NO_EOS)
    assert [x.index for x in c.choices] == [0, 1] and c.usage.completion_tokens == 6


def test_n_choices_decode_the_prompt_once(server: Served) -> None:
    long = [{"role": "user", "content": "Tell me about birds " * 40}]
    before = server.get("/slots")[1]["prompt_tokens"]
    r = _client(server).chat.completions.create(model="x", messages=long, n=4, max_tokens=2)
    decoded = server.get("/slots")[1]["prompt_tokens"] - before
    assert len(r.choices) == 4 and decoded < 2 * r.usage.prompt_tokens, decoded


def test_n_choices_stream_with_their_index(server: Served) -> None:
    body = {"messages": CHAT, "n": 2, "max_tokens": 3, "logit_bias": NO_EOS,
            "stream_options": {"include_usage": True}}  # fmt: skip
    conn, resp = server.open_stream("/v1/chat/completions", body)
    got = events(resp)
    conn.close()
    assert got[-1] == "[DONE]"
    chunks = got[:-1]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    finished = [c["choices"][0]["index"] for c in chunks[:-1]
                if c["choices"][0]["finish_reason"] is not None]  # fmt: skip
    assert finished == [0, 1]
    texts = ["", ""]
    for c in chunks[:-1]:
        choice = c["choices"][0]
        texts[choice["index"]] += choice["delta"].get("content") or ""
    assert all(texts)
    stream = _client(server).chat.completions.create(
        model="x", messages=CHAT, n=2, max_tokens=2, stream=True, logit_bias=NO_EOS
    )
    assert {ch.choices[0].index for ch in stream if ch.choices} == {0, 1}


def test_n_with_a_session_is_a_400_naming_n(server: Served) -> None:
    status, _, body = server.post(
        "/v1/chat/completions", {"messages": CHAT, "n": 2, "session_id": "s1", "max_tokens": 1}
    )
    assert status == 400 and body["error"]["param"] == "n"


# -- generation caps -----------------------------------------------------------------------------


def _generated(server: Served, **fields: Any) -> int:
    body = {"messages": CHAT, "logit_bias": NO_EOS, **fields}
    status, _, answer = server.post("/v1/chat/completions", body)
    assert status == 200, answer
    return int(answer["usage"]["completion_tokens"])


def test_max_completion_tokens_n_predict_and_the_server_cap(server: Served) -> None:
    assert _generated(server) == CAP  # no limit asked: the server's -n, not the whole slot
    assert _generated(server, max_tokens=100) == CAP
    assert _generated(server, max_tokens=3) == 3
    assert _generated(server, max_completion_tokens=2) == 2
    assert _generated(server, n_predict=4) == 4
    assert _generated(server, n_predict=-1) == CAP
    status, _, answer = server.post("/v1/completions", {"prompt": "x", "n_predict": 1})
    assert status == 200 and answer["usage"]["completion_tokens"] == 1
    r = _client(server).chat.completions.create(
        model="x", messages=CHAT, max_completion_tokens=3, logit_bias=NO_EOS
    )
    assert r.usage.completion_tokens == 3


def test_errors_name_the_servers_flags(server: Served) -> None:
    long = " ".join(["birds"] * 1000)  # more than a slot's 512 cells
    status, _, body = server.post("/v1/chat/completions", {"messages": [
        {"role": "user", "content": long}]})  # fmt: skip
    message = body["error"]["message"]
    assert status == 400 and "-c/--ctx-size" in message and "n_ctx" not in message


def test_a_zero_n_predict_is_refused(tiny_model: Path) -> None:
    from nexabind.server import ServeOptions

    with pytest.raises(ValueError, match="n_predict=0"):
        ServeOptions(str(tiny_model), n_predict=0)


# -- embeddings --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedder(libdir: Path, embed_model: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("serve") / "embed.log"
    with Served(embed_model, "--embedding", "-c", "1024", log=log) as s:
        yield s


def test_embeddings_are_unit_length_unless_asked_not_to_be(
    embedder: Served, embed_model: Path
) -> None:
    import numpy as np

    from nexabind import Llama

    with Llama(embed_model, embedding=True, n_ctx=1024, n_threads=1) as llm:
        raw = np.array(llm.embed(["Hello world"]))[0]
    r = _client(embedder).embeddings.create(model="x", input="Hello world")  # base64
    got = np.array(r.data[0].embedding)
    assert abs(np.linalg.norm(got) - 1) < 1e-5 and abs(np.linalg.norm(raw) - 1) > 0.1
    assert np.allclose(got, raw / np.linalg.norm(raw), atol=1e-5)
    status, _, body = embedder.post(
        "/v1/embeddings", {"input": "Hello world", "normalize": False, "encoding_format": "float"}
    )
    assert status == 200 and np.allclose(body["data"][0]["embedding"], raw, atol=1e-4)


def test_token_id_inputs(embedder: Served, embed_model: Path) -> None:
    import numpy as np

    from nexabind import Llama

    with Llama(embed_model, embedding=True, n_ctx=1024, n_threads=1, vocab_only=True) as llm:
        ids = [llm.tokenize(t.encode()) for t in ("Hello world", "the cat sat")]
    client = _client(embedder)
    by_text = client.embeddings.create(model="x", input=["Hello world", "the cat sat"])
    want = np.array([d.embedding for d in by_text.data])
    by_ids = client.embeddings.create(model="x", input=ids)  # [[...], [...]], base64 back
    assert np.allclose([d.embedding for d in by_ids.data], want, atol=1e-5)
    one = client.embeddings.create(model="x", input=ids[0], encoding_format="float")
    assert np.allclose(one.data[0].embedding, want[0], atol=1e-5)
    assert one.usage.prompt_tokens == len(ids[0])
    small = client.embeddings.create(model="x", input=[[1, 2, 3]])  # LangChain's default shape
    assert len(small.data) == 1
    status, _, body = embedder.post("/v1/embeddings", {"input": [[1, 2], "text"]})
    assert status == 400 and body["error"]["param"] == "input[1]"
    status, _, body = embedder.post("/v1/embeddings", {"input": [10**9]})
    assert status == 400 and "input token" in body["error"]["message"]


def test_dimensions_truncate_and_renormalise_or_a_400(embedder: Served) -> None:
    import numpy as np

    status, _, full = embedder.post(
        "/v1/embeddings", {"input": "Hello world", "encoding_format": "float"}
    )
    vector = np.array(full["data"][0]["embedding"])
    status, _, body = embedder.post(
        "/v1/embeddings", {"input": "Hello world", "dimensions": 8, "encoding_format": "base64"}
    )
    assert status == 200
    got = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    assert got.shape == (8,) and abs(np.linalg.norm(got) - 1) < 1e-5
    assert np.allclose(got, vector[:8] / np.linalg.norm(vector[:8]), atol=1e-5)
    r = _client(embedder).embeddings.create(model="x", input="Hello world", dimensions=4)
    assert len(r.data[0].embedding) == 4
    status, _, body = embedder.post(
        "/v1/embeddings", {"input": "Hello world", "dimensions": len(vector) + 1}
    )
    assert status == 400 and body["error"]["param"] == "dimensions"
    assert f"this model's {len(vector)}" in body["error"]["message"]


# -- a model without a chat template -------------------------------------------------------------


def test_a_model_without_a_template_chats_in_chatml(gemma: Path, tmp_path: Path) -> None:
    with Served(gemma, "-np", "1", "-c", "512", log=tmp_path / "log") as s:
        client = _client(s)
        for _ in range(2):
            r = client.chat.completions.create(model="x", messages=CHAT, max_tokens=3)
            assert r.choices[0].message.content is not None
        assert s.output().count("has no chat template: chats use the chatml format") == 1
        status, _, body = s.post("/v1/completions", {"prompt": json.dumps(CHAT), "max_tokens": 1})
        assert status == 200


@pytest.mark.parametrize("template", [None, "chatml"])
def test_chatml_chats_stop_at_the_turn_end(gemma: Path, template: str | None) -> None:
    from nexabind import Engine, LlamaGrammar

    reply = LlamaGrammar.from_string('root ::= "Hi there<|im_end|>\\n<|im_start|>user"')
    with Engine(gemma, n_parallel=1, n_ctx=512, n_threads=1, chat_template=template) as engine:
        tid = engine.create_task("chat", messages=CHAT, grammar=reply, max_tokens=30)
        res = engine.result(tid)
    assert res["text"] == "Hi there" and res["finish_reason"] == "stop"
