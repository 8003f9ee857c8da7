"""How deep JSON values nest, measured without recursion, and JSON text read with a depth limit.

Python's ``json`` reader raises ``RecursionError`` on text nested deeper than the interpreter's
recursion limit, and everything that walks a parsed value recursively (``json.dumps``, a
schema's checks, ``repr``) fails the same way at some depth below it. Values from a client or a
model are measured here first, in a loop, and refused with a ``ValueError`` beyond a limit that
leaves every later step room.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["MAX_DEPTH", "deeper_than", "loads"]

#: How deep a request body, a tool call's arguments or a JSON schema may nest (arrays and
#: objects): far beyond what a real one needs, far within the interpreter's recursion limit.
MAX_DEPTH = 64


def deeper_than(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether arrays and objects nest more than ``limit`` deep in ``value`` (a scalar: 0)."""
    if not isinstance(value, (dict, list)):
        return False
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        items = node.values() if isinstance(node, dict) else node
        depth += 1
        if depth > limit:
            return True
        stack.extend((v, depth) for v in items if isinstance(v, (dict, list)))
    return False


def loads(
    text: str | bytes | bytearray, limit: int = MAX_DEPTH, what: str = "the JSON text"
) -> Any:
    """``json.loads(text)``, refusing what nests more than ``limit`` deep.

    Raises:
        ValueError: The text is not JSON, or nests too deep (the message says which).
    """
    try:
        value = json.loads(text)
    except RecursionError:
        value = None
        deep = True
    else:
        deep = deeper_than(value, limit)
    if deep:
        msg = f"{what} nests arrays and objects more than {limit} deep"
        raise ValueError(msg)
    return value
