"""OpenAI's Responses API (``POST /v1/responses``), stateless, as an adapter over the chat path.

:func:`to_chat` turns a Responses request into a ``/v1/chat/completions`` body (checked
afterwards by the chat schema); :func:`response` and :class:`Events` turn the chat answer,
whole or streamed, into a ``response`` object and the Responses stream's events. Nothing is
stored: ``previous_response_id`` is a 400 naming it (send the earlier items in ``input``).
Pure: no I/O.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from nexabind.server._chunks import Blocks, Step, bad, parts, text_of

__all__ = ["RENAMED", "Events", "response", "to_chat"]

#: Responses fields with the same meaning under the chat API's name.
_SAME = {"model": "model", "max_output_tokens": "max_tokens", "temperature": "temperature",
         "top_p": "top_p", "stream": "stream"}  # fmt: skip
#: The Responses name of a chat field it goes by another name, for errors.
RENAMED = {ours: theirs for theirs, ours in _SAME.items() if ours != theirs}


def _content(content: Any, where: str) -> str:
    return text_of(content, where, ("input_text", "output_text", "text"))


def _items(items: Any) -> list[dict[str, Any]]:
    """``input`` as chat messages: a string is one user message; function calls and their
    outputs become an assistant's ``tool_calls`` and ``tool`` messages."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise bad("input", "give a string or a non-empty list of items")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad(where, "give an object")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise bad(f"{where}.role", "give 'user', 'assistant', 'system' or 'developer'")
            text = _content(item.get("content"), f"{where}.content")
            out.append({"role": "system" if role == "developer" else role, "content": text})
        elif kind == "function_call":
            if not isinstance(item.get("name"), str):
                raise bad(f"{where}.name", "give a string")
            args = item.get("arguments", "{}")
            if not isinstance(args, str):
                raise bad(f"{where}.arguments", "give JSON text")
            call = {"id": str(item.get("call_id") or ""), "type": "function",
                    "function": {"name": item["name"], "arguments": args}}  # fmt: skip
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output", "")
            out.append({"role": "tool", "tool_call_id": str(item.get("call_id") or ""),
                        "content": _content(output, f"{where}.output")})  # fmt: skip
        else:
            raise bad(f"{where}.type", f"is {kind!r}; take message, function_call or "
                       "function_call_output")  # fmt: skip
    return out


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise bad("tools", "give a list of function tools")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function":
            kind = t.get("type") if isinstance(t, dict) else None
            raise bad(f"tools[{i}].type", f"is {kind!r}; only function tools are served")
        if not isinstance(t.get("name"), str):
            raise bad(f"tools[{i}].name", "give a string")
        fn = {"name": t["name"], "description": t.get("description") or "",
              "parameters": t.get("parameters") or {"type": "object"}}  # fmt: skip
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any) -> str | dict[str, Any]:
    if choice in ("auto", "none", "required"):
        return str(choice)
    if (
        isinstance(choice, dict)
        and choice.get("type") == "function"
        and isinstance(choice.get("name"), str)
    ):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise bad("tool_choice", 'give "auto", "none", "required" or {"type": "function", "name"}')


def _format(fmt: Any) -> dict[str, Any]:
    """``text.format`` as the chat API's ``response_format``."""
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema" and isinstance(fmt.get("schema"), dict):
        schema = {"name": fmt.get("name") or "output", "schema": fmt["schema"]}
        return {"type": "json_schema", "json_schema": schema}
    msg = 'give {"type": "text" | "json_object"} or {"type": "json_schema", "name", "schema"}'
    raise bad("text.format", msg)


def to_chat(body: Any) -> dict[str, Any]:
    """A Responses request as a chat completions body.

    Raises:
        SchemaError: naming the Responses field that is missing, malformed or not served.
    """
    if not isinstance(body, dict):
        raise bad("body", "give a JSON object")
    if body.get("previous_response_id") is not None:
        msg = ("this server keeps no responses (it is stateless); send the earlier turns as "
               "items in 'input' instead")  # fmt: skip
        raise bad("previous_response_id", msg)
    if "input" not in body:
        raise bad("input", "is required")
    chat = {ours: body[theirs] for theirs, ours in _SAME.items() if theirs in body}
    messages: list[dict[str, Any]] = []
    if body.get("instructions") is not None:
        messages.append({"role": "system", "content": _content(body["instructions"],
                                                               "instructions")})  # fmt: skip
    chat["messages"] = messages + _items(body["input"])
    if body.get("tools"):
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    text = body.get("text")
    if text is not None:
        if not isinstance(text, dict):
            raise bad("text", 'give {"format": {...}}')
        if text.get("format") is not None:
            chat["response_format"] = _format(text["format"])
    if chat.get("stream"):
        chat["stream_options"] = {"include_usage": True}
    return chat


def _usage(usage: dict[str, Any] | None) -> dict[str, Any]:
    usage = usage or {}
    n_in, n_out = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    return {"input_tokens": n_in, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": n_out, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": n_in + n_out}  # fmt: skip


