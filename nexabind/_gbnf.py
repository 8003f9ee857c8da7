"""GBNF checked without a model: llama.cpp's grammar parser mirrored in Python.

:func:`check_gbnf` follows ``llama_grammar_parser::parse`` and the checks of
``llama_grammar_init_impl`` (src/llama-grammar.cpp) far enough to tell a grammar llama.cpp
accepts from one it refuses (syntax, undefined rules, the start rule, repetition bounds, left
recursion), and says where a bad one fails with the line, the column and a caret. It builds no
grammar: llama.cpp's grammar sampler runs the text (:mod:`nexabind.grammar`).
"""

from __future__ import annotations

__all__ = ["check_gbnf"]

_MAX_REPETITIONS = 2000  # MAX_REPETITION_THRESHOLD in llama.cpp's src/llama-grammar.cpp


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
