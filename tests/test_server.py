"""`nexabind serve` as a real process on 127.0.0.1: the official openai client, raw HTTP for the
SSE framing, the gateway's queue, keys, disconnects, idle unload and SIGTERM."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from _serve import Served, events, read_events

openai = pytest.importorskip("openai")


GREEDY: dict[str, Any] = {"temperature": 0}
NO_EOS = {"2": -100}  # the tiny model's end-of-sequence token: generate until told to stop
CHAT = [{"role": "user", "content": "Tell me about birds"}]


def _client(server: Served, **kw: Any) -> Any:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=kw.pop("api_key", "none"), **kw)


@pytest.fixture(scope="module")
def server(libdir: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with Served(tiny_model, "-np", "4", "-c", "4096", "--alias", "tiny", log=log) as s:
        yield s


# -- the openai client -----------------------------------------------------------------------


def test_openai_client_chat_stream_completion_and_models(server: Served) -> None:
    client = _client(server)
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, **GREEDY)
    assert r.object == "chat.completion" and r.model == "tiny"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8

    chunks = list(client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=8, stream=True,
        stream_options={"include_usage": True}, **GREEDY,
    ))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content  # streamed = not streamed, greedy
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1

    c = client.completions.create(model="tiny", prompt="Once upon", max_tokens=5, **GREEDY)
    assert c.object == "text_completion" and c.usage.completion_tokens == 5
    echoed = client.completions.create(
        model="tiny", prompt="Once upon", max_tokens=5, echo=True, **GREEDY
    )
    assert echoed.choices[0].text == "Once upon" + c.choices[0].text

    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"] and models.object == "list"
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError, match="no model 'gpt-4'"):
        client.models.retrieve("gpt-4")


def test_openai_client_raises_bad_request_with_the_field(server: Served) -> None:
    client = _client(server, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=CHAT, temperature=7)
    assert e.value.status_code == 400
    assert e.value.body["param"] == "temperature" and "from 0 to 2" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\]\.role is missing"):
        client.chat.completions.create(model="tiny", messages=[{"content": "x"}])
    with pytest.raises(openai.BadRequestError, match="but a slot holds 1024") as e:
        client.completions.create(model="tiny", prompt=[1] + [450] * 1100, max_tokens=2)
    assert e.value.code == "context_length_exceeded"


# -- raw HTTP --------------------------------------------------------------------------------


def test_sse_framing(server: Served) -> None:
    conn, resp = server.open_stream(
        "/v1/chat/completions", {"messages": CHAT, "max_tokens": 4, **GREEDY}
    )
    assert resp.status == 200
    assert resp.getheader("Content-Type").startswith("text/event-stream")
    raw = resp.read()
    conn.close()
    blocks = raw.split(b"\n\n")
    assert blocks[-1] == b"" and blocks[-2] == b"data: [DONE]"
    for block in blocks[:-2]:
        assert block.startswith(b"data: {") and b"\n" not in block
    chunks = [json.loads(b[6:]) for b in blocks[:-2]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all("usage" not in c for c in chunks)  # only with stream_options.include_usage


def test_bad_input_is_a_4xx_naming_the_field_never_a_500(server: Served) -> None:
    cases: list[tuple[Any, int, str | None]] = [
        (b"{nope", 400, None),
        (b"", 400, None),
        (b"[1, 2]", 400, "body"),
        ({"messages": "hi"}, 400, "messages"),
        ({}, 400, "messages"),
        ({"messages": CHAT, "max_tokens": 0}, 400, "max_tokens"),
        ({"messages": CHAT, "max_tokens": "ten"}, 400, "max_tokens"),
        ({"messages": CHAT, "n": 17}, 400, "n"),
        ({"messages": CHAT, "stop": [1]}, 400, "stop[0]"),
        ({"messages": CHAT, "logit_bias": {"x": 1}}, 400, "logit_bias.x"),
        ({"messages": CHAT, "logit_bias": {"99999": 1}}, 400, None),
        ({"messages": CHAT, "stream_options": {"include_usage": "yes"}}, 400,
         "stream_options.include_usage"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
        ({"messages": CHAT, "seed": -1}, 400, "seed"),
        ({"messages": CHAT, "temperature": True}, 400, "temperature"),
        ({"messages": CHAT, "response_format": "json"}, 400, "response_format"),
        ({"messages": CHAT, "response_format": {"type": "xml"}}, 400, None),
        ({"messages": CHAT, "tools": [{"type": "function"}]}, 400, None),
        ({"messages": CHAT, "tools": "get_weather"}, 400, "tools"),
        ({"messages": CHAT, "tool_choice": 3}, 400, "tool_choice"),
    ]  # fmt: skip
    for body, status, param in cases:
        got, _, answer = server.post("/v1/chat/completions", body)
        assert got == status, (body, answer)
        err = answer["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["type"] == "invalid_request_error" and err["message"]
        if param is not None:
            assert err["param"] == param, (body, err)
    for path, body in (("/v1/completions", {"prompt": ["a", "b"]}),
                       ("/v1/completions", {"prompt": 12}),
                       ("/v1/embeddings", {"input": "x"})):  # fmt: skip
        got, _, answer = server.post(path, body)
        assert 400 <= got < 500 or got == 501, (path, body, answer)
    status, _, answer = server.post(
        "/v1/chat/completions", {"messages": CHAT, "pad": "x" * (9 << 20)}
    )
    assert status == 413 and "larger than" in answer["error"]["message"]
    status, body = server.get("/v2/whatever")
    assert status == 404 and body["error"]["type"] == "not_found_error"
    assert "Traceback" not in server.output()


def test_concurrent_clients_get_their_sequential_results(server: Served) -> None:
    prompts = [f"Story number {i} about {w}" for i, w in enumerate(
        ["cats", "dogs", "hills", "birds", "songs", "rain", "the sea", "a mat"])]  # fmt: skip
    body = {"max_tokens": 24, "logit_bias": NO_EOS, **GREEDY}

    def ask(p: str) -> str:
        _, _, r = server.post("/v1/chat/completions",
                              {"messages": [{"role": "user", "content": p}], **body})  # fmt: skip
        return r["choices"][0]["message"]["content"]  # type: ignore[no-any-return]

    want = [ask(p) for p in prompts]
    got: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, ask(prompts[i])))
               for i in range(len(prompts))]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(prompts))] == want


def test_a_disconnect_mid_stream_frees_the_slot(server: Served) -> None:
    before = server.get("/slots")[1]["generated_tokens"]
    conn, resp = server.open_stream(
        "/v1/completions", {"prompt": "Once", "max_tokens": 100_000, "logit_bias": NO_EOS, **GREEDY}
    )
    assert len(read_events(resp, 3)) == 3
    assert server.get("/slots")[1]["slots_busy"] == 1
    _drop(conn)  # the client goes away without a word
    deadline = time.monotonic() + 30
    while (slots := server.get("/slots")[1])["slots_busy"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert slots["slots_busy"] == 0 and all(s["state"] == "idle" for s in slots["slots"])
    # It stopped: the slot holds 1024 cells, far from generated in full.
    generated = slots["generated_tokens"] - before
    assert generated < 900
    time.sleep(0.2)
    assert server.get("/slots")[1]["generated_tokens"] - before == generated


def test_a_session_keeps_its_conversation(server: Served) -> None:
    body = {"max_tokens": 6, "logit_bias": NO_EOS, **GREEDY}
    turn1 = [{"role": "user", "content": "Hello there"}]
    _, _, r1 = server.post("/v1/chat/completions",
                           {"messages": turn1, "session_id": "s1", **body})  # fmt: skip
    reply = r1["choices"][0]["message"]
    turn2 = [*turn1, reply, {"role": "user", "content": "And then?"}]
    _, _, r2 = server.post("/v1/chat/completions",
                           {"messages": turn2, "session_id": "s1", **body})  # fmt: skip
    slots = server.get("/slots")[1]["slots"]
    assert any(s["session"] for s in slots)  # the conversation holds a slot's cells
    _, _, alone = server.post("/v1/chat/completions", {"messages": turn2, **body})
    assert r2["choices"][0]["message"] == alone["choices"][0]["message"]
    assert r2["usage"]["prompt_tokens"] == alone["usage"]["prompt_tokens"]
    # `user` routes the same way; a conversation that does not continue the held one restarts.
    _, _, r3 = server.post("/v1/chat/completions", {"messages": turn1, "user": "s1", **body})
    assert r3["choices"][0]["message"] == reply


# -- the gateway -------------------------------------------------------------------------------


def _drop(conn: Any) -> None:
    """Go away without a word: the socket is shut, whatever still refers to it."""
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.sock.close()
    conn.close()


def _hold(server: Served) -> tuple[Any, Any]:
    """A stream that keeps its slot until closed (the end-of-sequence token is banned)."""
    conn, resp = server.open_stream(
        "/v1/completions", {"prompt": "Once", "max_tokens": 100_000, "logit_bias": NO_EOS, **GREEDY}
    )
    assert resp.status == 200 and len(read_events(resp, 2)) == 2
    return conn, resp


def test_queue_overflow_answers_exactly_the_expected_429s(
    libdir: Path, tiny_model: Path, tmp_path: Path
) -> None:
    args = ("-np", "2", "-c", "16384", "--max-queue", "3", "--queue-timeout", "2")
    with Served(tiny_model, *args, log=tmp_path / "log") as s:
        holders = [_hold(s) for _ in range(2)]
        results: list[tuple[int, dict[str, str]]] = []

        def ask() -> None:
            status, headers, _ = s.post("/v1/completions", {"prompt": "x", "max_tokens": 1})
            results.append((status, headers))

        queued = [threading.Thread(target=ask) for _ in range(3)]
        for t in queued:
            t.start()
        deadline = time.monotonic() + 30
        while s.metric("nexabind_requests_deferred") < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert s.metric("nexabind_requests_deferred") == 3
        for _ in range(4):  # the queue is full: at once
            ask()
        assert [st for st, _ in results] == [429] * 4
        assert all(int(h["retry-after"]) >= 1 for _, h in results)
        for t in queued:  # then the waiting ones run out of time
            t.join()
        assert [st for st, _ in results] == [429] * 7
        assert s.metric('nexabind_requests_total{endpoint="/v1/completions",status="429"}') == 7
        for conn, _ in holders:
            _drop(conn)
        status, _, r = s.post("/v1/completions", {"prompt": "x", "max_tokens": 1})
        assert status == 200
        assert s.metric('nexabind_requests_total{endpoint="/v1/completions",status="429"}') == 7
        assert s.metric("nexabind_queue_wait_seconds_count") >= 1


def test_the_openai_client_retries_after_retry_after(
    libdir: Path, tiny_model: Path, tmp_path: Path
) -> None:
    import httpx2 as httpx  # the openai client's own HTTP library

    seen: list[tuple[int, str | None, float]] = []

    def note(response: Any) -> None:
        seen.append((response.status_code, response.headers.get("retry-after"), time.monotonic()))

    args = ("-np", "1", "-c", "8192", "--max-queue", "0")
    with Served(tiny_model, *args, log=tmp_path / "log") as s:
        conn, _ = _hold(s)
        threading.Timer(0.5, _drop, args=(conn,)).start()
        client = _client(
            s, max_retries=2, http_client=httpx.Client(event_hooks={"response": [note]})
        )
        r = client.completions.create(model="x", prompt="Hi", max_tokens=2, **GREEDY)
        assert r.usage.completion_tokens == 2
        assert seen[0][0] == 429 and seen[-1][0] == 200
        assert seen[1][2] - seen[0][2] >= int(seen[0][1]) - 0.05  # it waited as told
        with pytest.raises(openai.RateLimitError):  # and without retries, the 429 itself
            conn2, _ = _hold(s)
            try:
                _client(s, max_retries=0).completions.create(model="x", prompt="Hi", max_tokens=2)
            finally:
                conn2.close()


def test_api_keys(libdir: Path, tiny_model: Path, tmp_path: Path) -> None:
    keyfile = tmp_path / "keys"
    keyfile.write_text("second-key\n\n")
    with Served(tiny_model, "--api-key", "first-key", "--api-key-file", str(keyfile),
                log=tmp_path / "log") as s:  # fmt: skip
        assert s.get("/health")[0] == 200  # public
        for headers in ({}, {"Authorization": "Bearer nope"}, {"X-Api-Key": "nope"},
                        {"Authorization": "first-key"}):  # fmt: skip
            for path in ("/v1/models", "/slots", "/metrics"):
                assert s.get(path, headers=headers)[0] == 401
            status, _, body = s.post("/v1/completions", {"prompt": "x"}, headers=headers)
            assert status == 401 and body["error"]["type"] == "authentication_error"
        assert s.get("/v1/models", headers={"Authorization": "Bearer first-key"})[0] == 200
        assert s.get("/v1/models", headers={"X-Api-Key": "second-key"})[0] == 200
        with pytest.raises(openai.AuthenticationError):
            _client(s, api_key="wrong", max_retries=0).models.list()
        ok = _client(s, api_key="second-key").completions.create(
            model="x", prompt="a", max_tokens=1
        )
        assert ok.usage.completion_tokens == 1


def test_sigterm_lets_requests_finish_then_cancels_the_rest(
    libdir: Path, tiny_model: Path, tmp_path: Path
) -> None:
    with Served(tiny_model, "-np", "2", "-c", "16384", "--grace", "1", log=tmp_path / "log") as s:
        conn, resp = _hold(s)  # longer than the grace period
        short = s.open_stream("/v1/completions", {"prompt": "Hi", "max_tokens": 40, **GREEDY})
        s.proc.send_signal(15)
        tail = events(resp)
        assert "error" in tail[-1] and "[DONE]" not in tail  # cut, and told so
        short_events = events(short[1])
        assert short_events[-1] == "[DONE]"  # finished within the grace period
        assert s.proc.wait(timeout=30) == 0
        assert "Application shutdown complete" in s.output()


def test_idle_unload_and_reload(libdir: Path, tiny_model: Path, tmp_path: Path) -> None:
    with Served(tiny_model, "--idle-unload", "1", log=tmp_path / "log") as s:
        assert s.post("/v1/completions", {"prompt": "x", "max_tokens": 1})[0] == 200
        assert s.wait_health(200, timeout=30) == {"status": "ok"}
        deadline = time.monotonic() + 30
        while s.get("/health")[1]["status"] != "unloaded" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.get("/health") == (200, {"status": "unloaded"})
        assert s.get("/slots")[1]["loaded"] is False
        status, headers, body = s.post("/v1/completions", {"prompt": "x", "max_tokens": 1})
        assert status == 503 and int(headers["retry-after"]) >= 1
        assert "loading again" in body["error"]["message"]
        s.wait_health(200, timeout=60)
        assert s.post("/v1/completions", {"prompt": "x", "max_tokens": 1})[0] == 200


def test_embeddings_and_rerank(
    libdir: Path, embed_model: Path, tmp_path: Path, llama_source: Path
) -> None:
    import numpy as np

    from nexabind import Llama

    texts = ["Hello world", "the cat sat"]
    with Llama(embed_model, embedding=True, n_ctx=1024, n_threads=1) as llm:
        want = llm.embed(texts, normalize=True)  # OpenAI's vectors have unit length
    with Served(embed_model, "--embedding", "-c", "1024", log=tmp_path / "log") as s:
        client = _client(s)
        r = client.embeddings.create(model="x", input=texts)  # base64, the client's default
        got = np.array([d.embedding for d in r.data], dtype=np.float32)
        assert np.allclose(got, want, atol=1e-4) and r.usage.prompt_tokens > 0
        r2 = client.embeddings.create(model="x", input="Hello world", encoding_format="float")
        assert np.allclose(r2.data[0].embedding, want[0], atol=1e-4)
        status, _, body = s.post("/v1/chat/completions", {"messages": CHAT})
        assert status == 501 and "without --embedding" in body["error"]["message"]
    from nexabind.tinymodel import ModelSpec, write_random_model

    ranker = write_random_model(
        tmp_path / "rank.gguf", ModelSpec(pooling="rank", seed=5),
        vocab=llama_source / "models" / "ggml-vocab-llama-spm.gguf",
    )  # fmt: skip
    docs = ["birds sing", "cats sit", "dogs run fast"]
    with Served(ranker, "--rerank", "-np", "1", log=tmp_path / "log2") as s:
        status, _, body = s.post("/v1/rerank", {"query": "who sings?", "documents": docs,
                                                "top_n": 2, "return_documents": True})  # fmt: skip
        assert status == 200 and len(body["results"]) == 2
        scores = [r["relevance_score"] for r in body["results"]]
        assert scores == sorted(scores, reverse=True)
        assert all(r["document"]["text"] == docs[r["index"]] for r in body["results"])


def test_a_client_that_leaves_the_queue_takes_no_slot(
    libdir: Path, tiny_model: Path, tmp_path: Path
) -> None:
    import http.client

    with Served(tiny_model, "-np", "1", "-c", "8192", log=tmp_path / "log") as s:
        holder, _ = _hold(s)
        waiting = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
        waiting.request("POST", "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 500}),
                        {"Content-Type": "application/json"})  # fmt: skip
        deadline = time.monotonic() + 30
        while s.metric("nexabind_requests_deferred") < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        _drop(waiting)  # gone while it waited for a slot
        while s.metric("nexabind_requests_deferred") > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert s.metric("nexabind_requests_deferred") == 0
        _drop(holder)
        while s.get("/slots")[1]["slots_busy"] and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)
        slots = s.get("/slots")[1]
        assert (slots["slots_busy"], slots["in_flight"], slots["waiting"]) == (0, 0, 0), slots
        assert s.metric('nexabind_requests_total{endpoint="/v1/completions",status="499"}') == 1
        before = slots["generated_tokens"]
        time.sleep(0.3)
        assert s.get("/slots")[1]["generated_tokens"] == before  # nothing runs for it


def test_structured_output_and_tool_calls_with_the_openai_client(server: Served) -> None:
    from test_llguidance import validate
    from test_structured import TIME, WEATHER

    client = _client(server)
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 10}, "n": {"type": "integer"}},
        "required": ["city", "n"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema}}
    r = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=200, seed=1, response_format=fmt
    )
    assert r.choices[0].finish_reason == "stop"
    validate(json.loads(r.choices[0].message.content), schema)
    r = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=200, seed=2, tools=[WEATHER, TIME],
        tool_choice="required",
    )  # fmt: skip
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.tool_calls
    call = c.message.tool_calls[0]
    tool = WEATHER if call.function.name == "get_weather" else TIME
    validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    r = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=200, seed=4, tools=[WEATHER, TIME],
        tool_choice="get_time",  # a bare name, as LangChain's bind_tools sends it
    )  # fmt: skip
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_time"]
    chunks = list(client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=200, seed=3, tools=[WEATHER], stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    ))  # fmt: skip
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    args = "".join(tc.function.arguments or "" for d in deltas for tc in (d.tool_calls or []))
    validate(json.loads(args), WEATHER["function"]["parameters"])
