"""``Batch``: a reusable ``llama_batch``, allocated once and freed by ``close()`` or the GC."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nexabind._ffi import ffi
from nexabind.lowlevel._lib import lib


class Batch:
    """A reusable ``llama_batch`` of up to ``capacity`` tokens, allocated once.

    Args:
        capacity: Maximum number of tokens.
        n_seq_max: Maximum sequences a token may belong to.

    Raises:
        ValueError: ``capacity`` is below 1.
        MemoryError: llama.cpp could not allocate the batch.
    """

    def __init__(self, capacity: int, n_seq_max: int = 1) -> None:
        L = lib()
        if capacity < 1:
            msg = f"batch capacity must be >= 1, got {capacity}"
            raise ValueError(msg)
        self.capacity = capacity
        raw = L.llama_batch_init(capacity, 0, n_seq_max)
        if raw.token == ffi.NULL:
            msg = f"llama.cpp could not allocate a batch of {capacity} tokens"
            raise MemoryError(msg)
        # The struct lives in memory of ours; llama_batch_free frees the arrays it points to,
        # when close() releases the holder or, as a backstop, when the holder is collected.
        self._struct = ffi.new("struct llama_batch *", raw)
        free = L.llama_batch_free
        self._holder: Any = ffi.gc(self._struct, lambda h: free(h[0]))
        self.b = self._struct[0]

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._holder is None

    def close(self) -> None:
        """Free the batch; safe to call more than once."""
        if self._holder is not None:
            ffi.release(self._holder)
            self._holder = None
            self.b.n_tokens = 0

    def _room(self, n: int) -> None:
        if self._holder is None:
            msg = "the batch is closed"
            raise ValueError(msg)
        if not 0 < n <= self.capacity:
            what = "no tokens" if n == 0 else f"{n} tokens"
            msg = f"a batch of {self.capacity} tokens cannot take {what}; give 1..{self.capacity}"
            raise ValueError(msg)

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
        n = len(tokens)
        self._room(n)
        b = self.b
        tok, pos, nseq, sid, lg = b.token, b.pos, b.n_seq_id, b.seq_id, b.logits
        for i in range(n):
            tok[i] = tokens[i]
            pos[i] = pos0 + i
            nseq[i] = 1
            sid[i][0] = seq_id
            lg[i] = not logits_last
        lg[n - 1] = True
        b.n_tokens = n

    def set_array(self, tokens: Any, pos0: int, *, seq_id: int = 0) -> None:
        """Fill the batch from an int32 buffer (numpy int32, ``array('i')``) in one copy.

        Only the last token requests logits.

        Raises:
            ValueError: No tokens, or more than ``capacity``.
        """
        src = ffi.from_buffer("llama_token[]", tokens)
        n = len(src)
        self._room(n)
        b = self.b
        ffi.memmove(b.token, src, 4 * n)
        pos, nseq, sid, lg = b.pos, b.n_seq_id, b.seq_id, b.logits
        for i in range(n):
            pos[i] = pos0 + i
            nseq[i] = 1
            sid[i][0] = seq_id
            lg[i] = False
        lg[n - 1] = True
        b.n_tokens = n

    def clear(self) -> None:
        """Empty the batch before :meth:`add`."""
        self.b.n_tokens = 0

    def add(self, token: int, pos: int, seq_id: int = 0, logits: bool = False) -> None:
        """Append one token (e.g. several sequences in one decode for embeddings).

        Raises:
            ValueError: The batch is full.
        """
        b = self.b
        i = b.n_tokens
        if i >= self.capacity or self._holder is None:
            msg = f"the batch is full ({self.capacity} tokens)" if i else "the batch is closed"
            raise ValueError(msg)
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq_id
        b.logits[i] = logits
        b.n_tokens = i + 1

    def set_one(self, token: int, pos: int, seq_id: int = 0) -> None:
        """Fill the batch with a single token that requests logits (the generation step)."""
        self._room(1)
        b = self.b
        b.token[0] = token
        b.pos[0] = pos
        b.n_seq_id[0] = 1
        b.seq_id[0][0] = seq_id
        b.logits[0] = True
        b.n_tokens = 1
