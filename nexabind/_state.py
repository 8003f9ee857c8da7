"""The byte format of a saved ``Llama`` state: the tokens in the KV cache, then llama.cpp's blob.

::

    b"NXBSTAT1" | uint32 n (little-endian) | n x int32 tokens (little-endian) | llama.cpp state
"""

from __future__ import annotations

import struct
import sys
from array import array

from nexabind.errors import StateError

__all__ = ["pack", "unpack"]

_MAGIC = b"NXBSTAT1"
_HEAD = len(_MAGIC) + 4


def pack(tokens: array[int], payload: bytes) -> bytes:
    """Return the state blob of ``tokens`` (int32) and llama.cpp's ``payload``."""
    toks = array("i", tokens)
    if sys.byteorder == "big":
        toks.byteswap()
    return _MAGIC + struct.pack("<I", len(toks)) + toks.tobytes() + payload


def unpack(data: bytes, n_ctx: int) -> tuple[array[int], bytes]:
    """Split a state blob into its tokens and llama.cpp's payload.

    Args:
        data: What :func:`pack` returned.
        n_ctx: Cells of the context it is for; a state holding more tokens is refused.

    Raises:
        StateError: Not a state blob, cut short, or larger than the context.
    """
    if not data.startswith(_MAGIC) or len(data) < _HEAD:
        msg = "not a nexabind state (bad header); use bytes from Llama.save_state()"
        raise StateError(msg)
    (n,) = struct.unpack_from("<I", data, len(_MAGIC))
    end = _HEAD + 4 * n
    if len(data) < end:
        msg = f"the state is cut short ({len(data)} bytes for {n} tokens); save it again"
        raise StateError(msg)
    if n > n_ctx:
        msg = (
            f"the state holds {n} tokens but this context holds {n_ctx}; load it into "
            "a Llama with the same n_ctx as the one that saved it"
        )
        raise StateError(msg)
    toks = array("i", data[_HEAD:end])
    if sys.byteorder == "big":
        toks.byteswap()
    return toks, bytes(data[end:])
