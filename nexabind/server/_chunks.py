"""Reading a chat completion back, for the APIs that are adapters over the chat path.

``/v1/messages`` and ``/v1/responses`` run as ``/v1/chat/completions`` requests; their answers
are the chat answer in another shape. :class:`SSEReader` turns a stream's bytes back into its
chunks (whichever backend wrote them), :class:`Blocks` turns the chunks into content blocks
(text, then each tool call) that each API names its own way, and :func:`parts` does the same
for a whole ``chat.completion``. :func:`bad` and :func:`text_of` are the requests' side they
share. Pure: no I/O, tested without a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from nexabind.server._schema import SchemaError

__all__ = ["Blocks", "Part", "SSEReader", "Step", "bad", "parts", "text_of"]


def bad(param: str, message: str) -> SchemaError:
    """A 400 naming an adapter's request field."""
    return SchemaError(param, f"{param}: {message}")


def text_of(content: Any, where: str, kinds: tuple[str, ...]) -> str:
    """A string, or text parts (of the types ``kinds``) joined by newlines, as the chat path
    joins text parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(where, f"give a string or a list of {kinds[0]} parts")
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind not in kinds:
            raise bad(f"{where}[{i}]", f"is {kind!r}; only text parts are taken here")
        if not isinstance(part.get("text"), str):
            raise bad(f"{where}[{i}].text", "give a string")
        texts.append(part["text"])
    return "\n".join(texts)


class SSEReader:
    """``data:`` events from bytes in any cuts: each a chunk (a dict), or None for ``[DONE]``."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[dict[str, Any] | None]:
        self._buf += data.replace(b"\r\n", b"\n")
        out: list[dict[str, Any] | None] = []
        while b"\n\n" in self._buf:
            event, self._buf = self._buf.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    text = line[5:].strip()
                    out.append(None if text == b"[DONE]" else json.loads(text))
        return out


@dataclass(frozen=True)
class Step:
    """One step of an answer: a block opens (``text``, or ``call`` with its id and name),
    grows (``delta``) or closes (``close``)."""

    kind: str  # "text" | "call" | "delta" | "close"
    text: str = ""
    id: str = ""
    name: str = ""


@dataclass
class Blocks:
    """A chat stream's chunks as :class:`Step` s; the finish reason, usage and any error
    mid-stream are kept as they pass."""

    open: str | None = None  # "text", or the open call's index
    finish: str | None = None
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    texts: list[str] = field(default_factory=list)  # the open block's text so far

    def feed(self, chunk: dict[str, Any]) -> list[Step]:
        if "error" in chunk:
            self.error = chunk["error"]
            return self.close()
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        steps: list[Step] = []
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
                if self.open != "text":
                    steps += [*self.close(), Step("text")]
                    self.open = "text"
                steps.append(self._grow(delta["content"]))
            for call in delta.get("tool_calls") or ():
                fn = call.get("function") or {}
                at = f"call {call.get('index', 0)}"
                if self.open != at:
                    steps += [*self.close(), Step("call", id=call.get("id") or "",
                                                  name=fn.get("name") or "")]  # fmt: skip
                    self.open = at
                if fn.get("arguments"):
                    steps.append(self._grow(fn["arguments"]))
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
        return steps

    def _grow(self, text: str) -> Step:
        self.texts.append(text)
        return Step("delta", text)

    def close(self) -> list[Step]:
        """Close the open block (at the end of the stream, or before the next)."""
        if self.open is None:
            return []
        self.open = None
        text, self.texts = "".join(self.texts), []
        return [Step("close", text)]


@dataclass(frozen=True)
class Part:
    """A whole block of a ``chat.completion``: text, or a call (``id``, ``name``, its
    ``arguments`` as JSON text)."""

    kind: str  # "text" | "call"
    text: str = ""
    id: str = ""
    name: str = ""


def parts(completion: dict[str, Any]) -> list[Part]:
    """The blocks of a ``chat.completion``'s first choice: its text, then its calls."""
    message = completion["choices"][0]["message"]
    out = [Part("text", message["content"])] if message.get("content") else []
    for call in message.get("tool_calls") or ():
        fn = call["function"]
        out.append(Part("call", fn.get("arguments") or "{}", call.get("id") or "", fn["name"]))
    return out
