"""What every object owning a llama.cpp pointer shares: ``closed``, ``with``, the closed check;
and for one that others use (a model its contexts, an adapter its contexts), a deferred free."""

from __future__ import annotations

import threading
from typing import Any, TypeVar

from nexabind.errors import ClosedError

_O = TypeVar("_O", bound="Owned")


class Owned:
    """``closed``, ``with`` and the closed check of an object that owns a llama.cpp pointer.

    Subclasses set ``_ptr`` and ``_what`` (how the message names the object) and free the
    pointer in ``close()``.
    """

    _ptr: Any = None
    _what = "object"

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._ptr is None

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _O) -> _O:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self) -> Any:
        if self.closed:
            msg = f"the {self._what} is closed; create a new one"
            raise ClosedError(msg)
        return self._ptr


class Shared(Owned):
    """An :class:`Owned` object that others use: :meth:`close` frees it after the last user.

    Subclasses set ``_ptr`` and implement :meth:`_free` (called once, under the lock).
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._users = 0
        self._closing = False

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._ptr is None or self._closing

    def close(self) -> None:
        """Free now, or when the last user lets go; safe to call more than once."""
        if getattr(self, "_ptr", None) is None:
            return
        with self._lock:
            self._closing = True
            if self._users == 0 and self._ptr is not None:
                self._free()
                self._ptr = None

    def _free(self) -> None:
        raise NotImplementedError

    def _add_user(self) -> Any:
        """Count a user (the memory is freed after the last one); return the pointer."""
        with self._lock:
            ptr = self._check()
            self._users += 1
            return ptr

    def _release_user(self) -> None:
        with self._lock:
            self._users -= 1
            if self._closing and self._users == 0:
                self.close()
