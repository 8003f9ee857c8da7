"""Grammars that constrain generation: GBNF text, and JSON schemas through llguidance.

A :class:`LlamaGrammar` (llama-cpp-python's class and class methods) holds grammar text in one
of two forms, told apart as llama.cpp tells them apart:

- GBNF (``root ::= ...``): llama.cpp's own grammar language, run by llama.cpp's grammar sampler
  (:attr:`nexabind.sampling.SamplingOptions.grammar`). It is checked here, without a model, by a
  parser that mirrors llama.cpp's, so a grammar that does not parse fails at once with the line
  and column.
- llguidance's Lark form (first line ``%llguidance {}``), what :meth:`LlamaGrammar.from_json_schema`
  makes. A :class:`GrammarMatcher` runs it as a token mask. The JSON-schema engine is llguidance
  rather than a JSON-schema-to-GBNF converter because it costs a fraction of llama.cpp's grammar
  sampler per token on large vocabularies (Gemma 3: 262,144 tokens, which llama.cpp's sampler
  checks one by one at every step) and covers more of JSON Schema (string formats, number bounds,
  full regular expressions); benchmarks/test_grammar_bench.py measures both.

The sampler a :class:`GrammarMatcher` makes first lets the sampler chain pick a token from the
unconstrained logits and keeps it when the grammar allows it, as llama.cpp's common sampler
does; only when the grammar refuses it are the logits masked (every token the grammar refuses
set to -inf) and the chain asked again.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from nexabind import _json_schema

if TYPE_CHECKING:
    import numpy as np

    from nexabind import lowlevel

__all__ = [
    "GrammarMatcher",
    "LlamaGrammar",
    "check_gbnf",
    "json_schema_to_grammar",
    "response_format_grammar",
]

logger = logging.getLogger(__name__)

LLGUIDANCE_PREFIX = _json_schema.LLGUIDANCE_PREFIX
_MAX_REPETITIONS = 2000  # MAX_REPETITION_THRESHOLD in llama.cpp's src/llama-grammar.cpp


def json_schema_to_grammar(
    schema: Mapping[str, Any] | bool | str | bytes, *, default_additional_properties: bool = False
) -> str:
    """Return the grammar (llguidance's Lark form) of JSON text valid under ``schema``.

    Supported: ``type`` (and lists of types), ``properties`` / ``required`` /
    ``additionalProperties`` / ``patternProperties``, ``items`` / ``prefixItems`` /
    ``minItems`` / ``maxItems``, ``enum``, ``const``, ``anyOf``, ``oneOf`` (alternatives that
    cannot overlap), ``allOf``, ``$ref`` / ``$defs`` (inside the schema, recursion included),
    ``pattern``, ``minLength`` / ``maxLength``, ``minimum`` / ``maximum`` / ``exclusive*`` /
    ``multipleOf`` (integers and numbers), ``format`` (date, time, date-time, duration, email,
    hostname, ipv4, ipv6, uri, uuid); annotations (``title``, ``description``, ``default``,
    ``examples``, ...) are ignored.

    Args:
        schema: A JSON schema: a dict, a bool, or its JSON text.
        default_additional_properties: What an object that lists ``properties`` and says
            nothing of ``additionalProperties`` allows besides them: False (no other keys, as
            llama.cpp's converter and OpenAI's strict mode) or True (any, as JSON Schema says).

    Raises:
        ValueError: The schema is not valid JSON Schema, uses a keyword a grammar cannot
            enforce (``not``, ``if``, ``uniqueItems``, ...), or an unknown format; the message
            names the keyword and where it is, as a JSON pointer (``#/properties/tags``).
        TypeError: ``schema`` is not a mapping, a bool or text.
    """
    return _json_schema.to_grammar(
        schema, default_additional_properties=default_additional_properties
    )


def response_format_grammar(response_format: Mapping[str, Any] | None) -> LlamaGrammar | None:
    """The grammar of an OpenAI ``response_format`` (None for plain text).

    ``{"type": "json_object"}`` is any JSON object (with ``"schema"``, as llama-cpp-python
    allows, one valid under it); ``{"type": "json_schema", "json_schema": {"name", "schema",
    "strict"}}`` is OpenAI's structured output; ``{"type": "text"}`` constrains nothing.

    Raises:
        ValueError: The format is malformed, or its schema is not valid JSON Schema (the
            message names the keyword and where it is).
    """
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, Mapping) else None
    if kind == "text":
        return None
    if kind == "json_object":
        schema = response_format.get("schema") or {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or "schema" not in spec:
            msg = (
                'response_format type "json_schema" needs "json_schema": {"name": ..., '
                '"schema": {...}}'
            )
            raise ValueError(msg)
        schema = spec["schema"]
    else:
        msg = (
            f"response_format={response_format!r} is invalid; use {{'type': 'text'}}, "
            "{'type': 'json_object'} or {'type': 'json_schema', 'json_schema': {...}}"
        )
        raise ValueError(msg)
    return LlamaGrammar.from_json_schema(schema, verbose=False)


class LlamaGrammar:
    """A grammar for constrained generation (llama-cpp-python's ``LlamaGrammar``).

    Make one with :meth:`from_string`, :meth:`from_file` or :meth:`from_json_schema`; the
    text is checked when the grammar is made.

    Attributes:
        _grammar: The grammar text (GBNF, or llguidance's Lark form for JSON schemas), under
            llama-cpp-python's name.
        _root: The start rule of a GBNF grammar (``"root"``).

    Raises:
        ValueError: The text does not parse (the message says where).
    """

    def __init__(self, *, _grammar: str) -> None:
        self._grammar = _grammar
        self._root = "root"
        if self.engine == "gbnf":
            check_gbnf(_grammar)
        else:
            _check_llguidance(_grammar)

    @classmethod
    def _trusted(cls, text: str) -> LlamaGrammar:
        self = cls.__new__(cls)
        self._grammar = text
        self._root = "root"
        return self

    @classmethod
    def from_string(cls, grammar: str, verbose: bool = True) -> LlamaGrammar:
        """A grammar from its text: GBNF, or llguidance's Lark form (first line ``%llguidance``).

        Args:
            grammar: The grammar text.
            verbose: Log the grammar (logger ``nexabind.grammar``, level DEBUG).

        Raises:
            ValueError: The text does not parse; the message gives the line and column.
            TypeError: ``grammar`` is not a str.
        """
        if not isinstance(grammar, str):
            msg = f"a grammar is text (str), not {type(grammar).__name__}"
            raise TypeError(msg)
        self = cls(_grammar=grammar)
        if verbose:
            logger.debug("%s grammar:\n%s", self.engine, grammar)
        return self

    @classmethod
    def from_file(cls, file: str | os.PathLike[str], verbose: bool = True) -> LlamaGrammar:
        """A grammar from a text file (UTF-8), as :meth:`from_string`.

        Raises:
            OSError: The file cannot be read.
            ValueError: The file is empty or does not parse (the message names the file).
        """
        with open(file, encoding="utf-8") as f:
            text = f.read()
        if not text.strip():
            msg = f"the grammar file {os.fspath(file)!r} is empty; it needs at least a root rule"
            raise ValueError(msg)
        try:
            return cls.from_string(text, verbose=verbose)
        except ValueError as e:
            msg = f"{os.fspath(file)}: {e}"
            raise ValueError(msg) from None

    @classmethod
    def from_json_schema(
        cls, json_schema: Mapping[str, Any] | bool | str, verbose: bool = True
    ) -> LlamaGrammar:
        """A grammar of the JSON text valid under ``json_schema`` (a dict or its JSON text).

        See :func:`json_schema_to_grammar` for what is supported.

        Raises:
            ValueError: The schema is not valid JSON Schema or uses a keyword a grammar cannot
                enforce; the message names the keyword and its JSON pointer.
        """
        self = cls._trusted(json_schema_to_grammar(json_schema))
        if verbose:
            logger.debug("grammar of a JSON schema:\n%s", self._grammar)
        return self

    @property
    def engine(self) -> str:
        """``"gbnf"`` (llama.cpp's grammar sampler) or ``"llguidance"`` (a token mask)."""
        return "llguidance" if _is_llguidance(self._grammar) else "gbnf"

    def matcher(self, model: lowlevel.Model) -> GrammarMatcher:
        """A fresh :class:`GrammarMatcher` of this grammar over ``model``'s vocabulary."""
        return GrammarMatcher(self, model)

    def __repr__(self) -> str:
        first = self._grammar.strip().splitlines()[0] if self._grammar.strip() else ""
        return f"<LlamaGrammar {self.engine}: {first[:60]!r}>"


def _is_llguidance(text: str) -> bool:
    return text.lstrip().startswith("%llguidance")


def _check_llguidance(text: str) -> None:
    from llguidance import LLMatcher

    err = LLMatcher.validate_grammar(text)
    if err:
        msg = f"the llguidance grammar does not parse: {err.strip()}"
        raise ValueError(msg)


# -- GBNF ---------------------------------------------------------------------------------------


class _GbnfError(Exception):
    def __init__(self, what: str, pos: int) -> None:
        super().__init__(what)
        self.what = what
        self.pos = pos


def check_gbnf(text: str, root: str = "root") -> None:
    """Check GBNF text as llama.cpp's parser would, without a model.

    Mirrors ``llama_grammar_parser::parse`` and the checks of ``llama_grammar_init_impl``
    (src/llama-grammar.cpp): syntax, rules used but not defined, the start rule, left
    recursion. Token references (``<name>``) are checked for syntax only: which tokens exist
    depends on the model.

    Raises:
        ValueError: The grammar does not parse or cannot run; the message gives the line and
            column, the line itself and a caret under the place.
    """
    try:
        _Gbnf(text).check(root)
    except _GbnfError as e:
        line = text.count("\n", 0, e.pos) + 1
        start = text.rfind("\n", 0, e.pos) + 1
        end = text.find("\n", e.pos)
        src = text[start : end if end >= 0 else len(text)]
        col = e.pos - start + 1
        msg = (
            f"the GBNF grammar does not parse: {e.what} at line {line}, column {col}\n"
            f"    {src}\n    {' ' * (col - 1)}^"
        )
        raise ValueError(msg) from None


def _is_word(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c == "-")


_ESCAPES = {"x": 2, "u": 4, "U": 8}
_SIMPLE_ESCAPES = frozenset('trn\\"[]-')

# A rule is a list of alternatives; an alternative a list of symbols: a rule name, or None
# for a terminal (a literal, a character class, a token, '.').
_Rule = list[list[str | None]]


class _Gbnf:
    """llama.cpp's GBNF parser in Python, kept to what tells a good grammar from a bad one."""

    def __init__(self, src: str) -> None:
        self.s = src
        self.n = len(src)
        self.rules: dict[str, _Rule] = {}
        self.where: dict[str, int] = {}  # rule -> position of its definition (or its parent's)
        self.refs: dict[str, int] = {}  # name -> position of its first use
        self.symbols: set[str] = set()
        self.n_made = 0

    def at(self, pos: int) -> str:
        return self.s[pos] if pos < self.n else ""

    def space(self, pos: int, newline_ok: bool) -> int:
        s, n = self.s, self.n
        while pos < n and (s[pos] in " \t#" or (newline_ok and s[pos] in "\r\n")):
            if s[pos] == "#":
                while pos < n and s[pos] not in "\r\n":
                    pos += 1
            else:
                pos += 1
        return pos

    def name(self, pos: int) -> int:
        end = pos
        while _is_word(self.at(end)):
            end += 1
        if end == pos:
            raise _GbnfError("expecting a rule name", pos)
        return end

    def integer(self, pos: int) -> int:
        end = pos
        while self.at(end).isdigit() and self.at(end).isascii():
            end += 1
        if end == pos:
            raise _GbnfError("expecting an integer", pos)
        return end

    def char(self, pos: int) -> int:
        c = self.at(pos)
        if not c:
            raise _GbnfError("unexpected end of input", pos)
        if c != "\\":
            return pos + 1
        e = self.at(pos + 1)
        if e in _ESCAPES:
            size = _ESCAPES[e]
            digits = self.s[pos + 2 : pos + 2 + size]
            if len(digits) != size or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise _GbnfError(f"expecting {size} hex digits after \\{e}", pos)
            return pos + 2 + size
        if e and e in _SIMPLE_ESCAPES:
            return pos + 2
        raise _GbnfError(f"unknown escape \\{e}", pos)

    def symbol(self, name: str, pos: int) -> None:
        self.symbols.add(name)
        self.refs.setdefault(name, pos)

    def made(self, parent: str) -> str:
        self.n_made += 1
        name = f"{parent}_{self.n_made}"  # '_' is not a name character: never a user's name
        self.symbols.add(name)
        self.where[name] = self.where.get(parent, 0)
        return name

    def alternates(self, pos: int, rule: str, rule_id: str, nested: bool) -> int:
        alts: _Rule = [[]]
        pos = self.sequence(pos, rule, alts[-1], nested)
        while self.at(pos) == "|":
            pos = self.space(pos + 1, True)
            alts.append([])
            pos = self.sequence(pos, rule, alts[-1], nested)
        self.rules[rule_id] = alts
        return pos

    def sequence(self, pos: int, rule: str, alt: list[str | None], nested: bool) -> int:
        last = len(alt)  # where the item a repetition applies to starts
        n_prev = 1

        def repeat(op_pos: int, lo: int, hi: int | None) -> None:
            nonlocal n_prev
            if last == len(alt):
                raise _GbnfError("expecting an item before the repetition", op_pos)
            total = hi if hi else (lo or 1)
            if n_prev * total > _MAX_REPETITIONS:
                raise _GbnfError(
                    f"too many repetitions (over {_MAX_REPETITIONS} copies of rules)", op_pos
                )
            item = alt[last:]
            if lo == 0:
                del alt[last:]
            else:
                alt.extend(item * (lo - 1))
            n_opt = 1 if hi is None else hi - lo
            prev = None
            for i in range(n_opt):  # S' ::= S S' | (empty), as llama.cpp rewrites repetitions
                made = self.made(rule)
                body = list(item)
                if hi is None:
                    body.append(made)
                elif i > 0:
                    body.append(prev)
                self.rules[made] = [body, []]
                prev = made
            if n_opt > 0:
                alt.append(prev)
            n_prev *= total

        while pos < self.n:
            c = self.s[pos]
            if c in '"[':
                # A literal or a character class: a terminal (none at all when empty).
                last, n_prev = len(alt), 1
                close = '"' if c == '"' else "]"
                pos += 2 if self.s.startswith("[^", pos) else 1
                start = pos
                while self.at(pos) != close:
                    pos = self.char(pos)
                    if close == "]" and self.at(pos) == "-" and self.at(pos + 1) != "]":
                        pos = self.char(pos + 1)
                if pos > start:
                    alt.append(None)
                pos = self.space(pos + 1, nested)
            elif c in "<!":
                pos = self.token(pos + 1 if c == "!" else pos)
                last, n_prev = len(alt), 1
                alt.append(None)
                pos = self.space(pos, nested)
            elif _is_word(c):
                end = self.name(pos)
                ref = self.s[pos:end]
                self.symbol(ref, pos)
                last, n_prev = len(alt), 1
                alt.append(ref)
                pos = self.space(end, nested)
            elif c == "(":
                before = len(self.symbols)
                sub = self.made(rule)
                pos = self.alternates(self.space(pos + 1, True), rule, sub, True)
                n_prev = max(1, len(self.symbols) - before)
                last = len(alt)
                alt.append(sub)
                if self.at(pos) != ")":
                    raise _GbnfError("expecting ')'", pos)
                pos = self.space(pos + 1, nested)
            elif c == ".":
                last, n_prev = len(alt), 1
                alt.append(None)
                pos = self.space(pos + 1, nested)
            elif c in "*+?":
                op = pos
                pos = self.space(pos + 1, nested)
                repeat(op, 1 if c == "+" else 0, 1 if c == "?" else None)
            elif c == "{":
                op = pos
                pos = self.space(pos + 1, nested)
                if not self.at(pos).isdigit():
                    raise _GbnfError("expecting an integer after '{'", pos)
                end = self.integer(pos)
                lo, hi = int(self.s[pos:end]), None
                pos = self.space(end, nested)
                if self.at(pos) == "}":
                    hi = lo
                elif self.at(pos) == ",":
                    pos = self.space(pos + 1, nested)
                    if self.at(pos).isdigit():
                        end = self.integer(pos)
                        hi = int(self.s[pos:end])
                        pos = self.space(end, nested)
                    if self.at(pos) != "}":
                        raise _GbnfError("expecting '}'", pos)
                else:
                    raise _GbnfError("expecting ',' or '}'", pos)
                pos = self.space(pos + 1, nested)
                if lo > _MAX_REPETITIONS:
                    raise _GbnfError(f"more than {_MAX_REPETITIONS} repetitions", op)
                if hi is not None and hi > _MAX_REPETITIONS:
                    hi = None  # llama.cpp treats a larger maximum as none
                if hi is not None and hi < lo:
                    raise _GbnfError(f"the maximum {hi} is below the minimum {lo}", op)
                repeat(op, lo, hi)
            else:
                break
        return pos

    def token(self, pos: int) -> int:
        if self.at(pos) != "<":
            raise _GbnfError("expecting '<'", pos)
        pos += 1
        if self.at(pos) == "[":
            end = self.integer(pos + 1)
            if int(self.s[pos + 1 : end]) > 0xFFFFFFFF:
                raise _GbnfError("the token id is too big", pos + 1)
            if self.at(end) != "]":
                raise _GbnfError("expecting ']'", end)
            if self.at(end + 1) != ">":
                raise _GbnfError("expecting '>'", end + 1)
            return end + 2
        end = self.s.find(">", pos)
        if end < 0:
            raise _GbnfError("expecting '>'", self.n)
        return end + 1

    def rule(self, pos: int) -> int:
        end = self.name(pos)
        name = self.s[pos:end]
        self.symbols.add(name)
        self.where[name] = pos
        pos = self.space(end, False)
        if self.s[pos : pos + 3] != "::=":
            raise _GbnfError("expecting '::='", pos)
        pos = self.alternates(self.space(pos + 3, True), name, name, False)
        if self.s[pos : pos + 2] == "\r\n":
            pos += 2
        elif self.at(pos) in ("\r", "\n"):
            pos += 1
        elif pos < self.n:
            raise _GbnfError("expecting a newline or the end", pos)
        return self.space(pos, True)

    def check(self, root: str) -> None:
        pos = self.space(0, True)
        if pos >= self.n:
            raise _GbnfError("the grammar is empty", pos)
        while pos < self.n:
            pos = self.rule(pos)
        for name, used in self.refs.items():
            if name not in self.rules:
                raise _GbnfError(f"undefined rule {name!r}", used)
        if root not in self.rules:
            raise _GbnfError(f"no {root!r} rule (the start rule)", 0)
        self.left_recursion()

    def left_recursion(self) -> None:
        """Refuse left recursion, as ``llama_grammar_detect_left_recursion`` does."""
        done: set[str] = set()
        busy: set[str] = set()
        may_be_empty: set[str] = set()

        def visit(name: str) -> str | None:
            """The rule found again at the left edge of its own expansion, if any."""
            if name in busy:
                return name
            if name in done:
                return None
            busy.add(name)
            alts = self.rules[name]
            if any(not alt for alt in alts):
                may_be_empty.add(name)
            for alt in alts:
                for sym in alt:
                    if sym is None:
                        break
                    found = visit(sym)
                    if found:
                        return found
                    if sym not in may_be_empty:
                        break
            busy.discard(name)
            done.add(name)
            return None

        for name in self.rules:
            found = visit(name)
            if found:
                rule = found.split("_")[0]
                msg = (
                    f"rule {rule!r} is left-recursive, which llama.cpp's grammar sampler cannot "
                    'run; rewrite e.g. `expr ::= expr "+" term | term` as '
                    '`expr ::= term ("+" term)*`'
                )
                raise _GbnfError(msg, self.where.get(rule, 0))


# -- llguidance: the matcher -------------------------------------------------------------------


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
        grammar: A :class:`LlamaGrammar` in llguidance's form (from
            :meth:`LlamaGrammar.from_json_schema`), or such text.
        model: The model whose tokens are matched (its vocabulary is read once per model).

    Raises:
        ValueError: The grammar is GBNF (llama.cpp's grammar sampler runs that: pass it as
            ``grammar=``), or does not parse.
    """

    def __init__(self, grammar: LlamaGrammar | str, model: lowlevel.Model) -> None:
        import numpy as np
        from llguidance import LLMatcher

        g = grammar if isinstance(grammar, LlamaGrammar) else LlamaGrammar.from_string(grammar)
        if g.engine != "llguidance":
            msg = (
                "a GBNF grammar runs in llama.cpp's grammar sampler, not in a GrammarMatcher: "
                "pass it as grammar= (SamplingOptions.grammar)"
            )
            raise ValueError(msg)
        tokenizer, self._eog = _tokenizer(model)
        self._m = LLMatcher(tokenizer, g._grammar, log_level=0)
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
        and restores the logits, so log-probabilities read afterwards are the model's own.

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
        import numpy as np

        m = self._m
        consume, accepting, eog = m.try_consume_tokens, m.is_accepting, self._eog
        mask_logits = self.mask_logits

        def allowed(tok: int) -> bool:
            # Once the grammar is complete, llguidance takes no more tokens (not even its end
            # token): an end of generation is allowed whenever the text so far is complete.
            return consume([tok]) == 1 or (tok in eog and accepting())

        def constrained() -> int:
            if reject_first:
                tok = sample()
                if allowed(tok):
                    return tok
            logits = ctx.logits(-1)
            logits.setflags(write=True)  # llama.cpp's buffer: the chain reads it from there
            saved = logits.copy()
            mask_logits(logits)
            try:
                tok = sample()
            finally:
                np.copyto(logits, saved)
            if not allowed(tok):
                msg = f"the sampler chose token {tok}, which the grammar refuses: {m.get_error()}"
                raise RuntimeError(msg)
            return tok

        return constrained
