"""llguidance's grammars over a llama.cpp vocabulary: :class:`GrammarMatcher`, a token mask.

llguidance reads the model's vocabulary through a tokenizer made once per model (:class:`_Vocab`,
about a second for Gemma 3's 262,144 tokens); a :class:`GrammarMatcher` follows one generation
through a grammar in llguidance's Lark form (first line ``%llguidance``, what
:meth:`nexabind.grammar.LlamaGrammar.from_json_schema` makes), says which tokens may come next
and masks the logits of the others. :func:`constrained`, the one constrained draw of ``Llama``'s
loop and the Engine's scheduler (:meth:`GrammarMatcher.constrain` for a one-sequence loop),
wraps a loop's ``sample``: the token the chain picks from the unconstrained logits is kept when
the grammar allows it, as llama.cpp's common sampler does; only when it is refused are the
logits masked and the chain asked again.
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from nexabind._gbnf import check_gbnf

if TYPE_CHECKING:
    import numpy as np

    from nexabind import lowlevel

__all__ = [
    "GrammarMatcher",
    "check_grammar",
    "check_llguidance",
    "constrained",
    "is_llguidance",
    "limits",
]

logger = logging.getLogger("nexabind.grammar")

#: llguidance's limits that are lower here than its defaults (250,000 and 500,000).
MAX_LEXER_STATES = 100_000
MAX_GRAMMAR_SIZE = 200_000


class _Grammar(Protocol):
    """What a matcher reads of a :class:`~nexabind.grammar.LlamaGrammar`: its text."""

    _grammar: str


def is_llguidance(text: str) -> bool:
    """Whether grammar text is in llguidance's form (its first line ``%llguidance``)."""
    return text.lstrip().startswith("%llguidance")


@functools.cache
def limits() -> Any:
    """llguidance's resource limits for every grammar here: its defaults, with the lexer's
    states (about 2 kB each) and the grammar's size lowered so that one request's schema
    cannot take hundreds of megabytes."""
    from llguidance import LLParserLimits

    return LLParserLimits(
        max_lexer_states=MAX_LEXER_STATES,
        max_grammar_size=MAX_GRAMMAR_SIZE,
        verbose_errors=False,  # else an error quotes the whole grammar (to a client, too)
    )


def check_llguidance(text: str) -> None:
    """Check text in llguidance's form with llguidance's own parser.

    Raises:
        ValueError: It does not parse (llguidance's message says where).
    """
    from llguidance import LLMatcher

    err = LLMatcher.validate_grammar(text, limits=limits())
    if err:
        msg = f"the llguidance grammar does not parse: {err.strip()}"
        raise ValueError(msg)


def check_grammar(text: str) -> str:
    """Check grammar text in either form; return its engine, ``"gbnf"`` or ``"llguidance"``.

    Raises:
        ValueError: It does not parse (the GBNF or llguidance parser says where).
    """
    if is_llguidance(text):
        check_llguidance(text)
        return "llguidance"
    check_gbnf(text)
    return "gbnf"


class _Vocab:
    """A model's vocabulary as llguidance's ``TokenizerWrapper`` reads it."""

    def __init__(self, model: lowlevel.Model) -> None:
        piece = model.token_to_piece
        self.tokens = [piece(t, special=True) for t in range(model.n_vocab)]
        # Control tokens render as nothing unless asked for: llguidance must not match them
        # as text.
        self.special_token_ids = [t for t, p in enumerate(self.tokens) if p and not piece(t)]
        self.eog = [t for t in range(model.n_vocab) if model.is_eog(t)]
        self.eos_token_id = model.eos
        self.bos_token_id = model.bos if model.bos >= 0 else None
        self._model = weakref.ref(model)  # the tokenizer is cached per model: no cycle
        self._sentinel, self._skip = self._find_sentinel(model)

    def _find_sentinel(self, model: lowlevel.Model) -> tuple[bytes, int]:
        """A prefix that keeps llama.cpp's tokenizer from adding a space in front of the text.

        llguidance needs ``tokenize(s)`` to spell ``s`` exactly, but SentencePiece vocabularies
        add a space before the text. Tokenizing a control byte that begins no other token
        in front of ``s``, then dropping its tokens, spells ``s`` exactly (llguidance's own
        llama.cpp tokenizer does the same).
        """
        toks = self.tokens
        if b"".join(toks[t] for t in model.tokenize(b"a", add_special=False)) == b"a":
            return b"", 0
        starts = {p[:1] for p in toks if len(p) > 1} | {p[:2] for p in toks if len(p) > 2}
        singles = set(toks)
        for b in range(1, 32):
            c = bytes([b])
            if c in singles and c not in starts and b" " + c not in starts:
                skip = model.tokenize(c, add_special=False)
                got = model.tokenize(c + b"a", add_special=False)
                if got[: len(skip)] == skip and b"".join(toks[t] for t in got[len(skip) :]) == b"a":
                    return c, len(skip)
        return b"", 0

    def __call__(self, text: str | bytes) -> list[int]:
        model = self._model()
        if model is None or not text:
            return []
        data = text.encode() if isinstance(text, str) else text
        toks = model.tokenize(self._sentinel + data, add_special=False, parse_special=False)
        return toks[self._skip :]


