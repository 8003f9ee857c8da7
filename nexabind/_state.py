"""A saved ``Llama`` state (:class:`LlamaState`, llama-cpp-python's class) and its byte format:
the tokens in the KV cache, then llama.cpp's blob.

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
from typing import Any

from nexabind.errors import StateError

__all__ = ["LlamaState", "pack", "unpack"]

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
        msg = "not a nexabind state (bad header); use Llama.save_state() or its bytes"
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


class LlamaState:
    """A ``Llama``'s context saved by ``save_state()``: llama-cpp-python's class and fields.

    Attributes:
        input_ids: The context's token slots (int32, ``n_ctx`` long; the first ``n_tokens``
            are in the KV cache).
        scores: The logits after each of those tokens, ``(n_tokens, n_vocab)`` float32, when
            the Llama records them (``logits_all=True``); else no rows.
        n_tokens: Tokens in the KV cache.
        llama_state: llama.cpp's state (``llama_state_get_data``).
        llama_state_size: Its size in bytes.
        seed: The Llama's seed when it was saved (None: random per call).

    ``bytes(state)`` is the checked byte format of this module (what ``save_state(path)``
    writes); :meth:`from_bytes` reads it back. A state pickles.
    """

    def __init__(
        self,
        input_ids: Any,
        scores: Any,
        n_tokens: int,
        llama_state: bytes,
        llama_state_size: int,
        seed: int | None,
    ) -> None:
        self.input_ids = input_ids
        self.scores = scores
        self.n_tokens = n_tokens
        self.llama_state = llama_state
        self.llama_state_size = llama_state_size
        self.seed = seed

    def tokens(self) -> array[int]:
        """The tokens in the KV cache."""
        return array("i", [int(t) for t in self.input_ids[: self.n_tokens]])

    def __bytes__(self) -> bytes:
        return pack(self.tokens(), self.llama_state)

    @classmethod
    def from_bytes(cls, data: bytes, n_ctx: int | None = None) -> LlamaState:
        """Read the byte format (see :func:`unpack`; raises ``StateError`` the same way).

        Args:
            data: What ``bytes(state)`` returned.
            n_ctx: Refuse a state of more tokens (None: any).
        """
        import numpy as np

        toks, payload = unpack(data, (1 << 32) if n_ctx is None else n_ctx)
        ids = np.asarray(toks, dtype=np.intc)
        return cls(ids, np.zeros((0, 0), np.float32), len(toks), payload, len(payload), None)

    def __repr__(self) -> str:
        return f"<LlamaState {self.n_tokens} tokens, {self.llama_state_size} bytes>"
