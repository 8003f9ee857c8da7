"""What a decode produced: logits and embeddings as read-only numpy views over llama.cpp's
memory (:class:`ContextOutputs`, a part of :class:`~nexabind.lowlevel.Context`), and
:class:`LogitsView`, logits that refuse to be read once a later decode overwrote them."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from nexabind._ffi import ffi
from nexabind.errors import ContextError, DecodeError
from nexabind.lowlevel._lib import nonnull
from nexabind.lowlevel._limits import check_seq
from nexabind.lowlevel._model import Model
from nexabind.lowlevel._owned import Owned

if TYPE_CHECKING:
    import numpy as np


class ContextOutputs(Owned):
    """The logits and embeddings calls of :class:`~nexabind.lowlevel.Context` (which sets the
    attributes declared here)."""

    lock: threading.RLock
    _lib: Any
    _get_logits_ith: Any
    model: Model
    n_vocab: int
    n_seq_max: int
    generation: int

    def logits(self, i: int = -1) -> np.ndarray:
        """Return a read-only float32 view of the logits of batch token ``i`` (default: last).

        The view aliases llama.cpp memory and is only valid until the next decode; use
        :class:`LogitsView` through :meth:`logits_view` to detect stale use.
        """
        import numpy as np

        with self.lock:
            ptr = nonnull(
                self._get_logits_ith(self._check(), i),
                DecodeError,
                f"no logits for output {i}; request logits for that token in the batch",
            )
        arr = np.frombuffer(ffi.buffer(ptr, 4 * self.n_vocab), dtype=np.float32)
        arr.flags.writeable = False
        return arr

    def logits_view(self, i: int = -1) -> LogitsView:
        """Return logits that raise when read after the next decode."""
        return LogitsView(self, self.logits(i), self.generation)

    def logits_rows(self, n: int) -> np.ndarray:
        """A read-only ``(n, n_vocab)`` view of the logits of the last decode's ``n`` outputs
        (every token that asked for logits, in batch order); valid until the next decode.

        Raises:
            DecodeError: The last decode produced fewer than ``n`` outputs.
        """
        import numpy as np

        with self.lock:
            ptr = self._check()
            if n < 1 or self._get_logits_ith(ptr, n - 1) == ffi.NULL:
                msg = f"the last decode has fewer than {n} outputs with logits"
                raise DecodeError(msg)
            base = self._lib.llama_get_logits(ptr)
        arr = np.frombuffer(ffi.buffer(base, 4 * n * self.n_vocab), dtype=np.float32)
        arr = arr.reshape(n, self.n_vocab)
        arr.flags.writeable = False
        return arr

    def token_embeddings(self, i: int) -> np.ndarray:
        """A read-only view of the embedding of output ``i`` of the last decode (an embedding
        context without pooling gives one per token).

        Raises:
            DecodeError: Output ``i`` has no embedding.
        """
        import numpy as np

        with self.lock:
            ptr = self._lib.llama_get_embeddings_ith(self._check(), i)
        ptr = nonnull(ptr, DecodeError, f"no embedding for output {i} of the last decode")
        arr = np.frombuffer(ffi.buffer(ptr, 4 * self.model.n_embd), dtype=np.float32)
        arr.flags.writeable = False
        return arr

    def embeddings(self, seq_id: int = 0) -> np.ndarray:
        """Return a read-only view of the pooled embedding of sequence ``seq_id``."""
        import numpy as np

        L = self._lib
        with self.lock:
            ptr = L.llama_get_embeddings_seq(self._check(), check_seq(seq_id, self.n_seq_max))
            if ptr == ffi.NULL:
                ptr = L.llama_get_embeddings_ith(self._ptr, -1)
        ptr = nonnull(ptr, DecodeError, "no embeddings: create the context with embeddings=True")
        arr = np.frombuffer(ffi.buffer(ptr, 4 * self.model.n_embd), dtype=np.float32)
        arr.flags.writeable = False
        return arr


class LogitsView:
    """Logits tied to the decode that produced them; :attr:`array` raises once stale."""

    def __init__(self, ctx: ContextOutputs, arr: np.ndarray, generation: int) -> None:
        self._ctx = ctx
        self._arr = arr
        self._gen = generation

    @property
    def array(self) -> np.ndarray:
        """The zero-copy view. Raises ContextError after the next decode or close."""
        if self._ctx.closed or self._ctx.generation != self._gen:
            msg = (
                "these logits are stale (a later decode or close overwrote them); "
                "copy them with .copy() to keep them"
            )
            raise ContextError(msg)
        return self._arr
