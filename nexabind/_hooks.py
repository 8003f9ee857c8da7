"""Per-generation wrappers around a decode loop's token steps, built once per generation.

A plain generation runs :class:`~nexabind.lowlevel.TokenSteps` as they are. A generation that
asks for more wraps ``sample`` (and ``is_eog``) here, so the decode loop itself does no extra
work per token for the features it was not asked for:

- recorded logits (``logits_all``): the raw logits of every position go into ``scores``;
- an llguidance grammar (:class:`~nexabind.grammar.GrammarMatcher`): only tokens it allows;
- logits processors (llama-cpp-python's ``LogitsProcessorList``): they rewrite the logits
  before the sampler chain draws, as llama-cpp-python's custom sampler at the head of its chain
  does; the model's own logits are put back afterwards, so log-probabilities stay the model's;
- stopping criteria (``StoppingCriteriaList``): asked after each draw; when one says stop, the
  drawn token ends the generation like an end-of-generation token, and is not emitted;
- a draft model (speculative decoding): its guesses are decoded in one batch with the sampled
  token, and each guess the sampler then draws itself needs no decode of its own.

Each callable gets what llama-cpp-python gives it: ``input_ids``, the tokens in the context so
far (a zero-copy int32 view), and one position's logits (a float32 array).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nexabind import lowlevel

if TYPE_CHECKING:
    from array import array

    import numpy as np

    from nexabind.grammar import GrammarMatcher

__all__ = ["Hooks", "wrap"]

Processor = Callable[[Any, Any], Any]
Criterion = Callable[[Any, Any], bool]


@dataclass
class Hooks:
    """What a generation asks of its steps beyond sampling.

    Attributes:
        processors: Called as ``processors(input_ids, logits)``, returning the new logits.
        criteria: Called as ``criteria(input_ids, logits)``; true ends the generation.
        matcher: An llguidance grammar the tokens must follow.
        reject_first: Let the chain draw from unmasked logits first (see
            :meth:`GrammarMatcher.constrain`).
        scores: An ``(n_ctx, n_vocab)`` float32 array; row ``i`` receives the logits after
            position ``i``.
        draft: Called with the tokens so far (int32 array); returns guessed next tokens.
        stopped: Set when a stopping criterion ended the generation.
        finish: Called once when the generation ends (set by :func:`wrap`).
    """

    processors: Processor | None = None
    criteria: Criterion | None = None
    matcher: GrammarMatcher | None = None
    reject_first: bool = True
    scores: np.ndarray | None = None
    draft: Callable[[Any], Any] | None = None
    stopped: bool = False
    finish: Callable[[], None] | None = None

    @property
    def active(self) -> bool:
        """Whether any wrapper is needed."""
        found = (self.processors, self.criteria, self.matcher, self.scores, self.draft)
        return any(x is not None for x in found)


def wrap(
    steps: lowlevel.TokenSteps,
    ctx: lowlevel.Context,
    chain: lowlevel.SamplerChain,
    history: array[int],
    n_past: Callable[[], int],
    hooks: Hooks,
) -> lowlevel.TokenSteps:
    """Return ``steps`` with ``sample``, ``is_eog`` and ``feed`` wrapped for ``hooks``.

    Args:
        steps: The loop's steps.
        ctx: The context whose last decode's logits ``sample`` reads.
        chain: The sampler chain ``steps.sample`` draws with.
        history: The tokens in the context (``n_ctx`` int32 slots).
        n_past: How many of ``history`` the context holds now.
        hooks: What to do; ``hooks.stopped`` is set by a stopping criterion, ``hooks.finish``
            to what must run when the generation ends.
    """
    import numpy as np

    ids = np.frombuffer(history, dtype=np.int32)
    sample, feed = steps.sample, steps.feed
    processors, criteria, scores = hooks.processors, hooks.criteria, hooks.scores
    out = [-1]  # the output of the last decode that the next draw reads

    if hooks.draft is not None and hooks.matcher is None:
        sample, feed = _speculate(ctx, chain, ids, hooks, out, steps.feed)

    if processors is not None:
        inner = sample

        def sample() -> int:
            logits = ctx.logits(out[0])
            logits.setflags(write=True)  # llama.cpp's buffer: the chain reads it from there
            saved = logits.copy()
            new = processors(ids[: n_past()], saved.copy())
            np.copyto(logits, np.asarray(new, dtype=np.float32))
            try:
                return inner()
            finally:
                np.copyto(logits, saved)

    if hooks.matcher is not None:
        sample = hooks.matcher.constrain(ctx, sample, reject_first=hooks.reject_first)

    if scores is not None or criteria is not None:
        chosen = sample

        def sample() -> int:
            n = n_past()
            logits = ctx.logits(out[0])
            if scores is not None:
                scores[n - 1] = logits
            tok = chosen()
            if criteria is not None and criteria(ids[:n], logits):
                hooks.stopped = True
            return tok

    is_eog = steps.is_eog
    if criteria is not None:
        eog = is_eog

        def is_eog(tok: int) -> bool:
            return hooks.stopped or eog(tok)

    return lowlevel.TokenSteps(sample, is_eog, steps.piece, feed)


def _speculate(
    ctx: lowlevel.Context,
    chain: lowlevel.SamplerChain,
    ids: np.ndarray,
    hooks: Hooks,
    out: list[int],
    plain_feed: Callable[[int, int], None],
) -> tuple[Callable[[], int], Callable[[int, int], None]]:
    """``sample`` and ``feed`` that decode a draft model's guesses with each sampled token."""
    import numpy as np

    draft = hooks.draft
    assert draft is not None
    pending: list[int] = []  # guesses in the KV cache after the last fed token, in order
    batch = ctx.batch
    n_ctx = ctx.n_ctx
    where = [0]  # position of the first pending guess

    def sample() -> int:
        return chain.sample(ctx, out[0])

    def feed(token: int, pos: int) -> None:
        if pending:
            if pending[0] == token and where[0] == pos:
                pending.pop(0)  # decoded with the last batch: its logits are the next output
                where[0] += 1
                out[0] += 1
                return
            pending.clear()
            ctx.seq_rm(0, pos, -1)
        room = min(n_ctx - pos - 1, batch.capacity - 1)
        guesses: list[int] = []
        if room > 0:
            ids[pos] = token  # the history as the draft model sees it
            guess = draft(ids[: pos + 1])
            guesses = [int(t) for t in np.asarray(guess).ravel()[:room]]
            if guesses and (min(guesses) < 0 or max(guesses) >= ctx.n_vocab):
                guesses = []  # a draft model's bad guess is no reason to fail the generation
        if not guesses:
            plain_feed(token, pos)
            out[0] = -1
            return
        batch.set([token, *guesses], pos, logits_last=False)
        ctx.decode()
        pending[:] = guesses
        where[0] = pos + 1
        out[0] = 0
        batch.set_one(0, 0)  # plain_feed writes only the token and position of one slot
        ctx.prepare_single_token()

    def finish() -> None:
        if pending:
            ctx.seq_rm(0, where[0], -1)  # guesses nobody confirmed leave the cache
            pending.clear()

    hooks.finish = finish
    return sample, feed
