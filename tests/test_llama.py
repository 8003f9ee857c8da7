"""Llama on the real library with generated models: generation, streaming, KV reuse, state."""

from __future__ import annotations

import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from nexabind import Llama, Token
from nexabind.errors import (
    ClosedError,
    ContextError,
    ContextOverflowError,
    ModelLoadError,
    StateError,
)

GREEDY = {"temperature": 0.0}


@pytest.fixture
def llm(libdir: Path, tiny_model: Path):
    with Llama(tiny_model, n_ctx=512, n_threads=1, lib_path=libdir) as m:
        yield m


def text_of(tokens) -> str:
    return "".join(t.text for t in tokens)


def test_greedy_is_repeatable_and_matches_a_low_level_loop(llm: Llama, libdir: Path) -> None:
    from nexabind import lowlevel

    ids = [t.id for t in llm.generate("Hello world", max_tokens=40, **GREEDY)]
    llm.reset()
    assert [t.id for t in llm.generate("Hello world", max_tokens=40, **GREEDY)] == ids
    assert len(ids) == 40

    model = lowlevel.Model(llm.model_path)
    with lowlevel.Context(model, n_ctx=512, n_threads=1) as ctx:
        prompt = model.tokenize("Hello world")
        ctx.batch.set(prompt, 0)
        ctx.decode()
        sampler = lowlevel.SamplerChain().add_greedy()
        out, pos = [], len(prompt)
        for _ in range(40):
            tok = sampler.sample(ctx)
            out.append(tok)
            ctx.batch.set_one(tok, pos)
            ctx.decode()
            pos += 1
        sampler.close()
    model.close()
    assert out == ids


def test_stream_joined_equals_non_stream(llm: Llama) -> None:
    whole = llm("Hello world", max_tokens=30, **GREEDY)
    chunks = list(llm("Hello world", max_tokens=30, stream=True, **GREEDY))
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_stop_string_across_token_boundary_is_never_emitted(llm: Llama) -> None:
    toks = list(llm.generate("Hello world", max_tokens=30, **GREEDY))
    # A stop string made of the end of one token and the start of the next.
    i = next(i for i in range(3, 29) if len(toks[i].text) >= 2 and len(toks[i + 1].text) >= 2)
    a, b = toks[i].text, toks[i + 1].text
    stop = a[-2:] + b[:2]
    full = text_of(toks)
    cut = full.index(stop)
    got = list(llm.generate("Hello world", max_tokens=30, stop=[stop], **GREEDY))
    assert text_of(got) == full[:cut]
    assert stop not in text_of(got)
    assert llm.last_finish_reason == "stop"
    res = llm("Hello world", max_tokens=30, stop=stop, **GREEDY)
    assert res["choices"][0]["text"] == full[:cut]
    assert res["choices"][0]["finish_reason"] == "stop"
    streamed = "".join(
        c["choices"][0]["text"]
        for c in llm("Hello world", max_tokens=30, stop=stop, stream=True, **GREEDY)
    )
    assert streamed == full[:cut]


def test_multibyte_character_split_across_tokens(llm: Llama) -> None:
    # U+1D518 is not in the SPM vocabulary: it is generated as four byte-fallback tokens.
    toks = list(llm.generate("Hello", max_tokens=8, grammar='root ::= "𝔘𝔘"', **GREEDY))
    assert text_of(toks) == "𝔘𝔘"
    assert "\ufffd" not in text_of(toks)
    assert len(toks) >= 4
    assert toks[0].text == ""  # the first byte alone is no character yet


def test_kv_cache_reuse_decodes_only_new_tokens(llm: Llama, libdir: Path, tiny_model: Path) -> None:
    prompt = "Hello world, this is the first turn of a conversation."
    first = text_of(llm.generate(prompt, max_tokens=10, **GREEDY))
    n_prompt = len(llm.tokenize(prompt))
    assert llm.n_prompt_tokens_decoded == n_prompt
    follow = prompt + first + " And a second turn."
    before = llm.n_decoded_tokens
    second = text_of(llm.generate(follow, max_tokens=10, **GREEDY))
    n_follow = len(llm.tokenize(follow))
    # Only the tokens not already in the cache were decoded (the last generated token, which
    # was never fed back, plus the new turn).
    assert llm.n_prompt_tokens_decoded < n_follow - n_prompt + 3
    assert llm.n_decoded_tokens - before == llm.n_prompt_tokens_decoded + 9
    with Llama(tiny_model, n_ctx=512, n_threads=1, lib_path=libdir) as fresh:
        assert text_of(fresh.generate(follow, max_tokens=10, **GREEDY)) == second
        assert fresh.n_prompt_tokens_decoded == n_follow


