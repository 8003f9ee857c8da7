"""What one sequence emits, token by token: the one emission path of ``Llama`` and the Engine.

An :class:`Emitter` follows one generation. Each sampled token goes through :meth:`Emitter.update`
(vLLM's ``IncrementalDetokenizer.update`` is the model: detokenize the new token, then evaluate
the stop criteria): its log-probabilities, the end-of-generation check, its bytes, the
incremental UTF-8 decoder, the stop strings and the token limit, and out comes the
:class:`~nexabind.tokens.Token` to hand to the caller. :class:`nexabind._sequence.KVSequence`
(``Llama``'s decode loop) and :class:`nexabind._scheduler.Scheduler` (the Engine's) both call
it, so the same tokens give the same text in ``Llama``, the Engine and ``nexabind serve``.

The UTF-8 policy: the bytes of an unfinished character wait for the tokens that finish it (the
token that brings them carries an empty text), and are dropped if the generation ends first (as
llama-cpp-python drops them); a sequence that cannot become UTF-8 becomes one U+FFFD, where it
is, as ``bytes.decode("utf-8", "replace")`` of the whole output has it.

:func:`spelled_markers` gives both the text of the control tokens that spell a tool-call
marker. The one grammar-constrained draw of both loops is
:func:`nexabind._llguidance.constrained`.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from nexabind.tokens import StopMatcher, Token, logprobs_of

if TYPE_CHECKING:
    import numpy as np

    from nexabind import lowlevel

__all__ = ["Emitter", "spelled_markers", "text_of"]

_NO_SPELLING: Mapping[int, str] = {}


class Emitter:
    """One generation's output: the tokens it samples in, the :class:`Token` objects it yields.

    Args:
        piece: The bytes of a token (``Context.token_steps(...).piece``).
        is_eog: Whether a token ends the generation.
        stops: Stop strings: the text ends before the first one, which is not emitted; text
            that could be the start of one is held back until it cannot.
        limit: Most tokens to emit; the one that reaches it ends the generation.
        logits: ``logits(row)``: the logits a token was drawn from, for its log-probabilities
            (None: no log-probabilities).
        n_top: How many of the most likely tokens go into ``Token.top_logprobs`` (None: none).
        spelled: Tokens whose text is given rather than read from the vocabulary (control
            tokens that spell a tool-call marker, which llama.cpp renders as nothing).

    Attributes:
        n: Tokens generated so far (an end-of-generation token is not counted).
        reason: ``"stop"`` (end of generation or a stop string) or ``"length"`` (the limit) once
            the generation has ended; None while it goes on.
        hit: Whether a stop string ended it.
    """

    __slots__ = (
        "_dec",
        "_logits",
        "_matcher",
        "_n_top",
        "_spelled",
        "hit",
        "is_eog",
        "limit",
        "n",
        "piece",
        "reason",
    )

    def __init__(
        self,
        piece: Callable[[int], bytes],
        is_eog: Callable[[int], bool],
        *,
        stops: Sequence[str] = (),
        limit: int = 1 << 62,
        logits: Callable[[int], np.ndarray] | None = None,
        n_top: int | None = None,
        spelled: Mapping[int, str] | None = None,
    ) -> None:
        self.piece = piece
        self.is_eog = is_eog
        self.limit = limit
        self._logits = logits
        self._n_top = n_top
        self._spelled = spelled or _NO_SPELLING
        self._matcher = StopMatcher(stops) if any(stops) else None
        self._dec = codecs.getincrementaldecoder("utf-8")("replace").decode
        self.n = 0
        self.reason: str | None = None
        self.hit = False

    def update(self, tok: int, row: int = -1) -> Token | None:
        """Take the sampled token ``tok``; return what it emits (None: nothing).

        ``row`` is the output of the last decode that ``tok`` was drawn from (for its
        log-probabilities). After the call, :attr:`reason` says whether the generation ended;
        an end-of-generation token emits only the text still held back, if there is any.
        """
        lp = top = None
        if self._logits is not None:
            lp, top = logprobs_of(self._logits(row), tok, self._n_top)
        matcher = self._matcher
        if self.is_eog(tok):
            self.reason = "stop"
            tail = matcher.flush() if matcher is not None else ""
            return Token(tok, tail, lp, top) if tail else None
        spelled = self._spelled
        text = spelled[tok] if tok in spelled else self._dec(self.piece(tok))
        n = self.n = self.n + 1
        last = n >= self.limit
        if matcher is not None:
            text, hit = matcher.feed(text)
            if hit:
                self.reason = "stop"
                self.hit = True
                return Token(tok, text, lp, top)
            if last:
                text += matcher.flush()
        if last:
            self.reason = "length"
        t = int.__new__(Token, tok)  # Token(...) through its Python-level __new__ costs more
        # One dict literal is cheaper than attribute stores; the usual None logprobs stay the
        # class defaults.
        if lp is None:
            t.__dict__ = {"text": text}
        else:
            t.__dict__ = {"text": text, "logprob": lp, "top_logprobs": top}
        return t


def text_of(data: bytes) -> str:
    """What an :class:`Emitter` makes of ``data`` as one whole output: a sequence that cannot
    become UTF-8 is one U+FFFD, an unfinished last character is left out."""
    return codecs.getincrementaldecoder("utf-8")("replace").decode(data)


def spelled_markers(model: lowlevel.Model, markers: Sequence[str]) -> dict[int, str]:
    """The control tokens that spell a tool-call marker on their own, with the marker's text
    (llama.cpp renders control tokens as nothing)."""
    out = {}
    for m in markers:
        ids = model.tokenize(m, add_special=False, parse_special=True)
        if len(ids) == 1 and model.token_to_piece(ids[0]) == b"":
            out[ids[0]] = m
    return out
