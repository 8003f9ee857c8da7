"""Anthropic's Messages API (``/v1/messages``) and OpenAI's Responses API (``/v1/responses``)
against a real `nexabind serve`, through the official ``anthropic`` and ``openai`` clients, and
raw HTTP for what a client would not send: bad bodies (400 in each API's error shape, never a
500) and the ``x-api-key`` header."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from _serve import Served

anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")

KEY = "dialect-key"
# an enum: the tiny model's random strings would not end within max_tokens
CITY = {"type": "string", "enum": ["Paris", "Rome"]}
WEATHER = {"type": "object", "properties": {"city": CITY}, "required": ["city"]}
TOOLS = [{"name": "get_weather", "description": "The weather in a city", "input_schema": WEATHER}]
FUNCTIONS = [{"type": "function", "name": "get_weather", "parameters": WEATHER}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(libdir: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with Served(tiny_model, "-np", "2", "-c", "2048", "--api-key", KEY, log=log) as s:
        yield s


def _anthropic(server: Served) -> Any:
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)


def _openai(server: Served) -> Any:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def _chat_prompt_tokens(server: Served, messages: list[dict[str, Any]]) -> int:
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"messages": messages, "max_tokens": 1}
    status, _, r = server.post("/v1/chat/completions", body, headers=auth)
    assert status == 200, r
    return int(r["usage"]["prompt_tokens"])


# -- Anthropic Messages ---------------------------------------------------------------------------


def test_messages_create(server: Served) -> None:
    client = _anthropic(server)
    system = [{"type": "text", "text": "Be brief."}]
    m = client.messages.create(
        model="x",
        max_tokens=4,
        system=system,
        messages=ASK,
        # sampling (this client version sends them as extra fields)
        extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 20},
        stop_sequences=["\n\n"],
    )
    assert m.type == "message" and m.role == "assistant"
    assert m.stop_reason in ("end_turn", "max_tokens")
    assert all(b.type == "text" for b in m.content)
    assert 0 < m.usage.output_tokens <= 4
    # the same prompt as the chat path's
    chat = [{"role": "system", "content": "Be brief."}, *ASK]
    assert m.usage.input_tokens == _chat_prompt_tokens(server, chat)
    count = client.messages.count_tokens(model="x", system=system, messages=ASK)
    assert count.input_tokens == m.usage.input_tokens


def test_messages_stream(server: Served) -> None:
    client = _anthropic(server)
    with client.messages.stream(model="x", max_tokens=5, messages=ASK) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds[-2] == "message_delta"
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert 0 < final.usage.output_tokens <= 5 and final.usage.input_tokens > 0
    if final.content:  # a block opens, grows and closes
        assert kinds[1:3] == ["content_block_start", "content_block_delta"]
        assert "content_block_stop" in kinds
    # the raw events: named, as Anthropic's are
    status, headers, data = server.request(
        "POST",
        "/v1/messages",
        {"max_tokens": 3, "messages": ASK, "stream": True},
        headers={"x-api-key": KEY},
    )
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    names = [line[7:] for line in data.decode().splitlines() if line.startswith("event: ")]
    assert names[0] == "message_start" and names[-1] == "message_stop"


def test_messages_tools(server: Served) -> None:
    client = _anthropic(server)
    m = client.messages.create(
        model="x",
        max_tokens=60,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    assert m.stop_reason == "tool_use"
    (use,) = [b for b in m.content if b.type == "tool_use"]
    assert use.name == "get_weather" and isinstance(use.input, dict) and use.id
    # the call and its result in the history
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": use.id, "name": use.name, "input": {"city": "Paris"}}
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": use.id,
                    "content": [{"type": "text", "text": "Sunny, 21 C"}],
                }
            ],
        },
    ]
    again = client.messages.create(model="x", max_tokens=3, messages=history, tools=TOOLS)
    assert again.stop_reason in ("end_turn", "max_tokens", "tool_use")
    with client.messages.stream(
        model="x", max_tokens=60, messages=ASK, tools=TOOLS, tool_choice={"type": "any"}
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [b.name for b in final.content if b.type == "tool_use"] == ["get_weather"]
    assert isinstance(final.content[-1].input, dict)


# -- OpenAI Responses -----------------------------------------------------------------------------


def test_responses_create_and_stream(server: Served) -> None:
    client = _openai(server)
    r = client.responses.create(
        model="x",
        input="Tell me about birds",
        instructions="Be brief.",
        max_output_tokens=4,
        temperature=0.5,
    )
    assert r.object == "response" and r.status in ("completed", "incomplete")
    assert 0 < r.usage.output_tokens <= 4
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"
    items = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "Tell me about birds"}]},
    ]
    again = client.responses.create(model="x", input=items, max_output_tokens=1)
    assert again.usage.input_tokens == r.usage.input_tokens  # the same prompt
    events = list(client.responses.create(model="x", input="Hi", max_output_tokens=5, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] in (
        "response.completed",
        "response.incomplete",
    )
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-1].response.output_text == text
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_responses_function_calls(server: Served) -> None:
    client = _openai(server)
    r = client.responses.create(
        model="x",
        input=ASK[0]["content"],
        tools=FUNCTIONS,
        tool_choice="required",
        max_output_tokens=60,
    )
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments), dict)
    items = [
        *ASK,
        {
            "type": "function_call",
            "call_id": call.call_id,
            "name": call.name,
            "arguments": call.arguments,
        },
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny"},
    ]
    again = client.responses.create(model="x", input=items, tools=FUNCTIONS, max_output_tokens=3)
    assert again.status in ("completed", "incomplete")
    events = list(
        client.responses.create(
            model="x",
            input=ASK[0]["content"],
            tools=FUNCTIONS,
            tool_choice={"type": "function", "name": "get_weather"},
            max_output_tokens=60,
            stream=True,
        )
    )
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [i.type for i in done] == ["function_call"] and done[0].name == "get_weather"
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert done[0].arguments == args and isinstance(json.loads(args), dict)


def test_responses_structured_output(server: Served) -> None:
    from typing import Literal

    from pydantic import BaseModel

    class Weather(BaseModel):
        city: Literal["Paris", "Rome"]

    r = _openai(server).responses.parse(
        model="x", input=ASK[0]["content"], text_format=Weather, max_output_tokens=40
    )
    assert r.output_parsed is not None and r.output_parsed.city in ("Paris", "Rome")
    assert r.text.format.type == "json_schema"


# -- bad requests and keys ------------------------------------------------------------------------

MESSAGES_BAD = [
    ({"messages": ASK}, "max_tokens"),
    ({"max_tokens": 0, "messages": ASK}, "max_tokens"),
    ({"max_tokens": 4, "messages": []}, "messages"),
    ({"max_tokens": 4, "messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role"),
    (
        {"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image"}]}]},
        "messages[0].content[0]",
    ),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"max_tokens": 4, "messages": ASK, "system": [{"type": "text", "text": 1}]}, "system[0]"),
    ({"max_tokens": 4, "messages": ASK, "temperature": 7}, "temperature"),
    ({"max_tokens": 4, "messages": ASK, "stop_sequences": 5}, "stop_sequences"),
    ({"max_tokens": 4, "messages": ASK, "tools": [{"name": "f", "input_schema": 3}]}, "tools[0]"),
    ({"max_tokens": 4, "messages": ASK, "tool_choice": {"type": "maybe"}}, "tool_choice"),
    ([1, 2], "body"),
]


@pytest.mark.parametrize(("body", "field"), MESSAGES_BAD)
def test_bad_messages_are_400s_in_anthropics_shape(server: Served, body: Any, field: str) -> None:
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        if path.endswith("count_tokens") and field == "max_tokens":
            continue  # count_tokens takes no max_tokens
        status, _, r = server.post(path, body, headers={"x-api-key": KEY})
        assert status == 400, r
        assert r["type"] == "error" and r["error"]["type"] == "invalid_request_error"
        assert field in r["error"]["message"]
    status, _, r = server.post("/v1/messages", b"{not json", headers={"x-api-key": KEY})
    assert status == 400 and r["type"] == "error"


RESPONSES_BAD = [
    ({}, "input"),
    ({"input": 5}, "input"),
    ({"input": [{"type": "reasoning"}]}, "input[0].type"),
    ({"input": [{"role": "robot", "content": "hi"}]}, "input[0].role"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "hi", "temperature": "hot"}, "temperature"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "hi", "tool_choice": "always"}, "tool_choice"),
    ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "hi", "text": "json"}, "text"),
    ({"input": "hi", "text": {"format": {"type": "yaml"}}}, "text.format"),
]


@pytest.mark.parametrize(("body", "field"), RESPONSES_BAD)
def test_bad_responses_requests_are_400s_naming_the_field(
    server: Served, body: Any, field: str
) -> None:
    status, _, r = server.post("/v1/responses", body, headers={"Authorization": f"Bearer {KEY}"})
    assert status == 400, r
    assert r["error"]["param"] == field and r["error"]["type"] == "invalid_request_error"


def test_keys_x_api_key_and_metrics(server: Served) -> None:
    body = {"max_tokens": 2, "messages": ASK}
    before = server.metric("nexabind_requests_total", {"x-api-key": KEY})
    status, _, r = server.post("/v1/messages", body)
    assert status == 401 and r["error"]["type"] == "authentication_error"
    status, _, r = server.post("/v1/messages", body, headers={"x-api-key": "wrong"})
    assert status == 401 and r["type"] == "error"
    status, _, r = server.post("/v1/messages", body, headers={"x-api-key": KEY})
    assert status == 200 and r["type"] == "message"
    status, _, r = server.post("/v1/messages", body, headers={"Authorization": f"Bearer {KEY}"})
    assert status == 200
    status, _, r = server.post("/v1/responses", {"input": "hi"}, headers={"x-api-key": "wrong"})
    assert status == 401 and r["error"]["code"] == "invalid_api_key"
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).messages.create(
            model="x", max_tokens=2, messages=ASK
        )
    _, text = server.get("/metrics", headers={"x-api-key": KEY})
    assert 'endpoint="/v1/messages",status="401"' in text
    assert server.metric("nexabind_requests_total", {"x-api-key": KEY}) >= before + 5


def test_a_full_queue_is_a_429_in_anthropics_shape(
    libdir: Path, tiny_model: Path, tmp_path: Path
) -> None:
    long = {"max_tokens": 400, "messages": ASK, "stream": True}
    with Served(
        tiny_model, "-np", "1", "--max-queue", "0", "-c", "1024", log=tmp_path / "log"
    ) as s:
        conn, resp = s.open_stream("/v1/messages", long)
        try:
            assert resp.status == 200
            resp.readline()
            status, headers, r = s.post("/v1/messages", {"max_tokens": 2, "messages": ASK})
            assert status == 429 and r["error"]["type"] == "rate_limit_error"
            assert "retry-after" in headers
        finally:
            conn.close()


# -- a real model ---------------------------------------------------------------------------------


def test_gemma_through_both_clients(gemma: Path, tmp_path: Path) -> None:
    """A trained model answers the same through the chat API, Messages and Responses (greedy:
    the three are one prompt and one generation), whole or streamed, and calls a tool."""
    system, question = "You are a helpful assistant.", "Name a colour."
    sky = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    with Served(gemma, "-np", "1", "-c", "1024", "--api-key", KEY, log=tmp_path / "log") as s:
        auth = {"x-api-key": KEY}
        _, _, chat = s.post(
            "/v1/chat/completions",
            {"messages": sky, "max_tokens": 12, "temperature": 0},
            headers=auth,
        )
        want = chat["choices"][0]["message"]["content"]
        assert want.strip()
        m = _anthropic(s).messages.create(
            model="x",
            max_tokens=12,
            extra_body={"temperature": 0},
            system=system,
            messages=[{"role": "user", "content": question}],
        )
        assert m.content[0].text == want
        with _anthropic(s).messages.stream(
            model="x",
            max_tokens=12,
            extra_body={"temperature": 0},
            system=system,
            messages=[{"role": "user", "content": question}],
        ) as stream:
            assert "".join(stream.text_stream) == want
        r = _openai(s).responses.create(
            model="x", input=question, instructions=system, temperature=0, max_output_tokens=12
        )
        assert r.output_text == want
        text = "".join(
            e.delta
            for e in _openai(s).responses.create(
                model="x",
                input=question,
                instructions=system,
                temperature=0,
                max_output_tokens=12,
                stream=True,
            )
            if e.type == "response.output_text.delta"
        )
        assert text == want
        m = _anthropic(s).messages.create(
            model="x",
            max_tokens=40,
            extra_body={"temperature": 0},
            messages=ASK,
            tools=TOOLS,
            tool_choice={"type": "any"},
        )
        assert m.stop_reason == "tool_use" and m.content[-1].input["city"] == "Paris"


def test_the_llama_server_engine_answers_through_the_adapters(
    libdir: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """The adapters read the chat answer back, whichever backend wrote it: llama-server's
    chunks too (in its own cuts)."""
    import os

    from nexabind._build import server_binary

    if server_binary() is None:
        msg = "no llama-server in the build cache: run `nexabind build --with-server`"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    args = ("--engine", "llama-server", "-np", "1", "-c", "2048", "--api-key", KEY)
    greedy = {"temperature": 0}
    with Served(tiny_model, *args, log=tmp_path / "log") as s:
        _, _, chat = s.post(
            "/v1/chat/completions",
            {"messages": ASK, "max_tokens": 6, **greedy},
            headers={"x-api-key": KEY},
        )
        want = chat["choices"][0]["message"]["content"]
        m = _anthropic(s).messages.create(model="x", max_tokens=6, messages=ASK, extra_body=greedy)
        assert "".join(b.text for b in m.content) == want
        assert m.usage.input_tokens == chat["usage"]["prompt_tokens"]
        with _anthropic(s).messages.stream(
            model="x", max_tokens=6, messages=ASK, extra_body=greedy
        ) as stream:
            assert "".join(stream.text_stream) == want
        r = _openai(s).responses.create(model="x", input=ASK, max_output_tokens=6, temperature=0)
        assert r.output_text == want
        events = _openai(s).responses.create(
            model="x", input=ASK, max_output_tokens=6, temperature=0, stream=True
        )
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == want
