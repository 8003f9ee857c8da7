"""llama-cpp-python's chat formats by name, formatters, handlers, and the chatml fallback."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _tools import require

from nexabind import Jinja2ChatFormatter, Llama, chat_formats
from nexabind.tinymodel import ModelSpec, write_random_model

CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "And now?"},
    ],
    [{"role": "user", "content": "One"}, {"role": "assistant", "content": "Two"}],
]


def test_formats_render_as_llama_cpp_python_renders_them() -> None:
    ours = {
        name: [
            (lambda r: [r.prompt, r.stop])(chat_formats.get_chat_formatter(name)(messages=m))
            for m in CONVERSATIONS
        ]
        for name in chat_formats.format_names()
    }
    code = (
        "import json, sys\n"
        "from llama_cpp import llama_chat_format as f\n"
        "names, convs = json.loads(sys.stdin.read())\n"
        "reg = f.LlamaChatCompletionHandlerRegistry()\n"
        "out = {}\n"
        "for n in names:\n"
        "    fmt = reg.get_chat_completion_handler_by_name(n).__closure__[0].cell_contents\n"
        "    out[n] = [(lambda r: [r.prompt, r.stop])(fmt(messages=m)) for m in convs]\n"
        "print(json.dumps(out))\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": "",
        "LLAMA_CPP_LIB_PATH": os.environ.get("NEXABIND_LIB_PATH", ""),
    }
    proc = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps([sorted(ours), CONVERSATIONS]),
        capture_output=True,
        text=True,
        env=env,
    )
    if "ModuleNotFoundError" in proc.stderr or not env["LLAMA_CPP_LIB_PATH"]:
        require(False, "llama-cpp-python is not installed: the fixed cases below still run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {n: [list(x) for x in v] for n, v in ours.items()} == theirs


@pytest.mark.parametrize(
    ("name", "prompt", "stop"),
    [
        (
            "chatml",
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
            "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nAnd now?<|im_end|>\n"
            "<|im_start|>assistant\n",
            "<|im_end|>",
        ),
        (
            "llama-2",
            "[INST] <<SYS>>\nBe brief.\n<</SYS>> Hi there [/INST]Hello! </s><s>[INST]And now? "
            " [/INST]",
            None,
        ),
        ("mistral-instruct", "[INST] Hi there [/INST]Hello!</s>[INST] And now? [/INST]", "</s>"),
        (
            "gemma",
            "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>"
            "\n<start_of_turn>user\nAnd now?<end_of_turn>\n<start_of_turn>model\n",
            "<end_of_turn>\n",
        ),
    ],
)
def test_fixed_renderings(name: str, prompt: str, stop: str | None) -> None:
    res = chat_formats.get_chat_formatter(name)(messages=CONVERSATIONS[1])
    assert (res.prompt, res.stop) == (prompt, stop)


def test_jinja_and_tokenizer_config_formatters() -> None:
    template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{{ eos_token }}"
    f = Jinja2ChatFormatter(template, eos_token="</s>", bos_token="<s>", stop_token_ids=[2])
    res = f(messages=CONVERSATIONS[0])
    assert res.prompt == "[user]Hello</s>" and res.stop == ["</s>"] and res.added_special
    assert res.stopping_criteria([1, 2], None) and not res.stopping_criteria([2, 1], None)
    config = {"chat_template": template, "bos_token": "<s>", "eos_token": "</s>"}
    g = chat_formats.hf_tokenizer_config_to_chat_formatter(config)
    assert g(messages=CONVERSATIONS[0]).prompt == "[user]Hello[assistant]</s>"
    with pytest.raises(ValueError, match="needs 'eos_token'"):
        chat_formats.hf_tokenizer_config_to_chat_formatter(
            {"chat_template": template, "bos_token": ""}
        )


@pytest.fixture(scope="module")
def bare_model(tmp_path_factory: pytest.TempPathFactory, llama_source: Path) -> Path:
    """A model with no chat template."""
    path = tmp_path_factory.mktemp("bare") / "bare.gguf"
    vocab = llama_source / "models" / "ggml-vocab-llama-spm.gguf"
    return write_random_model(path, ModelSpec(chat_template=None), vocab=vocab)


def test_a_model_without_a_template_falls_back_to_chatml_once(
    libdir: Path, bare_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    msgs = CONVERSATIONS[0]
    with caplog.at_level(logging.WARNING), Llama(bare_model, n_ctx=128, lib_path=libdir) as m:
        assert m.chat_format == "chatml"
        assert m.format_chat(msgs).startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user")
        m.create_chat_completion(msgs, max_tokens=2)
        m.create_chat_completion(msgs, max_tokens=2)
    warnings = [r for r in caplog.records if "has no chat template" in r.getMessage()]
    assert len(warnings) == 1


def test_chat_format_names_and_builtin_templates(libdir: Path, bare_model: Path) -> None:
    with Llama(bare_model, n_ctx=128, chat_format="llama-2", lib_path=libdir) as m:
        # llama-cpp-python's llama-2 prompt, spaces and all
        assert m.format_chat(CONVERSATIONS[0]) == " <s>[INST]Hello  [/INST]"
        out = m.create_chat_completion(CONVERSATIONS[0], max_tokens=3, temperature=0)
        assert out["choices"][0]["message"]["role"] == "assistant"
    with Llama(bare_model, n_ctx=128, chat_format="phi3", lib_path=libdir) as m:
        assert m.format_chat(CONVERSATIONS[0]) == "<|user|>\nHello<|end|>\n<|assistant|>\n"
    with pytest.raises(
        ValueError, match="chat_format='nope' is not a known format; known: .*chatml"
    ):
        Llama(bare_model, n_ctx=128, chat_format="nope", lib_path=libdir)


def test_chat_format_stop_strings_apply(libdir: Path, bare_model: Path) -> None:
    with Llama(bare_model, n_ctx=128, chat_format="chatml", lib_path=libdir) as m:
        only = 'root ::= "<|im_end|>" [a-z]*'  # the model can only say the stop string first
        out = m.create_chat_completion(CONVERSATIONS[0], max_tokens=20, grammar=only)
        assert out["choices"][0]["message"]["content"] == ""
        assert out["choices"][0]["finish_reason"] == "stop"


def test_chat_handlers(libdir: Path, bare_model: Path) -> None:
    template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
    handler = Jinja2ChatFormatter(template, eos_token="</s>", bos_token="<s>").to_chat_handler()
    with Llama(bare_model, n_ctx=128, chat_handler=handler, lib_path=libdir) as m:
        out = m.create_chat_completion(CONVERSATIONS[0], max_tokens=3, temperature=0)
        assert out["object"] == "chat.completion"
        # the template's text holds BOS (added_special): none is added, as in llama-cpp-python
        n = len(m.tokenize(b"user: Hello\nassistant:", add_bos=False))
        assert out["usage"]["prompt_tokens"] == n
        # a handler called as llama-cpp-python calls one
        again = handler(llama=m, messages=CONVERSATIONS[0], max_tokens=3, temperature=0)
        assert again["choices"][0]["message"] == out["choices"][0]["message"]
    seen = {}

    def custom(*, llama, messages, **request):
        seen.update(request, llama=llama)
        return {"answer": messages[-1]["content"]}

    with Llama(bare_model, n_ctx=128, chat_handler=custom, lib_path=libdir) as m:
        assert m.create_chat_completion(CONVERSATIONS[0], temperature=0.5) == {"answer": "Hello"}
        assert seen["llama"] is m and seen["temperature"] == 0.5
