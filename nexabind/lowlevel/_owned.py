"""What every object owning a llama.cpp pointer shares: ``closed``, ``with``, the closed check."""

from __future__ import annotations

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
