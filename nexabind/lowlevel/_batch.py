"""``Batch``: a reusable ``llama_batch`` whose arrays are ours, filled in bulk."""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from functools import cached_property
from typing import Any

from nexabind._ffi import ffi
from nexabind.lowlevel._lib import lib


class Batch:
    """A reusable ``llama_batch`` of up to ``capacity`` tokens, allocated once.

    The token, position, sequence and logits arrays are allocated here (cffi owns and frees
    them), and a chunk of a prompt goes in with a few ``memmove`` copies (numpy views of the
    arrays are there for callers that want them). Each token belongs to one sequence.

    Args:
        capacity: Maximum number of tokens.
        n_seq_max: Kept for the signature of llama.cpp's ``llama_batch_init``; one sequence
            per token is what this batch fills.

    Raises:
        ValueError: ``capacity`` is below 1.
    """

    def __init__(self, capacity: int, n_seq_max: int = 1) -> None:
        lib()  # the struct's layout was checked against the library when it loaded
        if capacity < 1:
            msg = f"batch capacity must be >= 1, got {capacity}"
            raise ValueError(msg)
        del n_seq_max
        self.capacity = capacity
        n = capacity
        self._arrays: Any = (
            ffi.new("llama_token[]", n),
            ffi.new("llama_pos[]", n),
            ffi.new("int32_t[]", n),
            ffi.new("llama_seq_id[]", n),
            ffi.new("llama_seq_id *[]", n),
            ffi.new("int8_t[]", n),
        )
        token, pos, n_seq, seq, seq_ptr, logits = self._arrays
        for i in range(n):
            seq_ptr[i] = seq + i
        self._struct = ffi.new("struct llama_batch *")
        self.b = b = self._struct[0]
        b.token, b.pos, b.n_seq_id, b.seq_id, b.logits = token, pos, n_seq, seq_ptr, logits
        b.embd = ffi.NULL
        ffi.memmove(n_seq, array("i", [1]) * n, 4 * n)
        self._open = True

    # numpy views for callers that index the arrays; made on first use, so that a Llama that
    # never asks for them does not import numpy (most of a first Llama(...)'s Python time).
    def _view(self, i: int, dtype: str) -> Any:
        import numpy as np

        return np.frombuffer(ffi.buffer(self._arrays[i]), dtype=dtype)

    @cached_property
    def tokens(self) -> Any:
        """int32 view of the token ids (the first ``n_tokens`` are in the batch)."""
        return self._view(0, "int32")

    @cached_property
    def positions(self) -> Any:
        """int32 view of the positions."""
        return self._view(1, "int32")

    @cached_property
    def seq_ids(self) -> Any:
        """int32 view of each token's sequence."""
        return self._view(3, "int32")

    @cached_property
    def logits(self) -> Any:
        """int8 view: 1 where llama.cpp computes logits for the token."""
        return self._view(5, "int8")

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return not self._open

    @property
    def n_tokens(self) -> int:
        """Tokens in the batch."""
        return int(self.b.n_tokens)

    def close(self) -> None:
        """Empty the batch for good; its memory goes with the object. Safe to call twice."""
        self._open = False
        self.b.n_tokens = 0

    def _room(self, at: int, n: int) -> None:
        if not self._open:
            msg = "the batch is closed"
            raise ValueError(msg)
        if n < 1 or at + n > self.capacity:
            what = "no tokens" if n < 1 else f"{n} tokens after {at}"
            msg = f"a batch of {self.capacity} tokens cannot take {what}"
            raise ValueError(msg)

    def append(self, tokens: Any, pos0: int, seq_id: int = 0, *, logits_last: bool = True) -> int:
        """Append ``tokens`` (a sequence or an int32 buffer) at positions ``pos0..``.

        Args:
            tokens: Token ids.
            pos0: Position of the first one.
            seq_id: Their sequence.
            logits_last: Ask for logits of the last one (none of the others).

        Returns:
            The batch index of the last token appended (where its logits will be).

        Raises:
            ValueError: No tokens, more than the batch has room for, or the batch is closed.
        """
        at = self.b.n_tokens
        n = len(tokens)
        self._room(at, n)
        end = at + n
        token, pos, _, seq, _, logits = self._arrays
        ffi.memmove(token + at, _int32(tokens), 4 * n)
        ffi.memmove(pos + at, array("i", range(pos0, pos0 + n)), 4 * n)
        ffi.memmove(seq + at, array("i", [seq_id]) * n, 4 * n)
        ffi.memmove(logits + at, bytes(n), n)
        if logits_last:
            logits[end - 1] = 1
        self.b.n_tokens = end
        return end - 1

    def set(
        self, tokens: Sequence[int], pos0: int, *, seq_id: int = 0, logits_last: bool = True
    ) -> None:
        """Fill the batch with ``tokens`` at positions ``pos0..`` in sequence ``seq_id``.

        Args:
            tokens: Token ids (1 to ``capacity``).
            pos0: Position of the first token.
            seq_id: Sequence id.
            logits_last: Request logits for the last token only (else for every token).

        Raises:
            ValueError: No tokens, or more than ``capacity``.
        """
        self.b.n_tokens = 0
        self.append(tokens, pos0, seq_id)
        if not logits_last:
            ffi.memmove(self._arrays[5], b"\x01" * self.b.n_tokens, self.b.n_tokens)

    def set_array(self, tokens: Any, pos0: int, *, seq_id: int = 0) -> None:
        """Fill the batch from an int32 buffer (numpy int32, ``array('i')``); only the last
        token requests logits.

        Raises:
            ValueError: No tokens, or more than ``capacity``.
        """
        self.b.n_tokens = 0
        self.append(tokens, pos0, seq_id)

    def clear(self) -> None:
        """Empty the batch before :meth:`add` / :meth:`append`."""
        self.b.n_tokens = 0

    def add(self, token: int, pos: int, seq_id: int = 0, logits: bool = False) -> int:
        """Append one token; return its batch index.

        Raises:
            ValueError: The batch is full or closed.
        """
        b = self.b
        i = b.n_tokens
        if i >= self.capacity or not self._open:
            msg = (
                f"the batch is full ({self.capacity} tokens)"
                if self._open
                else "the batch is closed"
            )
            raise ValueError(msg)
        b.token[i] = token
        b.pos[i] = pos
        b.seq_id[i][0] = seq_id
        b.logits[i] = logits
        b.n_tokens = i + 1
        return i

    def set_one(self, token: int, pos: int, seq_id: int = 0) -> None:
        """Fill the batch with a single token that requests logits (the generation step)."""
        self._room(0, 1)
        b = self.b
        b.token[0] = token
        b.pos[0] = pos
        b.seq_id[0][0] = seq_id
        b.logits[0] = True
        b.n_tokens = 1


def _int32(tokens: Any) -> Any:
    """``tokens`` as a buffer of C ints: an int32 buffer as it is, anything else converted."""
    try:
        view = memoryview(tokens)
    except TypeError:
        return array("i", tokens)
    if view.format in ("i", "=i", "<i") and view.itemsize == 4 and view.c_contiguous:
        return view
    return array("i", view.tolist())
