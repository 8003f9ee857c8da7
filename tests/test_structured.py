"""Structured output and tool calls through ``Llama``, on a tiny random-weight model.

The model knows nothing: every valid reply here is valid because the grammar made it so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_llguidance import SCHEMAS, validate

from nexabind import Llama

HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{{ tools | tojson }}</tools><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}"
    "</tool_call>{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}},
    },
}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def llm(libdir: Path, tiny_model: Path):
    with Llama(tiny_model, n_ctx=2048, n_threads=1, lib_path=libdir) as m:
        yield m


@pytest.fixture(scope="module")
def hermes(libdir: Path, tiny_model: Path):
    with Llama(
        tiny_model, n_ctx=2048, n_threads=1, chat_template=HERMES_TEMPLATE, lib_path=libdir
    ) as m:
        yield m


def prompt_text(m: Llama, usage: dict[str, int]) -> str:
    ids = m.input_ids[: usage["prompt_tokens"]].tolist()
    return m.detokenize(ids, special=True).decode()


# -- response_format ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_response_format_is_valid(llm: Llama, name: str) -> None:
    schema = SCHEMAS[name]
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    out = llm.create_chat_completion(ASK, response_format=fmt, max_tokens=400, temperature=0.9)
    assert out["choices"][0]["finish_reason"] == "stop", out["choices"][0]["message"]
    validate(json.loads(out["choices"][0]["message"]["content"]), schema)


def test_json_object_with_and_without_a_schema(llm: Llama) -> None:
    seen = 0
    for seed in range(16):
        out = llm.create_chat_completion(
            ASK, response_format={"type": "json_object"}, max_tokens=300, seed=seed
        )
        if out["choices"][0]["finish_reason"] == "stop":
            assert isinstance(json.loads(out["choices"][0]["message"]["content"]), dict)
            seen += 1
    assert seen  # an unbounded object may run long; some ended, and each one parsed
    schema = SCHEMAS["nested objects"]
    out = llm.create_chat_completion(
        ASK, response_format={"type": "json_object", "schema": schema}, max_tokens=400
    )
    validate(json.loads(out["choices"][0]["message"]["content"]), schema)


def test_response_format_on_completions_and_streams(llm: Llama) -> None:
    schema = SCHEMAS["array of objects"]
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    out = llm.create_completion("JSON:", response_format=fmt, max_tokens=400)
    assert out["choices"][0]["finish_reason"] == "stop"
    validate(json.loads(out["choices"][0]["text"]), schema)
    chunks = list(llm.create_chat_completion(ASK, response_format=fmt, max_tokens=400, stream=True))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    validate(json.loads(text), schema)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("fmt", "fragment"),
    [
        ({"type": "yaml"}, "response_format=.* is invalid"),
        ({"type": "json_schema"}, '"json_schema" needs'),
        ({"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}, "#"),
        ({"type": "json_object", "schema": {"type": "object", "not": {}}}, "not"),
    ],
)
def test_bad_response_formats_are_refused(llm: Llama, fmt: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        llm.create_chat_completion(ASK, response_format=fmt, max_tokens=4)


def test_grammar_and_response_format_together_are_refused(llm: Llama) -> None:
    with pytest.raises(ValueError, match="not both"):
        llm.create_chat_completion(
            ASK, response_format={"type": "json_object"}, grammar='root ::= "x"', max_tokens=2
        )


# -- tools ---------------------------------------------------------------------------------------


def test_required_and_named_calls_follow_the_parameters(hermes: Llama) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in (named, "get_weather", "required"):
        for seed in range(3):
            out = hermes.create_chat_completion(
                ASK, tools=[WEATHER, TIME], tool_choice=choice, seed=seed, max_tokens=200
            )
            c = out["choices"][0]
            assert c["finish_reason"] == "tool_calls"
            assert c["message"]["content"] is None
            call = c["message"]["tool_calls"][0]
            assert call["type"] == "function" and call["id"].startswith("call_")
            name, args = call["function"]["name"], json.loads(call["function"]["arguments"])
            tool = WEATHER if name == "get_weather" else TIME
            validate(args, tool["function"]["parameters"])
            if choice != "required":
                assert name == "get_weather"
    # required among two: the template got the tools, and the call was opened in the model's
    # format (the model chooses the function)
    text = prompt_text(hermes, out["usage"])
    assert '"name": "get_weather"' in text and text.endswith("<tool_call>\n")


def test_auto_finds_calls_in_the_reply_and_leaves_bad_ones_as_text(hermes: Llama) -> None:
    call = (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}</tool_call>'
    )
    force = 'root ::= "OK. " "' + call.replace('"', '\\"') + '"'
    out = hermes.create_chat_completion(ASK, tools=[WEATHER], grammar=force, max_tokens=80)
    c = out["choices"][0]
    assert c["finish_reason"] == "tool_calls" and c["message"]["content"] == "OK."
    assert json.loads(c["message"]["tool_calls"][0]["function"]["arguments"]) == {
        "city": "Paris",
        "days": 2,
    }
    chunks = list(
        hermes.create_chat_completion(
            ASK, tools=[WEATHER], grammar=force, max_tokens=80, stream=True
        )
    )
    assert "".join(x["choices"][0]["delta"].get("content") or "" for x in chunks) == "OK. "
    assert chunks[-2]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    bad = 'root ::= "<tool_call>{\\"name\\": \\"rm_rf\\", \\"arguments\\": {}}</tool_call>"'
    out = hermes.create_chat_completion(ASK, tools=[WEATHER], grammar=bad, max_tokens=80)
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["choices"][0]["message"]["content"].startswith("<tool_call>")
    assert "tool_calls" not in out["choices"][0]["message"]


def test_other_formats_are_found_too(hermes: Llama) -> None:
    for text in (
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo", "days": 1}}]',
        '{"name": "get_weather", "parameters": {"city": "Oslo", "days": 1}}',
    ):
        force = 'root ::= "' + text.replace('"', '\\"') + '"'
        out = hermes.create_chat_completion(ASK, tools=[WEATHER], grammar=force, max_tokens=80)
        assert out["choices"][0]["finish_reason"] == "tool_calls", text


def test_none_renders_no_tools_and_finds_no_calls(hermes: Llama) -> None:
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "X", "days": 1}}</tool_call>'
    force = 'root ::= "' + call.replace('"', '\\"') + '"'
    out = hermes.create_chat_completion(
        ASK, tools=[WEATHER], tool_choice="none", grammar=force, max_tokens=80
    )
    assert out["choices"][0]["finish_reason"] == "stop"
    assert "get_weather" not in prompt_text(hermes, out["usage"])


def test_legacy_functions(hermes: Llama) -> None:
    out = hermes.create_chat_completion(
        ASK, functions=[WEATHER["function"]], function_call={"name": "get_weather"}, max_tokens=200
    )
    c = out["choices"][0]
    assert c["finish_reason"] == "function_call"
    assert c["message"]["function_call"]["name"] == "get_weather"
    validate(
        json.loads(c["message"]["function_call"]["arguments"]), WEATHER["function"]["parameters"]
    )


def test_the_follow_up_turn_renders_calls_and_results(hermes: Llama) -> None:
    first = hermes.create_chat_completion(
        ASK, tools=[WEATHER], tool_choice="required", max_tokens=200
    )
    message = first["choices"][0]["message"]
    call = message["tool_calls"][0]
    follow = [
        *ASK,
        message,
        {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 24 C"},
    ]
    out = hermes.create_chat_completion(follow, tools=[WEATHER], max_tokens=5)
    text = prompt_text(hermes, out["usage"])
    args = json.loads(call["function"]["arguments"])
    # the arguments reach the template as an object, written once as JSON (not a quoted string)
    assert json.dumps({"name": "get_weather", "arguments": args}) in text
    assert "<|im_start|>tool\nsunny, 24 C<|im_end|>" in text


@pytest.mark.parametrize("choice", ["get_weather", "required"])
def test_a_forced_function_is_its_arguments_alone_after_a_prompt_without_tools(
    hermes: Llama, choice: str
) -> None:
    """As llama-cpp-python: the model need not choose, so it is not told the tools, and it
    writes only the arguments, under the parameter schema (a few tokens, not a wrapper)."""
    plain = hermes.create_chat_completion(ASK, max_tokens=1)
    for seed in range(3):
        out = hermes.create_chat_completion(
            ASK, tools=[WEATHER], tool_choice=choice, seed=seed, max_tokens=40
        )
        c = out["choices"][0]
        assert c["finish_reason"] == "tool_calls" and c["message"]["content"] is None
        (call,) = c["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather"
        validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])
        assert out["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
        assert "<tool_call>" not in prompt_text(hermes, out["usage"])
    legacy = hermes.create_chat_completion(
        ASK, functions=[WEATHER["function"]], function_call={"name": "get_weather"}, max_tokens=40
    )
    assert legacy["choices"][0]["finish_reason"] == "function_call"
    assert legacy["choices"][0]["message"]["function_call"]["name"] == "get_weather"


def test_a_template_without_tools_is_told_about_them(llm: Llama) -> None:
    out = llm.create_chat_completion(
        ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=200
    )
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    text = prompt_text(llm, out["usage"])
    assert "You can call these tools" in text and '"get_weather"' in text


def test_required_with_a_grammar_is_refused(hermes: Llama) -> None:
    with pytest.raises(ValueError, match="required or named tool_choice"):
        hermes.create_chat_completion(
            ASK, tools=[WEATHER], tool_choice="required", grammar='root ::= "x"'
        )


# -- chatml-function-calling ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fc(libdir: Path, tiny_model: Path):
    with Llama(
        tiny_model, n_ctx=4096, n_threads=1, chat_format="chatml-function-calling", lib_path=libdir
    ) as m:
        yield m


def test_chatml_function_calling(fc: Llama) -> None:
    msgs = [{"role": "system", "content": "You help."}, *ASK]
    named = {"type": "function", "function": {"name": "get_weather"}}
    out = fc.create_chat_completion(msgs, tools=[WEATHER], tool_choice=named, max_tokens=50)
    c = out["choices"][0]
    assert c["finish_reason"] == "tool_calls"
    validate(json.loads(c["message"]["tool_calls"][0]["function"]["arguments"]),
             WEATHER["function"]["parameters"])  # fmt: skip
    assert c["message"]["function_call"]["name"] == "get_weather"  # one call: both shapes
    auto = fc.create_chat_completion(msgs, tools=[WEATHER, TIME], max_tokens=20, seed=1)
    message = auto["choices"][0]["message"]
    for call in message.get("tool_calls") or []:  # valid by construction, whichever it chose
        tool = WEATHER if call["function"]["name"] == "get_weather" else TIME
        validate(json.loads(call["function"]["arguments"]), tool["function"]["parameters"])
    plain = fc.create_chat_completion(msgs, max_tokens=4, stream=True)
    chunks = list(plain)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    streamed = list(
        fc.create_chat_completion(msgs, tools=[WEATHER], tool_choice=named, stream=True)
    )
    assert streamed[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize(
    ("schema", "fragment"),
    [
        ({"$ref": "#"}, "cycle"),
        ({"$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "null"}]}},
          "$ref": "#/$defs/a"}, "cycle"),
        ({"type": "object", "properties": {f"p{i}": {} for i in range(401)}},
         "limit is 400 per object"),
        ({"type": "object", "properties": {f"o{j}": {"type": "object", "properties": {
            f"p{i}": {} for i in range(300)}} for j in range(4)}}, "limit is 1000"),
        ({"x-guidance": 5}, "x-guidance"),
    ],
)  # fmt: skip
def test_schemas_beyond_the_limits_are_value_errors(schema: dict[str, Any], fragment: str) -> None:
    from nexabind._json_schema import to_grammar

    with pytest.raises(ValueError, match=fragment):
        to_grammar(schema)


def test_deep_schemas_are_value_errors_at_any_depth() -> None:
    from nexabind._json_schema import to_grammar

    for levels in (33, 70, 5000):
        schema: dict[str, Any] = {}
        for _ in range(levels):
            schema = {"type": "array", "items": schema}
        with pytest.raises(ValueError, match="limit is 32|more than 64 deep"):
            to_grammar(schema)
    assert to_grammar({"type": "object", "properties": {"a": {"$ref": "#"}}})  # it nests: fine


@pytest.mark.parametrize(
    ("schema", "most"),
    [
        ({"type": "integer"}, 10**16 - 1),
        ({"type": "integer", "minimum": 0}, 10**16 - 1),
        ({"type": "number"}, 1e16),  # the nearest double to 10**16 - 1
        ({"type": ["number", "null"], "exclusiveMaximum": 5}, 1e16),
        ({"type": "integer", "minimum": 0, "maximum": 10**20}, 10**20),
    ],
)
def test_digits_are_bounded_so_the_reply_parses(
    gemma: Path, libdir: Path, schema: dict[str, Any], most: int
) -> None:
    """A model that would write digits for ever (its digits favoured) still closes the object
    (llama-cpp-python's grammars allow 16 digits; a schema's own bounds may allow more), and
    a number's digits after the point end too."""
    with Llama(gemma, n_ctx=512, n_threads=1, verbose=False) as llm:
        digits = {llm.tokenize(str(d).encode(), add_bos=False)[0]: 30.0 for d in range(10)}
        if "number" in schema["type"]:  # and the point, so the digits go on after it
            digits[llm.tokenize(b".", add_bos=False)[0]] = 40.0
        fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": {
            "type": "object", "properties": {"age": schema}, "required": ["age"]}}}  # fmt: skip
        r = llm.create_chat_completion(
            [{"role": "user", "content": "Your age?"}], response_format=fmt, logit_bias=digits,
            temperature=0, max_tokens=60,
        )  # fmt: skip
    choice = r["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    age = json.loads(choice["message"]["content"])["age"]
    assert abs(age) <= most
    if schema["type"] == "integer":
        assert len(str(abs(age))) >= 16  # digits, as many as it may write
