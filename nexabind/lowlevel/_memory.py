"""A context's KV cells and state: clearing, copying and shifting sequences; saving and
restoring the whole state or one sequence's (:class:`ContextMemory`, a part of
:class:`~nexabind.lowlevel.Context`)."""

from __future__ import annotations

import threading
from typing import Any

from nexabind._ffi import ffi
from nexabind.errors import StateError
from nexabind.lowlevel._limits import check_seq
from nexabind.lowlevel._owned import Owned


class ContextMemory(Owned):
    """The KV-cell and state calls of :class:`~nexabind.lowlevel.Context` (which sets the
    attributes declared here)."""

    lock: threading.RLock
    _lib: Any
    n_seq_max: int
    generation: int
    _has_logits: bool

    def _memory(self) -> Any:
        return self._lib.llama_get_memory(self._check())

    def _seq(self, seq_id: int) -> int:
        return check_seq(seq_id, self.n_seq_max)

    def clear(self) -> None:
        """Clear the KV cache (all sequences)."""
        with self.lock:
            self._lib.llama_memory_clear(self._memory(), True)

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        """Remove positions ``[p0, p1)`` of a sequence (-1: open end); False if impossible."""
        with self.lock:
            return bool(self._lib.llama_memory_seq_rm(self._memory(), self._seq(seq_id), p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        """Copy positions ``[p0, p1)`` of sequence ``src`` to ``dst``."""
        with self.lock:
            mem = self._memory()
            self._lib.llama_memory_seq_cp(mem, self._seq(src), self._seq(dst), p0, p1)

    def seq_add(self, seq_id: int, p0: int, p1: int, delta: int) -> None:
        """Shift positions ``[p0, p1)`` of a sequence by ``delta`` (-1 ends: open)."""
        with self.lock:
            self._lib.llama_memory_seq_add(self._memory(), self._seq(seq_id), p0, p1, delta)

    def seq_keep(self, seq_id: int) -> None:
        """Drop every sequence but ``seq_id``."""
        with self.lock:
            self._lib.llama_memory_seq_keep(self._memory(), self._seq(seq_id))

    def seq_pos_max(self, seq_id: int = 0) -> int:
        """Highest position stored for a sequence (-1 when empty)."""
        with self.lock:
            return self._lib.llama_memory_seq_pos_max(self._memory(), self._seq(seq_id))

    def state_get(self) -> bytes:
        """Serialize the context state (KV cache, logits, RNG).

        Raises:
            StateError: llama.cpp wrote fewer bytes than it announced.
        """
        L = self._lib
        with self.lock:
            ptr = self._check()
            size = L.llama_state_get_size(ptr)
            buf = ffi.new("uint8_t[]", size)
            n = L.llama_state_get_data(ptr, buf, size)
        if n == 0 and size:
            msg = f"saving the context state failed ({size} bytes announced)"
            raise StateError(msg)
        return ffi.unpack(ffi.cast("char *", buf), n)

    def state_set(self, data: bytes) -> None:
        """Restore a state from :meth:`state_get` of a context over the same model.

        Raises:
            StateError: llama.cpp rejected the data.
        """
        src = ffi.from_buffer("uint8_t[]", data)
        with self.lock:
            ptr = self._check()
            self.generation += 1
            self._has_logits = False
            n = self._lib.llama_state_set_data(ptr, src, len(data))
        if n != len(data):
            msg = (
                f"restoring the context state failed (read {n} of {len(data)} bytes); "
                "the state must come from a context over the same model"
            )
            raise StateError(msg)

    def state_seq_get(self, seq_id: int) -> bytes:
        """Serialize one sequence's KV cells (to move it out of the cache and back later).

        Raises:
            StateError: llama.cpp wrote fewer bytes than it announced.
        """
        L = self._lib
        with self.lock:
            ptr = self._check()
            seq = self._seq(seq_id)
            size = L.llama_state_seq_get_size(ptr, seq)
            buf = ffi.new("uint8_t[]", size)
            n = L.llama_state_seq_get_data(ptr, buf, size, seq)
        if n != size:
            msg = f"saving sequence {seq_id} failed ({n} of {size} bytes written)"
            raise StateError(msg)
        return ffi.unpack(ffi.cast("char *", buf), n)

    def state_seq_set(self, data: bytes, seq_id: int) -> None:
        """Restore :meth:`state_seq_get` data into sequence ``seq_id`` (emptied first).

        Raises:
            StateError: llama.cpp refused the data (another model, or no room in the cache).
        """
        src = ffi.from_buffer("uint8_t[]", data)
        with self.lock:
            ptr = self._check()
            seq = self._seq(seq_id)
            self._lib.llama_memory_seq_rm(self._memory(), seq, -1, -1)
            n = self._lib.llama_state_seq_set_data(ptr, src, len(data), seq)
        if n != len(data):
            msg = (
                f"restoring sequence {seq_id} failed (read {n} of {len(data)} bytes); the "
                "data must come from a context over the same model, with room in its cache"
            )
            raise StateError(msg)
