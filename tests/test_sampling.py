"""Sampling options: validation, seeds, logit bias, penalties and grammars on the real library."""

from __future__ import annotations

from pathlib import Path

import pytest

from nexabind import Llama
from nexabind.sampling import SamplingOptions


@pytest.fixture
def llm(libdir: Path, tiny_model: Path):
    with Llama(tiny_model, n_ctx=256, n_threads=1, lib_path=libdir) as m:
        yield m


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"mirostat_mode": 3}, "mirostat_mode=3 is out of range"),
        ({"mirostat_tau": 0}, "mirostat_tau=0 is out of range"),
        ({"top_p": 1.5}, "top_p=1.5 is out of range: use a value in [0, 1]"),
        ({"min_p": -0.1}, "min_p"),
        ({"typical_p": 2}, "typical_p"),
        ({"top_k": -3}, "top_k"),
        ({"repeat_penalty": 0}, "repeat_penalty"),
        ({"seed": -2}, "unsigned 32-bit"),
        ({"seed": 1 << 32}, "unsigned 32-bit"),
    ],
)
def test_out_of_range_options(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        SamplingOptions(**kwargs)


_EXTREMES = (2**31, -(2**31), 2**63, float("nan"), float("inf"), "1", [1], True)


@pytest.mark.parametrize(
    "name",
    ["temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty",
     "frequency_penalty", "presence_penalty", "penalty_last_n", "seed", "mirostat_mode",
     "mirostat_tau", "mirostat_eta", "tfs_z"],
)  # fmt: skip
def test_every_option_refuses_what_its_c_type_cannot_hold(name: str) -> None:
    """Checked where the options are made (the caller's thread): a value cffi would refuse
    inside the engine's thread (OverflowError) is a ValueError or TypeError naming it."""
    for value in _EXTREMES:
        accepted = {  # values that are in range for the option
            "temperature": (2**31, -(2**31), 2**63),
            "frequency_penalty": (2**31, -(2**31), 2**63),
            "presence_penalty": (2**31, -(2**31), 2**63),
            "repeat_penalty": (2**31, 2**63),
            "mirostat_tau": (2**31, 2**63),
            "mirostat_eta": (2**31, 2**63),
            "tfs_z": (2**31, -(2**31), 2**63),
            "top_k": (),
            "penalty_last_n": (),
            "seed": (2**31,),
        }.get(name, ())
        if value in accepted and not isinstance(value, bool):
            SamplingOptions(**{name: value})
            continue
        with pytest.raises((ValueError, TypeError), match=name):
            SamplingOptions(**{name: value})


def test_int32_edges_are_taken() -> None:
    opts = SamplingOptions(top_k=2**31 - 1, penalty_last_n=-1, seed=0xFFFFFFFE)
    assert (opts.top_k, opts.penalty_last_n, opts.seed) == (2**31 - 1, -1, 0xFFFFFFFE)
    assert isinstance(SamplingOptions(temperature=1).temperature, float)


@pytest.mark.parametrize(
    "bias",
    [{2**31: 1.0}, {-1: 1.0}, {"x": 1.0}, {1: float("nan")}, {1: "a"}, [1]],
)
def test_logit_bias_ids_and_values_are_checked(bias: object) -> None:
    with pytest.raises((ValueError, TypeError), match="logit_bias"):
        SamplingOptions(logit_bias=bias)  # type: ignore[arg-type]


def test_a_logit_bias_of_minus_infinity_bans_a_token() -> None:
    assert SamplingOptions(logit_bias={2: float("-inf")}).logit_bias == {2: float("-inf")}


def test_unknown_option(llm: Llama) -> None:
    with pytest.raises(TypeError, match="unknown sampling options"):
        llm.generate("Hello", top_z=3)


def ids(llm: Llama, **kw) -> list[int]:
    return [t.id for t in llm.generate("Hello world", max_tokens=20, **kw)]


def test_same_seed_same_output(llm: Llama) -> None:
    a = ids(llm, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=123)
    b = ids(llm, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=123)
    c = ids(llm, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=124)
    assert a == b
    assert a != c


def test_logit_bias_forces_a_token(llm: Llama) -> None:
    tok = llm.tokenize("the", add_bos=False)[0]
    assert set(ids(llm, temperature=0, logit_bias={tok: 100.0})) == {tok}


def test_logit_bias_out_of_vocabulary(llm: Llama) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ids(llm, logit_bias={10**7: 1.0})


def test_presence_penalty_stops_a_repeat(llm: Llama) -> None:
    tok = llm.tokenize("the", add_bos=False)[0]
    bias = {tok: 50.0}
    assert ids(llm, temperature=0, logit_bias=bias).count(tok) == 20
    assert ids(llm, temperature=0, logit_bias=bias, presence_penalty=100.0).count(tok) == 1


def test_grammar_constrains_output(llm: Llama) -> None:
    g = 'root ::= ("yes" | "no") " " [0-9] [0-9]'
    out = llm("Hello", max_tokens=20, temperature=0.9, seed=5, grammar=g)
    text = out["choices"][0]["text"]
    assert text.split(" ")[0] in {"yes", "no"}
    assert text[-2:].isdigit()


def test_bad_grammar(llm: Llama) -> None:
    with pytest.raises(ValueError, match="grammar does not parse"):
        ids(llm, grammar="root ::= (")


def test_penalty_window_of_the_whole_context(llm: Llama) -> None:
    # llama.cpp reads a negative window as 0 (off): -1 must become the context length.
    tok = llm.tokenize("the", add_bos=False)[0]
    bias = {tok: 50.0}
    out = ids(llm, temperature=0, logit_bias=bias, presence_penalty=100.0, penalty_last_n=-1)
    assert out.count(tok) == 1
    off = ids(llm, temperature=0, logit_bias=bias, presence_penalty=100.0, penalty_last_n=0)
    assert off.count(tok) == 20
