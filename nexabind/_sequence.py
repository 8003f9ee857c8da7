"""One sequence of a context: the tokens its KV cache holds, prompt reuse, and the decode loop.

The loop does O(1) work per token: one ``llama_decode`` of one token through a batch allocated
once, one ``llama_sampler_sample``, and the Engine's :class:`~nexabind._emit.Emitter` (one
``llama_token_to_piece`` into a buffer allocated once, an incremental UTF-8 decoder, stop
strings checked only on what could still become one).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nexabind import _hooks, lowlevel
from nexabind._emit import Emitter
from nexabind.errors import (
    ClosedError,
    ContextError,
    ContextOverflowError,
    DecodeCancelled,
    NexabindError,
)
from nexabind.sampling import SamplingOptions, build_sampler
from nexabind.tokens import Outcome, Token

if TYPE_CHECKING:
    import numpy as np

__all__ = ["KVSequence", "Request"]


@dataclass
class Request:
    """A generation's settings, validated.

    Attributes:
        opts: Sampling settings.
        max_tokens: Most tokens to generate (None or <= 0: until the context is full).
        stops: Stop strings.
        want_logprobs: Fill ``Token.logprob``.
        n_top: How many top tokens to put in ``Token.top_logprobs`` (None: none).
        context_shift: Drop the older half of a full context instead of raising.
        hooks: Logits processors, stopping criteria, an llguidance grammar, recorded logits.
        spelled: Control tokens whose text is given (they spell a tool-call marker).
    """

    opts: SamplingOptions
    max_tokens: int | None = 16
    stops: list[str] = field(default_factory=list)
    want_logprobs: bool = False
    n_top: int | None = None
    context_shift: bool = False
    hooks: _hooks.Hooks | None = None
    spelled: dict[int, str] | None = None


class KVSequence:
    """Sequence 0 of ``ctx``: its tokens, in an int32 array of ``n_ctx`` slots.

    Args:
        ctx: The context.
        closed_message: What the error says when the context is closed under a generator.
    """

    def __init__(self, ctx: lowlevel.Context, closed_message: str) -> None:
        self.ctx = ctx
        self.closed_message = closed_message
        # Allocated once and written in place: the decode loop keeps no object per token.
        self.tokens = array("i", bytes(4 * ctx.n_ctx))
        self.n = 0
        """How many of :attr:`tokens` the KV cache holds."""
        self.epoch = 0
        """Bumped by anything that changes the cache under a running generator."""
        self.n_decoded = 0
        """Tokens decoded so far (prompt and generated)."""
        self.n_prompt_decoded = 0
        """Prompt tokens the last call had to decode (the rest came from the KV cache)."""
        self.err: BaseException | None = None
        """The error that ended the last generation, if one did."""

    def invalidate(self) -> None:
        """Tell running generators that the cache changed under them."""
        self.epoch += 1

    def reset(self) -> None:
        """Forget the KV cache; the next call decodes its whole prompt."""
        self.ctx.clear()
        self.n = 0
        self.epoch += 1

    def restore(self, tokens: array[int]) -> None:
        """Record that the cache now holds ``tokens`` (after a state was loaded)."""
        n = len(tokens)
        self.tokens[:n] = tokens
        self.n = n
        self.epoch += 1

    def ingest(self, tokens: list[int], scores: np.ndarray | None = None) -> None:
        """Make the KV cache hold ``tokens``, decoding only what differs from what it holds.

        Args:
            tokens: The tokens.
            scores: An ``(n_ctx, n_vocab)`` array: the logits after each decoded position go
                into its row (llama-cpp-python's ``logits_all``).

        Raises:
            ValueError: No tokens, or a token outside the vocabulary.
            ContextOverflowError: More tokens than the context holds.
        """
        ctx = self.ctx
        if not tokens:
            msg = "the prompt is empty; give at least one token"
            raise ValueError(msg)
        if len(tokens) > ctx.n_ctx:
            msg = (
                f"the prompt has {len(tokens)} tokens but the context holds {ctx.n_ctx}; "
                "shorten the prompt or create the Llama with a larger n_ctx"
            )
            raise ContextOverflowError(msg)
        ctx.model.check_tokens(tokens, "prompt token")
        import numpy as np

        new = np.asarray(tokens, dtype=np.int32)
        hist = np.frombuffer(self.tokens, dtype=np.int32)
        n_old = self.n
        lim = min(n_old, len(new) - 1)  # always decode at least one token for logits
        diff = np.flatnonzero(hist[:lim] != new[:lim])
        n = int(diff[0]) if diff.size else lim
        if n < n_old and not ctx.seq_rm(0, n, -1):
            ctx.clear()
            n = 0
        m = len(new)
        self.n = n
        hist[n:m] = new[n:]
        self.n_prompt_decoded = 0
        self._decode_from(n, m, scores)

    def _decode_from(self, n: int, m: int, scores: np.ndarray | None) -> None:
        """Decode ``tokens[n:m]`` (already in the history) in batches; reset on failure."""
        ctx = self.ctx
        hist = self.tokens
        step = ctx.n_batch
        batch = ctx.batch
        try:
            for i in range(n, m, step):
                chunk = hist[i : min(i + step, m)]
                batch.set_array(chunk, i)
                if scores is not None:
                    batch.logits[: len(chunk)] = 1
                ctx.decode()
                if scores is not None:
                    scores[i : i + len(chunk)] = ctx.logits_rows(len(chunk))
                self.n = i + len(chunk)
                self.n_prompt_decoded += len(chunk)
                self.n_decoded += len(chunk)
        except BaseException:
            self.reset()
            raise

    def extend(self, tokens: list[int], scores: np.ndarray | None = None) -> None:
        """Decode ``tokens`` after the ones the cache holds (llama-cpp-python's ``eval``).

        Raises:
            ValueError: A token outside the vocabulary.
            ContextOverflowError: They do not fit after what the cache holds.
        """
        ctx = self.ctx
        n, m = self.n, self.n + len(tokens)
        if m > ctx.n_ctx:
            msg = (
                f"{len(tokens)} more tokens do not fit: the context holds {ctx.n_ctx} and "
                f"{n} are in use; reset() or create the Llama with a larger n_ctx"
            )
            raise ContextOverflowError(msg)
        ctx.model.check_tokens(tokens, "token")
        if not tokens:
            return
        self.epoch += 1
        ctx.seq_rm(0, n, -1)
        self.tokens[n:m] = array("i", tokens)
        self.n_prompt_decoded = 0
        self._decode_from(n, m, scores)

    def shift(self) -> int:
        """Drop the older half of the context after the first token; return the new length."""
        n = self.n
        n_keep = 1
        n_discard = (n - n_keep) // 2
        self.ctx.seq_rm(0, n_keep, n_keep + n_discard)
        self.ctx.seq_add(0, n_keep + n_discard, n, -n_discard)
        hist = self.tokens
        hist[n_keep : n - n_discard] = hist[n_keep + n_discard : n]  # the tail moves down
        self.n = n - n_discard
        return self.n

    def generate(self, tokens: list[int], req: Request, outcome: Outcome) -> Iterator[Token]:
        """Decode ``tokens`` (reusing the cache) and yield the tokens generated after them.

        ``outcome`` is filled in when the generation ends (also when the caller stops early).
        A cancel requested before the first step applies to this generation; one left over
        when it ends is dropped.
        """
        ctx = self.ctx
        sampler = None
        epoch = -1
        self.err = None
        try:
            with ctx.lock:
                self.epoch += 1
                sampler = build_sampler(ctx.model, req.opts, ctx.n_ctx)
                hooks = req.hooks if req.hooks is not None and req.hooks.active else None
                try:
                    self.ingest(tokens, hooks.scores if hooks is not None else None)
                except DecodeCancelled:
                    outcome.finish_reason = "cancelled"
                    return
                # Bound under the lock, with the epoch this generation owns: another
                # thread's call that changes the cache from here on is noticed at the next step.
                steps = ctx.token_steps(sampler)
                if hooks is not None:
                    steps = _hooks.wrap(steps, ctx, sampler, self.tokens, lambda: self.n, hooks)
                epoch = self.epoch
            yield from self._loop(steps, epoch, req, outcome)
        except Exception as e:
            self.err = e
            raise
        finally:
            hooks = req.hooks
            if hooks is not None and hooks.finish is not None:
                with ctx.lock:
                    if not ctx.closed and self.epoch == epoch:
                        hooks.finish()
            if sampler is not None:
                sampler.close()
            ctx.clear_cancel()

    def _superseded(self) -> None:
        if self.ctx.closed:
            raise ClosedError(self.closed_message)
        msg = (
            "this generator was superseded by a later call on the same Llama (the context now "
            "holds other tokens); finish one generation before the next"
        )
        raise ContextError(msg)

    def _loop(
        self, steps: lowlevel.TokenSteps, epoch: int, req: Request, outcome: Outcome
    ) -> Iterator[Token]:
        ctx = self.ctx
        n_ctx = ctx.n_ctx
        context_shift = req.context_shift
        limit = req.max_tokens if req.max_tokens and req.max_tokens > 0 else None
        if limit is None and not context_shift:
            limit = n_ctx - self.n
        # Hot-loop locals: the C calls are bound once by token_steps; nothing is allocated or
        # looked up by name per token. Each step's C calls run under the context's lock, so
        # another thread's call or close() waits for the step (and cannot free under it).
        sample, is_eog, piece, feed = steps
        lock = ctx.lock
        # What each token emits (its text, stop strings, the limit, logprobs) is the Engine's
        # emitter too: the same tokens give the same text.
        emitter = Emitter(
            piece,
            is_eog,
            stops=req.stops,
            limit=1 << 62 if limit is None else limit,
            logits=ctx.logits if req.want_logprobs else None,
            n_top=req.n_top,
            spelled=req.spelled,
        )
        update = emitter.update
        hist = self.tokens  # n_ctx int32 slots: storing a token allocates nothing
        n_past = self.n
        n_fed = 0
        tok = -1
        try:
            while True:
                with lock:
                    if self.epoch != epoch:
                        self._superseded()
                    if tok >= 0:  # decode the token emitted last round
                        if n_past >= n_ctx:
                            if not context_shift:
                                outcome.finish_reason = "length"
                                msg = (
                                    f"the context of {n_ctx} tokens is full after "
                                    f"{emitter.n} generated tokens; use a larger n_ctx, a "
                                    "smaller max_tokens, or context_shift=True"
                                )
                                raise ContextOverflowError(msg)
                            n_past = self.shift()
                        try:
                            feed(tok, n_past)
                        except DecodeCancelled:
                            outcome.finish_reason = "cancelled"
                            return
                        except NexabindError:
                            self.reset()
                            raise
                        hist[n_past] = tok
                        n_past += 1
                        self.n = n_past  # in step with the cache even if the caller stops
                        n_fed += 1
                    tok = sample()
                    t = update(tok)
                if t is not None and emitter.reason is None:
                    yield t
                    continue
                outcome.finish_reason = emitter.reason
                if t is not None:
                    yield t
                return
        finally:
            # Counters are written once, not per token (also when the caller breaks out).
            outcome.completion_tokens = emitter.n
            self.n_decoded += n_fed
