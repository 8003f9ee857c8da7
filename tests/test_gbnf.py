"""The GBNF checker (nexabind._gbnf): it accepts what llama.cpp's parser accepts and refuses
what it refuses, saying where; each grammar is also given to llama.cpp's own grammar sampler.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from nexabind import lowlevel
from nexabind.grammar import LlamaGrammar, check_gbnf


@pytest.fixture(scope="module")
def model(libdir: Path, tiny_model: Path) -> Iterator[lowlevel.Model]:
    lowlevel.lib(libdir)
    with lowlevel.Model(tiny_model) as m:
        yield m


GOOD_GBNF = [
    'root ::= "a"',
    'root ::= x+ "!"\nx ::= [a-z] | "-"',
    "root ::= ( # comment\n  [0-9]{2,3}\n  | [^\\n\\x00]? )\n",
    'root ::= "\\u00e9" "\\U0001F600" [\\]\\-\\\\]',
    'root   ::=   item{1,}   \r\nitem ::= "x" # trailing comment',
    'root ::= a\na ::= b? "1"\nb ::= "0"',
]
BAD_GBNF = [
    ('root ::= "a', "unexpected end of input at line 1, column 12"),
    ('root = "a"', "expecting '::=' at line 1, column 6"),
    ("root ::= foo", "undefined rule 'foo' at line 1, column 10"),
    ('expr ::= "x"', "no 'root' rule"),
    ('root ::= root "a" | "b"', "rule 'root' is left-recursive"),
    ('root ::= a\na ::= b? a "x"\nb ::= "y"', "rule 'a' is left-recursive"),
    ("root ::= [a-z", "unexpected end of input"),
    ('root ::= "a" )', "expecting a newline or the end at line 1, column 14"),
    ('root ::= ("a"', "expecting ')' at line 1, column 14"),
    ("root ::= *", "expecting an item before the repetition at line 1, column 10"),
    ('root ::= "\\x4"', "expecting 2 hex digits after \\x at line 1, column 11"),
    ('root ::= "\\q"', "unknown escape \\q"),
    ('root ::= "a"{x}', "expecting an integer after '{' at line 1, column 14"),
    ('root ::= "a"{2001}', "more than 2000 repetitions"),
    ('\n\nroot ::= ("a"\n  | b)', "undefined rule 'b' at line 4, column 5"),
    ('root ::= "a"\n  | "b"', "expecting a rule name at line 2, column 3"),
    ("# only a comment\n", "the grammar is empty"),
]


def test_gbnf_files_of_llama_cpp_parse(llama_source: Path) -> None:
    files = sorted((llama_source / "grammars").glob("*.gbnf"))
    assert files
    for f in files:
        g = LlamaGrammar.from_file(f)
        assert g.engine == "gbnf" and g._grammar == f.read_text() and g._root == "root"


@pytest.mark.parametrize("text", GOOD_GBNF)
def test_good_gbnf_parses_here_and_in_llama_cpp(model: lowlevel.Model, text: str) -> None:
    check_gbnf(text)
    with lowlevel.SamplerChain() as chain:
        chain.add_grammar(model, text)


@pytest.mark.parametrize(("text", "fragment"), BAD_GBNF)
def test_bad_gbnf_is_refused_here_and_in_llama_cpp(
    model: lowlevel.Model, text: str, fragment: str
) -> None:
    with pytest.raises(ValueError) as e:
        LlamaGrammar.from_string(text)
    assert fragment in str(e.value)
    with lowlevel.SamplerChain() as chain, pytest.raises(ValueError):
        chain.add_grammar(model, text)


def test_gbnf_error_shows_the_line_and_a_caret() -> None:
    with pytest.raises(ValueError) as e:
        check_gbnf('root ::= item\nitem ::= "a" |\n  [b-')
    assert str(e.value).endswith("at line 3, column 6\n      [b-\n         ^")


def test_gbnf_repetition_that_llama_cpp_cannot_bound_is_refused() -> None:
    # {3,1}: llama.cpp would count its optional copies down from 1 - 3 as an unsigned number.
    with pytest.raises(ValueError, match="the maximum 1 is below the minimum 3"):
        LlamaGrammar.from_string('root ::= "a"{3,1}')
