"""The package's layers, read from the source: imports only go down, and never in a circle.

Every module of ``nexabind/`` has a layer (DESIGN.md, "Package layout"); a module imports
nexabind modules of its own layer or of layers below, and the imports within one layer form no
circle. Function-local imports and imports under ``TYPE_CHECKING`` count as well: a local
import that dodges a circle is a circle. No module imports names from the package face
(``nexabind/__init__.py``).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

import nexabind

PACKAGE = Path(nexabind.__file__).parent

#: Bottom up. _cdef is generated data that imports nothing; the ABI probe of the build and the
#: manifest's compatibility check read it, so it sits with the ground modules.
LAYERS: dict[str, int] = {
    **dict.fromkeys(
        (
            "errors",
            "pin",
            "platform",
            "targets",
            "settings",
            "_version",
            "_cdef",
            "_gguf",
            "_files",
            "_nesting",
        ),
        0,
    ),
    **dict.fromkeys(
        (
            "manifest",
            "choice",
            "cache",
            "_install_record",
            "_archive",
            "_http",
            "_download",
            "install",
            "_source",
            "_cross",
            "_variants",
        ),
        1,
    ),
    **dict.fromkeys(
        (
            "_fetch",
            "_build",
            "_cmake",
            "_artifact",
            "info",
            "hub",
            "_hub_names",
            "_hub_cache",
            "_hub_pull",
        ),
        2,
    ),
    **dict.fromkeys(("_ffi", "loader", "lowlevel"), 3),
    **dict.fromkeys(
        (
            "sampling",
            "grammar",
            "_gbnf",
            "_llguidance",
            "_json_schema",
            "chat",
            "_sandbox",
            "openai",
            "tokens",
            "_emit",
            "_embed",
            "_state",
            "_hooks",
            "processors",
            "prompt_cache",
            "speculative",
            "tokenizer",
            "llama_types",
            "chat_formats",
            "tool_calls",
            "_chat_plan",
            "_lcp_formats",
            "_function_calling",
            "tinymodel",
        ),
        4,
    ),  # fmt: skip
    **dict.fromkeys(
        (
            "llama",
            "_llama_core",
            "_lcp",
            "_chat_api",
            "_llama_args",
            "_sequence",
            "_probe",
            "_selfcheck",
        ),
        5,
    ),
    **dict.fromkeys(("engine", "_tasks", "_scheduler", "_slots", "doctor"), 6),
    "backends": 7,
    "server": 9,
    **dict.fromkeys(("cli", "cli_models", "cli_serve", "repl", "__main__"), 10),
}

#: The layers whose modules import nexabind modules at the top only.
TOP_ONLY = (0, 1, 2)


def _module(path: Path) -> str:
    """``nexabind/lowlevel/_lib.py`` -> ``lowlevel`` (a subpackage is one module here)."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """The nexabind modules ``path`` imports: (module, line, at module top)."""
    tree = ast.parse(path.read_text(), str(path))
    top = set()
    for node in tree.body:  # module level, and TYPE_CHECKING blocks at module level
        top.add(id(node))
        if isinstance(node, ast.If):
            top.update(id(n) for n in node.body)
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "nexabind":  # from nexabind import cache, pin
                names = [f"nexabind.{a.name}" for a in node.names]
            else:
                names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "nexabind" and len(parts) > 1:
                found.append((parts[1], node.lineno, id(node) in top))
    return found


Import = tuple[str, int, bool]  # file, line, at module top


@functools.cache
def _graph() -> dict[str, dict[str, list[Import]]]:
    """module -> imported module -> every import of it."""
    graph: dict[str, dict[str, list[Import]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__init__.py" and path.parent == PACKAGE:
            continue  # the package face
        edges = graph.setdefault(_module(path), {})
        for target, line, top in _imports(path):
            if target != _module(path):
                edges.setdefault(target, []).append((str(path.relative_to(PACKAGE)), line, top))
    return graph


def test_every_module_has_a_layer() -> None:
    missing = sorted(set(_graph()) - set(LAYERS))
    assert not missing, f"place {missing} in a layer of DESIGN.md and in LAYERS here"


def test_imports_go_down_or_stay_in_their_layer() -> None:
    up = [
        f"{where}:{line}: {module} (layer {LAYERS[module]}) imports {target} "
        f"(layer {LAYERS.get(target, '?')})"
        for module, edges in _graph().items()
        for target, imports in edges.items()
        for where, line, _ in imports
        if target not in LAYERS or LAYERS[target] > LAYERS[module]
    ]
    assert not up, "\n".join(up)


def test_no_module_imports_names_from_the_package_face() -> None:
    submodules = set(_graph())
    face = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "nexabind" and node.level == 0:
                face += [
                    f"{path.relative_to(PACKAGE)}:{node.lineno}: from nexabind import {a.name}"
                    for a in node.names
                    if a.name not in submodules
                ]
    assert not face, "\n".join(face)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle() -> None:
    graph = {m: set(edges) for m, edges in _graph().items()}
    circle = _cycle(graph)
    assert circle is None, " -> ".join(circle or [])


def test_the_circle_check_finds_circles() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


@pytest.mark.parametrize("layer", TOP_ONLY)
def test_nexabind_imports_are_at_module_top(layer: int) -> None:
    local = [
        f"{where}:{line}: {module} imports {target} inside a function"
        for module, edges in _graph().items()
        if LAYERS.get(module) == layer
        for target, imports in edges.items()
        for where, line, top in imports
        if not top
    ]
    assert not local, "\n".join(local)
