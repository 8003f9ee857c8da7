"""The byte format of a saved ``Llama`` state: the tokens in the KV cache, then llama.cpp's blob.

::

    b"NXBSTAT2"
    uint32 n          tokens in the KV cache
    uint64 size       bytes of llama.cpp's state
    uint32 crc32      of the tokens and the state
    n x int32         the tokens
    size bytes        llama.cpp's state (llama_state_get_data)

All integers little-endian. A blob that is cut short, has bytes added, or was altered anywhere
after the header is refused before llama.cpp sees it.
"""

from __future__ import annotations

import struct
import sys
import zlib
from array import array

from nexabind.errors import StateError

__all__ = ["pack", "unpack"]

_MAGIC = b"NXBSTAT2"
_HEADER = struct.Struct("<8sIQI")


def _le(tokens: array[int]) -> bytes:
    toks = array("i", tokens)
    if sys.byteorder == "big":
        toks.byteswap()
    return toks.tobytes()


def pack(tokens: array[int], payload: bytes) -> bytes:
    """Return the state blob of ``tokens`` (int32) and llama.cpp's ``payload``."""
    toks = _le(tokens)
    crc = zlib.crc32(payload, zlib.crc32(toks))
    return _HEADER.pack(_MAGIC, len(tokens), len(payload), crc) + toks + payload


def unpack(data: bytes, n_ctx: int) -> tuple[array[int], bytes]:
    """Check a state blob and split it into its tokens and llama.cpp's payload.

    Args:
        data: What :func:`pack` returned.
        n_ctx: Cells of the context it is for; a state holding more tokens is refused.

    Raises:
        StateError: Not a state blob, cut short or extended, altered, or larger than the
            context.
    """
    head = bytes(data[: len(_MAGIC)])
    if head != _MAGIC and not (len(head) < len(_MAGIC) and _MAGIC.startswith(head)):
        msg = "not a nexabind state (bad header); use bytes from Llama.save_state()"
        raise StateError(msg)
    if len(data) < _HEADER.size:
        msg = f"the state is cut short ({len(data)} bytes, less than its header); save it again"
        raise StateError(msg)
    _, n, size, crc = _HEADER.unpack_from(data)
    want = _HEADER.size + 4 * n + size
    if len(data) != want:
        how = "cut short" if len(data) < want else "longer than it says"
        msg = f"the state is {how} ({len(data)} bytes, its header says {want}); save it again"
        raise StateError(msg)
    view = memoryview(data)
    toks_end = _HEADER.size + 4 * n
    if zlib.crc32(view[toks_end:], zlib.crc32(view[_HEADER.size : toks_end])) != crc:
        msg = "the state's checksum does not match: it was altered or damaged; save it again"
        raise StateError(msg)
    if n > n_ctx:
        msg = (
            f"the state holds {n} tokens but this context holds {n_ctx}; load it into "
            "a Llama with the same n_ctx as the one that saved it"
        )
        raise StateError(msg)
    toks = array("i", view[_HEADER.size : toks_end].tobytes())
    if sys.byteorder == "big":
        toks.byteswap()
    return toks, bytes(view[toks_end:])
