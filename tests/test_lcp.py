"""llama-cpp-python's calls on ``Llama``: generate, eval/sample, arrays, states, caches, seeds,
processors and criteria, draft models, tokenizers, pickling, the hub."""

from __future__ import annotations

import itertools
import pickle
from pathlib import Path

import numpy as np
import pytest

from nexabind import (
    Llama,
    LlamaDiskCache,
    LlamaPromptLookupDecoding,
    LlamaRAMCache,
    LlamaState,
    LlamaTokenizer,
    LogitsProcessorList,
    MinTokensLogitsProcessor,
    StoppingCriteriaList,
)
from nexabind.errors import ContextError, StateError
from nexabind.tokenizer import BaseLlamaTokenizer


@pytest.fixture
def llm(libdir: Path, tiny_model: Path):
    with Llama(tiny_model, n_ctx=256, n_threads=1, lib_path=libdir) as m:
        yield m


@pytest.fixture
def scored(libdir: Path, tiny_model: Path):
    with Llama(tiny_model, n_ctx=256, n_threads=1, logits_all=True, lib_path=libdir) as m:
        yield m


def greedy_ids(llm: Llama, prompt: bytes, n: int) -> list[int]:
    return list(itertools.islice(llm.generate(llm.tokenize(prompt), temp=0.0), n))


# -- generate ---------------------------------------------------------------------------------


def test_generate_takes_token_lists_and_yields_ints(llm: Llama) -> None:
    toks = llm.tokenize(b"Hello world")
    out = list(itertools.islice(llm.generate(toks, 40, 0.95, 0.05, 1.0, 0.0), 5))
    assert all(type(t).__mro__[1] is int for t in out)
    assert [int(t) for t in out] == greedy_ids(llm, b"Hello world", 5)
    text = b"".join(llm.detokenize([t]) for t in out).decode("utf-8", "ignore")
    assert text.strip() and "".join(t.text for t in out).strip()
    assert out[0] == int(out[0]) and {out[0]: 1}[int(out[0])] == 1
    # nexabind's own keywords still work next to llama-cpp-python's positional ones
    assert len(list(llm.generate("Hello", max_tokens=3, temperature=0))) == 3


def test_generate_ends_at_the_end_of_generation_token(llm: Llama) -> None:
    eos = llm.token_eos()
    got = []
    for tok in llm.generate(llm.tokenize(b"Hi"), temp=0.0, logit_bias={eos: 100.0}):
        if tok == eos:  # llama-cpp-python's loop: it yields the end token; nexabind stops there
            break
        got.append(tok)
    assert got == []
    assert llm.last_finish_reason == "stop"
    out = llm("Hi", max_tokens=5, temperature=0, logit_bias={eos: 100.0})
    assert out["usage"]["completion_tokens"] == 0


def test_generate_reset_false_continues(llm: Llama) -> None:
    first = llm.tokenize(b"Hello")
    more = llm.tokenize(b" world", add_bos=False)
    a = list(itertools.islice(llm.generate(first + more, temp=0.0), 3))
    llm.reset()
    llm.eval(first)
    b = list(itertools.islice(llm.generate(more, temp=0.0, reset=False), 3))
    assert a == b


# -- eval, sample, the arrays -----------------------------------------------------------------


def test_eval_sample_and_the_token_array(llm: Llama) -> None:
    toks = llm.tokenize(b"The quick brown fox")
    expected = greedy_ids(llm, b"The quick brown fox", 2)
    llm.reset()
    assert llm.n_tokens == 0
    with pytest.raises(ContextError, match="eval"):
        llm.sample()
    llm.eval(toks)
    assert llm.n_tokens == len(toks)
    assert llm.input_ids[: llm.n_tokens].tolist() == toks
    assert list(llm.eval_tokens) == toks
    assert llm.sample(temp=0.0, idx=len(toks) - 1) == expected[0]
    llm.eval([expected[0]])
    assert llm.sample(temp=0.0) == expected[1]
    assert llm.scores.shape == (1, llm.n_vocab())  # without logits_all: the last logits only
    llm.n_tokens = 2
    assert llm.n_tokens == 2


