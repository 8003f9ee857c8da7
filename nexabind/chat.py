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

from nexabind._ffi import ffi

__all__ = ["apply_builtin_template", "render_jinja"]


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

    L = lowlevel.lib()
    keep = []
    arr = ffi.new("llama_chat_message[]", len(messages))
    for i, m in enumerate(messages):
        role = ffi.new("char[]", str(m["role"]).encode())
        content = ffi.new("char[]", str(m.get("content") or "").encode())
        keep += [role, content]
        arr[i].role = role
        arr[i].content = content
    tmpl = name_or_source.encode()
    cap = 1024 + sum(len(str(m.get("content") or "")) * 2 for m in messages)
    buf = ffi.new("char[]", cap)
    n = L.llama_chat_apply_template(tmpl, arr, len(messages), add_generation_prompt, buf, cap)
    if n > cap:
        cap = n
        buf = ffi.new("char[]", cap)
        n = L.llama_chat_apply_template(tmpl, arr, len(messages), add_generation_prompt, buf, cap)
    if n < 0:
        msg = (
            f"llama.cpp does not support the chat template {name_or_source[:60]!r}; "
            "pass a jinja template with chat_template=..."
        )
        raise TemplateError(msg)
    return ffi.unpack(buf, n).decode("utf-8", "replace")
