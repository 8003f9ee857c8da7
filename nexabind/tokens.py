"""What a generation yields and how it ended: ``Token``, ``Outcome``, stop strings, logprobs.

Shared by :class:`nexabind.Llama`, the engine and :mod:`nexabind.openai`, which turns a stream
of tokens and its outcome into OpenAI's shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import numpy as np

__all__ = ["Outcome", "StopMatcher", "Token", "logprobs_of"]


class Token(NamedTuple):
    """One generated token.

    Attributes:
        id: Token id.
        text: Text this token completes (may be empty while a UTF-8 character or a possible
            stop string is pending; the held text comes with a later token).
        logprob: Log-probability of the token, when asked for (else None).
        top_logprobs: The most likely tokens at this position as ``{id: logprob}``, most
            likely first, when asked for with ``logprobs=N`` (else None).
    """

    id: int
    text: str
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None


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


class StopMatcher:
    """Hold back text that could start a stop string; find stops across token boundaries."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""
        # Every proper prefix of every stop string: the longest one that ends the text is held.
        self.prefixes = {s[:i] for s in self.stops for i in range(1, len(s))}
        self.max_prefix = max((len(p) for p in self.prefixes), default=0)

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was hit)."""
        s = self.held + text
        best = -1
        for stop in self.stops:
            i = s.find(stop)
            if i >= 0 and (best < 0 or i < best):
                best = i
        if best >= 0:
            self.held = ""
            return s[:best], True
        for k in range(min(self.max_prefix, len(s)), 0, -1):
            if s[-k:] in self.prefixes:
                self.held = s[-k:]
                return s[:-k], False
        self.held = ""
        return s, False

    def flush(self) -> str:
        """Return and forget the held text (the generation ended without a stop)."""
        out, self.held = self.held, ""
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
