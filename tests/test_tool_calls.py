"""Tool calls without a model: requests, the formats models write, and OpenAI's shapes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from nexabind import openai, tool_calls
from nexabind.tokens import Outcome, Token
from nexabind.tool_calls import HERMES, LLAMA3, MISTRAL, ToolOutput, ToolRequest

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
NAMES = ["get_weather", "get_time"]


def test_request_is_normalized() -> None:
    assert ToolRequest.of(None, None, None, None) is None
    req = ToolRequest.of([WEATHER, TIME], None, None, None)
    assert req is not None and req.choice == "auto" and req.names == NAMES and not req.legacy
    named = ToolRequest.of(
        [WEATHER], {"type": "function", "function": {"name": "get_weather"}}, None, None
    )
    assert named is not None and named.named and named.choice == "get_weather"
    legacy = ToolRequest.of(None, None, [WEATHER["function"]], {"name": "get_weather"})
    assert legacy is not None and legacy.legacy and legacy.named
    by_name = ToolRequest.of([WEATHER, TIME], "get_time", None, None)  # LangChain's bind_tools
    assert by_name is not None and by_name.named and by_name.choice == "get_time"
    bare = ToolRequest.of([{"type": "function", "function": {"name": "f"}}], "required", None, None)
    assert bare is not None and bare.tool("f")["parameters"] == {"type": "object", "properties": {}}


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (([WEATHER, WEATHER], None, None, None), "appear more than once"),
        (([WEATHER], {"type": "function", "function": {"name": "nope"}}, None, None), "'nope'"),
        (([WEATHER], "sometimes", None, None), "tool_choice='sometimes' is invalid"),
        (([WEATHER], "get_time", None, None), r"a function's name \(get_weather\)"),
        ((None, "auto", None, None), "needs tools"),
        (([{"type": "function", "function": {}}], None, None, None), r"tools\[0\].function needs"),
        (
            ([{"type": "function", "function": {"name": "a b"}}], None, None, None),
            "'a b' is invalid",
        ),
        (([WEATHER], None, [WEATHER["function"]], None), "not both"),
    ],
)
def test_bad_requests_say_what_is_wrong(args: tuple[Any, ...], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        ToolRequest.of(*args)


def test_hermes_calls_with_content_before() -> None:
    text = (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        '</tool_call>\n<tool_call>{"name": "get_time", "arguments": "{}"}</tool_call>'
    )
    content, calls = HERMES.parse(text, NAMES)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {}),
    ]
    assert calls[0].id.startswith("call_") and calls[0].id != calls[1].id
    # a call the model did not close (it stopped at its end token) still counts
    _, calls = HERMES.parse('<tool_call>{"name": "get_time", "arguments": {}}', NAMES)
    assert calls[0].name == "get_time"


def test_llama3_and_mistral_calls() -> None:
    _, calls = LLAMA3.parse(
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}', NAMES
    )
    assert (calls[0].name, json.loads(calls[0].arguments)) == ("get_weather", {"city": "Rome"})
    _, calls = LLAMA3.parse('[{"name": "get_time", "parameters": {}}, {"name": "get_time"}]', NAMES)
    assert len(calls) == 2
    text = (
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}, "id": "abc123xyz"}]'
    )
    _, calls = MISTRAL.parse(text, NAMES)
    assert calls[0].id == "abc123xyz" and json.loads(calls[0].arguments) == {"city": "Oslo"}
    _, calls = MISTRAL.parse('[TOOL_CALLS]get_weather[ARGS]{"city": "Lima"}', NAMES)
    assert json.loads(calls[0].arguments) == {"city": "Lima"}


@pytest.mark.parametrize(
    ("fmt", "text"),
    [
        (HERMES, "Just an answer."),
        (HERMES, '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>'),
        (HERMES, '<tool_call>{"name": "launch_rockets", "arguments": {}}</tool_call>'),
        (HERMES, '<tool_call>{"name": "get_weather", "arguments": [1, 2]}</tool_call>'),
        (HERMES, '<tool_call>{"name": "get_weather", "arguments": "not json"}</tool_call>'),
        (HERMES, '<tool_call>{"name": "get_weather", "arguments": {}} trailing</tool_call>'),
        (LLAMA3, '{"name": "get_weather", "parameters": {}} and then some words'),
        (LLAMA3, '{"answer": 42}'),
        (MISTRAL, "[TOOL_CALLS] not json at all"),
        (MISTRAL, "[TOOL_CALLS]get_weather{no args marker}"),
    ],
)
def test_badly_formatted_calls_are_no_calls(fmt: tool_calls.ToolFormat, text: str) -> None:
    assert fmt.parse(text, NAMES) is None


def test_constraint_schema_and_format_detection() -> None:
    req = ToolRequest.of([WEATHER, TIME], "required", None, None)
    assert req is not None
    schema = tool_calls.constraint_schema(req, LLAMA3)
    assert [a["properties"]["name"] for a in schema["anyOf"]] == [
        {"const": "get_weather"},
        {"const": "get_time"},
    ]
    assert "parameters" in schema["anyOf"][0]["properties"]
    assert tool_calls.detect_format("{{ '[TOOL_CALLS]' }}") is MISTRAL
    assert tool_calls.detect_format("{{ '<|python_tag|>' }}") is LLAMA3
    assert tool_calls.detect_format("<tool_call>") is HERMES
    assert tool_calls.detect_format(None) is HERMES


def test_messages_for_templates_with_and_without_tools() -> None:
    req = ToolRequest.of([WEATHER], None, None, None)
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    rich = tool_calls.render_messages(history, req, True)
    assert rich[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert rich[3]["role"] == "tool"
    plain = tool_calls.render_messages(history, req, False)
    assert plain[0]["role"] == "system" and plain[0]["content"].startswith("Be brief.\n\n")
    assert '"get_weather"' in plain[0]["content"] and "<tool_call>" in plain[0]["content"]
    assert (
        plain[2]["content"]
        == '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    )
    assert plain[3] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}


def tokens(*texts: str) -> list[Token]:
    return [Token(i + 10, t) for i, t in enumerate(texts)]


def auto(legacy: bool = False) -> ToolOutput:
    return ToolOutput(
        lambda text: HERMES.parse(text, NAMES), HERMES.markers, json_start=False, legacy=legacy
    )


def test_chat_completion_with_calls_and_without() -> None:
    done = Outcome("stop", 5, 3)
    res = openai.chat_completion(
        tokens("<tool_", 'call>{"name": "get_time", "arguments": {}}', "</tool_call>"),
        done, model="m", tools=auto(),
    )  # fmt: skip
    choice = res["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "get_time", "arguments": "{}"}
    legacy = openai.chat_completion(
        tokens('<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'),
        done, model="m", tools=auto(legacy=True),
    )  # fmt: skip
    assert legacy["choices"][0]["finish_reason"] == "function_call"
    assert legacy["choices"][0]["message"]["function_call"]["name"] == "get_time"
    plain = openai.chat_completion(tokens("No ", "calls."), done, model="m", tools=auto())
    assert plain["choices"][0]["message"] == {"role": "assistant", "content": "No calls."}
    assert plain["choices"][0]["finish_reason"] == "stop"


def deltas(chunks: Any) -> list[tuple[dict[str, Any], str | None]]:
    return [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in chunks]


def test_stream_sends_text_then_holds_back_a_call() -> None:
    out = deltas(openai.chat_chunks(
        tokens("Sure", ", <tool", "_call>", '{"name": "get_weather", "arguments": {"city": "X"}}'),
        Outcome("stop"), model="m", tools=auto(),
    ))  # fmt: skip
    assert out[0] == ({"role": "assistant"}, None)
    assert "".join(d.get("content", "") for d, _ in out) == "Sure, "
    calls = [d["tool_calls"][0] for d, _ in out if "tool_calls" in d]
    assert len(calls) == 1 and calls[0]["index"] == 0 and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "X"}
    assert out[-1] == ({}, "tool_calls")


def test_stream_sends_a_bad_call_as_text_and_a_partial_marker_in_the_end() -> None:
    broken = tokens("a <tool", "_call>{broken", "</tool_call>")
    out = deltas(openai.chat_chunks(broken, Outcome("length"), model="m", tools=auto()))
    assert "".join(d.get("content", "") for d, _ in out) == "a <tool_call>{broken</tool_call>"
    assert out[-1] == ({}, "length")
    out = deltas(openai.chat_chunks(tokens("x <tool"), Outcome("stop"), model="m", tools=auto()))
    assert "".join(d.get("content", "") for d, _ in out) == "x <tool"


def test_stream_of_a_json_call_and_a_forced_call() -> None:
    llama3 = ToolOutput(lambda t: LLAMA3.parse(t, NAMES), LLAMA3.markers, json_start=True)
    out = deltas(openai.chat_chunks(
        tokens(" ", '{"name": "get_time", ', '"parameters": {}}'), Outcome("stop"), model="m",
        tools=llama3,
    ))  # fmt: skip
    assert [d for d, _ in out if "content" in d] == []
    assert out[-1] == ({}, "tool_calls")
    forced = ToolOutput(lambda t: HERMES.parse("<tool_call>" + t, NAMES), buffer_all=True)
    call = tokens('{"name": "get_time",', ' "arguments": {}}')
    out = deltas(openai.chat_chunks(call, Outcome("stop"), model="m", tools=forced))
    assert out[1][0]["tool_calls"][0]["function"]["name"] == "get_time"


def test_a_reply_nested_beyond_the_limit_is_text_not_a_crash() -> None:
    """A model made to write '[' 1,500 times once sent the parser into a RecursionError."""
    for fmt in (HERMES, LLAMA3, MISTRAL):
        for text in ("[" * 1500, "<tool_call>" + "[" * 1500, "[TOOL_CALLS]" + "{" * 1500,
                     '{"name": "f", "arguments": ' + '{"a": ' * 70 + "1" + "}" * 71):  # fmt: skip
            assert fmt.parse(text, ["f"]) is None


@pytest.mark.parametrize(
    "choice", [{"function": 5}, {"function": {"name": 5}}, {"type": "function"}, 5, ["auto"]]
)
def test_a_malformed_tool_choice_is_a_value_error_naming_it(choice: Any) -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    with pytest.raises(ValueError, match="tool_choice"):
        ToolRequest.of(tools, choice, None, None)
