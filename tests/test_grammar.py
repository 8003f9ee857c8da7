"""Grammars: LlamaGrammar's forms (GBNF, llguidance's from JSON schemas), the grammar made of
a JSON schema and its errors, and a GBNF grammar constraining Llama on the real library.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from nexabind import Llama
from nexabind.grammar import LlamaGrammar, json_schema_to_grammar

SEEDS = (0, 1, 2)


# -- JSON schema: what is made of it, and the errors ---------------------------------------------


def test_grammar_form_and_closed_objects() -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}}},
        "required": ["a", "c"],
        "$defs": {"base": {"type": "object", "properties": {"x": {"type": "integer"}}}},
        "allOf": [{"$ref": "#/$defs/base"}],
    }
    original = json.dumps(schema)
    g = LlamaGrammar.from_json_schema(schema)
    assert json.dumps(schema) == original  # the caller's dict is not touched
    assert g.engine == "llguidance" and g._root == "root"
    head, _, body = g._grammar.partition("\nstart: %json ")
    assert head == "%llguidance {}"
    made = json.loads(body)
    # An object with allOf stays open; an allOf member (and what it refers to) too.
    assert "additionalProperties" not in made
    assert "additionalProperties" not in made["$defs"]["base"]
    assert made["properties"]["a"]["additionalProperties"] is False
    assert made["x-guidance"]["whitespace_pattern"]
    del schema["allOf"]
    made = json.loads(json_schema_to_grammar(schema).partition(" %json ")[2])
    assert made["additionalProperties"] is False
    assert made["properties"]["c"] == {}  # required but not described: any value
    opened = json_schema_to_grammar(schema, default_additional_properties=True)
    assert "additionalProperties" not in json.loads(opened.partition(" %json ")[2])


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("not", {"type": "null"}),
        ("if", {"type": "string"}),
        ("uniqueItems", True),
        ("contains", {"type": "integer"}),
        ("propertyNames", {"maxLength": 3}),
        ("dependentRequired", {"a": ["b"]}),
        ("unevaluatedProperties", False),
        ("$dynamicRef", "#node"),
    ],
)
def test_unsupported_keyword_is_named_with_its_path(keyword: str, value: Any) -> None:
    schema = {"type": "object", "properties": {"tags": {"type": "array", keyword: value}}}
    with pytest.raises(ValueError) as e:
        LlamaGrammar.from_json_schema(schema)
    assert f"keyword {keyword!r} at #/properties/tags is not supported" in str(e.value)


@pytest.mark.parametrize(
    ("schema", "fragment"),
    [
        ({"properties": {"x": {"type": "strin"}}}, "at #/properties/x/type: type 'strin'"),
        ({"type": ["string", "string"]}, "at #/type: type ['string', 'string']"),
        ({"items": {"minItems": -1}}, "at #/items/minItems: minItems must be a non-negative"),
        ({"maxLength": 2.5}, "maxLength must be a non-negative integer, got 2.5"),
        ({"required": "a"}, "at #/required: required must be an array of names"),
        ({"enum": []}, "at #/enum: enum must be a non-empty array"),
        ({"anyOf": []}, "at #/anyOf: anyOf must be a non-empty array of schemas"),
        ({"properties": ["a"]}, "at #/properties: properties must be an object of schemas"),
        ({"items": [1]}, "at #/items/0: a schema must be an object or a boolean, got int 1"),
        ({"minimum": "0"}, "at #/minimum: minimum must be a number"),
        ({"multipleOf": 0}, "at #/multipleOf: multipleOf must be greater than 0"),
        ({"minimum": 0, "exclusiveMinimum": True}, "draft 4's form"),
        ({"minItems": 3, "maxItems": 1}, "at #: minItems 3 is greater than maxItems 1"),
        ({"$ref": "#/$defs/nope"}, "at #/$ref: $ref '#/$defs/nope' points to nothing"),
        ({"$ref": "https://example.com/s.json"}, "points outside the schema"),
        ({"pattern": "^(ab$"}, "at #/pattern: the pattern '^(ab$' does not compile: unclosed"),
        ({"patternProperties": {"[": {}}}, "at #/patternProperties/[: the pattern '['"),
        ({"format": "iri"}, "format 'iri' at #/format is not supported; supported: date"),
        (
            {"properties": {"a": {}, "b": {}}, "required": ["a"], "minProperties": 1},
            "minProperties/maxProperties at # are supported only when every listed property",
        ),
        (
            {"oneOf": [{"type": "number"}, {"type": "integer"}]},
            "oneOf at #/oneOf: its alternatives overlap",
        ),
        (False, "the JSON schema is false"),
        ('{"type": "object",\n "properties": }', "not valid JSON: Expecting value at line 2"),
    ],
)
def test_invalid_schema_says_where(schema: Any, fragment: str) -> None:
    with pytest.raises(ValueError) as e:
        LlamaGrammar.from_json_schema(schema)
    assert fragment in str(e.value)


def test_schema_of_the_wrong_type() -> None:
    with pytest.raises(TypeError, match="a JSON schema is a dict, a bool or JSON text, not list"):
        json_schema_to_grammar([{"type": "string"}])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="holds a value JSON cannot"):
        json_schema_to_grammar({"const": {1, 2}})


def test_true_schema_and_annotations_are_accepted() -> None:
    assert json_schema_to_grammar(True).startswith("%llguidance")
    annotated = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://example.com/x",
        "title": "t",
        "description": "d",
        "default": "x",
        "examples": ["a"],
        "x-vendor": 1,
        "type": "string",
        "maxLength": 3,
    }
    assert json_schema_to_grammar(annotated)


# -- LlamaGrammar ---------------------------------------------------------------------------------


def test_gbnf_grammar_constrains_llama_generate(libdir: Path, tiny_model: Path) -> None:
    g = LlamaGrammar.from_string('root ::= ("yes" | "no") "!"')
    with Llama(tiny_model, n_ctx=256, n_threads=1, lib_path=libdir) as llm:
        for seed in SEEDS:
            text = "".join(
                t.text
                for t in llm.generate(
                    "Answer:", max_tokens=20, temperature=0.9, seed=seed, grammar=g._grammar
                )
            )
            assert text in ("yes!", "no!")
            assert llm.last_finish_reason == "stop"
            llm.reset()


def test_from_file(tmp_path: Path) -> None:
    path = tmp_path / "g.gbnf"
    path.write_text('root ::= "a"\n', encoding="utf-8")
    assert LlamaGrammar.from_file(path)._grammar == 'root ::= "a"\n'
    with pytest.raises(FileNotFoundError):
        LlamaGrammar.from_file(tmp_path / "missing.gbnf")
    (tmp_path / "empty.gbnf").write_text("  \n")
    with pytest.raises(ValueError, match="empty.gbnf' is empty"):
        LlamaGrammar.from_file(tmp_path / "empty.gbnf")
    (tmp_path / "bad.gbnf").write_text("root ::= (\n")
    with pytest.raises(ValueError, match=r"bad\.gbnf: the GBNF grammar does not parse"):
        LlamaGrammar.from_file(tmp_path / "bad.gbnf")


def test_from_string_takes_llguidance_text() -> None:
    text = json_schema_to_grammar({"type": "integer"})
    g = LlamaGrammar.from_string(text)
    assert g.engine == "llguidance" and g._grammar == text
    assert "llguidance" in repr(g)
    with pytest.raises(ValueError, match="the llguidance grammar does not parse"):
        LlamaGrammar.from_string("%llguidance {}\nstart: %json {")
    with pytest.raises(TypeError, match="a grammar is text"):
        LlamaGrammar.from_string(b'root ::= "a"')  # type: ignore[arg-type]
