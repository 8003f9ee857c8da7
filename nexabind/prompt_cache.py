"""Prompt caches for ``Llama.set_cache``: saved states found again by their longest token prefix.

llama-cpp-python's classes: after a completion, the Llama saves its state under the tokens it
holds (prompt and completion); before the next one, it loads the saved state that shares the
longest prefix with the new prompt when that beats what its context already holds, so only the
rest is decoded.

- :class:`LlamaRAMCache` keeps states in memory, least recently used dropped first.
- :class:`LlamaDiskCache` keeps them as files in a folder (no third-party package; each file is
  written to a temporary name and renamed, so a reader never sees half a file), least recently
  used (by file time) dropped first; states survive the process.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

from nexabind._files import atomic_writer
from nexabind._state import LlamaState

__all__ = ["BaseLlamaCache", "LlamaCache", "LlamaDiskCache", "LlamaRAMCache", "longest_prefix"]

_MAGIC = b"NXBCACHE1"
_COUNT = struct.Struct("<I")


def longest_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _best(keys: Iterable[tuple[int, ...]], key: tuple[int, ...]) -> tuple[int, ...] | None:
    best, best_len = None, 0
    for k in keys:
        n = longest_prefix(k, key)
        if n > best_len:
            best, best_len = k, n
    return best


class BaseLlamaCache(ABC):
    """A map from token sequences to :class:`LlamaState`, looked up by longest shared prefix.

    Args:
        capacity_bytes: Most bytes of llama.cpp state to keep (default 2 GiB).
    """

    def __init__(self, capacity_bytes: int = 2 << 30) -> None:
        self.capacity_bytes = capacity_bytes

    @property
    @abstractmethod
    def cache_size(self) -> int:
        """Bytes held."""

    @abstractmethod
    def _keys(self) -> Iterable[tuple[int, ...]]: ...

    def _find_longest_prefix_key(self, key: tuple[int, ...]) -> tuple[int, ...] | None:
        return _best(self._keys(), key)

    @abstractmethod
    def __getitem__(self, key: Sequence[int]) -> LlamaState:
        """The state whose tokens share the longest prefix with ``key``.

        Raises:
            KeyError: No state shares a first token with ``key``.
        """

    def __contains__(self, key: Sequence[int]) -> bool:
        return self._find_longest_prefix_key(tuple(key)) is not None

    @abstractmethod
    def __setitem__(self, key: Sequence[int], value: LlamaState) -> None: ...


class LlamaRAMCache(BaseLlamaCache):
    """States in memory, the least recently used dropped first beyond ``capacity_bytes``."""

    def __init__(self, capacity_bytes: int = 2 << 30) -> None:
        super().__init__(capacity_bytes)
        self.cache_state: OrderedDict[tuple[int, ...], LlamaState] = OrderedDict()

    @property
    def cache_size(self) -> int:
        return sum(state.llama_state_size for state in self.cache_state.values())

    def _keys(self) -> Iterable[tuple[int, ...]]:
        return self.cache_state.keys()

    def __getitem__(self, key: Sequence[int]) -> LlamaState:
        found = self._find_longest_prefix_key(tuple(key))
        if found is None:
            raise KeyError("no cached state shares a prefix with these tokens")
        self.cache_state.move_to_end(found)
        return self.cache_state[found]

    def __setitem__(self, key: Sequence[int], value: LlamaState) -> None:
        key = tuple(int(t) for t in key)
        self.cache_state.pop(key, None)
        self.cache_state[key] = value
        while self.cache_size > self.capacity_bytes and self.cache_state:
            self.cache_state.popitem(last=False)

    def __len__(self) -> int:
        return len(self.cache_state)


#: llama-cpp-python's older name for :class:`LlamaRAMCache`.
LlamaCache = LlamaRAMCache


class LlamaDiskCache(BaseLlamaCache):
    """States as files in ``cache_dir``, the least recently used dropped beyond the capacity.

    Each file holds the key tokens and the state in the checked byte format of
    :class:`LlamaState` (a damaged file is skipped and removed, never loaded). A state read
    back has no recorded logits and no seed.

    Args:
        cache_dir: The folder (created if missing).
        capacity_bytes: Most bytes of files to keep (default 2 GiB).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str] = ".cache/llama_cache",
        capacity_bytes: int = 2 << 30,
    ) -> None:
        super().__init__(capacity_bytes)
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._index: dict[tuple[int, ...], Path] = {}
        for f in self.cache_dir.glob("*.state"):
            key = self._read_key(f)
            if key is not None:
                self._index[key] = f

    @staticmethod
    def _read_key(path: Path) -> tuple[int, ...] | None:
        try:
            with path.open("rb") as f:
                if f.read(len(_MAGIC)) != _MAGIC:
                    return None
                (n,) = _COUNT.unpack(f.read(_COUNT.size))
                data = f.read(4 * n)
        except (OSError, struct.error):
            return None
        if len(data) != 4 * n:
            return None
        return struct.unpack(f"<{n}i", data)

    @property
    def cache_size(self) -> int:
        total = 0
        for f in list(self._index.values()):
            with contextlib.suppress(OSError):
                total += f.stat().st_size
        return total

    def _keys(self) -> Iterable[tuple[int, ...]]:
        return list(self._index)

    def __getitem__(self, key: Sequence[int]) -> LlamaState:
        while True:
            found = self._find_longest_prefix_key(tuple(key))
            if found is None:
                raise KeyError("no cached state shares a prefix with these tokens")
            path = self._index[found]
            try:
                data = path.read_bytes()
                head = len(_MAGIC) + _COUNT.size + 4 * len(found)
                state = LlamaState.from_bytes(data[head:])
            except Exception:  # noqa: BLE001 - a damaged or vanished file is dropped
                self._drop(found)
                continue
            os.utime(path)  # most recently used
            return state

    def __setitem__(self, key: Sequence[int], value: LlamaState) -> None:
        key = tuple(int(t) for t in key)
        name = hashlib.sha256(struct.pack(f"<{len(key)}i", *key)).hexdigest()[:32]
        path = self.cache_dir / f"{name}.state"
        head = _MAGIC + _COUNT.pack(len(key)) + struct.pack(f"<{len(key)}i", *key)
        with atomic_writer(path) as f:
            f.write(head)
            f.write(bytes(value))
        self._index[key] = path
        self._trim()

    def _drop(self, key: tuple[int, ...]) -> None:
        path = self._index.pop(key, None)
        if path is not None:
            path.unlink(missing_ok=True)

    def _trim(self) -> None:
        def mtime(k: tuple[int, ...]) -> float:
            try:
                return self._index[k].stat().st_mtime_ns
            except OSError:
                return 0

        while self._index and self.cache_size > self.capacity_bytes:
            self._drop(min(self._index, key=mtime))

    def __len__(self) -> int:
        return len(self._index)
