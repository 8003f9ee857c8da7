"""Build a llama.cpp sampler chain from the usual sampling options.

The chain order follows llama.cpp's common sampler: logit bias, penalties, grammar, then the
truncation samplers, temperature and the final random draw: greedy when the temperature is 0,
a draw from the whole distribution when it is negative (as llama-cpp-python does), mirostat
when asked for.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field

from nexabind import lowlevel
from nexabind.grammar import LlamaGrammar

__all__ = ["INT32_MAX", "SAMPLING_KEYS", "SamplingOptions", "build_sampler", "check_int"]

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
        # Every value is checked and converted here, in the caller's thread: what reaches
        # llama.cpp is a Python int or float that fits its C type, never a value cffi refuses
        # (OverflowError, TypeError) in a thread that serves others.
        for name in _FLOATS:
            setattr(self, name, _real(name, getattr(self, name)))
        for name, (lo, hi, what) in _INTS.items():
            setattr(self, name, check_int(name, getattr(self, name), lo, hi, what))
        if self.seed is not None:
            self.seed = check_int(
                "seed", self.seed, -1, _UINT32_MAX, "use an unsigned 32-bit integer"
            )
            if self.seed in (-1, DEFAULT_SEED):
                self.seed = None  # llama-cpp-python's "random seed"
        self.logit_bias = _logit_bias(self.logit_bias)
        if self.grammar is not None and not isinstance(self.grammar, (str, LlamaGrammar)):
            msg = f"grammar must be GBNF text or a LlamaGrammar, not {type(self.grammar).__name__}"
            raise TypeError(msg)
        self.penalize_nl = bool(self.penalize_nl)

        def bad(name: str, value: float, what: str) -> None:
            msg = f"{name}={value:g} is out of range: {what}"
            raise ValueError(msg)

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
        for name in ("top_p", "min_p", "typical_p"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                bad(name, v, "use a value in [0, 1]")
        if self.repeat_penalty <= 0:
            bad("repeat_penalty", self.repeat_penalty, "use > 0 (1.0 disables it)")

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


#: The largest int32 (what llama.cpp's counts and token ids fit in).
INT32_MAX = 0x7FFFFFFF
_UINT32_MAX = 0xFFFFFFFF
#: Options llama.cpp takes as a float: any finite number.
_FLOATS = (
    "temperature", "top_p", "min_p", "typical_p", "repeat_penalty", "frequency_penalty",
    "presence_penalty", "mirostat_tau", "mirostat_eta", "tfs_z",
)  # fmt: skip
#: Options llama.cpp takes as an int32: their range, and what the message suggests.
_INTS = {
    "top_k": (0, INT32_MAX, "use 0 (off) to 2147483647"),
    "penalty_last_n": (-1, INT32_MAX, "use -1 (the whole context) to 2147483647"),
    "mirostat_mode": (0, 2, "use 0 (off), 1 or 2 (mirostat 2.0)"),
}


def _real(name: str, value: object, *, infinite: bool = False) -> float:
    """``value`` as a float, finite unless ``infinite`` (a bool or a non-number is a
    TypeError; NaN is always a ValueError)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        msg = f"{name} must be a number, not {type(value).__name__} {value!r:.60}"
        raise TypeError(msg)
    v = float(value)
    if math.isnan(v) or (math.isinf(v) and not infinite):
        what = "a number" if infinite else "a finite number"
        msg = f"{name}={v!r} is out of range: use {what}"
        raise ValueError(msg)
    return v


def check_int(name: str, value: object, lo: int, hi: int, what: str = "") -> int:
    """``value`` as an int in ``lo..hi`` (a bool or a non-integer is a TypeError, a value out
    of range a ValueError; both name ``name``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        msg = f"{name} must be an integer, not {type(value).__name__} {value!r:.60}"
        raise TypeError(msg)
    v = int(value)
    if not lo <= v <= hi:
        msg = f"{name}={v} is out of range: {what or f'use {lo} to {hi}'}"
        raise ValueError(msg)
    return v


def _logit_bias(bias: object) -> dict[int, float]:
    """``{token id: bias}`` with int32 ids and biases that are numbers (-inf bans a token; ids
    in the vocabulary are the model's to check)."""
    if bias is None:
        return {}
    if not isinstance(bias, Mapping):
        msg = f"logit_bias must be a mapping of token id to bias, not {type(bias).__name__}"
        raise TypeError(msg)
    out: dict[int, float] = {}
    for key, value in bias.items():
        if isinstance(key, str):
            try:
                key = int(key)
            except ValueError:
                msg = f"logit_bias key {key!r:.60} is not a token id"
                raise TypeError(msg) from None
        tok = check_int("logit_bias key", key, 0, INT32_MAX, "use a token id >= 0")
        out[tok] = _real(f"logit_bias[{tok}]", value, infinite=True)
    return out


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
