"""``SamplerChain``: llama.cpp's samplers, chained in the order they are added."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from nexabind._ffi import ffi
from nexabind.errors import DecodeError
from nexabind.lowlevel._lib import lib, nonnull
from nexabind.lowlevel._owned import Owned

if TYPE_CHECKING:
    from nexabind.lowlevel._context import Context
    from nexabind.lowlevel._model import Model


class SamplerChain(Owned):
    """A llama.cpp sampler chain, built step by step in the order the samplers are added.

    Each ``add_*`` method appends one llama.cpp sampler (the chain owns it) and returns the
    chain, so calls can be chained. Its calls hold the chain's lock, so sharing one between
    threads cannot crash, but a chain carries one generation's state (penalty window, grammar
    position, RNG): use one per generation.

    Example:
        >>> chain = SamplerChain().add_top_k(40).add_temp(0.8).add_dist(1234)
        >>> token = chain.sample(ctx)  # doctest: +SKIP

    Raises:
        MemoryError: llama.cpp could not allocate the chain (or, from ``add_*``, a sampler).
    """

    _what = "sampler chain"

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._n_vocab: int | None = None  # known once a vocabulary-bound sampler is added
        self._lib = L = lib()
        chain = nonnull(
            L.llama_sampler_chain_init(L.llama_sampler_chain_default_params()),
            MemoryError,
            "llama.cpp could not allocate a sampler chain",
        )
        self._ptr = ffi.gc(chain, L.llama_sampler_free)
        self._add = L.llama_sampler_chain_add
        self._sample = L.llama_sampler_sample

    def close(self) -> None:
        """Free the chain and its samplers; safe to call more than once."""
        with self._lock:
            if self._ptr is not None:
                ffi.release(self._ptr)
                self._ptr = None

    def _append(self, sampler: Any, what: str, n_vocab: int | None = None) -> SamplerChain:
        sampler = nonnull(sampler, MemoryError, f"llama.cpp could not create the {what}")
        with self._lock:
            try:
                chain = self._check()
            except BaseException:
                self._lib.llama_sampler_free(sampler)
                raise
            self._add(chain, sampler)  # the chain owns it from here
            if n_vocab is not None:
                self._n_vocab = n_vocab
        return self

    def add_logit_bias(self, n_vocab: int, bias: dict[int, float]) -> SamplerChain:
        """Add ``bias[token]`` to the logit of each token.

        Raises:
            ValueError: A token is outside ``0..n_vocab-1``.
        """
        items = list(bias.items())
        arr = ffi.new("llama_logit_bias[]", max(1, len(items)))
        for i, (tok, value) in enumerate(items):
            tok = int(tok)
            if not 0 <= tok < n_vocab:
                msg = f"logit_bias token {tok} is outside the vocabulary (0..{n_vocab - 1})"
                raise ValueError(msg)
            arr[i].token = tok
            arr[i].bias = float(value)
        sampler = self._lib.llama_sampler_init_logit_bias(n_vocab, len(items), arr)
        return self._append(sampler, "logit-bias sampler", n_vocab)

    def add_penalties(
        self, n_vocab: int, last_n: int, repeat: float, frequency: float, presence: float
    ) -> SamplerChain:
        """Penalize tokens seen in the last ``last_n`` accepted tokens.

        Args:
            n_vocab: Vocabulary size of the model.
            last_n: Window of accepted tokens the penalties look at (0: off).
            repeat: Divide positive logits (multiply negative ones) by this (1.0: off).
            frequency: Subtract this times the token's count in the window (0.0: off).
            presence: Subtract this once if the token is in the window (0.0: off).
        """
        sampler = self._lib.llama_sampler_init_penalties(
            n_vocab, last_n, repeat, frequency, presence
        )
        return self._append(sampler, "penalties sampler", n_vocab)

    def add_grammar(self, model: Model, grammar: str, root: str = "root") -> SamplerChain:
        """Constrain the output to a GBNF grammar.

        Raises:
            ValueError: The grammar does not parse or has no ``root`` rule (llama.cpp's log
                says where).
        """
        with model._lock:
            g = self._lib.llama_sampler_init_grammar(
                model._checked_vocab(), grammar.encode(), root.encode()
            )
        msg = (
            f"the GBNF grammar does not parse (it needs a {root!r} rule); check its syntax "
            "(enable logging.getLogger('nexabind.llama') for the parser's message)"
        )
        return self._append(nonnull(g, ValueError, msg), "grammar sampler", model.n_vocab)

    def add_top_k(self, k: int) -> SamplerChain:
        """Keep the ``k`` most likely tokens."""
        return self._append(self._lib.llama_sampler_init_top_k(k), "top-k sampler")

    def add_top_p(self, p: float, min_keep: int = 1) -> SamplerChain:
        """Keep the most likely tokens whose probabilities add up to ``p`` (nucleus)."""
        return self._append(self._lib.llama_sampler_init_top_p(p, min_keep), "top-p sampler")

    def add_min_p(self, p: float, min_keep: int = 1) -> SamplerChain:
        """Drop tokens less likely than ``p`` times the most likely one."""
        return self._append(self._lib.llama_sampler_init_min_p(p, min_keep), "min-p sampler")

    def add_typical(self, p: float, min_keep: int = 1) -> SamplerChain:
        """Locally typical sampling with mass ``p``."""
        sampler = self._lib.llama_sampler_init_typical(p, min_keep)
        return self._append(sampler, "typical sampler")

    def add_temp(self, t: float) -> SamplerChain:
        """Divide the logits by the temperature ``t``."""
        return self._append(self._lib.llama_sampler_init_temp(t), "temperature sampler")

    def add_dist(self, seed: int = 0xFFFFFFFF) -> SamplerChain:
        """Draw the token at random from what is left (the default seed is random)."""
        return self._append(self._lib.llama_sampler_init_dist(seed), "dist sampler")

    def add_mirostat(
        self, n_vocab: int, seed: int, tau: float, eta: float, m: int = 100
    ) -> SamplerChain:
        """Mirostat 1.0: keep the text's surprise near ``tau`` (a final sampler: it draws)."""
        sampler = self._lib.llama_sampler_init_mirostat(n_vocab, seed, tau, eta, m)
        return self._append(sampler, "mirostat sampler", n_vocab)

    def add_mirostat_v2(self, seed: int, tau: float, eta: float) -> SamplerChain:
        """Mirostat 2.0: keep the text's surprise near ``tau`` (a final sampler: it draws)."""
        sampler = self._lib.llama_sampler_init_mirostat_v2(seed, tau, eta)
        return self._append(sampler, "mirostat v2 sampler")

    def add_greedy(self) -> SamplerChain:
        """Pick the most likely token."""
        return self._append(self._lib.llama_sampler_init_greedy(), "greedy sampler")

    def __len__(self) -> int:
        with self._lock:
            return self._lib.llama_sampler_chain_n(self._check())

    def reset(self) -> None:
        """Reset the chain's state (penalty window, grammar position, RNG)."""
        with self._lock:
            self._lib.llama_sampler_reset(self._check())

    def accept(self, token: int) -> None:
        """Tell the chain that ``token`` was emitted without :meth:`sample` (e.g. a prompt).

        Penalties and grammars advance on accepted tokens.

        Raises:
            ValueError: ``token`` is negative, or outside the vocabulary of a sampler that
                knows one (a grammar, penalties, a logit bias).
        """
        if token < 0 or (self._n_vocab is not None and token >= self._n_vocab):
            limit = "" if self._n_vocab is None else f" of {self._n_vocab} tokens"
            msg = f"token {token} is outside the vocabulary{limit}"
            raise ValueError(msg)
        with self._lock:
            self._lib.llama_sampler_accept(self._check(), token)

    def sample(self, ctx: Context, i: int = -1) -> int:
        """Sample (and accept) the next token from output ``i`` of the last decode.

        Raises:
            DecodeError: The last decode computed no logits for output ``i``.
        """
        with ctx.lock, self._lock:
            ctx_ptr = ctx._check()
            if self._lib.llama_get_logits_ith(ctx_ptr, i) == ffi.NULL:
                msg = f"no logits for output {i}: decode a batch that asks for them first"
                raise DecodeError(msg)
            return self._sample(self._check(), ctx_ptr, i)