def test_logits_all_records_every_position(scored: Llama) -> None:
    toks = scored.tokenize(b"The quick brown fox")
    scored.eval(toks)
    rows = scored.scores[: len(toks)].copy()
    assert scored.scores.shape == (scored.n_ctx(), scored.n_vocab())
    assert len(scored.eval_logits) == len(toks)
    # row i is the logits after token i: greedy after the first two tokens
    scored.reset()
    scored.eval(toks[:2])
    np.testing.assert_allclose(scored.scores[1], rows[1], rtol=1e-4, atol=1e-4)
    assert scored.sample(temp=0.0) == int(np.argmax(rows[1]))
    # generated tokens are recorded too
    list(itertools.islice(scored.generate(toks, temp=0.0), 3))
    assert np.abs(scored.scores[len(toks) + 1]).sum() > 0


def test_echo_logprobs_score_the_prompt(scored: Llama, llm: Llama) -> None:
    out = scored("The quick brown", max_tokens=3, temperature=0, logprobs=2, echo=True)
    lp = out["choices"][0]["logprobs"]
    n_prompt = len(scored.tokenize(b"The quick brown")) - 1  # BOS is not listed
    assert len(lp["tokens"]) == n_prompt + 3
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v is not None and v <= 0 for v in lp["token_logprobs"][1:])
    assert "".join(lp["tokens"]) == out["choices"][0]["text"]
    assert lp["text_offset"][0] == 0
    toks = scored.tokenize(b"The quick brown")
    want = Llama.logits_to_logprobs(scored.scores[1])[toks[2]]
    assert lp["token_logprobs"][1] == pytest.approx(float(want), abs=1e-4)
    with pytest.raises(ValueError, match="logits_all=True"):
        llm("The quick", max_tokens=2, logprobs=1, echo=True)
    # without echo, offsets count from the start of the prompt, as llama-cpp-python's do
    plain = llm("The quick", max_tokens=3, temperature=0, logprobs=1)
    assert plain["choices"][0]["logprobs"]["text_offset"][0] == len("The quick")


# -- states and caches ------------------------------------------------------------------------


def test_save_state_returns_a_llama_state_and_load_takes_every_form(
    llm: Llama, tmp_path: Path
) -> None:
    toks = llm.tokenize(b"Hello world")
    llm.set_seed(7)
    llm.eval(toks)
    state = llm.save_state(tmp_path / "s.bin")
    assert isinstance(state, LlamaState)
    assert state.n_tokens == len(toks) and state.seed == 7
    assert state.llama_state_size == len(state.llama_state)
    assert state.input_ids[: state.n_tokens].tolist() == toks
    expected = greedy_ids(llm, b"Hello world", 4)
    for form in (state, pickle.loads(pickle.dumps(state)), bytes(state), tmp_path / "s.bin"):
        llm.reset()
        llm.set_seed(1)
        llm.load_state(form)
        assert llm.n_tokens == len(toks)
        # a LlamaState brings its seed back; the byte format has none
        assert llm._seed == (7 if isinstance(form, LlamaState) else 1)  # noqa: SLF001
        assert greedy_ids(llm, b"Hello world", 4) == expected
    with pytest.raises(StateError) as e:
        llm.load_state(b"junk")
    assert isinstance(e.value, RuntimeError)


def test_ram_cache_loads_the_longest_prefix(libdir: Path, tiny_model: Path) -> None:
    cache = LlamaRAMCache(capacity_bytes=1 << 30)
    common = {"n_ctx": 128, "n_threads": 1, "lib_path": libdir}
    with Llama(tiny_model, **common) as writer:
        writer.set_cache(cache)
        expected = writer("Hello world, hello", max_tokens=2, temperature=0)
    assert len(cache) == 1 and cache.cache_size > 0
    with Llama(tiny_model, **common) as reader:
        reader.set_cache(cache)
        calls = []
        original = reader.load_state
        reader.load_state = lambda s: (calls.append(s), original(s))[1]  # type: ignore[method-assign]
        got = reader("Hello world, hello", max_tokens=2, temperature=0)
        assert len(calls) == 1
        assert got["choices"][0]["text"] == expected["choices"][0]["text"]
        assert reader.n_prompt_tokens_decoded == 1
    tiny = LlamaRAMCache(capacity_bytes=1)
    tiny[[1, 2]] = cache[[1]]
    assert len(tiny) == 0  # over capacity: dropped
    with pytest.raises(KeyError):
        cache[[5, 6]]


