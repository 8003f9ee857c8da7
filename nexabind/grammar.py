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

This module holds :class:`LlamaGrammar` and the public functions; the GBNF checker is
:mod:`nexabind._gbnf`, the llguidance matcher :mod:`nexabind._llguidance`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from nexabind import _json_schema
from nexabind._gbnf import check_gbnf
from nexabind._llguidance import GrammarMatcher, check_grammar, is_llguidance

if TYPE_CHECKING:
    from nexabind import lowlevel

__all__ = [
    "GrammarMatcher",
    "LlamaGrammar",
    "check_gbnf",
    "field_grammar",
    "json_schema_to_grammar",
    "response_format_grammar",
]

logger = logging.getLogger(__name__)

LLGUIDANCE_PREFIX = _json_schema.LLGUIDANCE_PREFIX


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
    ``examples``, ...) are ignored. A number or integer is at most 16 digits before the point
    (as in llama-cpp-python's grammars) unless the schema's own bounds allow more, and a number
    without ``multipleOf`` at most 10 after it, with no exponent.

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
    return field_grammar("response_format", schema)


def field_grammar(field: str, schema: Any) -> LlamaGrammar:
    """The grammar of a JSON schema a request gave in ``field``; an error names the field.

    Raises:
        ValueError: The schema is not valid JSON Schema, or is beyond a limit (its message,
            after ``field``).
    """
    try:
        return LlamaGrammar.from_json_schema(schema, verbose=False)
    except (ValueError, TypeError) as e:
        msg = f"{field} holds a schema that cannot be used: {e}"
        raise ValueError(msg) from None


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
        check_grammar(_grammar)

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
        return "llguidance" if is_llguidance(self._grammar) else "gbnf"

    def matcher(self, model: lowlevel.Model) -> GrammarMatcher:
        """A fresh :class:`GrammarMatcher` of this grammar over ``model``'s vocabulary."""
        return GrammarMatcher(self, model)

    def __repr__(self) -> str:
        first = self._grammar.strip().splitlines()[0] if self._grammar.strip() else ""
        return f"<LlamaGrammar {self.engine}: {first[:60]!r}>"
