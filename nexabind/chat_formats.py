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

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

from nexabind import chat
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


@dataclasses.dataclass
class ChatFormatterResponse:
    """A rendered chat prompt.

    Attributes:
        prompt: The prompt text.
        stop: Stop strings the format ends a turn with.
        stopping_criteria: Stopping criteria the format needs.
        added_special: Whether the prompt already holds BOS (then none is added when
            tokenizing).
    """

    prompt: str
    stop: str | list[str] | None = None
    stopping_criteria: StoppingCriteriaList | None = None
    added_special: bool = False


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

_FORMATS: dict[str, ChatFormatter] = {}
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


def get_chat_formatter(name: str) -> ChatFormatter | None:
    """The formatter registered as ``name`` (llama-cpp-python's format names), or None."""
    return _FORMATS.get(name)


def format_names() -> list[str]:
    """The names of the registered formats."""
    return sorted(_FORMATS)


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


def _system(messages: Messages) -> str:
    for m in messages:
        if m.get("role") == "system":
            return m.get("content") or ""
    return ""


def _roles(messages: Messages, names: dict[str, str]) -> list[tuple[str, str | None]]:
    out = []
    for m in messages:
        role = m.get("role")
        if role in names:
            content = m.get("content")
            out.append((names[role], content if isinstance(content, str) else None))
    return out


def _with_reply(messages: Messages, names: dict[str, str]) -> list[tuple[str, str | None]]:
    return [*_roles(messages, names), (names["assistant"], None)]


def _colon_single(system: str, turns: list[tuple[str, str | None]], sep: str, tail: str) -> str:
    out = system + sep
    for role, text in turns:
        out += f"{role}: {text}{sep}" if text else role + tail
    return out


def _colon_two(system: str, turns: list[tuple[str, str | None]], sep: str, sep2: str) -> str:
    out = system + sep
    for i, (role, text) in enumerate(turns):
        out += f"{role}: {text}{(sep, sep2)[i % 2]}" if text else role + ":"
    return out


def _no_colon(system: str, turns: list[tuple[str, str | None]], sep: str) -> str:
    out = system
    for role, text in turns:
        out += role + text + sep if text else role
    return out


def _chatml(system: str, turns: list[tuple[str, str | None]], sep: str) -> str:
    out = "" if system == "" else system + sep + "\n"
    for role, text in turns:
        out += f"{role}\n{text}{sep}\n" if text else role + "\n"
    return out


def _fmt(prompt: str, stop: str | None = None) -> ChatFormatterResponse:
    return ChatFormatterResponse(prompt=prompt, stop=stop)


