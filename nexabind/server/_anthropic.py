"""Anthropic's Messages API (``POST /v1/messages``) as an adapter over the chat path.

:func:`to_chat` turns a Messages request into a ``/v1/chat/completions`` body (checked
afterwards by the chat schema, as any chat request is); :func:`message` and :class:`Events`
turn the chat answer, whole or streamed, into Anthropic's message and its SSE events;
:func:`error` is Anthropic's error object. Pure: no I/O.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from nexabind.server._chunks import Blocks, Step, bad, parts, text_of

__all__ = ["RENAMED", "Events", "error", "message", "to_chat"]

#: Anthropic's stop reasons for the chat finish reasons.
_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
#: Anthropic's error types by HTTP status.
_ERRORS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
           404: "not_found_error", 408: "timeout_error", 413: "request_too_large",
           429: "rate_limit_error", 503: "overloaded_error"}  # fmt: skip
#: Messages fields with the same meaning under the chat API's name.
_SAME = {"model": "model", "max_tokens": "max_tokens", "temperature": "temperature",
         "top_p": "top_p", "top_k": "top_k", "stop_sequences": "stop",
         "stream": "stream"}  # fmt: skip
#: The Messages name of a chat field it goes by another name, for errors.
RENAMED = {ours: theirs for theirs, ours in _SAME.items() if ours != theirs}


def _text(content: Any, where: str) -> str:
    return text_of(content, where, ("text",))


def _turn(m: Any, i: int) -> list[dict[str, Any]]:
    """One Messages turn as chat messages: tool results become ``tool`` messages, tool uses
    an assistant message's ``tool_calls``."""
    where = f"messages[{i}]"
    if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
        raise bad(f"{where}.role", "give 'user' or 'assistant'")
    role, content = m["role"], m.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise bad(f"{where}.content", "give a string or a list of content blocks")
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(_text([block], f"{where}.content"))
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(block.get("name"), str) or not isinstance(block.get("input"), dict):
                raise bad(at, "a tool_use block needs a string 'name' and an object 'input'")
            fn = {"name": block["name"], "arguments": json.dumps(block["input"])}
            calls.append({"id": str(block.get("id") or ""), "type": "function", "function": fn})
        elif kind == "tool_result" and role == "user":
            result = block.get("content", "")
            out.append({"role": "tool", "tool_call_id": str(block.get("tool_use_id") or ""),
                        "content": _text(result, f"{at}.content")})  # fmt: skip
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            continue  # another model's reasoning, which this one does not read back
        else:
            raise bad(at, f"is {kind!r}; take text, tool_use (assistant) or tool_result (user)")
    if texts or calls:
        turn: dict[str, Any] = {"role": role, "content": "\n".join(texts) or None}
        if calls:
            turn["tool_calls"] = calls
        out.append(turn)
    return out


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise bad("tools", "give a list of {name, description, input_schema}")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise bad(f"tools[{i}].name", "give a string")
        schema = t.get("input_schema", {"type": "object"})
        if not isinstance(schema, dict):
            raise bad(f"tools[{i}].input_schema", "give a JSON schema object")
        fn = {"name": t["name"], "description": t.get("description") or "", "parameters": schema}
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any) -> str | dict[str, Any]:
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind in ("auto", "none"):
        return str(kind)
    if kind == "any":
        return "required"
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise bad("tool_choice", 'give {"type": "auto" | "any" | "none"} or {"type": "tool", "name"}')