def _text_item(text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": []}] if text or (
        status == "completed") else []  # fmt: skip
    return {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": status,
            "role": "assistant", "content": content}  # fmt: skip


def _call_item(call_id: str, name: str, arguments: str, status: str = "completed") -> Any:
    return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call_id,
            "name": name, "arguments": arguments, "status": status}  # fmt: skip


class _Head:
    """The fields of a ``response`` that echo the request."""

    def __init__(self, body: dict[str, Any], model: str) -> None:
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.fields = {
            "model": model, "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "temperature": body.get("temperature"), "top_p": body.get("top_p"),
            "tools": body.get("tools") or [], "tool_choice": body.get("tool_choice") or "auto",
            "parallel_tool_calls": True, "previous_response_id": None, "metadata": {},
            "text": body.get("text") or {"format": {"type": "text"}},
            "truncation": "disabled", "error": None,
        }  # fmt: skip

    def response(self, status: str, output: list[Any], usage: Any = None,
                 finish: str | None = None) -> dict[str, Any]:  # fmt: skip
        incomplete = {"reason": "max_output_tokens"} if finish == "length" else None
        if status == "completed" and incomplete:
            status = "incomplete"
        return {"id": self.id, "object": "response", "created_at": self.created,
                "status": status, "output": output, "usage": usage,
                "incomplete_details": incomplete, **self.fields}  # fmt: skip


def response(completion: dict[str, Any], body: dict[str, Any], model: str) -> dict[str, Any]:
    """A ``chat.completion`` as a ``response``."""
    output = [
        _text_item(p.text) if p.kind == "text" else _call_item(p.id, p.name, p.text)
        for p in parts(completion)
    ]
    finish = completion["choices"][0].get("finish_reason")
    usage = _usage(completion.get("usage"))
    return _Head(body, model).response("completed", output, usage, finish)


class Events:
    """A chat stream's chunks as the Responses stream's events (type, data)."""

    def __init__(self, body: dict[str, Any], model: str) -> None:
        self.head = _Head(body, model)
        self.blocks = Blocks()
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self.item: dict[str, Any] = {}
        first = self.head.response("in_progress", [])
        self.start = [self._event("response.created", response=first),
                      self._event("response.in_progress", response=first)]  # fmt: skip

    def _event(self, name: str, **data: Any) -> tuple[str, dict[str, Any]]:
        self.seq += 1
        return name, {"type": name, "sequence_number": self.seq - 1, **data}

    def _map(self, steps: list[Step]) -> list[tuple[str, dict[str, Any]]]:
        out = []
        n = len(self.output)
        for s in steps:
            at = {"item_id": self.item.get("id"), "output_index": n}
            if s.kind == "text":
                self.item = _text_item("", "in_progress")
                part = {"type": "output_text", "text": "", "annotations": []}
                at = {"item_id": self.item["id"], "output_index": n}
                out += [self._event("response.output_item.added", output_index=n,
                                    item=self.item),
                        self._event("response.content_part.added", **at, content_index=0,
                                    part=part)]  # fmt: skip
            elif s.kind == "call":
                self.item = _call_item(s.id, s.name, "", "in_progress")
                out.append(self._event("response.output_item.added", output_index=n,
                                       item=self.item))  # fmt: skip
            elif s.kind == "delta" and self.item["type"] == "message":
                out.append(self._event("response.output_text.delta", **at, content_index=0,
                                       delta=s.text, logprobs=[]))  # fmt: skip
            elif s.kind == "delta":
                out.append(self._event("response.function_call_arguments.delta", **at,
                                       delta=s.text))  # fmt: skip
            elif self.item["type"] == "message":
                item = _text_item(s.text)
                item["id"] = self.item["id"]
                part = item["content"][0]
                out += [
                    self._event(
                        "response.output_text.done", **at, content_index=0, text=s.text, logprobs=[]
                    ),
                    self._event("response.content_part.done", **at, content_index=0, part=part),
                    self._event("response.output_item.done", output_index=n, item=item),
                ]
                self.output.append(item)  # fmt: skip
                n += 1
            else:
                item = {**self.item, "arguments": s.text, "status": "completed"}
                out += [
                    self._event("response.function_call_arguments.done", **at, arguments=s.text),
                    self._event("response.output_item.done", output_index=n, item=item),
                ]
                self.output.append(item)  # fmt: skip
                n += 1
        return out

    def feed(self, chunk: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        out = self._map(self.blocks.feed(chunk))
        err = self.blocks.error
        if err is not None:
            out.append(self._event("error", code=err.get("code"), message=err.get("message"),
                                   param=err.get("param")))  # fmt: skip
        return out

    def end(self) -> list[tuple[str, dict[str, Any]]]:
        out = self._map(self.blocks.close())
        final = self.head.response("completed", self.output, _usage(self.blocks.usage),
                                   self.blocks.finish)  # fmt: skip
        name = "response.completed" if final["status"] == "completed" else "response.incomplete"
        out.append(self._event(name, response=final))
        return out
