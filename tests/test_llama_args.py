"""Every llama-cpp-python constructor argument is taken and reaches llama.cpp (or says why not)."""

from __future__ import annotations

import inspect
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import native_lines

from nexabind import Llama
from nexabind.tinymodel import ModelSpec, write_random_lora

#: llama-cpp-python 0.3.36's ``Llama.__init__`` arguments and their defaults (its signature;
#: checked against it when it is installed).
LCP_DEFAULTS = {
    "n_gpu_layers": 0,
    "split_mode": 1,
    "main_gpu": 0,
    "tensor_split": None,
    "vocab_only": False,
    "use_mmap": True,
    "use_mlock": False,
    "kv_overrides": None,
    "seed": 0xFFFFFFFF,
    "n_ctx": 512,
    "n_batch": 512,
    "n_ubatch": 512,
    "n_threads": None,
    "n_threads_batch": None,
    "rope_scaling_type": -1,
    "pooling_type": -1,
    "attention_type": -1,
    "rope_freq_base": 0.0,
    "rope_freq_scale": 0.0,
    "yarn_ext_factor": -1.0,
    "yarn_attn_factor": 1.0,
    "yarn_beta_fast": 32.0,
    "yarn_beta_slow": 1.0,
    "yarn_orig_ctx": 0,
    "logits_all": False,
    "embedding": False,
    "offload_kqv": True,
    "flash_attn": False,
    "op_offload": None,
    "swa_full": None,
    "no_perf": False,
    "last_n_tokens_size": 64,
    "lora_base": None,
    "lora_scale": 1.0,
    "lora_path": None,
    "numa": False,
    "chat_format": None,
    "chat_handler": None,
    "draft_model": None,
    "tokenizer": None,
    "type_k": None,
    "type_v": None,
    "spm_infill": False,
    "verbose": True,
}


@pytest.fixture
def quiet_native_log():
    from nexabind import lowlevel

    yield
    lowlevel.set_verbose(False)


def test_the_argument_list_is_llama_cpp_python_s(libdir: Path) -> None:
    ours = set(inspect.signature(Llama.__init__).parameters)
    assert set(LCP_DEFAULTS) <= ours
    # Against llama-cpp-python itself when it is installed, in a child process (it would
    # take over llama.cpp's log callback in this one).
    code = (
        "import inspect, json, llama_cpp\n"
        "ps = inspect.signature(llama_cpp.Llama.__init__).parameters\n"
        "print(json.dumps({k: p.default for k, p in ps.items()\n"
        "                  if k not in ('self', 'model_path', 'kwargs')}))\n"
    )
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(libdir), "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if "ModuleNotFoundError" in proc.stderr:
        return  # not installed: the record above is the reference
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == LCP_DEFAULTS


def test_every_argument_at_llama_cpp_python_s_default(
    libdir: Path, tiny_model: Path, quiet_native_log
) -> None:
    with Llama(str(tiny_model), lib_path=libdir, **LCP_DEFAULTS) as m:
        assert m.n_ctx() == 512
        assert m.n_batch == 512
        assert m.chat_format == "chat_template.default"
        assert m.pooling_type() == -1 or m.pooling_type() >= 0
        out = m("Hello", max_tokens=3, temperature=0)
        assert out["usage"]["completion_tokens"] == 3


def test_extra_keywords_are_logged_and_ignored(
    libdir: Path, tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING),
        Llama(tiny_model, n_ctx=64, f16_kv=True, lib_path=libdir),
    ):
        pass
    assert "Llama(f16_kv): not arguments of nexabind or llama-cpp-python 0.3" in caplog.text


def test_lora_adapter_applies_and_lora_base_is_refused(
    libdir: Path, tiny_model: Path, tmp_path: Path
) -> None:
    lora = write_random_lora(tmp_path / "lora.gguf", ModelSpec())
    common = {"n_ctx": 64, "n_threads": 1, "lib_path": libdir}

    def logits(**kw) -> np.ndarray:
        with Llama(tiny_model, **common, **kw) as m:
            m.eval(m.tokenize(b"Hello world"))
            return np.asarray(m.scores[-1]).copy()

    base = logits()
    np.testing.assert_array_equal(logits(lora_path=str(lora), lora_scale=0.0), base)
    assert not np.allclose(logits(lora_path=str(lora)), base, atol=1e-3)
    with pytest.raises(NotImplementedError, match="lora_base='base.gguf' cannot apply"):
        Llama(tiny_model, lora_base="base.gguf", lora_path=str(lora), **common)


def test_kv_overrides_and_context_from_the_model(libdir: Path, tiny_model: Path) -> None:
    with Llama(
        tiny_model, n_ctx=0, kv_overrides={"llama.context_length": 768}, lib_path=libdir
    ) as m:
        assert m.n_ctx() == 768
        assert m.kv_overrides == {"llama.context_length": 768}


def test_context_arguments_reach_llama_cpp(libdir: Path, tiny_model: Path, native_log) -> None:
    with Llama(
        tiny_model,
        n_ctx=64,
        rope_freq_base=20000.0,
        rope_freq_scale=0.5,
        type_k="f32",
        type_v=0,
        attention_type=1,
        offload_kqv=False,
        swa_full=True,
        op_offload=False,
        no_perf=False,
        lib_path=libdir,
    ) as m:
        assert m("Hello", max_tokens=2)["usage"]["completion_tokens"] == 2
    text = native_lines(native_log)
    assert "freq_base             = 20000.0" in text
    assert "freq_scale            = 0.5" in text
    assert "K (f32)" in text and "V (f32)" in text
    with pytest.raises(ValueError, match="type_k=99 is invalid"):
        Llama(tiny_model, n_ctx=64, type_k=99, lib_path=libdir)


