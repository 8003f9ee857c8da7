"""Tool calling: OpenAI's ``tools``/``tool_choice`` (and legacy ``functions``) in, calls out.

Pure functions and values, no model: :class:`ToolRequest` checks and normalizes a request;
:func:`constraint_schema` is the JSON schema a ``required`` or named call is generated under;
:func:`render_messages` prepares a conversation for a template (or tells the tools to a model
whose template has no place for them); :class:`ToolFormat` finds calls in what a model wrote,
in the formats chat templates use:

- Hermes / Qwen: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one per call;
- Llama 3.1: the whole reply a JSON object ``{"name": ..., "parameters": {...}}`` (after
  ``<|python_tag|>`` or not), or a list of them;
- Mistral: ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]``, or
  ``[TOOL_CALLS]name[ARGS]{...}``.

A reply that does not parse as calls of the given tools is the reply's text, never an error.
"""

from __future__ import annotations

import json
import re
import reprlib
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from nexabind._nesting import deeper_than

__all__ = [
    "FORMATS",
    "Call",
    "ToolFormat",
    "ToolOutput",
    "ToolRequest",
    "call_id",
    "constraint_schema",
    "detect_format",
    "render_messages",
    "tools_system_prompt",
]


@dataclass
class Call:
    """One parsed tool call: the function's name and its arguments as JSON text."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: call_id())


def call_id() -> str:
    """A fresh tool call id, in OpenAI's form (``call_`` and 24 characters)."""
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ToolRequest:
    """A chat request's tools and what it asks of them, normalized.

    Attributes:
        tools: ``[{"type": "function", "function": {"name", "description", "parameters"}}]``.
        choice: ``"auto"``, ``"none"``, ``"required"``, or the name of the one function to
            call (``tool_choice`` names it in an object, or bare: ``"get_weather"``).
        legacy: The request used ``functions`` / ``function_call`` (the reply then carries
            ``function_call`` and finishes with ``"function_call"``).
    """

    tools: list[dict[str, Any]]
    choice: str
    legacy: bool = False
    named: bool = False

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    def tool(self, name: str) -> dict[str, Any]:
        return next(t["function"] for t in self.tools if t["function"]["name"] == name)

    @classmethod
    def of(
        cls,
        tools: Sequence[dict[str, Any]] | None,
        tool_choice: str | dict[str, Any] | None,
        functions: Sequence[dict[str, Any]] | None,
        function_call: str | dict[str, Any] | None,
    ) -> ToolRequest | None:
        """Normalize a request's tool arguments; None when it has no tools.

        Raises:
            ValueError: A malformed tool, a duplicate name, an unknown choice, or a named
                choice that is not among the tools (the message says which).
        """
        legacy = functions is not None or function_call is not None
        if functions is not None and tools is not None:
            msg = "give tools or functions (the older form), not both"
            raise ValueError(msg)
        if functions is not None:
            tools = [{"type": "function", "function": f} for f in functions]
            tool_choice = function_call
        if tool_choice is not None and not tools:
            msg = f"tool_choice={_show(tool_choice)} needs tools"
            raise ValueError(msg)
        if not tools:
            return None
        checked = [_check_tool(i, t) for i, t in enumerate(tools)]
        names = [t["function"]["name"] for t in checked]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            msg = f"tool names must be unique; {dup} appear more than once"
            raise ValueError(msg)
        choice = "auto" if tool_choice is None else tool_choice
        if isinstance(choice, dict):
            fn = choice.get("function")
            name = fn.get("name") if isinstance(fn, dict) else choice.get("name")
            if not isinstance(name, str):
                msg = (
                    f"tool_choice {_show(choice)} names no function; use "
                    '{"type": "function", "function": {"name": ...}}'
                )
                raise ValueError(msg)
            if name not in names:
                msg = f"tool_choice names {name!r}, which is not among the tools {names}"
                raise ValueError(msg)
            return cls(checked, name, legacy, named=True)
        if isinstance(choice, str) and choice not in _CHOICES and choice in names:
            return cls(checked, choice, legacy, named=True)  # a bare name: LangChain's bind_tools
        if not isinstance(choice, str) or choice not in _CHOICES:
            msg = (
                f"tool_choice={_show(choice)} is invalid; use 'auto', 'none', 'required', a "
                f"function's name ({', '.join(names)}) or "
                '{"type": "function", "function": {"name": ...}}'
            )
            raise ValueError(msg)
        return cls(checked, choice, legacy)


_CHOICES = ("auto", "none", "required")


