"""What a chat request asks beyond its messages, turned into what a generation needs.

``response_format``, ``grammar``, ``tools``/``tool_choice`` and the legacy ``functions``/
``function_call`` become: the messages and template variables to render, text to put after
the generation prompt (the opening of a forced call), the grammar to generate under, and how
to read the reply for calls. :class:`nexabind.Llama` and the :class:`~nexabind.engine.Engine`
(and through it the server) plan a chat the same way.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from nexabind import tool_calls
from nexabind.grammar import LlamaGrammar, field_grammar, response_format_grammar

__all__ = ["ChatPlan", "plan_chat"]


@dataclass
class ChatPlan:
    """A chat request, ready to render and generate.

    Attributes:
        messages: The conversation to render (tools told in a system message when the
            template has no place for them).
        extra: Template variables (``tools``).
        opener: Text that follows the generation prompt (the opening of a call ``required``
            among several tools).
        grammar: What the reply is generated under, if anything.
        output: How to read the reply for tool calls (None: it is content).
        markers: Every format's call markers (control tokens that spell them get their text
            back in the reply, since llama.cpp renders control tokens as nothing).
    """

    messages: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)
    opener: str = ""
    grammar: LlamaGrammar | str | None = None
    output: tool_calls.ToolOutput | None = None
    markers: tuple[str, ...] = ()


def plan_chat(
    messages: list[dict[str, Any]],
    *,
    template: str | None,
    tools: list[dict[str, Any]] | None = None,
    tool_choice: str | dict[str, Any] | None = None,
    functions: list[dict[str, Any]] | None = None,
    function_call: str | dict[str, Any] | None = None,
    response_format: dict[str, Any] | None = None,
    grammar: LlamaGrammar | str | None = None,
) -> ChatPlan:
    """Plan a chat request.

    Args:
        messages: The checked conversation.
        template: The jinja text the chat renders with (None for a built-in or a named
            format): whether it takes ``tools`` and which call format it teaches.
        tools, tool_choice, functions, function_call: OpenAI's tool request (and its legacy
            form).
        response_format: OpenAI's ``response_format``.
        grammar: A grammar given directly.

    Raises:
        ValueError: A malformed tool or response format, or a combination that cannot hold
            (a grammar and a response format; either with a forced call).
    """
    req = tool_calls.ToolRequest.of(tools, tool_choice, functions, function_call)
    constraint = response_format_grammar(response_format)
    if constraint is not None and grammar is not None:
        msg = "give grammar or response_format, not both"
        raise ValueError(msg)
    forced = req is not None and (req.named or req.choice == "required")
    if forced and (constraint is not None or grammar is not None):
        msg = (
            "a required or named tool_choice constrains the reply itself: give no grammar "
            "or response_format with it"
        )
        raise ValueError(msg)
    fmt = tool_calls.detect_format(template)
    active = req is not None and req.choice != "none"
    has_tools = template is not None and "tools" in template
    if forced and req is not None and (req.named or len(req.tools) == 1):
        return _one_function(messages, req, has_tools)
    plan = ChatPlan(
        tool_calls.render_messages(messages, req if active else None, has_tools),
        extra={"tools": req.tools} if active and has_tools and req is not None else {},
        grammar=constraint if constraint is not None else grammar,
    )
    if req is None or not active:
        return plan
    names = req.names
    plan.markers = tuple(m for f in tool_calls.FORMATS for m in f.markers)
    if forced:  # required, among several tools: which one is the model's choice
        plan.opener = fmt.opener
        schema = tool_calls.constraint_schema(req, fmt)
        plan.grammar = field_grammar("tools", schema)

        def parse_forced(text: str) -> Any:
            return fmt.parse(fmt.opener + text, names)

        plan.output = tool_calls.ToolOutput(parse_forced, buffer_all=True, legacy=req.legacy)
        return plan
    formats: Sequence[tool_calls.ToolFormat] = [
        fmt, *(f for f in tool_calls.FORMATS if f is not fmt)
    ]  # fmt: skip

    def parse_any(text: str) -> Any:
        return next((p for f in formats if (p := f.parse(text, names))), None)

    markers = tuple(m for f in formats for m in f.markers)
    plan.output = tool_calls.ToolOutput(
        parse_any, markers, json_start=fmt.json_start, legacy=req.legacy
    )
    return plan


def _one_function(
    messages: list[dict[str, Any]], req: tool_calls.ToolRequest, has_tools: bool
) -> ChatPlan:
    """The plan of a call to one known function (named, or ``required`` with one tool), as
    llama-cpp-python makes it: the prompt lists no tools (the model need not choose), and the
    reply is the function's arguments alone, generated under its parameter schema."""
    name = req.choice if req.named else req.names[0]
    grammar = field_grammar("tools", req.tool(name)["parameters"])

    def parse(text: str) -> tuple[str | None, list[tool_calls.Call]] | None:
        try:
            json.loads(text)
        except (ValueError, RecursionError):
            return None  # cut short (max_tokens): the text is the content
        return None, [tool_calls.Call(name, text.strip())]

    return ChatPlan(
        tool_calls.render_messages(messages, None, has_tools),
        grammar=grammar,
        output=tool_calls.ToolOutput(parse, buffer_all=True, legacy=req.legacy),
    )
