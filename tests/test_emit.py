"""The emitter alone, with no model: a byte vocabulary made of plain functions.

Token ids 0-255 are the bytes themselves, 256 ends the generation, and a few more stand for
multi-byte pieces and a control token. What ``Llama``, the Engine and ``nexabind serve`` say a
token sequence reads as is what these tests say (tests/test_emission.py checks that they agree).
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from nexabind._emit import Emitter, text_of
from nexabind.tokens import Token, logprobs_of

EOG = 256
WORDS = {300: b"abc E", 301: b"N", 302: b"Dxyz", 303: "ż".encode()[:1], 304: b"\xbc!"}
MARKER = 310  # a control token: no bytes of its own


def piece(tok: int) -> bytes:
    if tok < 256:
        return bytes([tok])
    return WORDS.get(tok, b"")


def emitter(**kw: object) -> Emitter:
    return Emitter(piece, lambda t: t == EOG, **kw)  # type: ignore[arg-type]


def run(em: Emitter, tokens: list[int]) -> list[Token]:
    """Feed ``tokens`` until the generation ends; the tokens it emitted."""
    out = []
    for tok in tokens:
        t = em.update(tok)
        if t is not None:
            out.append(t)
        if em.reason is not None:
            break
    return out


def text(tokens: list[Token]) -> str:
    return "".join(t.text for t in tokens)


def test_a_character_split_across_tokens_comes_with_its_last_byte() -> None:
    data = "ż𝔘".encode()  # 2 + 4 bytes, one token each
    got = run(emitter(), [*data, EOG])
    assert [t.text for t in got] == ["", "ż", "", "", "", "𝔘"]
    assert [int(t) for t in got] == list(data)
    assert all(type(t) is Token for t in got)


def test_an_invalid_sequence_becomes_one_replacement_character() -> None:
    # A lead byte followed by a whole character: the lead byte alone is invalid (one U+FFFD),
    # the character after it is kept (the Engine and Llama once disagreed here).
    data = b"xpath\xc5" + "żs".encode()
    got = run(emitter(), [*data, EOG])
    assert text(got) == "xpath\ufffdżs" == data.decode("utf-8", "replace")
    # a lone continuation byte, a truncated 3-byte sequence, an invalid lead byte
    for bad in (b"a\x80b", b"a\xe2\x82b", b"\xffa", b"\xf0\x9d\x94b"):
        assert text(run(emitter(), [*bad, EOG])) == bad.decode("utf-8", "replace")


def test_random_bytes_in_random_pieces_read_as_the_whole_output_decoded() -> None:
    rng = random.Random(7)
    alphabet = [*b"az ", 0x80, 0xBC, 0xC5, 0xE2, 0x82, 0xAC, 0xF0, 0x9D, 0x94, 0x98, 0xFF]
    for _ in range(300):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randrange(1, 24)))
        got = run(emitter(), [*data, EOG])
        assert text(got) == text_of(data), data
        want = data.decode("utf-8", "replace")
        assert want.startswith(text_of(data)) and want[len(text_of(data)) :] in ("", "\ufffd")


def test_an_unfinished_character_at_the_end_is_dropped() -> None:
    em = emitter()
    got = run(em, [ord("a"), 0xF0, 0x9D, EOG])
    assert [t.text for t in got] == ["a", "", ""]
    assert (em.reason, em.n, em.hit) == ("stop", 3, False)
    em = emitter(limit=2)
    got = run(em, [ord("a"), 0xC5, ord("b")])
    assert [t.text for t in got] == ["a", ""]
    assert (em.reason, em.n) == ("length", 2)


def test_the_end_token_emits_nothing_when_nothing_is_held() -> None:
    em = emitter()
    assert em.update(ord("a")) == ord("a")
    assert em.update(EOG) is None
    assert (em.reason, em.n) == ("stop", 1)


def test_a_stop_string_spanning_tokens_ends_the_text_before_it() -> None:
    em = emitter(stops=["END"])
    got = run(em, [300, 301, 302, ord("q")])
    assert [t.text for t in got] == ["abc ", "", ""]
    assert (em.reason, em.hit, em.n) == ("stop", True, 3)


def test_text_held_for_a_stop_string_comes_back_when_it_is_not_one() -> None:
    em = emitter(stops=["END"])
    got = run(em, [300, 301, ord("x"), EOG])
    assert [t.text for t in got] == ["abc ", "", "ENx"]
    assert (em.reason, em.hit) == ("stop", False)
    # held text at the end of generation and at the limit
    assert [t.text for t in run(emitter(stops=["END"]), [300, EOG])] == ["abc ", "E"]
    em = emitter(stops=["END"], limit=2)
    assert [t.text for t in run(em, [300, 301, 302])] == ["abc ", "EN"]
    assert em.reason == "length"


def test_a_stop_string_across_a_split_character() -> None:
    em = emitter(stops=["ż!"])
    got = run(em, [ord("a"), 303, 304, ord("b")])
    assert [t.text for t in got] == ["a", "", ""]
    assert em.hit
    # a replaced sequence can complete one
    em = emitter(stops=["\ufffdb"])
    assert text(run(em, [ord("a"), 0xC5, ord("b"), ord("c")])) == "a"
    assert em.hit


def test_the_limit_ends_the_generation_on_its_last_token() -> None:
    em = emitter(limit=3)
    got = run(em, [ord(c) for c in "abcdef"])
    assert text(got) == "abc"
    assert (em.reason, em.n) == ("length", 3)
    em = emitter(limit=1)
    assert [t.text for t in run(em, [0xE2, 0x82, 0xAC])] == [""]
    em = emitter(limit=3)
    assert [t.text for t in run(em, [0xE2, 0x82, 0xAC])] == ["", "", "€"]


def test_logprobs_are_read_from_the_row_the_token_was_drawn_from() -> None:
    rows = {-1: np.array([0.0, 1.0, 2.0, 3.0], np.float32), 5: np.array([3, 2, 1, 0], np.float32)}
    em = Emitter(piece, lambda t: t == 3, logits=rows.__getitem__, n_top=2)
    t = em.update(1, 5)
    assert t is not None
    lp, top = logprobs_of(rows[5], 1, 2)
    assert (t.text, t.logprob, t.top_logprobs) == ("\x01", lp, top)
    assert list(top or {}) == [0, 1]
    em = Emitter(piece, lambda t: t == 3, logits=rows.__getitem__)
    t = em.update(2)
    assert t is not None and t.logprob == logprobs_of(rows[-1], 2, None)[0]
    assert t.top_logprobs is None
    assert emitter().update(2).logprob is None  # type: ignore[union-attr]


def test_a_spelled_control_token_reads_as_its_marker_and_meets_stop_strings() -> None:
    em = emitter(spelled={MARKER: "<tool_call>"})
    assert [t.text for t in run(em, [ord("a"), MARKER, EOG])] == ["a", "<tool_call>"]
    em = emitter(spelled={MARKER: "<tool_call>"}, stops=["<tool"])
    assert text(run(em, [ord("a"), MARKER, ord("b")])) == "a"
    assert em.hit


@pytest.mark.parametrize("stops", [[], [""], ["", "zz"]])
def test_empty_stop_strings_stop_nothing(stops: list[str]) -> None:
    em = emitter(stops=stops)
    assert text(run(em, [*b"abc", EOG])) == "abc"
    assert not em.hit