def _show(value: Any) -> str:
    text = reprlib.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_tool(i: int, tool: Any) -> dict[str, Any]:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        msg = f'{where} must be {{"type": "function", "function": {{"name": ...}}}}'
        raise ValueError(msg)
    fn = tool.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        msg = f"{where}.function needs a name (a str)"
        raise ValueError(msg)
    if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", fn["name"]):
        msg = f"{where}.function.name {fn['name']!r} is invalid; use letters, digits, _ . -"
        raise ValueError(msg)
    params = fn.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(params, dict):
        msg = f"{where}.function.parameters must be a JSON schema object"
        raise ValueError(msg)
    return {"type": "function", "function": {**fn, "parameters": params}}


@dataclass(frozen=True)
class ToolOutput:
    """How to read a generation's text for calls (given to :mod:`nexabind.openai`'s chat shapes).

    Attributes:
        parse: The text's content and calls, or None when it holds no valid calls.
        markers: Text that starts calls: a stream holds back what follows one.
        json_start: A reply that starts with ``{`` or ``[`` may be a call (held back too).
        buffer_all: Hold the whole reply back (a constrained call: it is one).
        legacy: Answer in the legacy ``function_call`` shape.
    """

    parse: Callable[[str], tuple[str | None, list[Call]] | None]
    markers: tuple[str, ...] = ()
    json_start: bool = False
    buffer_all: bool = False
    legacy: bool = False


# -- formats -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolFormat:
    """How a model writes tool calls.

    Attributes:
        name: ``hermes``, ``llama3`` or ``mistral``.
        markers: Text that starts calls (the reply is held back from a stream once one
            appears).
        json_start: Whether a reply that starts with ``{`` or ``[`` is a call.
        arguments_key: The key the arguments go under.
        opener: What a constrained call starts with (written into the prompt).
    """

    name: str
    markers: tuple[str, ...]
    json_start: bool
    arguments_key: str
    opener: str

    def parse(self, text: str, names: Sequence[str]) -> tuple[str | None, list[Call]] | None:
        """The reply's content and calls, or None when it holds no valid calls."""
        try:
            found = _PARSERS[self.name](text)
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
            return None  # RecursionError: a model that wrote "[" a thousand times
        if found is None:
            return None
        content, raw = found
        calls = []
        for item in raw:
            call = _call_of(item, names)
            if call is None:
                return None
            calls.append(call)
        if not calls:
            return None
        content = content.strip() if content else ""
        return (content or None), calls


HERMES = ToolFormat("hermes", ("<tool_call>",), False, "arguments", "<tool_call>\n")
LLAMA3 = ToolFormat("llama3", ("<|python_tag|>",), True, "parameters", "")
MISTRAL = ToolFormat("mistral", ("[TOOL_CALLS]",), False, "arguments", "[TOOL_CALLS]")
#: Every format, the order they are tried in when a template does not say.
FORMATS = (HERMES, LLAMA3, MISTRAL)


def detect_format(template: str | None) -> ToolFormat:
    """The format a chat template's model writes calls in (Hermes when it does not say)."""
    text = template or ""
    if "[TOOL_CALLS]" in text:
        return MISTRAL
    if "<|python_tag|>" in text or ("ipython" in text and "<tool_call>" not in text):
        return LLAMA3
    return HERMES


