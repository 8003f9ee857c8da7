"""Request bodies checked against declarative schemas, field by field.

Each endpoint's schema maps a field to a :class:`Field`; :func:`validate` returns the body with
its values checked (and ``logit_bias`` keys made ints) or raises :class:`SchemaError` naming
the field, what it must be and what it was. Unknown fields are ignored, as OpenAI's clients
send some that a local server has no use for.
"""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from nexabind.server._options import ServeOptions

__all__ = [
    "CHAT", "COMPLETION", "EMBEDDING", "FIELDS", "RERANK", "SchemaError", "check_sizes",
    "field_of", "text_size", "validate",
]  # fmt: skip


class SchemaError(ValueError):
    """A body field is missing or malformed; ``param`` names it (``messages[2].role``...)."""

    def __init__(self, param: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 2, 60, 60


def _show(value: Any) -> str:
    text = _REPR.repr(value)  # bounded: a huge or deep value is not written out in full
    return text if len(text) <= 60 else text[:57] + "..."


def _what(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "an object", type(None): "null"}  # fmt: skip
    return names.get(type(value), type(value).__name__)


@dataclass(frozen=True)
class Field:
    """One field: its check, whether it must be there, and whether null is allowed."""

    check: Callable[[str, Any], Any]
    required: bool = False
    nullable: bool = True


def _fail(name: str, want: str, value: Any) -> SchemaError:
    return SchemaError(name, f"'{name}' must be {want}; got {_what(value)} {_show(value)}")


def boolean(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise _fail(name, "true or false", v)
    return v


def integer(lo: int | None = None, hi: int | None = None) -> Callable[[str, Any], int]:
    def check(name: str, v: Any) -> int:
        ok = isinstance(v, int) and not isinstance(v, bool)
        if not ok or (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = _range(lo, hi)
            raise _fail(name, f"an integer{rng}", v)
        return int(v)

    return check


def number(lo: float | None = None, hi: float | None = None, *, above: bool = False
           ) -> Callable[[str, Any], float]:  # fmt: skip
    def check(name: str, v: Any) -> float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if ok and above and lo is not None and v <= lo:
            ok = False
        if not ok or (lo is not None and v < lo) or (hi is not None and v > hi):
            top = f" and at most {hi:g}" if hi is not None else ""
            rng = f" above {lo:g}{top}" if above else _range(lo, hi)
            raise _fail(name, f"a number{rng}", v)
        return float(v)

    return check


def _range(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f" from {lo:g} to {hi:g}"
    if lo is not None:
        return f" >= {lo:g}"
    if hi is not None:
        return f" <= {hi:g}"
    return ""


def string(name: str, v: Any) -> str:
    if not isinstance(v, str):
        raise _fail(name, "a string", v)
    return v


def one_of(*choices: str) -> Callable[[str, Any], str]:
    def check(name: str, v: Any) -> str:
        if v not in choices:
            raise _fail(name, "one of " + ", ".join(repr(c) for c in choices), v)
        return str(v)

    return check


def strings(min_items: int = 0, max_items: int | None = None, *, or_string: bool = False
            ) -> Callable[[str, Any], Any]:  # fmt: skip
    def check(name: str, v: Any) -> Any:
        if or_string and isinstance(v, str):
            return v
        want = "a string or an array of strings" if or_string else "an array of strings"
        if not isinstance(v, list):
            raise _fail(name, want, v)
        for i, item in enumerate(v):
            if not isinstance(item, str):
                raise _fail(f"{name}[{i}]", "a string", item)
        if len(v) < min_items or (max_items is not None and len(v) > max_items):
            many = f"{min_items} to {max_items}" if max_items is not None else f"{min_items}+"
            msg = f"'{name}' must hold {many} strings; got {len(v)}"
            raise SchemaError(name, msg)
        return v

    return check


def objects(min_items: int = 1) -> Callable[[str, Any], list[Any]]:
    def check(name: str, v: Any) -> list[Any]:
        if not isinstance(v, list) or len(v) < min_items:
            raise _fail(name, f"an array of at least {min_items} object(s)", v)
        for i, item in enumerate(v):
            if not isinstance(item, dict):
                raise _fail(f"{name}[{i}]", "an object", item)
        return v

    return check


def logit_bias(name: str, v: Any) -> dict[int, float]:
    """``{"token id": bias}`` (JSON keys are strings) with biases from -100 to 100."""
    if not isinstance(v, dict):
        raise _fail(name, 'an object such as {"50256": -100}', v)
    if len(v) > MAX_LOGIT_BIAS:
        msg = f"'{name}' has {len(v)} entries; at most {MAX_LOGIT_BIAS} are taken"
        raise SchemaError(name, msg)
    out: dict[int, float] = {}
    for key, bias in v.items():
        tok = int(key) if key.isascii() and key.isdigit() and len(key) <= 10 else -1
        if not 0 <= tok <= INT32_MAX:
            raise _fail(f"{name}.{key:.40}", "keyed by a token id (0 to 2147483647)", key)
        out[tok] = number(-100, 100)(f"{name}.{key}", bias)
    return out


def stream_options(name: str, v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _fail(name, 'an object such as {"include_usage": true}', v)
    if "include_usage" in v:
        boolean(f"{name}.include_usage", v["include_usage"])
    return v


def _token_ids(v: Any) -> bool:
    return (
        isinstance(v, list)
        and bool(v)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
    )


def prompt(name: str, v: Any) -> str | list[int]:
    """A text, an array of token ids, or an array of one text."""
    if isinstance(v, str):
        return v
    if _token_ids(v):
        return list(v)
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
        return v[0]
    if isinstance(v, list) and len(v) > 1 and all(isinstance(t, str) for t in v):
        msg = f"'{name}' holds {len(v)} prompts; this server completes one per request"
        raise SchemaError(name, msg)
    raise _fail(name, "a string or an array of token ids", v)


def embed_input(name: str, v: Any) -> list[str] | list[list[int]]:
    """A text, an array of texts, an array of token ids, or an array of such arrays (what
    OpenAI's API takes, and LangChain's ``OpenAIEmbeddings`` sends by default)."""
    if isinstance(v, str) or _token_ids(v):
        v = [v]
    if not isinstance(v, list) or not v:
        raise _fail(name, "a string, an array of strings or an array of token ids", v)
    tokens = _token_ids(v[0])
    for i, item in enumerate(v):
        if tokens and not _token_ids(item):
            raise _fail(f"{name}[{i}]", "a non-empty array of token ids", item)
        if not tokens and (not isinstance(item, str) or not item):
            raise _fail(f"{name}[{i}]", "a non-empty string", item)
    return v


def an_object(name: str, v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _fail(name, "an object", v)
    return v


def choice(name: str, v: Any) -> str | dict[str, Any]:
    """``tool_choice`` / ``function_call``: a word (``auto``, ``none``...) or an object."""
    if not isinstance(v, (str, dict)):
        raise _fail(name, 'a string such as "auto" or an object naming a function', v)
    return v


def _find_key(value: Any, key: str) -> str | None:
    """Where ``key`` is a key of an object inside ``value`` (a JSON pointer), if anywhere."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            if key in node:
                return path or "/"
            stack.extend((v, f"{path}/{k}") for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, f"{path}/{i}") for i, v in enumerate(node))
    return None


def server_grammar(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    """``check``, and no ``x-guidance`` anywhere inside: how a schema compiles (lenient
    keywords, whitespace) is the server's choice, not a client's."""

    def checked(name: str, v: Any) -> Any:
        v = check(name, v)
        where = _find_key(v, "x-guidance")
        if where is not None:
            msg = (
                f"'{name}' holds \"x-guidance\" (at {where[:60]}); grammar options are the "
                "server's: remove it"
            )
            raise SchemaError(name, msg)
        return v

    return checked


#: The largest int32: what llama.cpp's counts fit in.
INT32_MAX = 0x7FFFFFFF
#: Choices one request may ask for (``n``).
MAX_CHOICES = 16
#: Entries a ``logit_bias`` may have (the model's vocabulary bounds it again).
MAX_LOGIT_BIAS = 1 << 18

_GENERATION: dict[str, Field] = {
    "model": Field(string),
    "max_tokens": Field(integer(1, INT32_MAX)),
    "max_completion_tokens": Field(integer(1, INT32_MAX)),
    "n_predict": Field(integer(-1, INT32_MAX)),
    "temperature": Field(number(0, 2)),
    "top_p": Field(number(0, 1)),
    "top_k": Field(integer(0, INT32_MAX)),
    "min_p": Field(number(0, 1)),
    "typical_p": Field(number(0, 1)),
    "repeat_penalty": Field(number(0, 1e6, above=True)),
    "presence_penalty": Field(number(-2, 2)),
    "frequency_penalty": Field(number(-2, 2)),
    "logit_bias": Field(logit_bias),
    "seed": Field(integer(0, 0xFFFFFFFF)),
    "n": Field(integer(1, MAX_CHOICES)),
    "stream": Field(boolean),
    "stream_options": Field(stream_options),
    "stop": Field(strings(0, 16, or_string=True)),
    "user": Field(string),
    "session_id": Field(string),
}

#: ``POST /v1/chat/completions``
CHAT: dict[str, Field] = {
    **_GENERATION,
    "response_format": Field(server_grammar(an_object)),
    "tools": Field(server_grammar(objects(0))),
    "tool_choice": Field(choice),
    "functions": Field(server_grammar(objects(0))),
    "function_call": Field(choice),
    "messages": Field(objects(1), required=True, nullable=False),
    "logprobs": Field(boolean),
    "top_logprobs": Field(integer(0, 20)),
}

#: ``POST /v1/completions``
COMPLETION: dict[str, Field] = {
    **_GENERATION,
    "prompt": Field(prompt, required=True, nullable=False),
    "response_format": Field(server_grammar(an_object)),
    "echo": Field(boolean),
    "logprobs": Field(integer(0, 20)),
    "suffix": Field(string),
}

#: ``POST /v1/embeddings``
EMBEDDING: dict[str, Field] = {
    "model": Field(string),
    "input": Field(embed_input, required=True, nullable=False),
    "encoding_format": Field(one_of("float", "base64")),
    "dimensions": Field(integer(1, INT32_MAX)),
    "normalize": Field(boolean),
    "user": Field(string),
}

#: ``POST /v1/rerank``
RERANK: dict[str, Field] = {
    "model": Field(string),
    "query": Field(string, required=True, nullable=False),
    "documents": Field(strings(1), required=True, nullable=False),
    "top_n": Field(integer(1, INT32_MAX)),
    "return_documents": Field(boolean),
}


#: Every field of every endpoint.
FIELDS = frozenset({*CHAT, *COMPLETION, *EMBEDDING, *RERANK})
_NAMED = re.compile(r"([a-z_]+)((?:\[\d+\]|\.[a-z_]+)*)(?=[ =])")


def field_of(message: str) -> str | None:
    """The request field an error message starts with (``top_k=...``, ``stop[1] must...``),
    if it names one."""
    m = _NAMED.match(message)
    return m.group(1) + m.group(2) if m and m.group(1) in FIELDS else None


def text_size(value: Any) -> int:
    """Characters of every string inside ``value`` (keys too), counted in a loop."""
    total = 0
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            total += len(node)
        elif isinstance(node, dict):
            stack.extend(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return total


def check_sizes(kind: str, body: Mapping[str, Any], options: ServeOptions) -> None:
    """Refuse a checked body whose size is beyond the server's limits, before any work.

    Raises:
        SchemaError: Too many messages, inputs or documents, or too many characters (``status``
            413; ``param`` names the field, the message the flag).
    """
    o = options
    field, texts, count, chars = {
        "chat": ("messages", body.get("messages"), ("--max-messages", o.max_messages),
                 ("--max-prompt-chars", o.max_prompt_chars)),
        "completion": ("prompt", body.get("prompt"), None,
                       ("--max-prompt-chars", o.max_prompt_chars)),
        "embedding": ("input", body.get("input"), ("--max-inputs", o.max_inputs),
                      ("--max-input-chars", o.max_input_chars)),
        "rerank": ("documents", [body.get("query"), *body.get("documents", ())],
                   ("--max-inputs", o.max_inputs), ("--max-input-chars", o.max_input_chars)),
    }[kind]  # fmt: skip
    if count is not None and len(body[field]) > count[1]:
        msg = f"'{field}' holds {len(body[field])} items; this server takes {count[1]} ({count[0]})"
        raise SchemaError(field, msg, 413)
    if (n := text_size(texts)) > chars[1]:
        msg = f"'{field}' holds {n} characters; this server takes {chars[1]} ({chars[0]})"
        raise SchemaError(field, msg, 413)


def validate(body: Any, schema: Mapping[str, Field]) -> dict[str, Any]:
    """Check ``body`` (parsed JSON) against ``schema``; return the checked values.

    Null values of nullable fields are dropped (as if absent).

    Raises:
        SchemaError: The body is not an object, a required field is missing, or a field is
            malformed (``param`` names it).
    """
    if not isinstance(body, dict):
        msg = f"the request body must be a JSON object; got {_what(body)}"
        raise SchemaError("body", msg)
    out: dict[str, Any] = {}
    for name, field in schema.items():
        if name not in body or (body[name] is None and field.nullable):
            if field.required:
                raise SchemaError(name, f"'{name}' is required")
            continue
        out[name] = field.check(name, body[name])
    return out
