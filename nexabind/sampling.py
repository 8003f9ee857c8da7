"""Build a llama.cpp sampler chain from the usual sampling options.

The chain order follows llama.cpp's common sampler: logit bias, penalties, grammar, then the
truncation samplers, temperature and the final random draw (or greedy when temperature <= 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nexabind import lowlevel

__all__ = ["SAMPLING_KEYS", "SamplingOptions", "build_sampler"]

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
    logit_bias: dict[int, float] | None = field(default_factory=dict)
    grammar: str | None = None

    def __post_init__(self) -> None:
        self.logit_bias = dict(self.logit_bias or {})

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


#: The names :class:`SamplingOptions` takes (the keyword arguments every generating call accepts).
SAMPLING_KEYS = frozenset(SamplingOptions.__dataclass_fields__)


def build_sampler(
    model: lowlevel.Model, opts: SamplingOptions, n_ctx: int | None = None
) -> lowlevel.SamplerChain:
    """Return a sampler chain for ``model`` built from ``opts``.

    Args:
        model: The model whose vocabulary the chain samples from.
        opts: The settings.
        n_ctx: Context length, the penalty window for ``penalty_last_n=-1`` (None: the
            model's training length).

    Raises:
        ValueError: The grammar does not parse, or a logit-bias token is out of the vocabulary.
        ModelLoadError: The model is closed.
    """
    n_vocab = model.n_vocab
    chain = lowlevel.SamplerChain()
    try:
        if opts.logit_bias:
            chain.add_logit_bias(n_vocab, opts.logit_bias)
        if opts.repeat_penalty != 1.0 or opts.frequency_penalty or opts.presence_penalty:
            chain.add_penalties(
                n_vocab,
                (n_ctx or model.n_ctx_train) if opts.penalty_last_n < 0 else opts.penalty_last_n,
                opts.repeat_penalty,
                opts.frequency_penalty,
                opts.presence_penalty,
            )
        if opts.grammar:
            chain.add_grammar(model, opts.grammar)
        if opts.greedy:
            return chain.add_greedy()
        if opts.top_k > 0:
            chain.add_top_k(opts.top_k)
        if opts.typical_p < 1.0:
            chain.add_typical(opts.typical_p)
        if opts.top_p < 1.0:
            chain.add_top_p(opts.top_p)
        if opts.min_p > 0.0:
            chain.add_min_p(opts.min_p)
        chain.add_temp(opts.temperature)
        return chain.add_dist(DEFAULT_SEED if opts.seed is None else opts.seed)
    except BaseException:
        chain.close()
        raise