def test_disk_cache_survives_the_process_and_skips_damage(
    libdir: Path, tiny_model: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "cache"
    common = {"n_ctx": 128, "n_threads": 1, "lib_path": libdir}
    with Llama(tiny_model, **common) as writer:
        writer.set_cache(LlamaDiskCache(folder))
        expected = writer("Hello world", max_tokens=3, temperature=0)["choices"][0]["text"]
    cache = LlamaDiskCache(folder)
    assert len(cache) == 1
    with Llama(tiny_model, **common) as reader:
        reader.set_cache(cache)
        assert reader("Hello world", max_tokens=3, temperature=0)["choices"][0]["text"] == expected
        assert reader.n_prompt_tokens_decoded == 1
    for f in folder.glob("*.state"):
        f.write_bytes(f.read_bytes()[:-5])
    damaged = LlamaDiskCache(folder)
    with pytest.raises(KeyError):
        damaged[[1, 15043]]
    assert not list(folder.glob("*.state"))


# -- processors, criteria, draft models ---------------------------------------------------------


def test_logits_processor_steers_and_logprobs_stay_the_model_s(llm: Llama) -> None:
    target = llm.tokenize(b"the", add_bos=False)[0]

    def force(input_ids, scores):
        assert input_ids.dtype == np.int32 and scores.dtype == np.float32
        scores[target] += 1000.0
        return scores

    procs = LogitsProcessorList([force])
    ids = [
        int(t) for t in llm.generate(llm.tokenize(b"Hello"), max_tokens=3, logits_processor=procs)
    ]
    assert ids == [target] * 3
    out = llm("Hello", max_tokens=3, logits_processor=procs, logprobs=1)
    # the log-probabilities are the model's own, not the steered ones (those would be ~0)
    assert all(lp < -0.5 for lp in out["choices"][0]["logprobs"]["token_logprobs"])


def test_min_tokens_processor_holds_back_the_end(llm: Llama) -> None:
    eos = llm.token_eos()
    proc = LogitsProcessorList([MinTokensLogitsProcessor(4, eos)])
    out = llm("Hi", max_tokens=10, temperature=0, logit_bias={eos: 1000.0}, logits_processor=proc)
    assert out["usage"]["completion_tokens"] == 4
    assert out["choices"][0]["finish_reason"] == "stop"


def test_stopping_criteria_end_the_generation(llm: Llama) -> None:
    seen = []

    def after_three(input_ids, logits):
        seen.append((len(input_ids), logits.shape))
        return len(seen) == 4

    crit = StoppingCriteriaList([after_three])
    out = llm("Hello", max_tokens=20, temperature=0, stopping_criteria=crit)
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] == 3
    n_prompt = out["usage"]["prompt_tokens"]
    assert [n for n, _ in seen] == [n_prompt, n_prompt + 1, n_prompt + 2, n_prompt + 3]
    assert seen[0][1] == (llm.n_vocab(),)
    toks = list(
        llm.generate(llm.tokenize(b"Hello"), temp=0.0, stopping_criteria=[lambda i, x: True])
    )
    assert toks == []


