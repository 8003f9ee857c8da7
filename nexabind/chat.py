"""Chat templates: the model's jinja template, llama.cpp's built-in ones by name, or your own.

Jinja templates render in a sandboxed environment set up the way Hugging Face transformers does
(``trim_blocks``, ``lstrip_blocks``, ``raise_exception``, ``strftime_now``, ``tojson``), with
``messages``, ``bos_token``, ``eos_token`` and ``add_generation_prompt`` in scope, and bounded
in time and size (:mod:`nexabind._sandbox`): a template comes with the model file, so a
hostile file brings a hostile template.

Messages are checked first (:func:`check_messages`), so a malformed one is a ``ValueError``
naming its index and field instead of ``None`` or a Python repr in the prompt.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from nexabind import _sandbox, lowlevel
from nexabind.errors import TemplateError

__all__ = [
    "RENDER_TIMEOUT",
    "apply_builtin_template",
    "check_messages",
    "continue_prompt",
    "format_chat",
    "format_messages",
    "jinja_source",
    "prompt_tokens",
    "render_jinja",
    "tokenize_prompt",
]

#: Seconds a template may take to render.
RENDER_TIMEOUT = 5.0
#: Characters a rendered prompt (and any value a template builds) may have, at least; more
#: when the messages themselves are longer.
MIN_RENDER_SIZE = 1 << 22


def _text_of(content: list[Any], i: int) -> str:
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            what = f"type {kind!r}" if kind else f"a {type(part).__name__}"
            msg = (
                f"messages[{i}].content[{j}] is {what}; this model takes text only: give "
                '{"type": "text", "text": "..."} parts or a string'
            )
            raise ValueError(msg)
        texts.append(part["text"])
    return "\n".join(texts)  # as llama.cpp's server joins text parts


def _check_function(fn: Any, where: str) -> None:
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        msg = f'{where} must be {{"name": "...", "arguments": "{{...}}"}}'
        raise ValueError(msg)
    args = fn.get("arguments", {})
    if not isinstance(args, (str, dict)):
        msg = f"{where}.arguments is a {type(args).__name__}; give JSON text or an object"
        raise ValueError(msg)


def _check_calls(m: dict[str, Any], i: int) -> None:
    """An assistant message's past ``tool_calls`` (or legacy ``function_call``)."""
    calls = m.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            msg = f"messages[{i}].tool_calls is a {type(calls).__name__}; give a list of calls"
            raise ValueError(msg)
        for j, call in enumerate(calls):
            where = f"messages[{i}].tool_calls[{j}]"
            if not isinstance(call, dict):
                msg = f'{where} must be {{"type": "function", "function": {{"name": ...}}}}'
                raise ValueError(msg)
            _check_function(call.get("function"), f"{where}.function")
    if m.get("function_call") is not None:
        _check_function(m["function_call"], f"messages[{i}].function_call")