def _text(grammar: _Grammar | str) -> str:
    """The text of a ``LlamaGrammar``; or ``grammar`` itself, checked as
    ``LlamaGrammar.from_string`` checks it (the GBNF or llguidance parser says where it fails)."""
    if not isinstance(grammar, str):
        text = getattr(grammar, "_grammar", None)
        if not isinstance(text, str):
            msg = f"a grammar is text (str), not {type(grammar).__name__}"
            raise TypeError(msg)
        return text
    logger.debug("%s grammar:\n%s", check_grammar(grammar), grammar)
    return grammar


_TOKENIZERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_TOKENIZERS_LOCK = threading.Lock()


def _tokenizer(model: lowlevel.Model) -> tuple[Any, frozenset[int]]:
    """llguidance's tokenizer of ``model`` and its end-of-generation tokens, made once per model.

    Reading the vocabulary takes about a second for Gemma 3's 262,144 tokens.
    """
    with _TOKENIZERS_LOCK:
        found = _TOKENIZERS.get(model)
        if found is None:
            from llguidance import LLTokenizer
            from llguidance._tokenizer import TokenizerWrapper

            vocab = _Vocab(model)
            tok = LLTokenizer(TokenizerWrapper(vocab), eos_token=vocab.eog or None)
            found = _TOKENIZERS[model] = (tok, frozenset(vocab.eog))
        return found


