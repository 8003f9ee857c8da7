"""llama-cpp-python's ``chatml-function-calling`` chat handler, on nexabind's completions.

The prompt is chatml with the functions listed in the system message; the model answers either
``message:`` and text, or one or more ``functions.<name>:`` lines each followed by the
arguments as JSON. Every choice is made under a grammar: which of the two (and which function),
then the arguments under the function's parameter schema, then whether another call follows.
As in llama-cpp-python, that makes ``auto`` calls valid by construction; unlike it, a streamed
``auto`` request is answered (the calls come as whole deltas) instead of refused, and message
text is not HTML-escaped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from nexabind import chat, tool_calls
from nexabind.grammar import LlamaGrammar, response_format_grammar

__all__ = ["chatml_function_calling"]

_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message.role }}\n"
    "{% if message.role == 'system' %}{{ message.content }}"
    "{% if tool_calls %}\n\nYou have access to the following functions:\n"
    "{% for tool in tools %}\nfunctions.{{ tool.function.name }}:\n"
    "{{ tool.function.parameters | tojson }}\n{% endfor %}"
    "\n\nYou can respond to users messages with either a single message or one or more "
    "function calls.\n\nTo respond with a message begin the message with 'message:', use the "
    "following format:\n\nmessage:\n<message>\n\nTo respond with one or more function calls "
    "begin the message with 'functions.<function_name>:', use the following format:\n\n"
    'functions.<function_name>:\n{ "arg1": "value1", "arg2": "value2" }\n'
    'functions.<function_name>:\n{ "arg1": "value1", "arg2": "value2" }'
    "{% endif %}<|im_end|>\n{% endif %}"
    "{% if message.role == 'user' %}{{ message.content }}<|im_end|>\n{% endif %}"
    "{% if message.role == 'assistant' %}"
    "{% if message.content and message.content | length > 0 %}"
    "{% if tool_calls %}message:\n{% endif %}{{ message.content }}<|im_end|>\n{% endif %}"
    "{% if message.tool_calls %}{% for tool_call in message.tool_calls %}"
    "functions.{{ tool_call.function.name }}:\n{{ tool_call.function.arguments }}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _to_chat(completion: dict[str, Any]) -> dict[str, Any]:
    choice = completion["choices"][0]
    return {
        "id": "chat" + completion["id"],
        "object": "chat.completion",
        "created": completion["created"],
        "model": completion["model"],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": choice["text"]},
                "logprobs": None,
                "finish_reason": choice["finish_reason"],
            }
        ],
        "usage": completion["usage"],
    }


def _stream_to_chat(chunks: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """A streamed completion as the chunks of a streamed chat completion."""
    started = False
    for c in chunks:
        head = {"id": "chat" + c["id"], "object": "chat.completion.chunk",
                "created": c["created"], "model": c["model"]}  # fmt: skip
        if not started:
            started = True
            yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant"},
                                        "logprobs": None, "finish_reason": None}]}  # fmt: skip
        choice = c["choices"][0]
        delta = {"content": choice["text"]} if choice["text"] else {}
        if delta or choice["finish_reason"]:
            yield {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                        "finish_reason": choice["finish_reason"]}]}  # fmt: skip


def _chunks(reply: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A whole chat reply as the chunks of a stream."""
    head = {k: reply[k] for k in ("id", "created", "model")}
    head["object"] = "chat.completion.chunk"
    choice = reply["choices"][0]
    message = choice["message"]

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                     "finish_reason": finish}]}  # fmt: skip

    yield chunk({"role": "assistant"}, None)
    if message.get("content"):
        yield chunk({"content": message["content"]}, None)
    for i, call in enumerate(message.get("tool_calls") or []):
        yield chunk({"tool_calls": [{"index": i, **call}]}, None)
    yield chunk({}, choice["finish_reason"])