def test_same_prompt_twice_decodes_one_token(llm: Llama) -> None:
    a = text_of(llm.generate("Hello world", max_tokens=5, **GREEDY))
    b = text_of(llm.generate("Hello world", max_tokens=5, **GREEDY))
    assert a == b
    assert llm.n_prompt_tokens_decoded == 1


def test_state_round_trip_continues_identically(llm: Llama, tmp_path: Path) -> None:
    prompt = llm.tokenize("Hello world")
    list(llm.generate(prompt, max_tokens=1, **GREEDY))
    state = llm.save_state(tmp_path / "state.bin")
    cont = llm._seq.tokens[: llm._seq.n].tolist() + [1]  # noqa: SLF001 - the tokens in the cache
    expected = [t.id for t in llm.generate(cont, max_tokens=15, **GREEDY)]
    llm.reset()
    llm.load_state(state)
    assert [t.id for t in llm.generate(cont, max_tokens=15, **GREEDY)] == expected
    assert llm.n_prompt_tokens_decoded == 1
    llm.reset()
    llm.load_state(tmp_path / "state.bin")
    assert [t.id for t in llm.generate(cont, max_tokens=15, **GREEDY)] == expected


def test_decode_loop_keeps_no_memory_per_token(libdir: Path, tiny_model: Path) -> None:
    # The token history is a fixed int32 buffer: generating keeps no Python object per token
    # (a list of ints kept about 40 bytes each).
    n_warm, n_measured = 50, 500
    n_total = n_warm + n_measured + 10  # both readings are taken in the middle of the loop
    with Llama(tiny_model, n_ctx=1024, n_threads=1, lib_path=libdir) as llm:
        opts = {**GREEDY, "logit_bias": {llm.token_eos(): float("-inf")}}
        for _ in llm.generate("Hello", max_tokens=n_total, **opts):
            pass  # warm caches and free lists
        it = llm.generate("Hello", max_tokens=n_total, **opts)
        tracemalloc.start()
        try:
            for _ in range(n_warm):  # also what tracing itself allocates once
                next(it)
            before = tracemalloc.take_snapshot()
            for _ in range(n_measured):
                next(it)
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        assert sum(1 for _ in it) == n_total - n_warm - n_measured
        # What nexabind's own lines keep (other threads of a test run allocate meanwhile).
        import nexabind

        mine = [tracemalloc.Filter(True, str(Path(nexabind.__file__).parent / "*"))]
        stats = after.filter_traces(mine).compare_to(before.filter_traces(mine), "filename")
        kept = sum(s.size_diff for s in stats)
        assert kept / n_measured < 1, f"{kept} bytes kept over {n_measured} tokens"


def test_context_shift_keeps_the_history_in_step(libdir: Path, tiny_model: Path) -> None:
    # After shifts the history must still match the cache: a prompt equal to it decodes one
    # token, and its continuation equals that of a fresh context given the same tokens.
    with Llama(tiny_model, n_ctx=64, n_threads=1, lib_path=libdir) as llm:
        n_ctx = llm.n_ctx()  # llama.cpp may round it up
        n_gen = 2 * n_ctx + 10  # at least two shifts
        opts = {**GREEDY, "logit_bias": {llm.token_eos(): float("-inf")}}
        toks = [t.id for t in llm.generate("Hello", max_tokens=n_gen, context_shift=True, **opts)]
        assert len(toks) == n_gen
        kept = llm._seq.tokens[: llm._seq.n].tolist()  # noqa: SLF001 - the tokens in the cache
        assert len(kept) < n_ctx
        assert kept[0] == llm.tokenize("Hello")[0]
        assert kept[-1] == toks[-2]  # the last token is sampled but never fed
        nxt = [t.id for t in llm.generate(kept + [toks[-1]], max_tokens=5, **GREEDY)]
        assert llm.n_prompt_tokens_decoded == 1
    with Llama(tiny_model, n_ctx=n_ctx, n_threads=1, lib_path=libdir) as fresh:
        assert [t.id for t in fresh.generate(kept + [toks[-1]], max_tokens=5, **GREEDY)] == nxt


