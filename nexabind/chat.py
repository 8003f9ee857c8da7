"""Chat templates: the model's jinja template, llama.cpp's built-in ones by name, or your own.

Jinja templates render in a sandboxed environment set up the way Hugging Face transformers does
(``trim_blocks``, ``lstrip_blocks``, ``raise_exception``, ``strftime_now``, ``tojson``), with
``messages``, ``bos_token``, ``eos_token`` and ``add_generation_prompt`` in scope.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

from nexabind import lowlevel
from nexabind.errors import TemplateError

__all__ = [
    "apply_builtin_template",
    "format_chat",
    "format_messages",
    "prompt_tokens",
    "render_jinja",
]


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(f"the chat template refused the messages: {message}")

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, **_: Any) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def render_jinja(
    source: str,
    messages: list[dict[str, Any]],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    **extra: Any,
) -> str:
    """Render a jinja chat template.

    Args:
        source: The template text (e.g. GGUF ``tokenizer.chat_template``).
        messages: ``[{"role": ..., "content": ...}, ...]``.
        bos_token: Text of the BOS token.
        eos_token: Text of the EOS token.
        add_generation_prompt: End with the assistant's turn header.
        **extra: More template variables (``tools``, ...).

    Returns:
        The prompt text.

    Raises:
        TemplateError: The template called ``raise_exception`` or is malformed.
    """
    import jinja2

    try:
        tmpl = _compile(source)
        return tmpl.render(
            messages=messages,
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
            **extra,
        )
    except jinja2.TemplateError as e:
        msg = f"the chat template could not be rendered: {e}"
        raise TemplateError(msg) from e


def apply_builtin_template(
    name_or_source: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True
) -> str:
    """Render with llama.cpp's own template code (``llama_chat_apply_template``).

    Args:
        name_or_source: A built-in template name (``chatml``, ``llama3``, ...) or a template
            text llama.cpp recognizes by its markers.
        messages: ``[{"role": ..., "content": ...}, ...]`` with string contents.
        add_generation_prompt: End with the assistant's turn header.

    Raises:
        TemplateError: llama.cpp does not know the template.
    """
    pairs = [(str(m["role"]), str(m.get("content") or "")) for m in messages]
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
) -> str:
    """Render ``messages`` with a jinja template, or a llama.cpp built-in one by name.

    Args:
        source: Jinja template text, or a built-in name (``chatml``, ``llama3``...): text
            without ``{`` is taken as a name.
        messages: ``[{"role": ..., "content": ...}, ...]``.
        bos_token: Text of the BOS token (jinja templates only).
        eos_token: Text of the EOS token (jinja templates only).
        add_generation_prompt: End with the assistant's turn header.

    Raises:
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
    )


def _special_text(model: lowlevel.Model, token: int) -> str:
    return model.token_to_piece(token, special=True).decode() if token >= 0 else ""


def format_chat(
    model: lowlevel.Model,
    messages: list[dict[str, Any]],
    *,
    template: str | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """Render ``messages`` into a prompt for ``model``.

    Args:
        model: Gives its own template (when ``template`` is None) and its BOS/EOS text.
        messages: ``[{"role": ..., "content": ...}, ...]``.
        template: A jinja template or a llama.cpp built-in name, instead of the model's.
        add_generation_prompt: End with the assistant's turn header.

    Raises:
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
    )


def prompt_tokens(
    model: lowlevel.Model, messages: list[dict[str, Any]], *, template: str | None = None
) -> list[int]:
    """Render ``messages`` (see :func:`format_chat`) and tokenize the prompt.

    BOS is added unless the template already wrote it; special-token text is parsed.
    """
    text = format_chat(model, messages, template=template)
    bos = _special_text(model, model.bos)
    add_bos = not (bos and text.startswith(bos))
    return model.tokenize(text, add_special=add_bos, parse_special=True)
