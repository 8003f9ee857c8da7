"""Build a llama.cpp sampler chain from the usual sampling options.

The chain order follows llama.cpp's common sampler: logit bias, penalties, grammar, then the
truncation samplers, temperature and the final random draw (or greedy when temperature <= 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nexabind import lowlevel
from nexabind._ffi import ffi
from nexabind.errors import ContextError

__all__ = ["SamplingOptions", "build_sampler"]

DEFAULT_SEED = 0xFFFFFFFF


@dataclass
class SamplingOptions:
    """Sampling settings, validated on creation (llama-cpp-python's names and defaults).

    Raises:
        ValueError: A setting is out of range (the message names it and its range).
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = 64
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: str | None = None

    def __post_init__(self) -> None:
        def bad(name: str, value: object, what: str) -> None:
            msg = f"{name}={value!r} is out of range: {what}"
            raise ValueError(msg)

        if self.temperature < 0:
            bad("temperature", self.temperature, "use >= 0 (0 means greedy)")
        if self.top_k < 0:
            bad("top_k", self.top_k, "use >= 0 (0 disables it)")
        for name in ("top_p", "min_p", "typical_p"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                bad(name, v, "use a value in [0, 1]")
        if self.repeat_penalty <= 0:
            bad("repeat_penalty", self.repeat_penalty, "use > 0 (1.0 disables it)")
        if self.penalty_last_n < -1:
            bad("penalty_last_n", self.penalty_last_n, "use >= -1 (-1: the whole context)")
        if self.seed is not None and not 0 <= self.seed <= 0xFFFFFFFF:
            bad("seed", self.seed, "use an unsigned 32-bit integer")

    @property
    def greedy(self) -> bool:
        """Whether the final pick is the most likely token."""
        return self.temperature <= 0.0


class _Chain:
    """A native sampler chain; freed by :meth:`close` (a finalizer is the backstop)."""

    def __init__(self, ptr: Any) -> None:
        self.ptr = ptr

    def reset(self) -> None:
        lowlevel.lib().llama_sampler_reset(self.ptr)

    def close(self) -> None:
        if self.ptr is not None:
            ffi.release(self.ptr)
            self.ptr = None


def build_sampler(model: lowlevel.Model, opts: SamplingOptions) -> _Chain:
    """Return a sampler chain for ``model`` built from ``opts``.

    Raises:
        ValueError: The grammar does not parse, or a logit-bias token is out of the vocabulary.
    """
    L = lowlevel.lib()
    vocab = model._vocab
    if vocab is None:
        msg = "the model is closed"
        raise ContextError(msg)
    chain = ffi.gc(
        L.llama_sampler_chain_init(L.llama_sampler_chain_default_params()), L.llama_sampler_free
    )
    add = L.llama_sampler_chain_add
    if opts.logit_bias:
        items = list(opts.logit_bias.items())
        arr = ffi.new("llama_logit_bias[]", len(items))
        for i, (tok, bias) in enumerate(items):
            tok = int(tok)
            if not 0 <= tok < model.n_vocab:
                msg = f"logit_bias token {tok} is outside the vocabulary (0..{model.n_vocab - 1})"
                raise ValueError(msg)
            arr[i].token = tok
            arr[i].bias = float(bias)
        add(chain, L.llama_sampler_init_logit_bias(model.n_vocab, len(items), arr))
    if opts.repeat_penalty != 1.0 or opts.frequency_penalty or opts.presence_penalty:
        add(
            chain,
            L.llama_sampler_init_penalties(
                model.n_vocab,
                opts.penalty_last_n,
                opts.repeat_penalty,
                opts.frequency_penalty,
                opts.presence_penalty,
            ),
        )
    if opts.grammar:
        g = L.llama_sampler_init_grammar(vocab, opts.grammar.encode(), b"root")
        if g == ffi.NULL:
            msg = "the GBNF grammar does not parse (it needs a `root` rule); check its syntax"
            raise ValueError(msg)
        add(chain, g)
    if opts.greedy:
        add(chain, L.llama_sampler_init_greedy())
    else:
        if opts.top_k > 0:
            add(chain, L.llama_sampler_init_top_k(opts.top_k))
        if opts.typical_p < 1.0:
            add(chain, L.llama_sampler_init_typical(opts.typical_p, 1))
        if opts.top_p < 1.0:
            add(chain, L.llama_sampler_init_top_p(opts.top_p, 1))
        if opts.min_p > 0.0:
            add(chain, L.llama_sampler_init_min_p(opts.min_p, 1))
        add(chain, L.llama_sampler_init_temp(opts.temperature))
        seed = DEFAULT_SEED if opts.seed is None else opts.seed
        add(chain, L.llama_sampler_init_dist(seed))
    return _Chain(chain)
