"""``Llama``'s constructor arguments (llama-cpp-python's, and nexabind's own) as llama.cpp settings.

Every argument of llama-cpp-python's ``Llama.__init__`` is taken. Those llama.cpp has go to
:class:`~nexabind.lowlevel.Model` and :class:`~nexabind.lowlevel.Context`; the one it has no
counterpart for (``lora_base``) raises ``NotImplementedError`` saying why. Arguments that are
not llama-cpp-python's (it accepts and ignores any keyword) are logged as a warning once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from nexabind import chat_formats, lowlevel

__all__ = ["ChatSetup", "chat_setup", "context_params", "model_params", "refuse", "warn_extra"]

logger = logging.getLogger("nexabind.llama")


def refuse(lora_base: str | None) -> None:
    """Raise for the arguments llama.cpp cannot apply.

    Raises:
        NotImplementedError: ``lora_base`` was given.
    """
    if lora_base is not None:
        msg = (
            f"lora_base={lora_base!r} cannot apply: llama.cpp applies a LoRA adapter on top of "
            "the loaded model and has no separate base model since it stopped merging adapters "
            "into the weights; load the model the adapter was made for and pass lora_path"
        )
        raise NotImplementedError(msg)


def warn_extra(kwargs: dict[str, Any]) -> None:
    """Log the keyword arguments that llama-cpp-python would silently ignore."""
    if kwargs:
        logger.warning(
            "Llama(%s): not arguments of nexabind or llama-cpp-python 0.3; ignored, as "
            "llama-cpp-python ignores them",
            ", ".join(sorted(kwargs)),
        )


def model_params(
    *,
    n_gpu_layers: int | None,
    split_mode: Any,
    main_gpu: int,
    tensor_split: Sequence[float] | None,
    vocab_only: bool,
    use_mmap: bool,
    use_mlock: bool,
    kv_overrides: dict[str, Any] | None,
    check_tensors: bool,
    rpc_servers: Sequence[str] | str | None = None,
) -> dict[str, Any]:
    """The keyword arguments of :class:`~nexabind.lowlevel.Model`."""
    if n_gpu_layers is None or n_gpu_layers < 0:
        n_gpu_layers = 0x7FFFFFFF  # all layers (llama-cpp-python's -1)
    return {
        "n_gpu_layers": n_gpu_layers,
        "split_mode": split_mode,
        "main_gpu": main_gpu,
        "tensor_split": tensor_split,
        "vocab_only": vocab_only,
        "use_mmap": use_mmap,
        "use_mlock": use_mlock,
        "kv_overrides": kv_overrides,
        "check_tensors": check_tensors,
        "rpc_servers": lowlevel.rpc.endpoints(rpc_servers),
    }


def context_params(values: dict[str, Any]) -> dict[str, Any]:
    """The optional llama.cpp context parameters among ``values`` (see
    :class:`~nexabind.lowlevel.Context`), zero meaning "the model's" as in llama-cpp-python."""
    out = {}
    for name in ("rope_freq_base", "rope_freq_scale", "yarn_orig_ctx"):
        if values.get(name):
            out[name] = values[name]
    for name in ("yarn_ext_factor", "yarn_attn_factor", "yarn_beta_fast", "yarn_beta_slow"):
        if values.get(name) is not None:
            out[name] = values[name]
    for name in ("type_k", "type_v", "offload_kqv", "op_offload", "swa_full", "no_perf"):
        if values.get(name) is not None:
            out[name] = values[name]
    for name in ("rope_scaling_type", "attention_type"):
        value = values.get(name)
        if value is not None and value != -1:  # -1: llama.cpp's UNSPECIFIED
            out[name] = value
    return out


class ChatSetup:
    """How a Llama renders chats.

    Attributes:
        chat_format: The format's name (llama-cpp-python's attribute): the name given, else
            ``chat_template.default`` for the model's own template, else ``chatml``.
        formatter: The llama-cpp-python formatter that renders it, if it is one.
        template: The jinja template or llama.cpp built-in name to render with, otherwise.
        fallback: Whether the model has no template and none was given (chatml is used).
        handler: The chat handler a format name stands for (``chatml-function-calling``).
    """

    def __init__(
        self,
        chat_format: str,
        formatter: chat_formats.ChatFormatter | None,
        template: str | None,
        fallback: bool = False,
        handler: Any = None,
    ) -> None:
        self.chat_format = chat_format
        self.formatter = formatter
        self.template = template
        self.fallback = fallback
        self.handler = handler


def chat_setup(
    model: lowlevel.Model, chat_format: str | None, chat_template: str | None
) -> ChatSetup:
    """Resolve ``chat_format`` (llama-cpp-python's names, then llama.cpp's built-in ones) and
    ``chat_template`` (a jinja template or a built-in name) for ``model``.

    Raises:
        ValueError: ``chat_format`` names no format, or both are given.
    """
    if chat_format is not None and chat_template is not None:
        msg = "give chat_format (a format's name) or chat_template (a template), not both"
        raise ValueError(msg)
    if chat_format is not None:
        if chat_format in chat_formats.handler_names():
            handler = chat_formats.get_chat_completion_handler(chat_format)
            chatml = chat_formats.get_chat_formatter("chatml")
            return ChatSetup(chat_format, chatml, None, handler=handler)
        formatter = chat_formats.get_chat_formatter(chat_format)
        if formatter is not None:
            return ChatSetup(chat_format, formatter, None)
        builtin = lowlevel.builtin_chat_templates()
        if chat_format in builtin:
            return ChatSetup(chat_format, None, chat_format)
        if chat_format == "chat_template.default" and model.chat_template() is not None:
            return ChatSetup(chat_format, None, None)
        known = sorted({*chat_formats.format_names(), *chat_formats.handler_names(), *builtin})
        msg = f"chat_format={chat_format!r} is not a known format; known: {', '.join(known)}"
        raise ValueError(msg)
    if chat_template is not None:
        return ChatSetup(
            chat_template if "{" not in chat_template else "custom", None, chat_template
        )
    if model.chat_template() is not None:
        return ChatSetup("chat_template.default", None, None)
    chatml = chat_formats.get_chat_formatter("chatml")
    return ChatSetup("chatml", chatml, None, fallback=True)
