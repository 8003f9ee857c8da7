"""JSON Schema in, llguidance grammar out: checked, with errors that say where.

llguidance (https://github.com/guidance-ai/llguidance, ``docs/json_schema.md``) compiles a JSON
schema into a grammar applied as a token mask. This module does what it leaves to its caller:

- Every error names the keyword and its place in the schema as a JSON pointer (``#/properties/
  tags``): a keyword llguidance cannot enforce, a value that is not valid JSON Schema, a ``$ref``
  that points nowhere, a pattern that does not compile, bounds that no value meets.
- An object schema that lists ``properties`` and says nothing of ``additionalProperties`` gets no
  other properties, as llama.cpp's converter and OpenAI's strict mode do (JSON Schema's default
  would let a model add any key with any value); ``default_additional_properties=True`` keeps the
  JSON Schema default.
- A number or an integer whose schema leaves a side unbounded gets llama-cpp-python's bound on
  that side: at most 16 digits before the point (``|x| < 10**16``; a number's bound is the
  nearest double, 1e16), so a model cannot write digits until ``max_tokens`` and leave a reply
  that never parses. A schema's own bounds, wider or narrower, stay as they are. A number
  without ``multipleOf`` is written with at most 10 digits after the point (``multipleOf``
  1e-10 in the grammar: llguidance takes no finer step), and without an exponent.
- Whitespace between JSON tokens is bounded as in llama.cpp's converter (one space, or one or two
  newlines and up to 20 spaces or tabs), so a model cannot stall in it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import unquote

from nexabind import _nesting
from nexabind._llguidance import limits

__all__ = [
    "LLGUIDANCE_PREFIX",
    "MAX_OBJECT_PROPERTIES",
    "MAX_PROPERTIES",
    "MAX_SCHEMA_DEPTH",
    "NUMBER_BOUND",
    "SUPPORTED_FORMATS",
    "UNSUPPORTED_KEYWORDS",
    "to_grammar",
]

LLGUIDANCE_PREFIX = "%llguidance {}"
"""The first line of a grammar in llguidance's Lark form (llama.cpp's convention)."""

# The whitespace between JSON tokens: llama.cpp's SPACE_RULE (common/json-schema-to-grammar.cpp).
WHITESPACE = " |\n{1,2}[ \t]{0,20}"

SUPPORTED_FORMATS = frozenset(
    ["date", "date-time", "duration", "email", "hostname", "ipv4", "ipv6", "time", "uri", "uuid"]
)

# Keywords a grammar cannot enforce (llguidance says "Unimplemented keys"), and what to do instead.
UNSUPPORTED_KEYWORDS: dict[str, str] = {
    "not": "a grammar cannot exclude a sub-schema",
    "if": "conditional schemas are not supported; use anyOf of the cases",
    "then": "conditional schemas are not supported; use anyOf of the cases",
    "else": "conditional schemas are not supported; use anyOf of the cases",
    "uniqueItems": "a grammar cannot compare array items; deduplicate after parsing",
    "contains": "use prefixItems or items to say what the array holds",
    "minContains": "use prefixItems or items to say what the array holds",
    "maxContains": "use prefixItems or items to say what the array holds",
    "propertyNames": "list the properties, or use patternProperties",
    "dependentRequired": "use anyOf of the allowed shapes",
    "dependentSchemas": "use anyOf of the allowed shapes",
    "dependencies": "use anyOf of the allowed shapes",
    "unevaluatedProperties": "use additionalProperties",
    "unevaluatedItems": "use items",
    "$dynamicRef": "use $ref",
    "$dynamicAnchor": "use $ref",
    "$recursiveRef": "use $ref",
    "$recursiveAnchor": "use $ref",
}

#: Sub-schema levels a schema may nest, and properties it may list in all: beyond these a
#: grammar's size (and the time to build it) grows past what a request should cost.
MAX_SCHEMA_DEPTH = 32
MAX_PROPERTIES = 1000
#: Properties one object may list: llguidance's parser has a row of about four items per
#: optional property and stops at 2,000 (a 600-property object fails mid-generation).
MAX_OBJECT_PROPERTIES = 400

_TYPES = frozenset(["array", "boolean", "integer", "null", "number", "object", "string"])
# Keywords whose value is a schema, a list of schemas, or a map of names to schemas.
_ONE = ("additionalProperties", "items", "additionalItems", "contentSchema")
_LIST = ("allOf", "anyOf", "oneOf", "prefixItems")
_MAP = ("properties", "patternProperties", "$defs", "definitions")
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
_RANGES = (
    ("minLength", "maxLength"),
    ("minItems", "maxItems"),
    ("minProperties", "maxProperties"),
    ("minimum", "maximum"),
)


def _bad(path: str, what: str) -> ValueError:
    return ValueError(f"invalid JSON schema at {path}: {what}")


def _pointer(path: str, key: str | int) -> str:
    return f"{path}/{str(key).replace('~', '~0').replace('/', '~1')}"


def load(schema: Any) -> Any:
    """Return ``schema`` (a mapping, a boolean, or its JSON text) as a fresh JSON value.

    Raises:
        ValueError: The text is not JSON (with line and column), or the value is not one
            that JSON can hold.
        TypeError: ``schema`` is neither a mapping, a boolean nor text.
    """
    if isinstance(schema, (str, bytes, bytearray)):
        try:
            return _nesting.loads(schema, what="the JSON schema")
        except json.JSONDecodeError as e:
            msg = f"the JSON schema is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"
            raise ValueError(msg) from None
    if isinstance(schema, (bool, Mapping)):
        if _nesting.deeper_than(dict(schema) if isinstance(schema, Mapping) else schema):
            msg = f"the JSON schema nests arrays and objects more than {_nesting.MAX_DEPTH} deep"
            raise ValueError(msg)
        try:
            return json.loads(json.dumps(schema, allow_nan=False))
        except (TypeError, ValueError, RecursionError) as e:
            msg = f"the JSON schema holds a value JSON cannot: {e}"
            raise ValueError(msg) from None
    msg = (
        f"a JSON schema is a dict, a bool or JSON text, not {type(schema).__name__}; "
        "e.g. {'type': 'object', 'properties': {...}}"
    )
    raise TypeError(msg)


def _subschemas(node: dict[str, Any], path: str) -> Iterator[tuple[str, str, Any]]:
    """Yield (keyword, path, sub-schema) for every schema-valued keyword of ``node``."""
    for key in _ONE:
        if key in node:
            value = node[key]
            if key == "items" and isinstance(value, list):  # draft 7 tuples
                for i, sub in enumerate(value):
                    yield key, _pointer(_pointer(path, key), i), sub
            else:
                yield key, _pointer(path, key), value
    for key in _LIST:
        if key in node:
            value = node[key]
            if not isinstance(value, list) or (key != "prefixItems" and not value):
                raise _bad(_pointer(path, key), f"{key} must be a non-empty array of schemas")
            for i, sub in enumerate(value):
                yield key, _pointer(_pointer(path, key), i), sub
    for key in _MAP:
        if key in node:
            value = node[key]
            if not isinstance(value, dict):
                raise _bad(_pointer(path, key), f"{key} must be an object of schemas")
            for name, sub in value.items():
                yield key, _pointer(_pointer(path, key), name), sub


class _Checker:
    """One walk over the schema: validity, supported keywords, references, patterns."""

    def __init__(self, root: Any, lenient: bool) -> None:
        self.root = root
        self.lenient = lenient
        self.anchors: set[str] = set()
        self.ids: set[str] = set()
        self.refs: list[tuple[str, str]] = []
        self.one_of: list[str] = []
        self.patterns: list[tuple[str, str]] = []
        self.n_properties = 0
        # Edges between schemas that produce no text of their own on the way: a $ref to its
        # target, an allOf/anyOf/oneOf to its members. A cycle of them generates nothing.
        self.empty_edges: dict[str, list[str]] = {}

    def walk(self, node: Any, path: str, depth: int = 0) -> None:
        if depth > MAX_SCHEMA_DEPTH:
            msg = (
                f"the JSON schema nests sub-schemas more than {MAX_SCHEMA_DEPTH} deep (at "
                f"{path[:60]}...); the limit is {MAX_SCHEMA_DEPTH}"
            )
            raise ValueError(msg)
        if isinstance(node, bool):
            return
        if not isinstance(node, dict):
            kind = type(node).__name__
            raise _bad(path, f"a schema must be an object or a boolean, got {kind} {node!r}")
        if node.get("uniqueItems") is False:
            del node["uniqueItems"]  # no constraint, and llguidance refuses the keyword
        if not self.lenient:
            for key in node:
                if key in UNSUPPORTED_KEYWORDS:
                    msg = (
                        f"the JSON schema keyword {key!r} at {path} is not supported: "
                        f"{UNSUPPORTED_KEYWORDS[key]}"
                    )
                    raise ValueError(msg)
        self._check_values(node, path)
        props = node.get("properties")
        if isinstance(props, dict) and len(props) > MAX_OBJECT_PROPERTIES:
            msg = (
                f"the JSON schema's object at {path[:60]} lists {len(props)} properties; the "
                f"limit is {MAX_OBJECT_PROPERTIES} per object (llguidance's parser cannot "
                "follow more at once)"
            )
            raise ValueError(msg)
        self.n_properties += len(props) if isinstance(props, dict) else 0
        if self.n_properties > MAX_PROPERTIES:
            msg = (
                f"the JSON schema lists more than {MAX_PROPERTIES} properties in all (at "
                f"{path}); the limit is {MAX_PROPERTIES}"
            )
            raise ValueError(msg)
        for key, sub_path, sub in _subschemas(node, path):
            if key in ("allOf", "anyOf", "oneOf"):
                self.empty_edges.setdefault(path, []).append(sub_path)
            self.walk(sub, sub_path, depth + 1)

    def _check_values(self, node: dict[str, Any], path: str) -> None:
        if "type" in node:
            t = node["type"]
            names = t if isinstance(t, list) else [t]
            if (
                not names
                or not all(isinstance(n, str) and n in _TYPES for n in names)
                or len(set(names)) < len(names)
            ):
                raise _bad(
                    _pointer(path, "type"),
                    f"type {t!r} is not one of {sorted(_TYPES)} (or a list of distinct ones)",
                )
        if "enum" in node and (not isinstance(node["enum"], list) or not node["enum"]):
            raise _bad(_pointer(path, "enum"), "enum must be a non-empty array of values")
        req = node.get("required", [])
        if not isinstance(req, list) or not all(isinstance(r, str) for r in req):
            raise _bad(_pointer(path, "required"), f"required must be an array of names: {req!r}")
        for key in _COUNTS:
            v = node.get(key, 0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or v != int(v):
                raise _bad(_pointer(path, key), f"{key} must be a non-negative integer, got {v!r}")
        for key in _BOUNDS:
            v = node.get(key, 0)
            if isinstance(v, bool) and key.startswith("exclusive"):
                raise _bad(
                    _pointer(path, key),
                    f"{key}: {json.dumps(v)} is draft 4's form; give the bound itself, "
                    f'e.g. "{key}": 0 instead of "{key[9].lower() + key[10:]}": 0, "{key}": true',
                )
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise _bad(_pointer(path, key), f"{key} must be a number, got {v!r}")
        if node.get("multipleOf", 1) <= 0:
            raise _bad(_pointer(path, "multipleOf"), "multipleOf must be greater than 0")
        for lo, hi in _RANGES:
            if lo in node and hi in node and node[lo] > node[hi]:
                raise _bad(path, f"{lo} {node[lo]} is greater than {hi} {node[hi]}: no value fits")
        if "format" in node:
            fmt = node["format"]
            if fmt not in SUPPORTED_FORMATS:
                msg = (
                    f"the JSON schema format {fmt!r} at {_pointer(path, 'format')} is not "
                    f"supported; supported: {', '.join(sorted(SUPPORTED_FORMATS))} "
                    "(or describe the string with a pattern)"
                )
                raise ValueError(msg)
        if "pattern" in node:
            if not isinstance(node["pattern"], str):
                raise _bad(_pointer(path, "pattern"), "pattern must be a string")
            self.patterns.append((_pointer(path, "pattern"), node["pattern"]))
        for name in node.get("patternProperties", {}):
            self.patterns.append((_pointer(_pointer(path, "patternProperties"), name), name))
        if "$ref" in node:
            if not isinstance(node["$ref"], str):
                raise _bad(_pointer(path, "$ref"), "$ref must be a string")
            self.refs.append((_pointer(path, "$ref"), node["$ref"]))
            if node["$ref"].startswith("#/") or node["$ref"] == "#":
                self.empty_edges.setdefault(path, []).append(unquote(node["$ref"]))
        if isinstance(node.get("$anchor"), str):
            self.anchors.add(node["$anchor"])
        if isinstance(node.get("$id"), str):
            self.ids.add(node["$id"])
        if "oneOf" in node:
            self.one_of.append(_pointer(path, "oneOf"))
        if "minProperties" in node or "maxProperties" in node:
            props = node.get("properties", {})
            if props and set(props) - set(req):
                raise ValueError(
                    f"minProperties/maxProperties at {path} are supported only when every "
                    "listed property is required (or no properties are listed)"
                )

    def check_refs(self) -> None:
        for path, ref in self.refs:
            if ref in self.ids or resolve(self.root, ref, self.anchors) is not None:
                continue
            if not ref.startswith("#") and ref.split("#")[0] not in self.ids:
                msg = (
                    f"the $ref {ref!r} at {path} points outside the schema; only references "
                    "inside it are supported (e.g. '#/$defs/name')"
                )
                raise ValueError(msg)
            raise _bad(path, f"$ref {ref!r} points to nothing in the schema")
        cycle = _cycle(self.empty_edges)
        if cycle:
            msg = (
                f"invalid JSON schema: the $ref cycle {' -> '.join(cycle)} generates nothing "
                "(a schema that refers to itself must nest inside properties or items)"
            )
            raise ValueError(msg)

    def check_patterns(self) -> None:
        from llguidance import LLMatcher

        for path, pattern in self.patterns:
            err = LLMatcher.validate_grammar(LLMatcher.grammar_from_regex(pattern))
            if err:
                # llguidance quotes the regex crate's report; its "error: ..." line says what.
                why = [ln[6:].strip() for ln in err.splitlines() if ln.startswith("error:")]
                reason = why[0] if why else err.strip().splitlines()[0]
                raise _bad(path, f"the pattern {pattern!r} does not compile: {reason}")


def _cycle(edges: Mapping[str, list[str]]) -> list[str]:
    """A cycle in ``edges`` (a path that comes back to its start), or []; without recursion."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in edges:
        if state.get(start):
            continue
        path = [start]
        todo = [iter(edges.get(start, ()))]
        state[start] = 1
        while todo:
            nxt = next(todo[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                todo.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                todo.append(iter(edges.get(nxt, ())))
    return []


def resolve(root: Any, ref: str, anchors: set[str] | frozenset[str] = frozenset()) -> Any:
    """Return what a local ``$ref`` (``#``, ``#/a/b``, ``#anchor``) points to, or None."""
    if not ref.startswith("#"):
        return None
    frag = unquote(ref[1:])
    if frag and not frag.startswith("/"):
        return True if frag in anchors else None
    node = root
    for part in frag.split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _close_objects(node: Any, path: str, open_refs: set[str], in_all_of: bool) -> None:
    """Give object schemas that list properties ``additionalProperties: false``.

    Members of an ``allOf`` (and what they ``$ref``) stay open: each sees only its own
    properties, so closing them would reject the others' keys.
    """
    if not isinstance(node, dict):
        return
    props = node.get("properties")
    if (
        isinstance(props, dict)
        and not in_all_of
        and path not in open_refs
        and "allOf" not in node
        and not {"additionalProperties", "patternProperties", "unevaluatedProperties"} & set(node)
    ):
        for name in node.get("required", []):
            props.setdefault(name, {})  # a required key the schema does not describe: any value
        node["additionalProperties"] = False
    for key, sub_path, sub in _subschemas(node, path):
        _close_objects(sub, sub_path, open_refs, key == "allOf")


#: The default bound of a number's magnitude: 16 digits before the point (llama-cpp-python's
#: ``[1-9] [0-9]{0,15}``).
NUMBER_BOUND = 10**16 - 1
#: The finest step of a number's grammar (digits after the point), where its schema gives none.
NUMBER_STEP = 1e-10
_LOWER = ("minimum", "exclusiveMinimum")
_UPPER = ("maximum", "exclusiveMaximum")


def _bound_numbers(node: Any, path: str) -> None:
    """Give number and integer schemas :data:`NUMBER_BOUND` on each side they leave open."""
    if not isinstance(node, dict):
        return
    types = node.get("type")
    kinds = {types} if isinstance(types, str) else set(types) if isinstance(types, list) else set()
    if kinds & {"integer", "number"} and "const" not in node and "enum" not in node:
        lower = [node[k] for k in _LOWER if isinstance(node.get(k), (int, float))]
        upper = [node[k] for k in _UPPER if isinstance(node.get(k), (int, float))]
        if not lower and not (upper and max(upper) < -NUMBER_BOUND):
            node["minimum"] = -NUMBER_BOUND
        if not upper and not (lower and min(lower) > NUMBER_BOUND):
            node["maximum"] = NUMBER_BOUND
        if "number" in kinds and "multipleOf" not in node:
            node["multipleOf"] = NUMBER_STEP
    for _, sub_path, sub in _subschemas(node, path):
        _bound_numbers(sub, sub_path)


def _all_of_refs(node: Any) -> Iterator[str]:
    """Yield the ``$ref`` of every ``allOf`` member, at any depth."""
    if isinstance(node, dict):
        for member in node.get("allOf", []) if isinstance(node.get("allOf"), list) else []:
            if isinstance(member, dict) and isinstance(member.get("$ref"), str):
                yield unquote(member["$ref"])
        for value in node.values():
            yield from _all_of_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _all_of_refs(value)


def _prepare(schema: Any, default_additional_properties: bool) -> tuple[Any, _Checker]:
    """Return a checked copy of ``schema`` ready for llguidance, and what the check found.

    Raises:
        ValueError: The schema is not valid JSON Schema, or uses what a grammar cannot
            enforce; the message names the keyword and its JSON pointer.
        TypeError: ``schema`` is not a mapping, a boolean or JSON text.
    """
    root = load(schema)
    if root is False:
        msg = "the JSON schema is false, which no value matches"
        raise ValueError(msg)
    options = root.get("x-guidance", {}) if isinstance(root, dict) else {}
    if not isinstance(options, dict):
        msg = f'the JSON schema\'s "x-guidance" must be an object of options, not {options!r:.60}'
        raise ValueError(msg)
    checker = _Checker(root, lenient=bool(options.get("lenient")))
    checker.walk(root, "#")
    checker.check_refs()
    if not isinstance(root, dict):
        root = {}
    if not default_additional_properties:
        open_refs = {"#" + r[1:] for r in _all_of_refs(root) if r.startswith("#")}
        _close_objects(root, "#", open_refs, in_all_of=False)
    _bound_numbers(root, "#")
    root["x-guidance"] = {"whitespace_flexible": True, "whitespace_pattern": WHITESPACE, **options}
    return root, checker


def to_grammar(schema: Any, *, default_additional_properties: bool = False) -> str:
    """Return the llguidance grammar (Lark form) that generates JSON valid under ``schema``.

    Args:
        schema: A JSON schema: a dict, a bool, or its JSON text.
        default_additional_properties: What an object that lists ``properties`` but says
            nothing of ``additionalProperties`` allows besides them: False (no other keys,
            as llama.cpp's converter) or True (any, as JSON Schema says).

    Raises:
        ValueError: The schema is not valid JSON Schema, or uses a keyword a grammar cannot
            enforce; the message names the keyword and where it is (a JSON pointer).
        TypeError: ``schema`` is not a mapping, a boolean or JSON text.
    """
    from llguidance import LLMatcher

    root, checker = _prepare(schema, default_additional_properties)
    grammar = f"{LLGUIDANCE_PREFIX}\nstart: %json {json.dumps(root, ensure_ascii=False)}"
    err = LLMatcher.validate_grammar(grammar, limits=limits())
    if err:
        checker.check_patterns()  # a pattern that does not compile, said with its place
        raise ValueError(_explain(err, checker.one_of))
    return grammar


def _explain(err: str, one_of: list[str]) -> str:
    """llguidance's message, with where when it can be told."""
    first = err.strip().splitlines()[0]
    first = re.sub(r"^at \d+\(\d+\): (failed to compile JSON schema: )?", "", first)
    if "oneOf" in first and one_of:
        return (
            f"oneOf at {', '.join(one_of)}: its alternatives overlap (a value can match more "
            "than one), which a grammar cannot rule out; use anyOf if any match will do"
        )
    return f"the JSON schema cannot be turned into a grammar: {first}"