def _call_of(item: Any, names: Sequence[str]) -> Call | None:
    if not isinstance(item, dict):
        return None
    if isinstance(item.get("function"), dict):  # {"type": "function", "function": {...}}
        item = item["function"]
    name = item.get("name")
    args = item.get("arguments", item.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if name not in names or not isinstance(args, dict):
        return None
    ident = item.get("id")
    text = json.dumps(args, ensure_ascii=False)
    return Call(name, text, ident) if isinstance(ident, str) and ident else Call(name, text)


_DECODER = json.JSONDecoder()


def _json_values(text: str) -> tuple[list[Any], str]:
    """The JSON values at the start of ``text`` (separated by spaces, commas or ';') and the
    rest."""
    values: list[Any] = []
    pos = 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,;":
            pos += 1
        if pos >= len(text) or text[pos] not in "{[":
            return values, text[pos:]
        value, pos = _DECODER.raw_decode(text, pos)
        if deeper_than(value):
            raise ValueError("nested too deep to be a call")
        values.append(value)


def _hermes(text: str) -> tuple[str, list[Any]] | None:
    start = text.find("<tool_call>")
    if start < 0:
        return None
    items = []
    for part in text[start:].split("<tool_call>")[1:]:
        body = part.split("</tool_call>")[0].strip()
        values, rest = _json_values(body)
        if rest.strip() or not values:
            raise ValueError("not a call")
        items += values
    return text[:start], items


def _flatten(values: list[Any]) -> list[Any]:
    return [x for v in values for x in (v if isinstance(v, list) else [v])]


def _llama3(text: str) -> tuple[str, list[Any]] | None:
    body = text.strip()
    body = body.removeprefix("<|python_tag|>").strip()
    if not body.startswith(("{", "[")):
        return None
    values, rest = _json_values(body)
    if rest.strip():
        raise ValueError("text after the call")
    return "", _flatten(values)


def _mistral(text: str) -> tuple[str, list[Any]] | None:
    start = text.find("[TOOL_CALLS]")
    if start < 0:
        return None
    body = text[start + len("[TOOL_CALLS]") :].strip()
    if body.startswith(("[", "{")):
        values, rest = _json_values(body)
        if rest.strip():
            raise ValueError("text after the calls")
        return text[:start], _flatten(values)
    items = []  # [TOOL_CALLS]name[ARGS]{...}[TOOL_CALLS]name[ARGS]{...}
    for part in text[start:].split("[TOOL_CALLS]")[1:]:
        name, sep, args = part.partition("[ARGS]")
        if not sep:
            raise ValueError("no [ARGS]")
        values, rest = _json_values(args.strip())
        if len(values) != 1 or rest.strip():
            raise ValueError("not a call")
        items.append({"name": name.strip(), "arguments": values[0]})
    return text[:start], items


_PARSERS = {"hermes": _hermes, "llama3": _llama3, "mistral": _mistral}


# -- constraints and prompts -----------------------------------------------------------------------


def constraint_schema(req: ToolRequest, fmt: ToolFormat) -> dict[str, Any]:
    """The JSON schema of one call of the chosen function (named), or of any tool
    (``required``), in ``fmt``'s keys: ``{"name": ..., "<arguments_key>": {...}}``."""
    names = [req.choice] if req.named else req.names
    alternatives = [
        {
            "type": "object",
            "properties": {
                "name": {"const": name},
                fmt.arguments_key: req.tool(name)["parameters"],
            },
            "required": ["name", fmt.arguments_key],
            "additionalProperties": False,
        }
        for name in names
    ]
    return alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}


def tools_system_prompt(req: ToolRequest) -> str:
    """What a model whose template has no place for tools is told about them."""
    listed = json.dumps(
        [
            {k: v for k, v in t["function"].items() if k in ("name", "description", "parameters")}
            for t in req.tools
        ],
        ensure_ascii=False,
    )
    return (
        "You can call these tools (the JSON schema of each one's arguments is given):\n"
        f"{listed}\n"
        "To call tools, answer with one line per call and nothing else:\n"
        '<tool_call>{"name": "<tool name>", "arguments": {<arguments>}}</tool_call>\n'
        "Otherwise answer normally."
    )


def _arguments_object(text: Any) -> Any:
    if isinstance(text, str):
        try:
            value = json.loads(text)
        except ValueError:
            return text
        return value if isinstance(value, dict) else text
    return text


def render_messages(
    messages: Sequence[dict[str, Any]], req: ToolRequest | None, template_has_tools: bool
) -> list[dict[str, Any]]:
    """The conversation as a template should see it.

    Tool calls' ``arguments`` become objects (chat templates write them with ``tojson``). For
    a template with no place for tools, the tools are described in the system message, past
    calls are written as ``<tool_call>`` lines and tool results as ``<tool_response>`` user
    turns.
    """
    out = []
    for m in messages:
        m = dict(m)
        calls = m.get("tool_calls") or (
            [{"type": "function", "function": m["function_call"]}] if m.get("function_call") else []
        )
        if calls:
            m["tool_calls"] = [
                {
                    **c,
                    "function": {
                        **c["function"],
                        "arguments": _arguments_object(c["function"].get("arguments", {})),
                    },
                }  # fmt: skip
                for c in calls
            ]
        out.append(m)
    if template_has_tools or req is None:
        return out
    plain = []
    for m in out:
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            lines = [
                "<tool_call>"
                + json.dumps(
                    {"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                    ensure_ascii=False,
                )
                + "</tool_call>"
                for c in m["tool_calls"]
            ]
            text = "\n".join([*([m["content"]] if m.get("content") else []), *lines])
            plain.append({"role": "assistant", "content": text})
        elif role in ("tool", "function"):
            text = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            plain.append({"role": "user", "content": text})
        else:
            plain.append(m)
    prompt = tools_system_prompt(req)
    if plain and plain[0].get("role") == "system":
        plain[0] = {**plain[0], "content": f"{plain[0]['content']}\n\n{prompt}"}
    else:
        plain.insert(0, {"role": "system", "content": prompt})
    return plain