def test_state_of_another_context_size_is_refused(
    llm: Llama, libdir: Path, tiny_model: Path
) -> None:
    with Llama(tiny_model, n_ctx=16, n_threads=1, lib_path=libdir) as small:
        n_small = small.n_ctx()  # llama.cpp may round it up
        assert n_small < llm.n_ctx()
        opts = {**GREEDY, "logit_bias": {llm.token_eos(): float("-inf")}}
        list(llm.generate("Hello world", max_tokens=n_small + 10, **opts))
        state = llm.save_state()
        with pytest.raises(StateError, match="same n_ctx"):
            small.load_state(state)
        list(small.generate("Hello", max_tokens=3, **GREEDY))  # still usable


def test_bad_state_is_refused(llm: Llama) -> None:
    with pytest.raises(StateError, match="not a nexabind state"):
        llm.load_state(b"garbage")


def test_damaged_states_are_refused_and_lose_nothing(llm: Llama, tmp_path: Path) -> None:
    list(llm.generate("Hello world", max_tokens=5, **GREEDY))
    state = bytes(llm.save_state())
    n_state = len(llm._seq.tokens[: llm._seq.n])  # noqa: SLF001 - the tokens in the cache
    for cut in (4, 20, 24, 40, len(state) // 2, len(state) - 1):
        with pytest.raises(StateError, match="cut short"):
            llm.load_state(state[:cut])
    with pytest.raises(StateError, match="longer than it says"):
        llm.load_state(state + b"\0")
    for at in (30, len(state) // 2, len(state) - 1):
        altered = bytearray(state)
        altered[at] ^= 0x40
        with pytest.raises(StateError, match="checksum"):
            llm.load_state(bytes(altered))
    with pytest.raises(StateError, match="bad header"):
        llm.load_state(b"NXBSTAT1" + state[8:])
    # A well-formed blob whose token list does not match its KV cache: the token history of
    # this state with the (empty) KV payload of a fresh context.
    from nexabind import _state

    llm.reset()
    empty = bytes(llm.save_state())
    toks, _ = _state.unpack(state, llm.n_ctx())
    _, payload = _state.unpack(empty, llm.n_ctx())
    with pytest.raises(StateError, match=f"names {n_state} tokens but its KV cache holds 0"):
        llm.load_state(_state.pack(toks, payload))
    # nothing is lost: the good state still loads and continues as before
    llm.load_state(state)
    assert llm._seq.n == n_state  # noqa: SLF001


def test_embeddings_shape_pooling_and_normalize(libdir: Path, embed_model: Path) -> None:
    with Llama(
        embed_model, embedding=True, n_ctx=1024, n_batch=64, n_threads=1, lib_path=libdir
    ) as m:
        e = m.embed(["Hello world", "the cat", "Hello world"], as_array=True)
        assert e.shape == (3, m.n_embd())
        assert e.dtype == np.float32
        np.testing.assert_allclose(e[0], e[2], rtol=1e-5)
        assert not np.allclose(e[0], e[1])
        n = m.embed(["Hello world", "the cat"], normalize=True, as_array=True)
        np.testing.assert_allclose(np.linalg.norm(n, axis=1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(n[0], e[0] / np.linalg.norm(e[0]), rtol=1e-4)
        assert m.embed("Hello world", as_array=True).shape == (1, m.n_embd())
        # Texts of one length share a decode, and each pools only its own sequence.
        before = m.n_decoded_tokens
        one_by_one = np.vstack(
            [m.embed(t, as_array=True) for t in ["Hello world", "the cat", "a b c d", "b c"]]
        )
        n_tok = m.n_decoded_tokens - before
        before, gen = m.n_decoded_tokens, m._ctx.generation  # noqa: SLF001 - decode count
        packed = m.embed(["Hello world", "the cat", "a b c d", "b c"], as_array=True)
        assert m._ctx.generation - gen < 4  # noqa: SLF001
        assert m.n_decoded_tokens - before == n_tok
        np.testing.assert_allclose(packed, one_by_one, rtol=1e-4, atol=1e-5)
        with pytest.raises(ContextOverflowError, match="truncate=True"):
            m.embed("word " * 200, truncate=False, as_array=True)
        assert m.embed("word " * 200, as_array=True).shape == (1, m.n_embd())


def test_embedding_needs_embedding_mode(llm: Llama) -> None:
    with pytest.raises(ContextError, match="embedding=True"):
        llm.embed("x")


def test_wrong_model_path(libdir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        Llama(tmp_path / "missing.gguf", lib_path=libdir)


def test_closed_llama_raises(libdir: Path, tiny_model: Path) -> None:
    m = Llama(tiny_model, n_ctx=128, lib_path=libdir)
    m.close()
    m.close()
    assert m.closed
    with pytest.raises(ClosedError, match="closed"):
        m("Hello")
    with pytest.raises(ClosedError, match="closed"):
        m.tokenize("Hello")


def test_prompt_longer_than_context(libdir: Path, tiny_model: Path) -> None:
    with (
        Llama(tiny_model, n_ctx=32, n_batch=32, n_threads=1, lib_path=libdir) as m,
        pytest.raises(ContextOverflowError, match="larger n_ctx"),
    ):
        m("Hello world " * 400, max_tokens=4)


def test_generation_reaching_end_of_context(libdir: Path, tiny_model: Path) -> None:
    with Llama(tiny_model, n_ctx=32, n_batch=32, n_threads=1, lib_path=libdir) as m:
        with pytest.raises(ContextOverflowError, match="context_shift"):
            list(m.generate("Hello", max_tokens=m.n_ctx() + 10, **GREEDY))
        # Until the context is full: stops with "length", no error.
        res = m("Hello", max_tokens=None, **GREEDY)
        assert res["choices"][0]["finish_reason"] == "length"
        # With a context shift, generation goes past the context length.
        n = m.n_ctx() + 20
        toks = list(m.generate("Hello", max_tokens=n, context_shift=True, **GREEDY))
        assert len(toks) == n


def test_break_stops_decoding(llm: Llama) -> None:
    before = llm.n_decoded_tokens
    for i, _ in enumerate(llm.generate("Hello", max_tokens=100, **GREEDY)):
        if i == 4:
            break
    # prompt + 4 fed-back tokens, nothing more
    assert llm.n_decoded_tokens - before == llm.n_prompt_tokens_decoded + 4


def test_cancel_from_another_thread(llm: Llama) -> None:
    got: list[Token] = []
    started = threading.Event()

    def run() -> None:
        for t in llm.generate("Hello", max_tokens=400, **GREEDY):
            got.append(t)
            started.set()

    th = threading.Thread(target=run)
    th.start()
    started.wait(10)
    llm.cancel()
    th.join(30)
    assert not th.is_alive()
    assert llm.last_finish_reason == "cancelled"
    assert len(got) < 400
    # The Llama still works afterwards.
    assert len(list(llm.generate("Hello", max_tokens=3, **GREEDY))) == 3


def test_logprobs_only_when_asked(llm: Llama) -> None:
    assert all(t.logprob is None for t in llm.generate("Hello", max_tokens=3, **GREEDY))
    lps = [t.logprob for t in llm.generate("Hello", max_tokens=3, logprobs=True, **GREEDY)]
    assert all(lp is not None and lp <= 0 for lp in lps)


def test_metadata_tokenize_detokenize(llm: Llama) -> None:
    md = llm.metadata
    assert md["general.architecture"] == "llama"
    toks = llm.tokenize("Hello world")
    assert toks[0] == llm.token_bos()
    assert llm.detokenize(toks[1:]).decode().strip() == "Hello world"
    assert llm.n_vocab() == 32000
    assert llm.n_ctx() == 512


def test_default_context_from_training_length(libdir: Path, tiny_model: Path) -> None:
    with Llama(tiny_model, lib_path=libdir) as m:
        assert m.n_ctx() == 2048  # the model's n_ctx_train, under the 4096 cap


def test_chat_reuses_the_conversation(llm: Llama) -> None:
    msgs = [{"role": "user", "content": "Hello"}]
    r1 = llm.create_chat_completion(msgs, max_tokens=6, temperature=0)
    msgs += [r1["choices"][0]["message"], {"role": "user", "content": "And again"}]
    n_all = len(llm.tokenize(llm.format_chat(msgs), special=True))
    llm.create_chat_completion(msgs, max_tokens=6, temperature=0)
    # The first turn's prompt stays in the cache: only the reply and the new turn are decoded.
    assert llm.n_prompt_tokens_decoded <= n_all - r1["usage"]["prompt_tokens"]


def test_superseded_generator_raises(llm: Llama) -> None:
    old = llm.generate("Hello", max_tokens=10, **GREEDY)
    next(old)
    assert len(list(llm.generate("world", max_tokens=3, **GREEDY))) == 3
    with pytest.raises(ContextError, match="superseded"):
        next(old)


def test_chat_iterator_matches_chat_completion(llm: Llama) -> None:
    msgs = [{"role": "user", "content": "Hello"}]
    streamed = text_of(llm.chat(msgs, max_tokens=8, temperature=0))
    res = llm.create_chat_completion(msgs, max_tokens=8, temperature=0)
    assert streamed == res["choices"][0]["message"]["content"]
    # The whole conversation was already in the cache: one token decoded for the logits.
    assert llm.n_prompt_tokens_decoded == 1


def test_context_options_reach_llama_cpp(libdir: Path, tiny_model: Path) -> None:
    with Llama(
        tiny_model,
        n_ctx=256,
        n_batch=64,
        n_ubatch=16,
        n_threads=1,
        n_threads_batch=2,
        flash_attn=False,
        lib_path=libdir,
    ) as m:
        ctx = m._ctx  # noqa: SLF001 - read back through the low-level context
        assert ctx.n_ubatch == 16
        assert (ctx.n_threads, ctx.n_threads_batch) == (1, 2)
        assert ctx.flash_attn.name == "DISABLED"
        # A prompt longer than a ubatch still decodes, in ubatch-sized steps.
        assert len(list(m.generate("Hello world " * 10, max_tokens=3, **GREEDY))) == 3
    with Llama(tiny_model, n_ctx=256, n_threads_batch=2, flash_attn=True, lib_path=libdir) as m:
        assert m._ctx.n_threads_batch == 2  # noqa: SLF001
        assert m._ctx.flash_attn.name == "ENABLED"  # noqa: SLF001


@pytest.fixture
def quiet_native_log():
    """Put the ``nexabind.llama`` logger back as it was after a verbose Llama."""
    from nexabind import lowlevel

    yield
    lowlevel.set_verbose(False)


def test_verbose_routes_llama_cpp_log_to_logging(
    libdir: Path, tiny_model: Path, caplog: pytest.LogCaptureFixture, quiet_native_log
) -> None:
    def native() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "nexabind.llama"]

    with Llama(tiny_model, n_ctx=64, lib_path=libdir):
        pass
    assert not [line for line in native() if "flash_attn" in line]  # quiet by default
    with Llama(tiny_model, n_ctx=64, use_mlock=True, verbose=True, lib_path=libdir):
        pass
    lines = native()
    assert any("flash_attn            = auto" in line for line in lines)
    assert any("load_mode = mmap+mlock" in line for line in lines)
    levels = {r.levelname for r in caplog.records if r.name == "nexabind.llama"}
    assert "INFO" in levels


def test_use_after_close_inside_a_generation(libdir: Path, tiny_model: Path) -> None:
    m = Llama(tiny_model, n_ctx=128, n_threads=1, lib_path=libdir)
    it = m.generate("Hello", max_tokens=10, **GREEDY)
    next(it)
    m.close()
    with pytest.raises(ClosedError, match="closed"):
        next(it)


def _numpy_top(logits: np.ndarray, n: int) -> tuple[np.ndarray, dict[int, float]]:
    x = logits.astype(np.float64)
    logp = x - x.max()
    logp -= np.log(np.exp(logp).sum())
    order = np.argsort(-logp, kind="stable")[:n]
    return logp, {int(i): float(logp[i]) for i in order}


def test_top_logprobs_match_numpy_over_the_same_logits(llm: Llama, libdir: Path) -> None:
    from nexabind import lowlevel

    toks = list(llm.generate("Hello world", max_tokens=6, logprobs=4, **GREEDY))
    assert all(len(t.top_logprobs) == 4 for t in toks)

    model = lowlevel.Model(llm.model_path)
    with lowlevel.Context(model, n_ctx=512, n_threads=1) as ctx:
        prompt = model.tokenize("Hello world")
        ctx.batch.set(prompt, 0)
        ctx.decode()
        pos = len(prompt)
        for t in toks:
            logp, top = _numpy_top(ctx.logits(), 4)
            assert int(np.argmax(logp)) == t.id  # greedy: the same token
            assert list(t.top_logprobs) == list(top)  # same tokens, most likely first
            np.testing.assert_allclose(list(t.top_logprobs.values()), list(top.values()), atol=1e-4)
            assert t.logprob == pytest.approx(logp[t.id], abs=1e-4)
            ctx.batch.set_one(t.id, pos)
            ctx.decode()
            pos += 1
    model.close()

    # The compatible dict: N alternatives by text plus the chosen token, per position.
    res = llm("Hello world", max_tokens=6, logprobs=4, temperature=0)
    lp = res["choices"][0]["logprobs"]
    # (This call decodes only the last prompt token: the logits may differ in the last bits.)
    assert lp["token_logprobs"] == pytest.approx([t.logprob for t in toks], abs=1e-4)
    rows = zip(toks, lp["top_logprobs"], lp["tokens"], lp["token_logprobs"], strict=True)
    for t, top, text, chosen in rows:
        assert text == t.text
        assert top[text] == chosen
        expected = {llm.detokenize([i]).decode("utf-8", "replace") for i in t.top_logprobs}
        assert expected <= set(top) <= expected | {t.text}
    # logprobs=0: only the chosen token.
    res0 = llm("Hello world", max_tokens=3, logprobs=0, temperature=0)
    assert all(len(d) == 1 for d in res0["choices"][0]["logprobs"]["top_logprobs"])
    with pytest.raises(ValueError, match="logprobs=-1 is invalid"):
        llm("Hello world", max_tokens=3, logprobs=-1)
    # Streamed chunks carry the same numbers, one token each.
    chunks = list(llm("Hello world", max_tokens=6, logprobs=4, temperature=0, stream=True))
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    assert [d["token_logprobs"][0] for d in streamed] == lp["token_logprobs"]
    assert [d["text_offset"][0] for d in streamed] == lp["text_offset"]


def test_suffix_is_appended(llm: Llama) -> None:
    plain = llm("Hello", max_tokens=5, **GREEDY)["choices"][0]["text"]
    res = llm("Hello", max_tokens=5, suffix=" [end]", **GREEDY)
    assert res["choices"][0]["text"] == plain + " [end]"
    chunks = list(llm("Hello", max_tokens=5, suffix=" [end]", stream=True, **GREEDY))
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain + " [end]"
    assert chunks[-2]["choices"][0]["text"] == " [end]"


def test_embeddings_with_a_unified_kv_cache(libdir: Path, embed_model: Path) -> None:
    texts = ["Hello world", "the cat", "a b c d", "b c"]
    common = {"embedding": True, "n_ctx": 1024, "n_batch": 64, "n_threads": 1, "lib_path": libdir}
    with Llama(embed_model, kv_unified=False, **common) as m:
        lengths = {len(m.tokenize(t)) for t in texts}
        assert len(lengths) > 1
        gen = m._ctx.generation  # noqa: SLF001 - decode count
        split = m.embed(texts)
        assert m._ctx.n_ctx_seq < m.n_ctx()  # noqa: SLF001 - each sequence has its share
        assert m._ctx.generation - gen == len(lengths)  # noqa: SLF001 - a decode per length
    with Llama(embed_model, **common) as m:  # unified: the default of an embedding context
        assert m._ctx.n_ctx_seq == m.n_ctx()  # noqa: SLF001
        gen = m._ctx.generation  # noqa: SLF001
        np.testing.assert_allclose(m.embed(texts), split, rtol=1e-4, atol=1e-5)
        assert m._ctx.generation - gen == 1  # noqa: SLF001 - all four lengths in one decode


def test_chat_logprobs_are_the_generation_logprobs(llm: Llama) -> None:
    msgs = [{"role": "user", "content": "Hello"}]
    toks = list(llm.chat(msgs, max_tokens=5, logprobs=3, temperature=0))
    llm.reset()  # decode the whole prompt again, as for `toks`: the same logits
    res = llm.create_chat_completion(
        msgs, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = res["choices"][0]["logprobs"]["content"]
    assert [e["logprob"] for e in content] == [t.logprob for t in toks]
    for e, t in zip(content, toks, strict=True):
        assert bytes(e["bytes"]) == llm.detokenize([t.id])
        assert [a["logprob"] for a in e["top_logprobs"]] == list(t.top_logprobs.values())
        assert [bytes(a["bytes"]) for a in e["top_logprobs"]] == [
            llm.detokenize([i]) for i in t.top_logprobs
        ]
