"""Model and context parameters, LoRA adapters and vocabulary-only models, on the real library."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import native_lines

from nexabind.errors import ClosedError, ContextError, ModelLoadError
from nexabind.tinymodel import ModelSpec, write_random_lora, write_random_model


@pytest.fixture(scope="session")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("params")
    return {
        "model": write_random_model(d / "tiny.gguf", ModelSpec()),
        "lora": write_random_lora(d / "lora.gguf", ModelSpec()),
        "wide": write_random_model(d / "wide.gguf", ModelSpec(n_embd=128, n_ff=256)),
    }


@pytest.fixture
def model(ll, files):
    with ll.Model(files["model"]) as m:
        yield m


def logits(ctx, text: str = "Hello world, hello") -> np.ndarray:
    ctx.clear()
    ctx.batch.set(ctx.model.tokenize(text), 0)
    ctx.decode()
    return ctx.logits().copy()


def test_lora_adapter_changes_the_logits_by_its_scale(ll, model, files) -> None:
    with ll.Context(model, n_ctx=64, n_threads=1) as ctx:
        base = logits(ctx)
        adapter = ll.LoraAdapter(model, files["lora"])
        assert adapter.metadata()["adapter.type"] == "lora"
        ctx.set_lora_adapters([(adapter, 1.0)])
        full = logits(ctx)
        ctx.set_lora_adapters([(adapter, 0.0)])
        np.testing.assert_array_equal(logits(ctx), base)
        ctx.set_lora_adapters([(adapter, 0.5)])
        half = logits(ctx)
        assert not np.allclose(full, base, atol=1e-3)
        assert not np.allclose(half, full, atol=1e-3)
        # Closing an adapter a context still uses waits for the context to let go.
        adapter.close()
        assert adapter.closed
        np.testing.assert_array_equal(logits(ctx), half)
        ctx.set_lora_adapters([])
        assert adapter._ptr is None  # noqa: SLF001 - freed now
        np.testing.assert_array_equal(logits(ctx), base)
        with pytest.raises(ClosedError, match="LoRA adapter is closed"):
            ctx.set_lora_adapters([(adapter, 1.0)])


def test_lora_adapter_refused_for_another_model(ll, model, files, tmp_path: Path) -> None:
    with ll.Model(files["wide"]) as wide:
        with pytest.raises(ModelLoadError, match="could not load the LoRA adapter"):
            ll.LoraAdapter(wide, files["lora"])
        with (
            ll.Context(wide, n_ctx=64) as ctx,
            ll.LoraAdapter(model, files["lora"]) as a,
            pytest.raises(ValueError, match="loaded for another model"),
        ):
            ctx.set_lora_adapters([(a, 1.0)])
    with pytest.raises(ModelLoadError, match="not found"):
        ll.LoraAdapter(model, tmp_path / "missing.gguf")
    with pytest.raises(ModelLoadError, match="could not load the LoRA adapter"):
        ll.LoraAdapter(model, files["model"])  # a model, not an adapter


def test_adapter_keeps_its_model_alive(ll, files) -> None:
    m = ll.Model(files["model"])
    a = ll.LoraAdapter(m, files["lora"])
    m.close()
    assert m._ptr is not None  # noqa: SLF001 - the adapter still holds it
    a.close()
    assert m._ptr is None  # noqa: SLF001


def test_kv_overrides_reach_the_loader(ll, files) -> None:
    with ll.Model(files["model"], kv_overrides={"llama.context_length": 1234}) as m:
        assert m.n_ctx_train == 1234
    for bad, fragment in [
        ({"llama.context_length": [1]}, "is a list; use bool, int, float or str"),
        ({"x" * 200: 1}, "key 'xxxx"),
        ({"general.name": "y" * 200}, "at most 127 bytes"),
        ({"llama.context_length": 1 << 70}, "64-bit"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            ll.Model(files["model"], kv_overrides=bad)


def test_split_options_are_checked(ll, files) -> None:
    with ll.Model(files["model"], split_mode="none", main_gpu=0, tensor_split=[1.0]):
        pass
    with pytest.raises(ValueError, match="split_mode='diagonal' is invalid; use one of none"):
        ll.Model(files["model"], split_mode="diagonal")
    with pytest.raises(ValueError, match="tensor_split"):
        ll.Model(files["model"], tensor_split=[1.0] * (ll.max_devices() + 1))
    with pytest.raises(ValueError, match="main_gpu=-1"):
        ll.Model(files["model"], main_gpu=-1)


def test_rope_and_cache_parameters_reach_llama_cpp(ll, model, native_log) -> None:
    with ll.Context(model, n_ctx=64, n_threads=1) as ctx:
        base = logits(ctx)
    with ll.Context(
        model, n_ctx=64, n_threads=1, rope_freq_base=50000.0, rope_freq_scale=0.5
    ) as ctx:
        scaled = logits(ctx)
    text = native_lines(native_log)
    assert "freq_base             = 50000.0" in text
    assert "freq_scale            = 0.5" in text
    assert not np.allclose(base, scaled, atol=1e-4)
    with ll.Context(model, n_ctx=64, type_k="f32", type_v=ll.GgmlType.F32) as ctx:
        np.testing.assert_allclose(logits(ctx), base, rtol=1e-2, atol=1e-2)
    assert "K (f32)" in native_lines(native_log)
    with ll.Context(model, n_ctx=64, attention_type="non_causal", rope_scaling_type="yarn"):
        pass
    assert "causal_attn           = 0" in native_lines(native_log)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"type_k": 999}, r"type_k=999 is invalid; use one of f32 \(0\)"),
        ({"rope_scaling_type": "cubic"}, "rope_scaling_type='cubic' is invalid"),
        ({"attention_type": True}, "attention_type=True is invalid"),
        ({"yarn_orig_ctx": -1}, "yarn_orig_ctx=-1 is invalid"),
    ],
)
def test_out_of_range_context_parameters_are_refused(ll, model, kwargs, fragment) -> None:
    with pytest.raises(ValueError, match=fragment):
        ll.Context(model, n_ctx=64, **kwargs)


def test_unknown_context_parameter(ll, model) -> None:
    with pytest.raises(TypeError, match=r"unknown context parameters \['rope_freq'\]"):
        ll.Context(model, n_ctx=64, rope_freq=1.0)


def test_vocab_only_model_tokenizes_and_refuses_to_decode(ll, files, llama_source: Path) -> None:
    vocab = llama_source / "models" / "ggml-vocab-llama-spm.gguf"
    with ll.Model(vocab, vocab_only=True) as m:
        assert (m.n_layer, m.n_head, m.n_head_kv) == (0, 0, 0)
        assert m.tokenize("Hello World") == [1, 15043, 2787]
        assert m.special_tokens()["nl"] == 13
        with ll.Context(m, n_ctx=64) as ctx:
            assert ctx.ptr is ctx.ctx
            ctx.batch.set([1, 15043], 0)
            with pytest.raises(ContextError, match="vocab_only=True: it has no weights"):
                ctx.decode()
            with pytest.raises(ContextError, match="vocab_only"):
                ctx.token_steps(ll.SamplerChain().add_greedy())


def test_mirostat_samplers_draw_tokens(ll, model) -> None:
    with ll.Context(model, n_ctx=64, n_threads=1) as ctx:
        logits(ctx)
        for chain in (
            ll.SamplerChain().add_mirostat(model.n_vocab, 1, 5.0, 0.1),
            ll.SamplerChain().add_temp(0.8).add_mirostat_v2(1, 5.0, 0.1),
        ):
            with chain:
                assert 0 <= chain.sample(ctx) < model.n_vocab


def test_logits_rows_and_token_embeddings(ll, model) -> None:
    with ll.Context(model, n_ctx=64, n_threads=1) as ctx:
        toks = model.tokenize("Hello world")
        ctx.batch.set(toks, 0, logits_last=False)
        ctx.decode()
        rows = ctx.logits_rows(len(toks))
        assert rows.shape == (len(toks), model.n_vocab)
        np.testing.assert_array_equal(rows[-1], ctx.logits(-1))
        np.testing.assert_array_equal(rows[0], ctx.logits(0))
        with pytest.raises(Exception, match="fewer than"):
            ctx.logits_rows(len(toks) + 1)
    with ll.Context(model, n_ctx=64, embeddings=True, pooling=ll.PoolingType.NONE) as ctx:
        toks = model.tokenize("Hello world")
        ctx.batch.set(toks, 0, logits_last=False)
        ctx.decode()
        first, last = ctx.token_embeddings(0), ctx.token_embeddings(len(toks) - 1)
        assert first.shape == (model.n_embd,)
        assert not np.allclose(first, last)


def test_numa_strategy_is_set_once(ll) -> None:
    ll.numa_init(ll.NumaStrategy.DISABLED)
    ll.numa_init(False)
    with pytest.raises(ValueError, match="numa=distribute cannot apply"):
        ll.numa_init("distribute")
