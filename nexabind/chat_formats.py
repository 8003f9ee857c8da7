"""llama-cpp-python's chat formats by name, chat formatters and chat handlers.

``Llama(chat_format="llama-2")`` picks a format by the name llama-cpp-python gives it; each one
renders the prompt llama-cpp-python renders for it, character for character, and says where
to stop. A name that is not one of them may be a llama.cpp built-in template (``phi3``,
``llama3``, ``deepseek3``, ...; see :func:`nexabind.chat.apply_builtin_template`).

A *chat formatter* turns messages into a :class:`ChatFormatterResponse` (prompt, stop strings,
stopping criteria); :class:`Jinja2ChatFormatter` renders a jinja template (in nexabind's
sandbox). A *chat handler* answers a whole chat request: ``handler(llama=..., messages=...,
**request)`` returns the ``chat.completion`` (or its chunks);
:func:`chat_formatter_to_chat_completion_handler` makes one from a formatter, and
``Llama(chat_handler=...)`` uses it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from nexabind import _lcp_formats, chat
from nexabind._function_calling import chatml_function_calling
from nexabind._lcp_formats import (  # the formats by their function names, as llama-cpp-python
    ChatFormatterResponse,
    format_alpaca,
    format_baichuan,
    format_baichuan2,
    format_chatglm3,
    format_chatml,
    format_gemma,
    format_intel,
    format_llama2,
    format_llama3,
    format_mistral_instruct,
    format_mistrallite,
    format_oasst_llama,
    format_open_orca,
    format_openbuddy,
    format_openchat,
    format_phind,
    format_pygmalion,
    format_qwen,
    format_redpajama_incite,
    format_saiga,
    format_snoozy,
    format_vicuna,
    format_zephyr,
)
from nexabind.processors import StoppingCriteriaList

__all__ = [
    "CHATML_CHAT_TEMPLATE",
    "ChatFormatter",
    "ChatFormatterResponse",
    "FormatterHandler",
    "Jinja2ChatFormatter",
    "LLAMA3_INSTRUCT_CHAT_TEMPLATE",
    "LlamaChatCompletionHandler",
    "MISTRAL_INSTRUCT_CHAT_TEMPLATE",
    "MIXTRAL_INSTRUCT_CHAT_TEMPLATE",
    "chat_formatter_to_chat_completion_handler",
    "chatml_function_calling",
    "format_alpaca",
    "format_baichuan",
    "format_baichuan2",
    "format_chatglm3",
    "format_chatml",
    "format_gemma",
    "format_intel",
    "format_llama2",
    "format_llama3",
    "format_mistral_instruct",
    "format_mistrallite",
    "format_names",
    "format_oasst_llama",
    "format_open_orca",
    "format_openbuddy",
    "format_openchat",
    "format_phind",
    "format_pygmalion",
    "format_qwen",
    "format_redpajama_incite",
    "format_saiga",
    "format_snoozy",
    "format_vicuna",
    "format_zephyr",
    "get_chat_completion_handler",
    "get_chat_formatter",
    "guess_chat_format_from_gguf_metadata",
    "handler_names",
    "hf_autotokenizer_to_chat_completion_handler",
    "hf_autotokenizer_to_chat_formatter",
    "hf_tokenizer_config_to_chat_completion_handler",
    "hf_tokenizer_config_to_chat_formatter",
    "register_chat_completion_handler",
    "register_chat_format",
]

Messages = list[dict[str, Any]]

# Templates llama-cpp-python recognizes in a model's metadata (it then uses the named format).
CHATML_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token"
)
_MISTRAL_END = (
    " }}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)
MISTRAL_INSTRUCT_CHAT_TEMPLATE = _MISTRAL + " + ' '" + _MISTRAL_END
MIXTRAL_INSTRUCT_CHAT_TEMPLATE = _MISTRAL + _MISTRAL_END
LLAMA3_INSTRUCT_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


class ChatFormatter(Protocol):
    """``formatter(messages=..., **request) -> ChatFormatterResponse``."""

    def __call__(self, *, messages: Messages, **kwargs: Any) -> ChatFormatterResponse: ...


class LlamaChatCompletionHandler(Protocol):
    """``handler(llama=..., messages=..., **request)`` -> a chat completion or its chunks."""

    def __call__(self, *, llama: Any, messages: Messages, **kwargs: Any) -> Any: ...


class Jinja2ChatFormatter:
    """Render a jinja chat template (Hugging Face's conventions, nexabind's sandbox).

    Args:
        template: The template text.
        eos_token: Text of the EOS token (also the stop string).
        bos_token: Text of the BOS token.
        add_generation_prompt: End with the assistant's turn header.
        stop_token_ids: Tokens that end a turn: generation stops after one of them.
    """

    def __init__(
        self,
        template: str,
        eos_token: str,
        bos_token: str,
        add_generation_prompt: bool = True,
        stop_token_ids: list[int] | None = None,
    ) -> None:
        self.template = template
        self.eos_token = eos_token
        self.bos_token = bos_token
        self.add_generation_prompt = add_generation_prompt
        self.stop_token_ids = set(stop_token_ids) if stop_token_ids is not None else None

    def __call__(self, *, messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
        for name in ("functions", "function_call", "tools", "tool_choice"):
            kwargs.setdefault(name, None)
        prompt = chat.render_jinja(
            self.template,
            messages,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            add_generation_prompt=self.add_generation_prompt,
            **kwargs,
        )
        criteria = None
        if self.stop_token_ids is not None:
            ids = self.stop_token_ids

            def stop_on_last_token(tokens: Any, logits: Any) -> bool:
                return len(tokens) > 0 and int(tokens[-1]) in ids

            criteria = StoppingCriteriaList([stop_on_last_token])
        return ChatFormatterResponse(prompt, [self.eos_token], criteria, added_special=True)

    def to_chat_handler(self) -> FormatterHandler:
        """A chat handler that renders with this formatter."""
        return chat_formatter_to_chat_completion_handler(self)


class FormatterHandler:
    """A chat handler made from a chat formatter (see ``Llama(chat_handler=...)``).

    Called as llama-cpp-python calls a handler, it answers through the Llama's own
    ``create_chat_completion`` with the prompt this formatter renders.
    """

    def __init__(self, formatter: ChatFormatter) -> None:
        self.formatter = formatter

    def __call__(self, *, llama: Any, messages: Messages, **kwargs: Any) -> Any:
        return llama._chat_completion(messages, formatter=self.formatter, **kwargs)


def chat_formatter_to_chat_completion_handler(formatter: ChatFormatter) -> FormatterHandler:
    """The chat handler that renders prompts with ``formatter``."""
    return FormatterHandler(formatter)


# -- llama-cpp-python's named formats -----------------------------------------------------------

_FORMATS: dict[str, ChatFormatter] = dict(_lcp_formats.FORMATS)
_HANDLERS: dict[str, LlamaChatCompletionHandler] = {}


def register_chat_format(name: str) -> Callable[[Any], Any]:
    """Decorator: register a chat formatter under ``name``."""

    def decorator(f: Any) -> Any:
        _FORMATS[name] = f
        return f

    return decorator


def register_chat_completion_handler(name: str) -> Callable[[Any], Any]:
    """Decorator: register a chat handler under ``name``."""

    def decorator(f: Any) -> Any:
        _HANDLERS[name] = f
        return f

    return decorator


register_chat_completion_handler("chatml-function-calling")(chatml_function_calling)


def get_chat_formatter(name: str) -> ChatFormatter | None:
    """The formatter registered as ``name`` (llama-cpp-python's format names), or None."""
    return _FORMATS.get(name)


def format_names() -> list[str]:
    """The names of the registered formats."""
    return sorted(_FORMATS)


def handler_names() -> list[str]:
    """The names of the registered chat handlers."""
    return sorted(_HANDLERS)


def get_chat_completion_handler(name: str) -> LlamaChatCompletionHandler:
    """The handler registered as ``name``, or the one of the format of that name.

    Raises:
        ValueError: No handler or format has that name.
    """
    if name in _HANDLERS:
        return _HANDLERS[name]
    if name in _FORMATS:
        return FormatterHandler(_FORMATS[name])
    known = ", ".join(sorted({*_HANDLERS, *_FORMATS}))
    msg = f"no chat format or handler named {name!r}; known: {known}"
    raise ValueError(msg)


def guess_chat_format_from_gguf_metadata(metadata: dict[str, str]) -> str | None:
    """The format name llama-cpp-python picks for a model's template, when it knows it."""
    template = metadata.get("tokenizer.chat_template")
    if template == CHATML_CHAT_TEMPLATE:
        return "chatml"
    if template in (MISTRAL_INSTRUCT_CHAT_TEMPLATE, MIXTRAL_INSTRUCT_CHAT_TEMPLATE):
        return "mistral-instruct"
    if template == LLAMA3_INSTRUCT_CHAT_TEMPLATE:
        return "llama-3"
    return None


# -- Hugging Face tokenizer configurations ------------------------------------------------------


def hf_tokenizer_config_to_chat_formatter(
    tokenizer_config: dict[str, Any], add_generation_prompt: bool = True
) -> ChatFormatter:
    """A formatter from a Hugging Face ``tokenizer_config.json`` (its ``chat_template``,
    ``bos_token`` and ``eos_token``), as llama-cpp-python makes one: the reply is opened with
    an empty assistant message.

    Raises:
        ValueError: The configuration lacks one of those keys, or one is not a str.
    """
    for key in ("chat_template", "bos_token", "eos_token"):
        if not isinstance(tokenizer_config.get(key), str):
            msg = f"the tokenizer config needs {key!r} as a str; got {tokenizer_config.get(key)!r}"
            raise ValueError(msg)
    template = tokenizer_config["chat_template"]
    bos, eos = tokenizer_config["bos_token"], tokenizer_config["eos_token"]

    def format_tokenizer_config(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
        if add_generation_prompt:
            messages = [*messages, {"role": "assistant", "content": ""}]
        kwargs.setdefault("add_generation_prompt", False)
        prompt = chat.render_jinja(template, messages, bos_token=bos, eos_token=eos, **kwargs)
        return ChatFormatterResponse(prompt=prompt, stop=[eos, bos], added_special=True)

    return format_tokenizer_config


def hf_tokenizer_config_to_chat_completion_handler(
    tokenizer_config: dict[str, Any], add_generation_prompt: bool = True
) -> FormatterHandler:
    """The chat handler of :func:`hf_tokenizer_config_to_chat_formatter`."""
    formatter = hf_tokenizer_config_to_chat_formatter(tokenizer_config, add_generation_prompt)
    return chat_formatter_to_chat_completion_handler(formatter)


def hf_autotokenizer_to_chat_formatter(pretrained_model_name_or_path: str) -> ChatFormatter:
    """A formatter that renders with ``transformers.AutoTokenizer.apply_chat_template``.

    Raises:
        ImportError: ``transformers`` is not installed.
    """
    try:
        from transformers import AutoTokenizer  # type: ignore[import-not-found]
    except ImportError as e:
        msg = "hf_autotokenizer_to_chat_formatter needs transformers: pip install transformers"
        raise ImportError(msg) from e
    tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path)

    def format_autotokenizer(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
        tokenizer.use_default_system_prompt = False
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
        return ChatFormatterResponse(prompt=prompt, stop=tokenizer.eos_token, added_special=True)

    return format_autotokenizer


def hf_autotokenizer_to_chat_completion_handler(
    pretrained_model_name_or_path: str,
) -> FormatterHandler:
    """The chat handler of :func:`hf_autotokenizer_to_chat_formatter`."""
    formatter = hf_autotokenizer_to_chat_formatter(pretrained_model_name_or_path)
    return chat_formatter_to_chat_completion_handler(formatter)
