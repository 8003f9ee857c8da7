"""The low-level layer against the real library and a tiny random model."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import native_lines

from nexabind.errors import ClosedError, ContextError, DecodeCancelled, ModelLoadError, StateError
from nexabind.tinymodel import ModelSpec, write_random_model


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny.gguf"
    write_random_model(path, ModelSpec())
    return path


@pytest.fixture
def model(ll, tiny: Path):
    with ll.Model(tiny) as m:
        yield m


def _generate(ll, ctx, n: int, sampler=None) -> list[int]:
    sampler = sampler or ll.SamplerChain().add_greedy()
    prompt = ctx.model.tokenize("Hello")
    ctx.batch.set(prompt, 0)
    ctx.decode()
    out, pos = [], len(prompt)
    for _ in range(n):
        tok = sampler.sample(ctx)
        out.append(tok)
        ctx.batch.set_one(tok, pos)
        pos += 1
        ctx.decode()
    return out


def test_tokenize_roundtrip(model) -> None:
    toks = model.tokenize("hello world", add_special=False)
    assert toks and all(0 <= t < model.n_vocab for t in toks)
    assert model.detokenize(toks) == "hello world"
    # SPM vocabularies prefix a space that detokenize strips
    assert b"".join(model.token_to_piece(t) for t in toks).lstrip() == b"hello world"
    assert model.tokenize("hi", add_special=True)[0] == model.bos


def test_greedy_generation_is_deterministic(ll, model) -> None:
    with ll.Context(model, n_ctx=128) as a, ll.Context(model, n_ctx=128) as b:
        assert _generate(ll, a, 10) == _generate(ll, b, 10)


def test_logits_view_shares_llama_memory(ll, model) -> None:
    from nexabind._ffi import ffi

    with ll.Context(model, n_ctx=128) as ctx:
        ctx.batch.set(model.tokenize("Hello"), 0)
        ctx.decode()
        view = ctx.logits()
        ptr = ll.lib().llama_get_logits_ith(ctx._ptr, -1)
        assert view.ctypes.data == int(ffi.cast("uintptr_t", ptr))
        assert view.shape == (model.n_vocab,) and view.dtype == np.float32
        assert not view.flags.writeable and not view.flags.owndata
        copied = np.array(ffi.unpack(ptr, model.n_vocab), dtype=np.float32)
        np.testing.assert_array_equal(view, copied)
        with pytest.raises(ValueError):
            view[0] = 1.0


def test_stale_logits_are_detected(ll, model) -> None:
    with ll.Context(model, n_ctx=128) as ctx:
        prompt = model.tokenize("Hello")
        ctx.batch.set(prompt, 0)
        ctx.decode()
        logits = ctx.logits_view()
        first = logits.array.copy()
        ctx.batch.set_one(int(first.argmax()), len(prompt))
        ctx.decode()
        with pytest.raises(ContextError, match="stale.*copy"):
            _ = logits.array


def _assert_lowlevel_keeps_nothing(fn) -> None:
    """Run ``fn`` (1,000 tokens) under tracemalloc: nexabind.lowlevel may keep < 2 KiB in all."""
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        fn()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    stats = after.compare_to(before, "filename")
    growth = sum(s.size_diff for s in stats if "lowlevel" in s.traceback[0].filename)
    assert growth < 2048, stats[:5]


def test_no_allocation_growth_per_token(ll, model) -> None:
    with ll.Context(model, n_ctx=1200, n_threads=1) as ctx:
        sampler = ll.SamplerChain().add_greedy()
        _generate(ll, ctx, 50, sampler)
        ctx.clear()
        gc.collect()
        _assert_lowlevel_keeps_nothing(lambda: _generate(ll, ctx, 1000, sampler))


def test_use_after_close_raises(ll, tiny: Path) -> None:
    model = ll.Model(tiny)
    ctx = ll.Context(model, n_ctx=64)
    ctx.close()
    ctx.close()
    assert ctx.closed
    with pytest.raises(ClosedError, match="closed"):
        ctx.decode()
    with pytest.raises(ClosedError, match="closed"):
        ctx.logits()
    model.close()
    model.close()
    with pytest.raises(ClosedError, match="closed"):
        model.tokenize("x")
    with pytest.raises(ClosedError, match="closed"):
        ll.Context(model)


def test_context_keeps_model_alive(ll, tiny: Path) -> None:
    ctx = ll.Context(ll.Model(tiny), n_ctx=64)
    gc.collect()  # no reference to the model remains but the context's
    assert len(_generate(ll, ctx, 3)) == 3
    ctx.close()


def test_closing_a_model_in_use_defers_the_free(ll, tiny: Path) -> None:
    model = ll.Model(tiny)
    ctx = ll.Context(model, n_ctx=64)
    prompt = model.tokenize("Hello")
    model.close()
    assert model.closed
    with pytest.raises(ClosedError, match="closed"):
        model.tokenize("x")
    ctx.batch.set(prompt, 0)
    ctx.decode()  # the weights are still there
    assert ctx.logits().shape == (model.n_vocab,)
    ctx.close()
    assert model._ptr is None  # freed with its last context


def test_cancel_from_another_thread(ll, model) -> None:
    with ll.Context(model, n_ctx=512, n_batch=512, n_threads=1) as ctx:
        prompt = [3 + i % (model.n_vocab - 3) for i in range(500)]
        result: list[BaseException | None] = []

        def work() -> None:
            try:
                for _ in range(100000):
                    ctx.clear()
                    ctx.batch.set(prompt, 0)
                    ctx.decode()
                result.append(None)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                result.append(e)

        t = threading.Thread(target=work)
        t.start()
        time.sleep(0.2)
        ctx.cancel()
        t.join(30)
        assert not t.is_alive()
        assert isinstance(result[0], DecodeCancelled)
        # the context is usable again afterwards
        ctx.clear()
        assert len(_generate(ll, ctx, 2)) == 2


def test_two_contexts_decode_in_two_threads(ll, model) -> None:
    with ll.Context(model, n_ctx=128) as ref:
        want = _generate(ll, ref, 20)
    got: dict[int, list[int]] = {}

    def work(i: int) -> None:
        with ll.Context(model, n_ctx=128, n_threads=1) as ctx:
            got[i] = _generate(ll, ctx, 20)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == {0: want, 1: want}


def test_load_free_cycles_do_not_grow_rss(ll, tiny: Path) -> None:
    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096

    if not Path("/proc/self/statm").exists():
        pytest.skip("RSS measured through /proc")
    for _ in range(50):
        with ll.Model(tiny) as m, ll.Context(m, n_ctx=64):
            pass
    gc.collect()
    start = rss()
    for _ in range(1000):
        with ll.Model(tiny) as m, ll.Context(m, n_ctx=64):
            pass
    gc.collect()
    assert rss() - start < 8 * 2**20


def test_missing_model_file(ll, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        ll.Model(tmp_path / "nope.gguf")


@pytest.mark.parametrize("kind", ["truncated", "random"])
def test_bad_gguf_raises_in_a_child(libdir: Path, tiny: Path, tmp_path: Path, kind: str) -> None:
    bad = tmp_path / "bad.gguf"
    data = tiny.read_bytes()
    bad.write_bytes(
        data[: len(data) // 2] if kind == "truncated" else np.random.default_rng(1).bytes(4096)
    )
    code = (
        "import sys\n"
        "from nexabind import lowlevel\n"
        "from nexabind.errors import ModelLoadError\n"
        "lowlevel.lib(sys.argv[1])\n"
        "try:\n"
        "    lowlevel.Model(sys.argv[2])\n"
        "except ModelLoadError as e:\n"
        "    print('ModelLoadError:', e)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(libdir), str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ModelLoadError:" in r.stdout and str(bad) in r.stdout


def test_metadata_version_and_chat_template(ll, model) -> None:
    assert ll.version()
    meta = model.metadata()
    assert meta["general.architecture"] == "llama"
    assert model.n_params > 0 and model.size > 0
    assert model.token_text(model.bos)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.token_text(model.n_vocab)
    text = ll.chat_template_apply("chatml", [("user", "hi")])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="does not support the chat template"):
        ll.chat_template_apply("no-such-template", [("user", "hi")])


def test_state_roundtrip_and_array_input(ll, model) -> None:
    prompt = np.array(model.tokenize("Hello world"), dtype=np.int32)
    with ll.Context(model, n_ctx=128) as a, ll.Context(model, n_ctx=128) as b:
        a.batch.set_array(prompt, 0)
        a.decode()
        assert a.seq_pos_max(0) == len(prompt) - 1
        state = a.state_get()
        b.state_set(state)
        assert b.seq_pos_max(0) == len(prompt) - 1
        for ctx in (a, b):  # the same next step from the restored cache
            ctx.batch.set_one(5, len(prompt))
            ctx.decode()
        np.testing.assert_array_equal(b.logits(), a.logits())
        assert b.seq_rm(0, 2, -1)
        assert b.seq_pos_max(0) == 1
        with pytest.raises(StateError, match="same model"):
            b.state_set(state[: len(state) // 2])


def test_several_sequences_in_one_decode(ll, model) -> None:
    texts = ["Hello", "world again"]
    with ll.Context(model, n_ctx=128, n_seq_max=2) as ctx:
        ctx.batch.clear()
        last = []  # batch index of each sequence's last token
        for seq, text in enumerate(texts):
            toks = model.tokenize(text)
            for pos, tok in enumerate(toks):
                ctx.batch.add(tok, pos, seq, logits=pos == len(toks) - 1)
            last.append(ctx.batch.b.n_tokens - 1)
        ctx.decode()
        assert [ctx.seq_pos_max(s) for s in (0, 1)] == [len(model.tokenize(t)) - 1 for t in texts]
        both = [ctx.logits(i).copy() for i in last]
    for seq, text in enumerate(texts):
        with ll.Context(model, n_ctx=128) as one:
            one.batch.set(model.tokenize(text), 0)
            one.decode()
            np.testing.assert_allclose(one.logits(), both[seq], rtol=1e-4, atol=1e-4)


def test_cancel_flag_is_public(ll, model) -> None:
    with ll.Context(model, n_ctx=64) as ctx:
        ctx.cancel()
        assert ctx.cancelled
        ctx.clear_cancel()
        assert not ctx.cancelled
        ctx.prepare_single_token()
        ctx.cancel()
        ctx.batch.set(model.tokenize("Hi"), 0)
        with pytest.raises(DecodeCancelled):
            ctx.decode()
        assert not ctx.cancelled  # consumed by the decode that reported it


# -- sampler chain, context parameters, per-token steps ---------------------------------------


def test_sampler_chain_builder(ll, model) -> None:
    with ll.Context(model, n_ctx=128, n_threads=1) as ctx:
        ctx.batch.set(model.tokenize("Hello"), 0)
        ctx.decode()
        logits = ctx.logits().copy()
        greedy = ll.SamplerChain().add_greedy()
        assert len(greedy) == 1
        assert greedy.sample(ctx) == int(np.argmax(logits))
        # A bias on the least likely token makes it the greedy pick.
        low = int(np.argmin(logits))
        with ll.SamplerChain().add_logit_bias(model.n_vocab, {low: 1e6}).add_greedy() as ch:
            assert len(ch) == 2
            assert ch.sample(ctx) == low
        # top_k=1 leaves only the most likely token, whatever the seed.
        chain = (
            ll.SamplerChain()
            .add_penalties(model.n_vocab, 64, 1.0, 0.0, 0.0)
            .add_top_k(1)
            .add_typical(1.0)
            .add_top_p(0.9)
            .add_min_p(0.05)
            .add_temp(0.7)
            .add_dist(7)
        )
        assert len(chain) == 7
        assert chain.sample(ctx) == int(np.argmax(logits))
        chain.accept(3)
        chain.reset()
        chain.close()
        chain.close()
        assert chain.closed
        with pytest.raises(ClosedError, match="sampler chain is closed"):
            chain.sample(ctx)
        with pytest.raises(ClosedError, match="closed"):
            chain.add_greedy()
        greedy.close()


def test_sampler_chain_errors(ll, model) -> None:
    chain = ll.SamplerChain()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        chain.add_logit_bias(model.n_vocab, {model.n_vocab: 1.0})
    with pytest.raises(ValueError, match="GBNF grammar does not parse.*'root' rule"):
        chain.add_grammar(model, "root ::= (")
    with pytest.raises(ValueError, match="'start' rule"):
        chain.add_grammar(model, 'root ::= "a"', root="start")
    assert len(chain) == 0
    chain.add_grammar(model, 'root ::= "a"')
    assert len(chain) == 1
    chain.close()


def test_context_parameters_reach_llama_cpp(ll, model) -> None:
    with ll.Context(model, n_ctx=256, n_batch=64, n_ubatch=16, n_threads=1, n_threads_batch=2) as c:
        assert c.n_ubatch == 16
        assert (c.n_threads, c.n_threads_batch) == (1, 2)
        c.set_threads(2, 1)
        assert (c.n_threads, c.n_threads_batch) == (2, 1)
        c.set_threads(1)
        assert (c.n_threads, c.n_threads_batch) == (1, 1)
        with pytest.raises(ValueError, match="n_threads=0 is invalid; use 1..512"):
            c.set_threads(0)
    with ll.Context(model, n_ctx=256, n_batch=64, n_threads=3) as c:
        assert c.n_ubatch == 64
        assert (c.n_threads, c.n_threads_batch) == (3, 3)
    for kwargs, fragment in [
        ({"n_ubatch": 0}, "n_ubatch=0"),
        ({"n_threads": 0}, "n_threads=0"),
        ({"n_threads_batch": -2}, "n_threads_batch=-2"),
        ({"flash_attn": "sometimes"}, "flash_attn='sometimes' is invalid"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            ll.Context(model, n_ctx=64, **kwargs)


def test_kv_unified_gives_each_sequence_the_whole_context(ll, model) -> None:
    # (llama.cpp pads a sequence's share to a multiple of 256 cells.)
    with ll.Context(model, n_ctx=1024, n_seq_max=4, kv_unified=False) as c:
        assert c.n_ctx_seq == 256
    with ll.Context(model, n_ctx=1024, n_seq_max=4, kv_unified=True) as c:
        assert c.n_ctx_seq == 1024


@pytest.mark.parametrize(
    ("value", "name"), [(True, "enabled"), (False, "disabled"), (None, "auto")]
)
def test_flash_attn_setting_reaches_llama_cpp(ll, model, native_log, value, name) -> None:
    with ll.Context(model, n_ctx=64, flash_attn=value) as c:
        assert c.flash_attn is ll.FlashAttention[name.upper()]
    assert f"flash_attn            = {name}" in native_lines(native_log)


def test_flash_attn_changes_the_computation(ll, model) -> None:
    def logits(flash: bool) -> np.ndarray:
        with ll.Context(model, n_ctx=128, n_threads=1, flash_attn=flash) as c:
            c.batch.set(model.tokenize("Hello world, hello world"), 0)
            c.decode()
            return c.logits().copy()

    on, off = logits(True), logits(False)
    # Same math, another kernel: close, but not bit for bit.
    np.testing.assert_allclose(on, off, rtol=1e-3, atol=1e-3)
    assert not np.array_equal(on, off)


def test_use_mlock_reaches_llama_cpp(ll, tiny: Path, native_log) -> None:
    with ll.Model(tiny, use_mlock=True):
        pass
    with ll.Model(tiny, use_mlock=True, use_mmap=False):
        pass
    with ll.Model(tiny, use_mmap=False):
        pass
    lines = native_lines(native_log)
    assert "load_mode = mmap+mlock" in lines
    assert "load_mode = mlock" in lines
    assert "load_mode = none" in lines


def test_token_steps_match_the_decode_loop(ll, model) -> None:
    with ll.Context(model, n_ctx=256, n_threads=1) as ctx:
        expected = _generate(ll, ctx, 30)
        ctx.clear()
        prompt = model.tokenize("Hello")
        ctx.batch.set(prompt, 0)
        ctx.decode()
        sampler = ll.SamplerChain().add_greedy()
        sample, is_eog, piece, feed = ctx.token_steps(sampler)
        got, pos, gen = [], len(prompt), ctx.generation
        for _ in range(30):
            tok = sample()
            got.append(tok)
            assert piece(tok) == model.token_to_piece(tok)
            assert is_eog(tok) == model.is_eog(tok)
            feed(tok, pos)
            pos += 1
        assert got == expected
        assert ctx.generation == gen + 30  # stale logits views stay detectable
        assert is_eog(model.eos)
        ctx.cancel()
        with pytest.raises(DecodeCancelled):
            feed(got[-1], pos)
        assert not ctx.cancelled
        sampler.close()
        with pytest.raises(ClosedError, match="closed"):
            sample()
    with pytest.raises(ClosedError, match="closed"):
        feed(got[-1], pos)


def test_token_steps_allocate_nothing_per_token(ll, model) -> None:
    with (
        ll.Context(model, n_ctx=1200, n_threads=1) as ctx,
        ll.SamplerChain().add_greedy() as sampler,
    ):

        def run(n: int) -> None:
            ctx.clear()
            ctx.batch.set(model.tokenize("Hello"), 0)
            ctx.decode()
            sample, is_eog, piece, feed = ctx.token_steps(sampler)
            pos = ctx.seq_pos_max(0) + 1
            for _ in range(n):
                tok = sample()
                is_eog(tok)
                piece(tok)
                feed(tok, pos)
                pos += 1

        run(50)
        gc.collect()
        _assert_lowlevel_keeps_nothing(lambda: run(1000))


def _run_python(code: str, libdir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NEXABIND_LIB_PATH": str(libdir)}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )


def test_llama_log_reaches_logging(libdir: Path) -> None:
    code = (
        "import logging; logging.basicConfig(level=logging.DEBUG)\n"
        "from nexabind import lowlevel; lowlevel.lib()\n"
    )
    r = _run_python(code, libdir)
    assert r.returncode == 0, r.stderr
    assert "nexabind.llama" in r.stderr and "backend" in r.stderr
    # quiet by default
    r = _run_python("from nexabind import lowlevel; lowlevel.lib()", libdir)
    assert r.returncode == 0 and r.stderr == ""


def test_a_vocabulary_only_model_loads_and_tokenizes(libdir: Path, tiny: Path) -> None:
    from _child import ok, run_child

    out = ok(run_child(
        """
        import sys
        from nexabind import lowlevel
        lowlevel.lib(sys.argv[1])
        with lowlevel.Model(sys.argv[2], vocab_only=True) as m:
            print(m.n_vocab, m.n_head, len(m.tokenize("hello world")) > 1)
        """,
        libdir, tiny,
    ))  # fmt: skip
    assert out.split()[1:] == ["0", "True"]