def test_draft_model_gives_the_same_tokens_in_fewer_decodes(libdir: Path, tiny_model: Path) -> None:
    # A processor makes the text repeat a cycle, so prompt lookup guesses right.
    common = {"n_ctx": 256, "n_threads": 1, "lib_path": libdir}
    cycle = [450, 4996, 17354, 1701, 29916]

    def repeat(input_ids, scores):
        last = int(input_ids[-1])
        nxt = cycle[(cycle.index(last) + 1) % len(cycle)] if last in cycle else cycle[0]
        scores[nxt] += 100.0
        return scores

    prompt = [1, *cycle, *cycle]

    def run(**kw) -> tuple[list[int], int]:
        with Llama(tiny_model, **common, **kw) as m:
            before = m._ctx.generation  # noqa: SLF001 - counts decodes
            ids = [int(t) for t in m.generate(prompt, temp=0.0, max_tokens=30,
                                               logits_processor=repeat)]  # fmt: skip
            again = m("Hello", max_tokens=5, temperature=0)["choices"][0]["text"]
            return ids, m._ctx.generation - before, again  # type: ignore[return-value]  # noqa: SLF001

    plain, n_plain, text_plain = run()
    drafted, n_drafted, text_drafted = run(draft_model=LlamaPromptLookupDecoding(num_pred_tokens=4))
    assert drafted == plain
    assert n_drafted < n_plain / 2
    assert text_drafted == text_plain  # no guess is left in the cache afterwards
    sampled = {"temp": 1.2, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    with Llama(tiny_model, seed=5, **common) as m:
        a = [int(t) for t in m.generate(prompt, max_tokens=20, **sampled)]
    with Llama(tiny_model, seed=5, draft_model=LlamaPromptLookupDecoding(), **common) as m:
        assert [int(t) for t in m.generate(prompt, max_tokens=20, **sampled)] == a


# -- tokenizers, special tokens, the C handles --------------------------------------------------


def test_detokenize_is_llama_cpp_python_s(llm: Llama) -> None:
    toks = llm.tokenize(b"Hello World")
    assert toks[0] == llm.token_bos()
    assert llm.detokenize(toks) == b"Hello World"  # the space after BOS is dropped
    assert llm.detokenize(toks[1:]) == b" Hello World"
    assert llm.detokenize(toks[2:], prev_tokens=toks[:2]) == llm.detokenize(toks[2:])
    assert llm.detokenize([llm.token_eos()]) == b""
    assert llm.detokenize([llm.token_eos()], special=True) == b"</s>"


def test_incomplete_utf8_at_the_end_is_dropped(llm: Llama) -> None:
    first_byte = llm.tokenize("\u20ac".encode(), add_bos=False, special=False)
    byte_tok = next(t for t in range(llm.n_vocab()) if llm.detokenize([t]) == b"\xe2")
    del first_byte
    out = llm("Hello", max_tokens=1, logit_bias={byte_tok: 100.0})
    assert out["choices"][0]["text"] == ""
    streamed = "".join(
        c["choices"][0]["text"]
        for c in llm("Hello", max_tokens=1, logit_bias={byte_tok: 100.0}, stream=True)
    )
    assert streamed == ""


def test_tokenizer_objects(llm: Llama) -> None:
    tok = llm.tokenizer()
    assert isinstance(tok, LlamaTokenizer)
    assert tok.encode("Hello World") == llm.tokenize(b"Hello World", special=True)
    assert tok.decode(tok.encode("Hello World")) == "Hello World"
    assert llm.token_nl() == 13
    assert llm.pooling_type() >= -1
    assert llm.n_threads == 1 and llm.n_threads_batch >= 1
    from nexabind._ffi import ffi

    assert ffi.typeof(llm.ctx).cname == "struct llama_context *"
    assert ffi.typeof(llm.model).cname == "struct llama_model *"


def test_tokenizer_override_is_used(libdir: Path, tiny_model: Path) -> None:
    calls = []

    class Counting(BaseLlamaTokenizer):
        def __init__(self, inner: LlamaTokenizer) -> None:
            self.inner = inner

        def tokenize(self, text: bytes, add_bos: bool = True, special: bool = True) -> list[int]:
            calls.append(text)
            return self.inner.tokenize(text, add_bos, special)

        def detokenize(self, tokens, prev_tokens=None, special=False) -> bytes:
            return b"<" + self.inner.detokenize(tokens, prev_tokens, special) + b">"

    vocab = LlamaTokenizer.from_ggml_file(str(tiny_model))
    with Llama(tiny_model, n_ctx=64, tokenizer=Counting(vocab), lib_path=libdir) as m:
        m("Hello", max_tokens=1)
        assert calls == [b"Hello"]
        assert m.detokenize([15043]) == b"< Hello>"


# -- pickling, OpenAI client types, the hub ------------------------------------------------------


def test_pickle_reopens_from_the_arguments(llm: Llama) -> None:
    expected = greedy_ids(llm, b"Hello", 4)
    clone = pickle.loads(pickle.dumps(llm))
    try:
        assert clone.n_ctx() == llm.n_ctx() and clone.model_path == llm.model_path
        assert greedy_ids(clone, b"Hello", 4) == expected
    finally:
        clone.close()


def test_openai_v1_gives_the_openai_package_s_types(
    llm: Llama, monkeypatch: pytest.MonkeyPatch
) -> None:
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    msgs = [{"role": "user", "content": "Hi"}]
    out = llm.create_chat_completion_openai_v1(msgs, max_tokens=3)
    assert isinstance(out, ChatCompletion) and out.choices[0].message.role == "assistant"
    chunks = list(llm.create_chat_completion_openai_v1(msgs, max_tokens=3, stream=True))
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    import sys

    for name in ("openai", "openai.types", "openai.types.chat"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match="pip install openai"):
        llm.create_chat_completion_openai_v1(msgs)


# -- embeddings, infill -----------------------------------------------------------------------


def test_embed_returns_lists_and_arrays_on_request(libdir: Path, embed_model: Path) -> None:
    import json

    with Llama(embed_model, embedding=True, n_ctx=128, lib_path=libdir) as m:
        one = m.embed("Hello world")
        assert isinstance(one, list) and len(one) == m.n_embd()
        assert all(isinstance(x, float) for x in one)
        json.dumps(one)
        many = m.embed(["Hello world", "the cat"])
        assert len(many) == 2 and many[0] == pytest.approx(one, abs=1e-5)
        arr = m.embed(["Hello world", "the cat"], as_array=True)
        assert arr.shape == (2, m.n_embd()) and arr.dtype == np.float32
        vecs, n = m.embed(["Hello world", "the cat"], return_count=True)
        assert n == len(m.tokenize(b"Hello world")) + len(m.tokenize(b"the cat"))
        unit = m.embed("Hello world", normalize=True)
        assert float(np.linalg.norm(unit)) == pytest.approx(1.0, abs=1e-5)
    with Llama(embed_model, embedding=True, n_ctx=128, pooling_type=0, lib_path=libdir) as m:
        per_token = m.embed("Hello world")
        assert len(per_token) == len(m.tokenize(b"Hello world"))
        assert all(len(row) == m.n_embd() for row in per_token)


def test_suffix_makes_an_infill_prompt_with_the_model_s_fim_tokens(
    libdir: Path, tiny_model: Path
) -> None:
    fim = {"tokenizer.ggml.fim_pre_token_id": 100, "tokenizer.ggml.fim_suf_token_id": 101,
           "tokenizer.ggml.fim_mid_token_id": 102}  # fmt: skip
    pre = [15043]  # "Hello" without BOS: an infill prompt parses no special text
    for spm in (False, True):
        with Llama(tiny_model, n_ctx=128, kv_overrides=fim, spm_infill=spm, lib_path=libdir) as m:
            suf = m.tokenize(b" world", add_bos=False)
            out = m("Hello", suffix=" world", max_tokens=1, temperature=0)
            held = m.input_ids[: out["usage"]["prompt_tokens"]].tolist()
            middle = [101, *suf, 100, *pre] if spm else [100, *pre, 101, *suf]
            assert held == [1, *middle, 102]
            assert not out["choices"][0]["text"].endswith(" world")
    with Llama(tiny_model, n_ctx=128, lib_path=libdir) as m:  # no FIM tokens: appended
        assert m("Hello", suffix="!!", max_tokens=2)["choices"][0]["text"].endswith("!!")


def test_token_is_an_int_with_its_text() -> None:
    from nexabind import Token

    t = Token(42, "hi", -0.5, {42: -0.5})
    assert t == 42 and t + 1 == 43 and hash(t) == hash(42) and {42: 1}[t] == 1
    assert (t.id, t.text, t.logprob, t.top_logprobs) == (42, "hi", -0.5, {42: -0.5})
    assert str(t) == "42" and f"{t}" == "42"
    assert repr(t) == "Token(42, 'hi', logprob=-0.5, top_logprobs={42: -0.5})"
    back = pickle.loads(pickle.dumps(t))
    assert (back, back.text, back.logprob) == (42, "hi", -0.5)
    plain = Token(7, "x")
    assert plain.logprob is None and plain.top_logprobs is None and repr(plain) == "Token(7, 'x')"
