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

__all__ = ["TemplateError", "apply_builtin_template", "render_jinja"]


class TemplateError(ValueError):
    """A chat template raised or could not be rendered."""


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
    from nexabind import lowlevel

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