def chatml_function_calling(
    *,
    llama: Any,
    messages: list[dict[str, Any]],
    functions: list[dict[str, Any]] | None = None,
    function_call: str | dict[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
    tool_choice: str | dict[str, Any] | None = None,
    stream: bool = False,
    stop: str | list[str] | None = None,
    response_format: dict[str, Any] | None = None,
    max_tokens: int | None = None,
    **sampling: Any,
) -> Any:
    """Answer a chat request as llama-cpp-python's ``chatml-function-calling`` handler does.

    Raises:
        ValueError: A malformed tool or choice (see :class:`nexabind.tool_calls.ToolRequest`).
    """
    req = tool_calls.ToolRequest.of(tools, tool_choice, functions, function_call)
    sampling.pop("logprobs", None)  # the chat reply is assembled here: no logprobs
    sampling.pop("top_logprobs", None)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    stops.append("<|im_end|>")
    msgs = tool_calls.render_messages(messages, None, True)

    def render(with_tools: bool) -> str:
        return chat.render_jinja(
            _TEMPLATE, msgs, tools=req.tools if req else [], tool_calls=with_tools or None
        )

    def complete(prompt: str, **kw: Any) -> Any:
        return llama.create_completion(prompt, **{**sampling, **kw})

    if req is None or req.choice == "none":
        grammar = response_format_grammar(response_format) or sampling.pop("grammar", None)
        out = complete(render(False), stop=stops, max_tokens=max_tokens, stream=stream,
                       grammar=grammar)  # fmt: skip
        return _stream_to_chat(out) if stream else _to_chat(out)
    prompt = render(True)
    names = req.names
    pick = " | ".join(f'"functions.{n}:"' for n in names)
    calls: list[tool_calls.Call] = []
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    first: dict[str, Any] | None = None

    def add_usage(c: dict[str, Any]) -> None:
        for k in usage:
            usage[k] += c["usage"][k]

    name: str | None = req.choice if req.named else None
    if name is None:
        either = "" if req.choice == "required" else '"message:" | '
        choice = LlamaGrammar.from_string(f"root ::= {either}functions\nfunctions ::= {pick}\n")
        head = complete(prompt, temperature=0, stop=[":"], max_tokens=None, grammar=choice)
        add_usage(head)
        first = head
        text = head["choices"][0]["text"]
        if not text.startswith("functions."):
            out = complete(prompt + "message:\n", stop=stops, max_tokens=max_tokens, stream=stream)
            return _stream_to_chat(out) if stream else _to_chat(out)
        name = text[len("functions.") :]
    then = LlamaGrammar.from_string(f'root ::= functions | "<|im_end|>"\nfunctions ::= {pick}\n')
    while name in names:
        prompt += f"functions.{name}:\n"
        params = req.tool(name)["parameters"]
        args = complete(prompt, stop=stops, max_tokens=None,
                        grammar=LlamaGrammar.from_json_schema(params, verbose=False))  # fmt: skip
        add_usage(args)
        first = first or args
        text = args["choices"][0]["text"]
        try:
            value = json.loads(text)
        except ValueError:  # the context filled up inside the arguments
            break
        calls.append(tool_calls.Call(name, json.dumps(value, ensure_ascii=False)))
        if req.named:
            break
        prompt += text + "\n"
        nxt = complete(prompt, temperature=0, stop=[":"], max_tokens=None, grammar=then)
        add_usage(nxt)
        name = nxt["choices"][0]["text"][len("functions.") :]
    assert first is not None
    if not calls:
        reply = _to_chat(first)
        return _chunks(reply) if stream else reply
    message: dict[str, Any] = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls
        ],
    }
    if len(calls) == 1:
        message["function_call"] = {"name": calls[0].name, "arguments": calls[0].arguments}
    reply = {
        "id": "chat" + first["id"],
        "object": "chat.completion",
        "created": first["created"],
        "model": first["model"],
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": "tool_calls"}
        ],  # fmt: skip
        "usage": usage,
    }
    return _chunks(reply) if stream else reply