def to_chat(body: Any, *, count: bool = False) -> dict[str, Any]:
    """A Messages request as a chat completions body (``count``: for ``count_tokens``, which
    needs no ``max_tokens``).

    Raises:
        SchemaError: naming the Messages field that is missing or malformed.
    """
    if not isinstance(body, dict):
        raise bad("body", "give a JSON object")
    if not count and "max_tokens" not in body:
        raise bad("max_tokens", "is required")
    chat = {ours: body[theirs] for theirs, ours in _SAME.items() if theirs in body}
    messages: list[dict[str, Any]] = []
    if body.get("system") is not None:
        messages.append({"role": "system", "content": _text(body["system"], "system")})
    turns = body.get("messages")
    if not isinstance(turns, list) or not turns:
        raise bad("messages", "give a non-empty list of {role, content}")
    for i, m in enumerate(turns):
        messages += _turn(m, i)
    chat["messages"] = messages
    if body.get("tools"):
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    if count:  # the prompt's tokens are counted by a one-token answer to it
        chat["max_tokens"], chat["stream"] = 1, False
    if chat.get("stream"):
        chat["stream_options"] = {"include_usage": True}
    return chat


def _usage(usage: dict[str, Any] | None) -> dict[str, int]:
    usage = usage or {}
    return {"input_tokens": usage.get("prompt_tokens", 0),
            "output_tokens": usage.get("completion_tokens", 0)}  # fmt: skip


def _input(arguments: str) -> Any:
    try:
        return json.loads(arguments or "{}")
    except ValueError:
        return {}


def message(completion: dict[str, Any], model: str) -> dict[str, Any]:
    """A ``chat.completion`` as Anthropic's ``message``."""
    content = [
        {"type": "text", "text": p.text}
        if p.kind == "text"
        else {"type": "tool_use", "id": p.id, "name": p.name, "input": _input(p.text)}
        for p in parts(completion)
    ]
    reason = completion["choices"][0].get("finish_reason") or "stop"
    return {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant",
            "model": model, "content": content, "stop_reason": _STOP.get(reason, "end_turn"),
            "stop_sequence": None, "usage": _usage(completion.get("usage"))}  # fmt: skip


def error(status: int, text: str) -> dict[str, Any]:
    """Anthropic's error object for an HTTP status."""
    return error_of(_ERRORS.get(status, "api_error"), text)


def error_of(kind: str, text: str) -> dict[str, Any]:
    """Anthropic's error object: ``{"type": "error", "error": {"type", "message"}}``."""
    return {"type": "error", "error": {"type": kind, "message": text}}


def _event(name: str, data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return name, {"type": name, **data}


class Events:
    """A chat stream's chunks as the Messages stream's events (name, data)."""

    def __init__(self, model: str) -> None:
        self.blocks = Blocks()
        self.index = -1
        self.kind = ""  # the open block's
        head: dict[str, Any] = {
                "id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant",
                "model": model, "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": 0, "output_tokens": 0}}  # fmt: skip
        self.start = [_event("message_start", {"message": head})]

    def _map(self, steps: list[Step]) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for s in steps:
            if s.kind in ("text", "call"):
                self.index += 1
                self.kind = s.kind
                block = (
                    {"type": "text", "text": ""}
                    if s.kind == "text"
                    else {"type": "tool_use", "id": s.id, "name": s.name, "input": {}}
                )
                out.append(_event("content_block_start",
                                  {"index": self.index, "content_block": block}))  # fmt: skip
            elif s.kind == "delta":
                delta = (
                    {"type": "text_delta", "text": s.text}
                    if self.kind == "text"
                    else {"type": "input_json_delta", "partial_json": s.text}
                )
                out.append(_event("content_block_delta", {"index": self.index, "delta": delta}))
            else:
                out.append(_event("content_block_stop", {"index": self.index}))
        return out

    def feed(self, chunk: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        out = self._map(self.blocks.feed(chunk))
        err = self.blocks.error
        if err is not None:  # the chat path's error type where Anthropic has the same
            kind = str(err.get("type"))
            kind = kind if kind in _ERRORS.values() else "api_error"
            out.append(("error", error_of(kind, err.get("message") or "")))
        return out

    def end(self) -> list[tuple[str, dict[str, Any]]]:
        out = self._map(self.blocks.close())
        reason = _STOP.get(self.blocks.finish or "stop", "end_turn")
        out.append(_event("message_delta", {"delta": {"stop_reason": reason,
                          "stop_sequence": None}, "usage": _usage(self.blocks.usage)}))  # fmt: skip
        out.append(_event("message_stop", {}))
        return out
