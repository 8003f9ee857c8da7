"""What a generation yields and how it ended: ``Token``, ``Outcome``, stop strings, logprobs.

Shared by :class:`nexabind.Llama`, the engine and :mod:`nexabind.openai`, which turns a stream
of tokens and its outcome into OpenAI's shapes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

__all__ = ["Outcome", "StopMatcher", "Token", "logprobs_of"]


class Token(int):
    """One generated token: its id as an ``int``, with what it produced.

    A ``Token`` is the token id (``token == 42``, ``llm.detokenize([token])``, a dict key, an
    index), as llama-cpp-python's ``generate`` yields it, and carries its text and
    log-probabilities as attributes.

    Attributes:
        id: Token id (``int(token)``).
        text: Text this token completes (may be empty while a UTF-8 character or a possible
            stop string is pending; the held text comes with a later token).
        logprob: Log-probability of the token, when asked for (else None).
        top_logprobs: The most likely tokens at this position as ``{id: logprob}``, most
            likely first, when asked for with ``logprobs=N`` (else None).
    """

    # An int subclass cannot have __slots__ with fields: the attributes live in the instance
    # dict, and the two that are usually None are class defaults, so a token stores one.
    text: str
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None

    def __new__(
        cls,
        id: int,
        text: str = "",
        logprob: float | None = None,
        top_logprobs: dict[int, float] | None = None,
    ) -> Token:
        self = int.__new__(cls, id)
        self.text = text
        if logprob is not None:
            self.logprob = logprob
        if top_logprobs is not None:
            self.top_logprobs = top_logprobs
        return self

    @property
    def id(self) -> int:
        """The token id as a plain ``int``."""
        return int(self)

    def __repr__(self) -> str:
        extra = "" if self.logprob is None else f", logprob={self.logprob!r}"
        if self.top_logprobs is not None:
            extra += f", top_logprobs={self.top_logprobs!r}"
        return f"Token({int(self)}, {self.text!r}{extra})"

    __str__ = int.__repr__  # str(token) and f"{token}" are the number, as for an int

    def __reduce__(self) -> tuple[type[Token], tuple[int, str, float | None, Any]]:
        return (Token, (int(self), self.text, self.logprob, self.top_logprobs))


@dataclass
class Outcome:
    """How a generation ended, filled in by the generator when it finishes.

    Attributes:
        finish_reason: ``"stop"`` (end-of-generation token or stop string), ``"length"``
            (``max_tokens`` or a full context) or ``"cancelled"``; None while running.
        prompt_tokens: Tokens in the prompt.
        completion_tokens: Tokens generated.
    """

    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _failure(stop: str) -> list[int]:
    """KMP failure function: for each prefix, the length of its longest proper border."""
    fail = [0] * len(stop)
    k = 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = fail[k - 1]
        if stop[i] == stop[k]:
            k += 1
        fail[i] = k
    return fail


class StopMatcher:
    """Find stop strings across token boundaries; hold back text that could start one.

    Each stop string has a Knuth-Morris-Pratt automaton, so time and memory are linear in the
    stop strings' lengths and in the text: every generated character advances each automaton
    once, and only the text that could still become a stop string is held back.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._fail = [_failure(s) for s in self.stops]
        self._state = [0] * len(self.stops)  # chars of each stop matched at the text's end
        self._first = {s[0] for s in self.stops}
        self._held: deque[str] = deque()  # text not emitted yet, in pieces
        self._n_held = 0

    @property
    def held(self) -> str:
        """The text held back (it could be the start of a stop string)."""
        return "".join(self._held)

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was hit).

        On a hit, the text before the earliest-starting stop string that completed within
        ``text`` is returned and nothing is held.
        """
        state = self._state
        if not self._n_held and self._first.isdisjoint(text):
            return text, False  # no stop string can start or continue here
        stops, fail = self.stops, self._fail
        base = self._n_held  # offset of text in held + text
        hit = -1
        for i, c in enumerate(text):
            for j, stop in enumerate(stops):
                q = state[j]
                while q and stop[q] != c:
                    q = fail[j][q - 1]
                if stop[q] == c:
                    q += 1
                if q == len(stop):
                    start = base + i + 1 - q
                    if hit < 0 or start < hit:
                        hit = start
                    q = fail[j][q - 1]
                state[j] = q
        self._held.append(text)
        self._n_held += len(text)
        if hit >= 0:
            out = self._take(hit)
            self.flush()
            return out, True
        return self._take(self._n_held - max(state)), False

    def _take(self, n: int) -> str:
        """Remove and return the first ``n`` held characters."""
        parts = []
        held = self._held
        while n > 0:
            piece = held.popleft()
            if len(piece) > n:
                held.appendleft(piece[n:])
                piece = piece[:n]
            parts.append(piece)
            n -= len(piece)
            self._n_held -= len(piece)
        return "".join(parts)

    def flush(self) -> str:
        """Return and forget the held text (the generation ended without a stop)."""
        out = self._take(self._n_held)
        self._state = [0] * len(self.stops)
        return out


def logprobs_of(
    logits: np.ndarray, tok: int, n_top: int | None
) -> tuple[float, dict[int, float] | None]:
    """Log-probability of ``tok`` and of the ``n_top`` most likely tokens, from raw logits.

    Args:
        logits: One position's logits (a zero-copy view is left untouched).
        tok: The chosen token.
        n_top: How many of the most likely tokens to return (None: none).

    Returns:
        ``(logprob, {token: logprob})``, the dict most likely first (None without ``n_top``).
    """
    import numpy as np

    z = logits - logits.max()  # one float32 copy
    lse = float(np.log(np.exp(z).sum(dtype=np.float64)))
    lp = float(z[tok]) - lse
    if n_top is None:
        return lp, None
    k = min(n_top, z.shape[0])
    if k == 0:
        return lp, {}
    idx = np.argpartition(z, -k)[-k:]
    idx = idx[np.argsort(-z[idx], kind="stable")]
    return lp, {int(i): float(z[i]) - lse for i in idx}