def check_messages(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """Check a conversation and return it with each content as one string.

    ``content`` may be a string, a list of ``{"type": "text", "text": ...}`` parts (joined
    with newlines, as llama.cpp's server does), or None on an assistant message that carries
    ``tool_calls`` or ``function_call``.

    Raises:
        ValueError: Naming the message index and field that is missing or malformed.
    """
    if isinstance(messages, (str, bytes, dict)) or not isinstance(messages, Sequence):
        msg = f"messages must be a list of {{role, content}} dicts, got {type(messages).__name__}"
        raise ValueError(msg)
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            msg = f"messages[{i}] is a {type(m).__name__}; give a {{role, content}} dict"
            raise ValueError(msg)
        role = m.get("role")
        if not isinstance(role, str) or not role:
            what = "is missing" if role is None else f"is {role!r}"
            msg = f"messages[{i}].role {what}; give a role such as 'user' or 'assistant'"
            raise ValueError(msg)
        _check_calls(m, i)
        content = m.get("content")
        if isinstance(content, list):
            content = _text_of(content, i)
        elif content is None:
            if not (role == "assistant" and (m.get("tool_calls") or m.get("function_call"))):
                msg = f"messages[{i}].content is missing; give a string"
                raise ValueError(msg)
        elif not isinstance(content, str):
            msg = (
                f"messages[{i}].content is a {type(content).__name__}; give a string or a "
                "list of text parts"
            )
            raise ValueError(msg)
        if content is not None:
            try:
                content.encode()
            except UnicodeEncodeError as e:
                msg = f"messages[{i}].content is not valid text: {e.reason} at position {e.start}"
                raise ValueError(msg) from None
        out.append({**m, "content": content})
    return out


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> Any:
    import jinja2

    try:
        return _sandbox.compile_template(source)
    except jinja2.TemplateError as e:
        msg = f"the chat template could not be rendered: {e}"
        raise TemplateError(msg) from e


def _raise_exception(message: str) -> None:
    raise TemplateError(f"the chat template refused the messages: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def render_jinja(
    source: str,
    messages: list[dict[str, Any]],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    timeout: float = RENDER_TIMEOUT,
    **extra: Any,
) -> str:
    """Render a jinja chat template.

    Args:
        source: The template text (e.g. GGUF ``tokenizer.chat_template``).
        messages: ``[{"role": ..., "content": ...}, ...]`` (see :func:`check_messages`).
        bos_token: Text of the BOS token.
        eos_token: Text of the EOS token.
        add_generation_prompt: End with the assistant's turn header.
        timeout: Seconds the rendering may take.
        **extra: More template variables (``tools``, ...).

    Returns:
        The prompt text.

    Raises:
        ValueError: A message is malformed.
        TemplateError: The template called ``raise_exception``, is malformed, or ran over its
            time or size limit.
    """
    checked = check_messages(messages)
    size = max(MIN_RENDER_SIZE, 8 * sum(len(m["content"] or "") for m in checked))
    variables = {
        "messages": checked,
        "bos_token": bos_token,
        "eos_token": eos_token,
        "add_generation_prompt": add_generation_prompt,
        "raise_exception": _raise_exception,
        "strftime_now": _strftime_now,
        **extra,
    }
    return _sandbox.render(_compile(source), variables, size=size, timeout=timeout)


def apply_builtin_template(
    name_or_source: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True
) -> str:
    """Render with llama.cpp's own template code (``llama_chat_apply_template``).

    Args:
        name_or_source: A built-in template name (``chatml``, ``llama3``, ...) or a template
            text llama.cpp recognizes by its markers.
        messages: ``[{"role": ..., "content": ...}, ...]`` (see :func:`check_messages`).
        add_generation_prompt: End with the assistant's turn header.

    Raises:
        ValueError: A message is malformed, or holds a NUL character (C strings end there).
        TemplateError: llama.cpp does not know the template.
    """
    pairs = []
    for i, m in enumerate(check_messages(messages)):
        content = m["content"] or ""
        for field, text in (("role", m["role"]), ("content", content)):
            if "\x00" in text:
                msg = f"messages[{i}].{field} holds a NUL character; remove it"
                raise ValueError(msg)
        pairs.append((m["role"], content))
    try:
        return lowlevel.chat_template_apply(
            name_or_source, pairs, add_assistant=add_generation_prompt
        )
    except ValueError as e:
        msg = (
            f"llama.cpp does not support the chat template {name_or_source[:60]!r}; "
            "pass a jinja template with chat_template=..."
        )
        raise TemplateError(msg) from e


def format_messages(
    source: str,
    messages: list[dict[str, Any]],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    **extra: Any,
) -> str:
    """Render ``messages`` with a jinja template, or a llama.cpp built-in one by name.

    Args:
        source: Jinja template text, or a built-in name (``chatml``, ``llama3``...): text
            without ``{`` is taken as a name.
        messages: ``[{"role": ..., "content": ...}, ...]``.
        bos_token: Text of the BOS token (jinja templates only).
        eos_token: Text of the EOS token (jinja templates only).
        add_generation_prompt: End with the assistant's turn header.
        **extra: More variables for a jinja template (``tools``, ...).

    Raises:
        ValueError: A message is malformed.
        TemplateError: The template refused the messages, failed, or is unknown.
    """
    if "{" not in source:
        return apply_builtin_template(source, messages, add_generation_prompt=add_generation_prompt)
    return render_jinja(
        source,
        messages,
        bos_token=bos_token,
        eos_token=eos_token,
        add_generation_prompt=add_generation_prompt,
        **extra,
    )


def _special_text(model: lowlevel.Model, token: int) -> str:
    return model.token_to_piece(token, special=True).decode() if token >= 0 else ""


def jinja_source(model: lowlevel.Model, template: str | None) -> str | None:
    """The jinja text chats render with: ``template``, else the model's own template; None
    when that is a llama.cpp built-in name (no jinja) or there is none."""
    src = template or model.chat_template()
    return src if src and "{" in src else None


def format_chat(
    model: lowlevel.Model,
    messages: list[dict[str, Any]],
    *,
    template: str | None = None,
    add_generation_prompt: bool = True,
    **extra: Any,
) -> str:
    """Render ``messages`` into a prompt for ``model``.

    Args:
        model: Gives its own template (when ``template`` is None) and its BOS/EOS text.
        messages: ``[{"role": ..., "content": ...}, ...]``.
        template: A jinja template or a llama.cpp built-in name, instead of the model's.
        add_generation_prompt: End with the assistant's turn header.
        **extra: More variables for a jinja template (``tools``, ...).

    Raises:
        ValueError: A message is malformed.
        TemplateError: The model has no chat template and none was given, or the template
            refused the messages.
    """
    src = template or model.chat_template()
    if src is None:
        msg = (
            f"{model.path} has no chat template; pass chat_template= (a jinja template or a "
            "llama.cpp name such as 'chatml')"
        )
        raise TemplateError(msg)
    return format_messages(
        src,
        messages,
        bos_token=_special_text(model, model.bos),
        eos_token=_special_text(model, model.eos),
        add_generation_prompt=add_generation_prompt,
        **extra,
    )


def prompt_tokens(
    model: lowlevel.Model,
    messages: list[dict[str, Any]],
    *,
    template: str | None = None,
    **extra: Any,
) -> list[int]:
    """Render ``messages`` (see :func:`format_chat`; ``extra``: more template variables) and
    tokenize the prompt."""
    return tokenize_prompt(model, format_chat(model, messages, template=template, **extra))


def tokenize_prompt(model: lowlevel.Model, text: str) -> list[int]:
    """Tokenize a rendered chat prompt: BOS unless the template wrote it, specials parsed."""
    bos = _special_text(model, model.bos)
    add_bos = not (bos and text.startswith(bos))
    return model.tokenize(text, add_special=add_bos, parse_special=True)


def continue_prompt(
    model: lowlevel.Model, text: str, seen: tuple[str, Sequence[int]] | None
) -> list[int]:
    """Tokenize a rendered chat prompt that may extend what the model already saw.

    A reply's text, rendered back into the next prompt, may tokenize differently from the
    tokens the model generated (``" Hello"`` as one token or two), which would make the KV
    cache diverge where the reply starts. When ``text`` starts with the text the model saw,
    the prompt is the tokens it saw plus only what the template adds after them (the end of
    the turn, the new message), so a follow-up turn decodes only its new tokens.

    Args:
        model: Tokenizes the new part.
        text: The prompt, rendered with the whole conversation.
        seen: ``(text, tokens)`` the model saw last: the previous prompt and its reply, as
            text and as the prompt's tokens followed by the generated ids; None for none.
    """
    if seen is not None and text.startswith(seen[0]):
        rest = text[len(seen[0]) :]
        return [*seen[1], *model.tokenize(rest, add_special=False, parse_special=True)]
    return tokenize_prompt(model, text)
