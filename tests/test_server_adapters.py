"""The adapters' pure parts, without a model: a chat stream read back from bytes in any cuts,
its chunks as content blocks, and those blocks as Anthropic's and the Responses API's events."""

from __future__ import annotations

import json
from typing import Any

import pytest

from nexabind.server import _anthropic, _responses
from nexabind.server._chunks import Blocks, SSEReader, Step
from nexabind.server._schema import SchemaError


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip


def _call(index: int, args: str, name: str = "") -> dict[str, Any]:
    head = {"id": f"call_{index}", "type": "function"} if name else {}
    fn = {"name": name, "arguments": args} if name else {"arguments": args}
    return {"tool_calls": [{"index": index, **head, "function": fn}]}


STREAM = [
    _chunk({"role": "assistant", "content": ""}),
    _chunk({"content": "Let me "}),
    _chunk({"content": "look."}),
    _chunk(_call(0, '{"city":', "get_weather")),
    _chunk(_call(0, ' "Paris"}')),
    _chunk(_call(1, "{}", "get_time")),
    _chunk({}, "tool_calls"),
    {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 7}},
]


def test_sse_reader_takes_any_cuts() -> None:
    data = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in STREAM)
    data += b"data: [DONE]\n\n"
    for size in (1, 7, 64, len(data)):
        reader = SSEReader()
        got: list[Any] = []
        for i in range(0, len(data), size):
            got += reader.feed(data[i : i + size])
        assert got == [*STREAM, None]


def test_blocks_open_grow_and_close() -> None:
    blocks = Blocks()
    steps = [s for c in STREAM for s in blocks.feed(c)] + blocks.close()
    assert steps == [
        Step("text"), Step("delta", "Let me "), Step("delta", "look."),
        Step("close", "Let me look."),
        Step("call", id="call_0", name="get_weather"), Step("delta", '{"city":'),
        Step("delta", ' "Paris"}'), Step("close", '{"city": "Paris"}'),
        Step("call", id="call_1", name="get_time"), Step("delta", "{}"), Step("close", "{}"),
    ]  # fmt: skip
    assert blocks.finish == "tool_calls" and blocks.usage == {"prompt_tokens": 9,
                                                              "completion_tokens": 7}  # fmt: skip


def test_anthropic_events() -> None:
    events = _anthropic.Events("m")
    out = events.start + [e for c in STREAM for e in events.feed(c)] + events.end()
    names = [n for n, _ in out]
    assert names == ["message_start",
                     "content_block_start", "content_block_delta", "content_block_delta",
                     "content_block_stop",
                     "content_block_start", "content_block_delta", "content_block_delta",
                     "content_block_stop",
                     "content_block_start", "content_block_delta", "content_block_stop",
                     "message_delta", "message_stop"]  # fmt: skip
    assert all(d["type"] == n for n, d in out)
    starts = [d for n, d in out if n == "content_block_start"]
    assert [d["index"] for d in starts] == [0, 1, 2]
    assert starts[1]["content_block"] == {"type": "tool_use", "id": "call_0",
                                          "name": "get_weather", "input": {}}  # fmt: skip
    deltas = [d["delta"] for n, d in out if n == "content_block_delta"]
    assert deltas[0] == {"type": "text_delta", "text": "Let me "}
    assert deltas[2] == {"type": "input_json_delta", "partial_json": '{"city":'}
    assert out[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert out[-2][1]["usage"] == {"input_tokens": 9, "output_tokens": 7}


def test_responses_events() -> None:
    events = _responses.Events({"input": "hi"}, "m")
    out = events.start + [e for c in STREAM for e in events.feed(c)] + events.end()
    assert [d["sequence_number"] for _, d in out] == list(range(len(out)))
    final = out[-1][1]["response"]
    assert out[-1][0] == "response.completed" and final["status"] == "completed"
    assert [o["type"] for o in final["output"]] == ["message", "function_call", "function_call"]
    assert final["output"][0]["content"][0]["text"] == "Let me look."
    assert final["output"][1]["arguments"] == '{"city": "Paris"}'
    assert final["usage"]["total_tokens"] == 16


def test_a_stream_error_is_an_error_event() -> None:
    err = {"error": {"message": "the model was unloaded", "type": "server_error"}}
    events = _anthropic.Events("m")
    out = events.feed(_chunk({"content": "Hi"})) + events.feed(err)
    assert out[-2][0] == "content_block_stop"
    assert out[-1] == ("error", {"type": "error", "error": {
        "type": "api_error", "message": "the model was unloaded"}})  # fmt: skip


def test_requests_become_chat_requests() -> None:
    chat = _anthropic.to_chat({
        "max_tokens": 5, "system": [{"type": "text", "text": "S"}], "stop_sequences": ["x"],
        "tool_choice": {"type": "any"},
        "tools": [{"name": "f", "input_schema": {"type": "object"}}],
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm"},
                {"type": "text", "text": "t"},
                {"type": "tool_use", "id": "c1", "name": "f", "input": {"a": 1}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c1",
                                          "content": "r"}]},
        ],
    })  # fmt: skip
    assert chat["messages"] == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "t", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "r"},
    ]  # fmt: skip
    assert chat["stop"] == ["x"] and chat["tool_choice"] == "required"
    assert chat["tools"][0]["function"]["parameters"] == {"type": "object"}
    items = [{"role": "user", "content": "q"},
             {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
             {"type": "function_call_output", "call_id": "c1", "output": "r"}]  # fmt: skip
    chat = _responses.to_chat({"input": items, "instructions": "S", "max_output_tokens": 3})
    assert [m["role"] for m in chat["messages"]] == ["system", "user", "assistant", "tool"]
    assert chat["max_tokens"] == 3
    with pytest.raises(SchemaError) as e:
        _responses.to_chat({"input": "q", "previous_response_id": "resp_1"})
    assert e.value.param == "previous_response_id"
