"""Chat templates: jinja rendering like Hugging Face, llama.cpp's built-in templates."""

from __future__ import annotations

from pathlib import Path

import pytest

from nexabind import Llama
from nexabind.chat import apply_builtin_template, render_jinja
from nexabind.errors import TemplateError

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
]

# Templates from llama.cpp's models/templates/ that llama.cpp recognizes and renders itself,
# with the BOS text the model's tokenizer gives them. Others are recognized too but differ on
# purpose (llama.cpp leaves BOS to the tokenizer, drops tool and date preambles).
SAME_AS_LLAMA_CPP = {
    "Bielik-11B-v3.0-Instruct.jinja": "",
    "ByteDance-Seed-OSS.jinja": "<s>",
    "Kimi-K2-Instruct.jinja": "<s>",
    "LFM2-8B-A1B.jinja": "",
    "LFM2.5-Instruct.jinja": "",
    "MiMo-VL.jinja": "<s>",
    "Qwen-Qwen2.5-7B-Instruct.jinja": "<s>",
    "Qwen-Qwen3-0.6B.jinja": "<s>",
    "Qwen3-Coder.jinja": "<s>",
    "ibm-granite-granite-3.3-2B-Instruct.jinja": "<s>",
    "ibm-granite-granite-4.0.jinja": "<s>",
    "microsoft-Phi-3.5-mini-instruct.jinja": "<s>",
    "moonshotai-Kimi-K2.jinja": "<s>",
    "openbmb-MiniCPM5-1B.jinja": "",
}


@pytest.mark.parametrize("name", sorted(SAME_AS_LLAMA_CPP))
def test_jinja_matches_llama_chat_apply_template(
    name: str, llama_source: Path, libdir: Path
) -> None:
    from nexabind import lowlevel

    lowlevel.lib(libdir)
    src = (llama_source / "models" / "templates" / name).read_text()
    bos = SAME_AS_LLAMA_CPP[name]
    ours = render_jinja(src, MESSAGES, bos_token=bos, eos_token="</s>")
    assert ours == apply_builtin_template(src, MESSAGES)
    assert "Bye" in ours


def test_builtin_by_name(libdir: Path) -> None:
    from nexabind import lowlevel

    lowlevel.lib(libdir)
    out = apply_builtin_template("chatml", MESSAGES[1:2])
    assert out == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    no_gen = apply_builtin_template("chatml", MESSAGES[1:2], add_generation_prompt=False)
    assert no_gen == "<|im_start|>user\nHi there<|im_end|>\n"


def test_unknown_builtin_name(libdir: Path) -> None:
    from nexabind import lowlevel

    lowlevel.lib(libdir)
    with pytest.raises(TemplateError, match="does not support the chat template"):
        apply_builtin_template("no-such-template", MESSAGES)


def test_raise_exception_and_variables() -> None:
    src = (
        "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
        "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}>{% endif %}"
    )
    with pytest.raises(TemplateError, match="first must be user"):
        render_jinja(src, MESSAGES)
    out = render_jinja(src, MESSAGES[1:2], bos_token="<s>", eos_token="</s>")
    assert out == "<s>Hi there</s>>"
    assert render_jinja(src, MESSAGES[1:2], add_generation_prompt=False) == "Hi there"


def test_sandbox_refuses_unsafe_access() -> None:
    with pytest.raises(TemplateError):
        render_jinja("{{ messages.__class__.__mro__[1].__subclasses__() }}", MESSAGES)


def test_malformed_template() -> None:
    with pytest.raises(TemplateError, match="could not be rendered"):
        render_jinja("{% for m in messages %}", MESSAGES)


def test_llama_uses_model_template_or_given_one(libdir: Path, tiny_model: Path) -> None:
    with Llama(tiny_model, n_ctx=256, lib_path=libdir) as m:
        assert m.format_chat(MESSAGES[1:2]) == (
            "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
        )
    with Llama(tiny_model, n_ctx=256, chat_template="llama2", lib_path=libdir) as m:
        assert "[INST]" in m.format_chat(MESSAGES[1:2])
    with Llama(tiny_model, n_ctx=256, chat_template="{{ bos_token }}X", lib_path=libdir) as m:
        assert m.format_chat(MESSAGES) == "<s>X"


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        ({"tool_calls": "get_weather"}, r"messages\[1\]\.tool_calls"),
        ({"tool_calls": [5]}, r"messages\[1\]\.tool_calls\[0\]"),
        ({"tool_calls": [{"id": "c1"}]}, r"messages\[1\]\.tool_calls\[0\]\.function"),
        ({"tool_calls": [{"function": {"name": "f", "arguments": 5}}]}, r"\.arguments"),
        ({"function_call": 5}, r"messages\[1\]\.function_call"),
    ],
)
def test_malformed_past_tool_calls_are_value_errors_naming_them(
    extra: dict[str, object], where: str
) -> None:
    from nexabind.chat import check_messages

    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None, **extra}]
    with pytest.raises(ValueError, match=where):
        check_messages(messages)