@register_chat_format("llama-2")
def format_llama2(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    system = _system(messages)
    if system:
        system = f"[INST] <<SYS>>\n{system}\n<</SYS>>"
    out = system + " "
    for i, (role, text) in enumerate(
        _roles(messages, {"user": "<s>[INST]", "assistant": "[/INST]"})
    ):
        if system and i == 0:
            out += (text or "") + " "
        elif text:
            out += role + text + " " + (" ", "</s>")[i % 2]
        else:
            out += role + " "
    return _fmt(out + "[/INST]")


@register_chat_format("llama-3")
def format_llama3(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    names = {
        r: f"<|start_header_id|>{r}<|end_header_id|>\n\n" for r in ("system", "user", "assistant")
    }
    return _fmt(_no_colon("", _with_reply(messages, names), "<|eot_id|>"), "<|eot_id|>")


@register_chat_format("alpaca")
def format_alpaca(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    names = {"user": "### Instruction", "assistant": "### Response"}
    return _fmt(_colon_two(_system(messages), _roles(messages, names), "\n\n", "</s>"))


@register_chat_format("qwen")
def format_qwen(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    system = "<|im_start|>system\n" + (_system(messages) or "You are a helpful assistant.")
    names = {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"}
    return _fmt(_chatml(system, _with_reply(messages, names), "<|im_end|>"), "<|endoftext|>")


_VICUNA = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)


@register_chat_format("vicuna")
def format_vicuna(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    turns = _with_reply(messages, {"user": "USER", "assistant": "ASSISTANT"})
    return _fmt(_colon_two(_VICUNA, turns, " ", "</s>"))


@register_chat_format("oasst_llama")
def format_oasst_llama(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    system = f"[INST] <<SYS>>\n{_system(messages)}\n<</SYS>>\n\n"
    turns = _with_reply(messages, {"user": "<|prompter|>", "assistant": "<|assistant|>"})
    return _fmt(_no_colon(system, turns, "</s>"))


def _baichuan(user: str, assistant: str) -> ChatFormatter:
    def format_baichuan(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
        turns = _with_reply(messages, {"user": user, "assistant": assistant})
        return _fmt(_no_colon(_system(messages), turns, ""))

    return format_baichuan


format_baichuan2 = register_chat_format("baichuan-2")(_baichuan("<reserved_106>", "<reserved_107>"))
format_baichuan = register_chat_format("baichuan")(_baichuan("<reserved_102>", "<reserved_103>"))

_OPENBUDDY = (
    "You are a helpful, respectful and honest INTP-T AI Assistant named Buddy. You are talking "
    "to a human User.\nAlways answer as helpfully and logically as possible, while being safe. "
    "Your answers should not include any harmful, political, religious, unethical, racist, "
    "sexist, toxic, dangerous, or illegal content. Please ensure that your responses are "
    "socially unbiased and positive in nature.\nIf a question does not make any sense, or is "
    "not factually coherent, explain why instead of answering something not correct. If you "
    "don't know the answer to a question, please don't share false information.\nYou can speak "
    "fluently in many languages, for example: English, Chinese.\nYou cannot access the "
    "internet, but you have vast knowledge, cutoff: 2021-09.\nYou are trained by OpenBuddy "
    "team, (https://openbuddy.ai, https://github.com/OpenBuddy/OpenBuddy), you are based on "
    "LLaMA and Falcon transformers model, not related to GPT or OpenAI.\n\n"
)


@register_chat_format("openbuddy")
def format_openbuddy(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    turns = _with_reply(messages, {"user": "User", "assistant": "Assistant"})
    return _fmt(_colon_single(_OPENBUDDY, turns, "\n", ":"))


@register_chat_format("redpajama-incite")
def format_redpajama_incite(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    turns = _with_reply(messages, {"user": "<human>", "assistant": "<bot>"})
    return _fmt(_colon_single(_system(messages), turns, "\n", ":"), "<human>")


_SNOOZY = (
    "The prompt below is a question to answer, a task to complete, or a conversation to respond "
    "to; decide which and write an appropriate response."
)


@register_chat_format("snoozy")
def format_snoozy(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    turns = _with_reply(messages, {"user": "### Prompt", "assistant": "### Response"})
    return _fmt(_colon_single(_system(messages) or _SNOOZY, turns, "\n", ":"), "###")


@register_chat_format("phind")
def format_phind(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    system = "### System Prompt\nYou are an intelligent programming assistant."
    turns = _with_reply(messages, {"user": "### User Message", "assistant": "### Assistant"})
    return _fmt(_colon_single(system, turns, "\n\n", ":"))


@register_chat_format("intel")
def format_intel(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    turns = _with_reply(messages, {"user": "### User:", "assistant": "### Assistant:"})
    return _fmt(_colon_single("### System:\n{system_message}", turns, "\n", ":"))


_OPEN_ORCA = (
    "You are a helpful assistant. Please answer truthfully and write out your thinking step by "
    "step to be sure you get the right answer. If you make a mistake or encounter an error in "
    "your thinking, say so out loud and attempt to correct it. If you don't know or aren't sure "
    "about something, say so clearly. You will act as a professional logician, mathematician, "
    "and physicist. You will also act as the most appropriate type of expert to answer any "
    "particular question or solve the relevant problem; state which expert type your are, if "
    "so. Also think of any particular named expert that would be ideal to answer the relevant "
    "question or solve the relevant problem; name and act as them, if appropriate."
)


@register_chat_format("open-orca")
def format_open_orca(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    # llama-cpp-python maps the roles "User" and "Assistant" only (so "user" turns drop out).
    turns = [*_roles(messages, {"User": "User", "Assistant": "Assistant"}), ("Assistant", None)]
    return _fmt(_colon_single(_OPEN_ORCA, turns, "<|end_of_turn|>\n", ": "), "User")


@register_chat_format("mistrallite")
def format_mistrallite(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    system = f"<|system|>{_system(messages)}</s>"
    turns = _with_reply(messages, {"user": "<|prompter|>", "assistant": "</s>\n<|assistant|>"})
    return _fmt(_no_colon(system, turns, " "))


@register_chat_format("zephyr")
def format_zephyr(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    system = f"<|system|>\n{_system(messages)}"
    turns = _with_reply(messages, {"user": "<|user|>\n", "assistant": "<|assistant|>\n"})
    return _fmt(_chatml(system, turns, "</s>"), "</s>")


@register_chat_format("pygmalion")
def format_pygmalion(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    system = f"<|system|>{_system(messages)}"
    turns = _with_reply(messages, {"user": "<|user|>", "assistant": "<|model|>"})
    return _fmt(_chatml(system, turns, "\n"), "\n")


@register_chat_format("chatml")
def format_chatml(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    system = f"<|im_start|>system\n{_system(messages)}"
    names = {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"}
    return _fmt(_chatml(system, _with_reply(messages, names), "<|im_end|>"), "<|im_end|>")


@register_chat_format("mistral-instruct")
def format_mistral_instruct(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    prompt = ""
    for m in messages:
        content = m.get("content")
        if m.get("role") == "user" and isinstance(content, str):
            prompt += "[INST] " + content
        elif m.get("role") == "assistant" and content is not None:
            prompt += " [/INST]" + content + "</s>"
    return _fmt(prompt + " [/INST]", "</s>")


@register_chat_format("chatglm3")
def format_chatglm3(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    out = f"<|system|>\n{_system(messages)}"
    for role, text in _with_reply(messages, {"user": "<|user|>", "assistant": "<|assistant|>"}):
        out += f"{role}\n {text}" if text else role
    return _fmt(out, "</s>")


@register_chat_format("openchat")
def format_openchat(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    system = f"{_system(messages)}<|end_of_turn|>"
    names = {
        "user": "GPT4 Correct User: ",
        "assistant": "<|end_of_turn|>GPT4 Correct Assistant: ",
    }
    return _fmt(_chatml(system, _with_reply(messages, names), "<|end_of_turn|>"), "<|end_of_turn|>")


@register_chat_format("saiga")
def format_saiga(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    out = ""
    for role, text in _roles(messages, {"user": "user", "bot": "bot", "system": "system"}):
        out += f"<s>{role}\n{text}</s>" if text else f"<s>{role}\n"
    return _fmt((out + "<s>bot").strip())


@register_chat_format("gemma")
def format_gemma(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    names = {"user": "<start_of_turn>user\n", "assistant": "<start_of_turn>model\n"}
    return _fmt(_no_colon("", _with_reply(messages, names), "<end_of_turn>\n"), "<end_of_turn>\n")


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
