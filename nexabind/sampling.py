"""Build a llama.cpp sampler chain from the usual sampling options.

The chain order follows llama.cpp's common sampler: logit bias, penalties, grammar, then the
truncation samplers, temperature and the final random draw: greedy when the temperature is 0,
a draw from the whole distribution when it is negative (as llama-cpp-python does), mirostat
when asked for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from nexabind import lowlevel
from nexabind.grammar import LlamaGrammar

__all__ = ["SAMPLING_KEYS", "SamplingOptions", "build_sampler"]

logger = logging.getLogger(__name__)

DEFAULT_SEED = 0xFFFFFFFF
_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning("%s", msg)


@dataclass
class SamplingOptions:
    """Sampling settings, validated on creation (llama-cpp-python's names and defaults).

    ``temperature`` 0 is greedy; below 0 draws from the model's distribution untruncated, as
    in llama-cpp-python. ``seed`` None (or -1, or 0xFFFFFFFF) is a random seed. ``grammar``
    is GBNF text or a :class:`~nexabind.grammar.LlamaGrammar`. ``mirostat_mode`` 1 or 2
    replaces the truncation samplers with mirostat (after the temperature, as llama.cpp's
    common sampler does). ``tfs_z`` and ``penalize_nl`` are accepted for llama-cpp-python's
    sake and have no effect (llama.cpp removed tail-free sampling and the newline exemption);
    a value other than the default is logged once as a warning.

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
    grammar: str | LlamaGrammar | None = None
    mirostat_mode: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    tfs_z: float = 1.0
    penalize_nl: bool = True

    def __post_init__(self) -> None:
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        if self.seed is not None and self.seed in (-1, DEFAULT_SEED):
            self.seed = None  # llama-cpp-python's "random seed"

        def bad(name: str, value: object, what: str) -> None:
            msg = f"{name}={value!r} is out of range: {what}"
            raise ValueError(msg)

        if self.mirostat_mode not in (0, 1, 2):
            bad("mirostat_mode", self.mirostat_mode, "use 0 (off), 1 or 2 (mirostat 2.0)")
        for name in ("mirostat_tau", "mirostat_eta"):
            if getattr(self, name) <= 0:
                bad(name, getattr(self, name), "use > 0")
        if self.tfs_z != 1.0:
            _warn_once(
                "tfs_z",
                f"tfs_z={self.tfs_z} has no effect: llama.cpp no longer has tail-free sampling "
                "(llama-cpp-python ignores it too)",
            )
        if not self.penalize_nl:
            _warn_once(
                "penalize_nl",
                "penalize_nl=False has no effect: llama.cpp's penalties treat every token alike "
                "(llama-cpp-python ignores it too)",
            )
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
        return self.temperature == 0.0

    @property
    def penalties(self) -> bool:
        """Whether the chain has repetition penalties (they count every token it accepts)."""
        return bool(self.repeat_penalty != 1.0 or self.frequency_penalty or self.presence_penalty)

    @property
    def gbnf(self) -> tuple[str, str] | None:
        """The GBNF grammar and its start rule for llama.cpp's grammar sampler, if any.

        An llguidance grammar runs outside the chain, as a
        :class:`~nexabind.grammar.GrammarMatcher`.
        """
        g = self.grammar
        if isinstance(g, LlamaGrammar):
            return (g._grammar, g._root) if g.engine == "gbnf" else None
        if g and not g.lstrip().startswith("%llguidance"):
            return g, "root"
        return None


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
        if opts.penalties:
            chain.add_penalties(
                n_vocab,
                (n_ctx or model.n_ctx_train) if opts.penalty_last_n < 0 else opts.penalty_last_n,
                opts.repeat_penalty,
                opts.frequency_penalty,
                opts.presence_penalty,
            )
        gbnf = opts.gbnf
        if gbnf is not None:
            chain.add_grammar(model, *gbnf)
        seed = DEFAULT_SEED if opts.seed is None else opts.seed
        if opts.greedy:
            return chain.add_greedy()
        if opts.temperature < 0.0:
            return chain.add_dist(seed)  # llama-cpp-python: a draw from the raw distribution
        if opts.mirostat_mode:
            chain.add_temp(opts.temperature)
            if opts.mirostat_mode == 1:
                return chain.add_mirostat(n_vocab, seed, opts.mirostat_tau, opts.mirostat_eta)
            return chain.add_mirostat_v2(seed, opts.mirostat_tau, opts.mirostat_eta)
        if opts.top_k > 0:
            chain.add_top_k(opts.top_k)
        if opts.typical_p < 1.0:
            chain.add_typical(opts.typical_p)
        if opts.top_p < 1.0:
            chain.add_top_p(opts.top_p)
        if opts.min_p > 0.0:
            chain.add_min_p(opts.min_p)
        chain.add_temp(opts.temperature)
        return chain.add_dist(seed)
    except BaseException:
        chain.close()
        raise