class GrammarMatcher:
    """Where a generation stands in an llguidance grammar: which tokens may come next.

    One matcher follows one generation; :meth:`reset` starts it over.

    Args:
        grammar: A :class:`~nexabind.grammar.LlamaGrammar` in llguidance's form (from
            :meth:`~nexabind.grammar.LlamaGrammar.from_json_schema`), or such text.
        model: The model whose tokens are matched (its vocabulary is read once per model).

    Raises:
        ValueError: The grammar is GBNF (llama.cpp's grammar sampler runs that: pass it as
            ``grammar=``), or does not parse.
    """

    def __init__(self, grammar: _Grammar | str, model: lowlevel.Model) -> None:
        import numpy as np
        from llguidance import LLMatcher

        text = _text(grammar)
        if not is_llguidance(text):
            msg = (
                "a GBNF grammar runs in llama.cpp's grammar sampler, not in a GrammarMatcher: "
                "pass it as grammar= (SamplingOptions.grammar)"
            )
            raise ValueError(msg)
        tokenizer, self._eog = _tokenizer(model)
        self._m = LLMatcher(tokenizer, text, log_level=0, limits=limits())
        if self._m.is_error():
            msg = f"the grammar cannot run: {self._m.get_error()}"
            raise ValueError(msg)
        self.n_vocab = n = model.n_vocab
        self._words = np.zeros((n + 31) // 32, dtype=np.int32)
        self._lanes = np.empty(n, dtype=np.int32)
        self._neg_inf = np.array([-np.inf], dtype=np.float32).view(np.int32)[0]

    def reset(self) -> None:
        """Go back to the start of the grammar."""
        self._m.reset()

    @property
    def is_accepting(self) -> bool:
        """Whether what was accepted so far is complete (an end-of-generation token may come)."""
        return self._m.is_accepting()

    @property
    def is_stopped(self) -> bool:
        """Whether the grammar is complete and nothing but an end-of-generation token may come."""
        return self._m.is_stopped()

    def accepts(self, token: int) -> bool:
        """Whether ``token`` may come next (nothing is accepted)."""
        return self._m.validate_tokens([token]) == 1 or (
            token in self._eog and self._m.is_accepting()
        )

    def accept(self, token: int) -> None:
        """Advance past ``token``.

        Raises:
            ValueError: The grammar does not allow ``token`` here (the matcher is unchanged).
        """
        if self._m.try_consume_tokens([token]) != 1 and not (
            token in self._eog and self._m.is_accepting()
        ):
            msg = f"token {token} is not allowed by the grammar here"
            if self._m.is_error():  # the matcher stopped: a limit, usually (it says which)
                msg = f"the grammar matcher failed: {self._m.get_error()}"
            raise ValueError(msg)

    def _fill(self) -> Any:
        m = self._m
        m.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        if m.is_error():
            msg = f"the grammar matcher failed: {m.get_error()}"
            raise RuntimeError(msg)
        return self._words

    def allowed(self) -> np.ndarray:
        """A bool array over the vocabulary: True for each token that may come next."""
        import numpy as np

        bits = np.unpackbits(self._fill().view(np.uint8), bitorder="little", count=self.n_vocab)
        return bits.astype(bool)

    def mask_logits(self, logits: np.ndarray) -> None:
        """Set the logit of every token the grammar refuses here to -inf, in place.

        Args:
            logits: A writable float32 array of the vocabulary's size.
        """
        import numpy as np

        bits = np.unpackbits(self._fill().view(np.uint8), bitorder="little", count=self.n_vocab)
        # Branch-free over the whole vocabulary: lane = -bit (all ones where allowed), then
        # logit = (logit & lane) | (-inf & ~lane) on the float's bits.
        lanes, as_int = self._lanes, logits.view(np.int32)
        np.copyto(lanes, bits, casting="unsafe")
        np.negative(lanes, out=lanes)
        np.bitwise_and(as_int, lanes, out=as_int)
        np.invert(lanes, out=lanes)
        np.bitwise_and(lanes, self._neg_inf, out=lanes)
        np.bitwise_or(as_int, lanes, out=as_int)

    def constrain(
        self, ctx: lowlevel.Context, sample: Callable[[], int], *, reject_first: bool = True
    ) -> Callable[[], int]:
        """Wrap a token loop's ``sample()`` so that it only returns tokens the grammar allows.

        ``sample`` draws (and accepts into its sampler chain) a token from the last decode's
        logits of ``ctx``: ``Context.token_steps(chain).sample`` or ``lambda:
        chain.sample(ctx)``. The returned function calls it, keeps the token when the grammar
        allows it, and otherwise masks the logits (every refused token at -inf), calls it again
        and restores the logits, so log-probabilities read afterwards are the model's own
        (:func:`constrained`, for the last output of the decode).

        Args:
            ctx: The context whose logits ``sample`` reads.
            sample: The unconstrained draw.
            reject_first: Try the unconstrained token first (cheap: one grammar check for
                most tokens of a trained model). A refused token has then been accepted into
                the chain once; a chain with repetition penalties should pass False, so that
                every token is drawn from masked logits.

        Returns:
            ``sample()`` under the grammar; it also advances this matcher.
        """
        draw = constrained(self, lambda _row: sample(), ctx.logits, reject_first=reject_first)
        return lambda: draw(-1)


def constrained(
    matcher: GrammarMatcher,
    sample: Callable[[int], int],
    logits: Callable[[int], np.ndarray],
    *,
    reject_first: bool = True,
) -> Callable[[int], int]:
    """``sample(row)`` under an llguidance grammar: the one constrained draw of ``Llama``'s loop
    and the Engine's scheduler.

    ``sample(row)`` draws (and accepts into its sampler chain) a token from output ``row`` of
    the last decode, whose logits ``logits(row)`` returns (llama.cpp's own buffer). With
    ``reject_first`` the token drawn from the unconstrained logits is kept when the grammar
    allows it, as llama.cpp's common sampler does; otherwise, and when it is refused, every
    token the grammar refuses gets a logit of -inf, the chain draws again, and the logits are
    put back. The returned function advances ``matcher`` past each token it returns.

    Raises:
        RuntimeError: The chain drew a token the grammar refuses even from masked logits, or
            the matcher failed (from the returned function).
    """
    import numpy as np

    m = matcher._m
    consume, accepting, eog = m.try_consume_tokens, m.is_accepting, matcher._eog
    mask_logits = matcher.mask_logits

    def allowed(tok: int) -> bool:
        # Once the grammar is complete, llguidance takes no more tokens (not even its end
        # token): an end of generation is allowed whenever the text so far is complete.
        return consume([tok]) == 1 or (tok in eog and accepting())

    def draw(row: int) -> int:
        if reject_first:
            tok = sample(row)
            if allowed(tok):
                return tok
        buf = logits(row)
        buf.setflags(write=True)  # llama.cpp's buffer: the chain reads it from there
        saved = buf.copy()
        mask_logits(buf)
        try:
            tok = sample(row)
        finally:
            np.copyto(buf, saved)
        if not allowed(tok):
            msg = f"the sampler chose token {tok}, which the grammar refuses: {m.get_error()}"
            raise RuntimeError(msg)
        return tok

    return draw
