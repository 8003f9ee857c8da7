"""The corners of OpenAI's contract that clients use by default, against a real `nexabind serve`:
normalised embeddings of texts or token ids, and ``dimensions``."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from _serve import Served

openai = pytest.importorskip("openai")


def _client(server: Served) -> Any:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none")


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
