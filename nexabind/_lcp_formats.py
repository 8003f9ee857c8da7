"""llama-cpp-python's named chat formats, each rendering the prompt it renders, character for
character (its spacing included), with the stop strings it gives.

:data:`FORMATS` maps each name to its formatter; :mod:`nexabind.chat_formats` registers them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from nexabind.processors import StoppingCriteriaList

__all__ = ["FORMATS", "ChatFormatterResponse"]

Messages = list[dict[str, Any]]


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


#: llama-cpp-python's format names and their formatters.
FORMATS: dict[str, Callable[..., ChatFormatterResponse]] = {}


def _named(name: str) -> Callable[[Any], Any]:
    def decorator(f: Any) -> Any:
        FORMATS[name] = f
        return f

    return decorator


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


@_named("llama-2")
def format_llama2(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    """llama-cpp-python's ``llama-2`` chat format."""
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


@_named("llama-3")
def format_llama3(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    """llama-cpp-python's ``llama-3`` chat format."""
    names = {
        r: f"<|start_header_id|>{r}<|end_header_id|>\n\n" for r in ("system", "user", "assistant")
    }
    return _fmt(_no_colon("", _with_reply(messages, names), "<|eot_id|>"), "<|eot_id|>")


@_named("alpaca")
def format_alpaca(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    """llama-cpp-python's ``alpaca`` chat format."""
    names = {"user": "### Instruction", "assistant": "### Response"}
    return _fmt(_colon_two(_system(messages), _roles(messages, names), "\n\n", "</s>"))


@_named("qwen")
def format_qwen(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    """llama-cpp-python's ``qwen`` chat format."""
    system = "<|im_start|>system\n" + (_system(messages) or "You are a helpful assistant.")
    names = {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"}
    return _fmt(_chatml(system, _with_reply(messages, names), "<|im_end|>"), "<|endoftext|>")


_VICUNA = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)


@_named("vicuna")
def format_vicuna(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    """llama-cpp-python's ``vicuna`` chat format."""
    turns = _with_reply(messages, {"user": "USER", "assistant": "ASSISTANT"})
    return _fmt(_colon_two(_VICUNA, turns, " ", "</s>"))


@_named("oasst_llama")
def format_oasst_llama(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    """llama-cpp-python's ``oasst_llama`` chat format."""
    system = f"[INST] <<SYS>>\n{_system(messages)}\n<</SYS>>\n\n"
    turns = _with_reply(messages, {"user": "<|prompter|>", "assistant": "<|assistant|>"})
    return _fmt(_no_colon(system, turns, "</s>"))


def _baichuan(user: str, assistant: str) -> Any:
    def format_baichuan(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
        """llama-cpp-python's ``baichuan`` / ``baichuan-2`` chat format."""
        turns = _with_reply(messages, {"user": user, "assistant": assistant})
        return _fmt(_no_colon(_system(messages), turns, ""))

    return format_baichuan


format_baichuan2 = _named("baichuan-2")(_baichuan("<reserved_106>", "<reserved_107>"))
format_baichuan = _named("baichuan")(_baichuan("<reserved_102>", "<reserved_103>"))

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


@_named("openbuddy")
def format_openbuddy(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    """llama-cpp-python's ``openbuddy`` chat format."""
    turns = _with_reply(messages, {"user": "User", "assistant": "Assistant"})
    return _fmt(_colon_single(_OPENBUDDY, turns, "\n", ":"))


@_named("redpajama-incite")
def format_redpajama_incite(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    """llama-cpp-python's ``redpajama-incite`` chat format."""
    turns = _with_reply(messages, {"user": "<human>", "assistant": "<bot>"})
    return _fmt(_colon_single(_system(messages), turns, "\n", ":"), "<human>")


_SNOOZY = (
    "The prompt below is a question to answer, a task to complete, or a conversation to respond "
    "to; decide which and write an appropriate response."
)


@_named("snoozy")
def format_snoozy(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    """llama-cpp-python's ``snoozy`` chat format."""
    turns = _with_reply(messages, {"user": "### Prompt", "assistant": "### Response"})
    return _fmt(_colon_single(_system(messages) or _SNOOZY, turns, "\n", ":"), "###")


@_named("phind")
def format_phind(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    """llama-cpp-python's ``phind`` chat format."""
    system = "### System Prompt\nYou are an intelligent programming assistant."
    turns = _with_reply(messages, {"user": "### User Message", "assistant": "### Assistant"})
    return _fmt(_colon_single(system, turns, "\n\n", ":"))


@_named("intel")
def format_intel(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    """llama-cpp-python's ``intel`` chat format."""
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


@_named("open-orca")
def format_open_orca(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    """llama-cpp-python's ``open-orca`` chat format."""
    # llama-cpp-python maps the roles "User" and "Assistant" only (so "user" turns drop out).
    turns = [*_roles(messages, {"User": "User", "Assistant": "Assistant"}), ("Assistant", None)]
    return _fmt(_colon_single(_OPEN_ORCA, turns, "<|end_of_turn|>\n", ": "), "User")


@_named("mistrallite")
def format_mistrallite(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    """llama-cpp-python's ``mistrallite`` chat format."""
    system = f"<|system|>{_system(messages)}</s>"
    turns = _with_reply(messages, {"user": "<|prompter|>", "assistant": "</s>\n<|assistant|>"})
    return _fmt(_no_colon(system, turns, " "))


@_named("zephyr")
def format_zephyr(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    """llama-cpp-python's ``zephyr`` chat format."""
    system = f"<|system|>\n{_system(messages)}"
    turns = _with_reply(messages, {"user": "<|user|>\n", "assistant": "<|assistant|>\n"})
    return _fmt(_chatml(system, turns, "</s>"), "</s>")


@_named("pygmalion")
def format_pygmalion(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    """llama-cpp-python's ``pygmalion`` chat format."""
    system = f"<|system|>{_system(messages)}"
    turns = _with_reply(messages, {"user": "<|user|>", "assistant": "<|model|>"})
    return _fmt(_chatml(system, turns, "\n"), "\n")


@_named("chatml")
def format_chatml(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    """llama-cpp-python's ``chatml`` chat format."""
    system = f"<|im_start|>system\n{_system(messages)}"
    names = {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"}
    return _fmt(_chatml(system, _with_reply(messages, names), "<|im_end|>"), "<|im_end|>")


@_named("mistral-instruct")
def format_mistral_instruct(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    """llama-cpp-python's ``mistral-instruct`` chat format."""
    prompt = ""
    for m in messages:
        content = m.get("content")
        if m.get("role") == "user" and isinstance(content, str):
            prompt += "[INST] " + content
        elif m.get("role") == "assistant" and content is not None:
            prompt += " [/INST]" + content + "</s>"
    return _fmt(prompt + " [/INST]", "</s>")


@_named("chatglm3")
def format_chatglm3(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    """llama-cpp-python's ``chatglm3`` chat format."""
    out = f"<|system|>\n{_system(messages)}"
    for role, text in _with_reply(messages, {"user": "<|user|>", "assistant": "<|assistant|>"}):
        out += f"{role}\n {text}" if text else role
    return _fmt(out, "</s>")


@_named("openchat")
def format_openchat(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    """llama-cpp-python's ``openchat`` chat format."""
    system = f"{_system(messages)}<|end_of_turn|>"
    names = {
        "user": "GPT4 Correct User: ",
        "assistant": "<|end_of_turn|>GPT4 Correct Assistant: ",
    }
    return _fmt(_chatml(system, _with_reply(messages, names), "<|end_of_turn|>"), "<|end_of_turn|>")


@_named("saiga")
def format_saiga(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    """llama-cpp-python's ``saiga`` chat format."""
    out = ""
    for role, text in _roles(messages, {"user": "user", "bot": "bot", "system": "system"}):
        out += f"<s>{role}\n{text}</s>" if text else f"<s>{role}\n"
    return _fmt((out + "<s>bot").strip())


@_named("gemma")
def format_gemma(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    """llama-cpp-python's ``gemma`` chat format."""
    names = {"user": "<start_of_turn>user\n", "assistant": "<start_of_turn>model\n"}
    return _fmt(_no_colon("", _with_reply(messages, names), "<end_of_turn>\n"), "<end_of_turn>\n")