def test_gpu_split_options_are_taken(libdir: Path, tiny_model: Path) -> None:
    with Llama(
        tiny_model, n_ctx=64, n_gpu_layers=-1, split_mode=0, main_gpu=0, tensor_split=[1.0],
        lib_path=libdir,
    ) as m:  # fmt: skip
        assert m.tensor_split == [1.0]
    with pytest.raises(ValueError, match="split_mode=7 is invalid"):
        Llama(tiny_model, n_ctx=64, split_mode=7, lib_path=libdir)


def test_vocab_only_tokenizes(libdir: Path, llama_source: Path) -> None:
    vocab = llama_source / "models" / "ggml-vocab-llama-spm.gguf"
    with Llama(vocab, vocab_only=True, lib_path=libdir) as m:
        assert m.tokenize(b"Hello World") == [1, 15043, 2787]
        assert m.detokenize([1, 15043, 2787]) == b"Hello World"
        with pytest.raises(Exception, match="vocab_only"):
            m("Hello", max_tokens=2)


def test_seed_minus_one_is_random_and_a_seed_gives_a_reproducible_sequence(
    libdir: Path, tiny_model: Path
) -> None:
    opts = {"max_tokens": 12, "temperature": 1.5, "top_k": 0, "top_p": 1.0, "min_p": 0.0}

    def texts(seed) -> list[str]:
        with Llama(tiny_model, n_ctx=128, seed=seed, lib_path=libdir) as m:
            return [m("Hello", **opts)["choices"][0]["text"] for _ in range(3)]

    a, b = texts(42), texts(42)
    assert a == b  # the same seed, the same sequence of calls: the same texts
    assert len(set(a)) > 1  # each call takes the next seed of the sequence
    assert texts(-1) != texts(-1)


def test_last_n_tokens_size_is_the_penalty_window(libdir: Path, tiny_model: Path) -> None:
    def ids(window: int) -> tuple[list[int], int]:
        with Llama(tiny_model, n_ctx=128, last_n_tokens_size=window, lib_path=libdir) as m:
            tok = m.tokenize(b"the", add_bos=False)[0]
            opts = {"temp": 0.0, "logit_bias": {tok: 50.0}, "presence_penalty": 100.0}
            return [int(t) for t in m.generate(m.tokenize(b"Hello"), max_tokens=6, **opts)], tok

    off, tok = ids(0)
    assert off == [tok] * 6  # no window: the bias wins every time
    on, _ = ids(64)
    assert on[0] == tok and tok not in on[1:]  # once seen, the presence penalty holds it back


def test_numa_is_taken(libdir: Path, tiny_model: Path) -> None:
    with Llama(tiny_model, n_ctx=64, numa=False, lib_path=libdir) as m:
        assert m.numa is False


def test_verbose_reaches_logging(libdir: Path, tiny_model: Path, caplog, quiet_native_log) -> None:
    with (
        caplog.at_level(logging.DEBUG, "nexabind.llama"),
        Llama(tiny_model, n_ctx=64, verbose=True, lib_path=libdir),
    ):
        pass
    assert "llama_context" in caplog.text


#: llama-cpp-python 0.3.36's public ``Llama`` methods and attributes.
LCP_NAMES = [
    "close",
    "create_chat_completion",
    "create_chat_completion_openai_v1",
    "create_completion",
    "create_embedding",
    "ctx",
    "detokenize",
    "embed",
    "eval",
    "eval_logits",
    "eval_tokens",
    "from_pretrained",
    "generate",
    "load_state",
    "logits_to_logprobs",
    "longest_token_prefix",
    "model",
    "n_ctx",
    "n_embd",
    "n_vocab",
    "pooling_type",
    "reset",
    "sample",
    "save_state",
    "set_cache",
    "set_seed",
    "token_bos",
    "token_eos",
    "token_nl",
    "tokenize",
    "tokenizer",
    "verbose",
    "numa",
    "model_path",
    "model_params",
    "tensor_split",
    "kv_overrides",
    "n_batch",
    "n_threads",
    "n_threads_batch",
    "context_params",
    "last_n_tokens_size",
    "cache",
    "lora_base",
    "lora_scale",
    "lora_path",
    "spm_infill",
    "tokenizer_",
    "chat_format",
    "chat_handler",
    "draft_model",
    "n_tokens",
    "input_ids",
    "scores",
    "metadata",
]


def test_the_readme_table_names_every_argument_method_and_attribute() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("## Coming from llama-cpp-python") :]
    missing = [n for n in [*LCP_DEFAULTS, *LCP_NAMES] if f"`{n}`" not in table]
    assert not missing


def test_every_llama_cpp_python_name_exists(libdir: Path, tiny_model: Path) -> None:
    unsupported = {"model_params", "context_params"}  # llama-cpp-python's ctypes structs
    with Llama(tiny_model, n_ctx=64, lib_path=libdir) as m:
        missing = [n for n in LCP_NAMES if n not in unsupported and not hasattr(m, n)]
    assert not missing
