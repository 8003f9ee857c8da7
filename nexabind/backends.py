"""The ``TextModel`` contract and a small registry of backends that load one.

A backend is a name, an ``available()`` check and ``load_model(path, **options)``;
:func:`load_model` takes the first available backend, or the one named. nexabind registers
``llama.cpp`` (an in-process :class:`~nexabind.engine.Engine`); other packages can register
theirs with :func:`register`.

::

    model = nexabind.backends.load_model("model.gguf", n_parallel=2)
    for token in model.generate("Once upon a time", max_tokens=20):
        print(token.text, end="")
    model.close()
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from nexabind.engine import Engine
from nexabind.errors import LibraryNotFoundError, NexabindError
from nexabind.tokens import Token

__all__ = ["Backend", "TextModel", "available", "backends", "load_model", "register"]


@runtime_checkable
class TextModel(Protocol):
    """What every backend's model offers (``Llama`` and ``Engine`` both do)."""

    model_type: str
    """The architecture, e.g. ``llama`` or ``gemma3``."""

    err: BaseException | None
    """The error that ended the last ``generate`` / ``chat`` iterator, if any."""

    def generate(self, prompt: str | Sequence[int], **options: Any) -> Iterator[Token]:
        """Tokens generated after ``prompt``."""
        ...

    def chat(self, messages: list[dict[str, Any]], **options: Any) -> Iterator[Token]:
        """Tokens of the assistant's reply to ``messages``."""
        ...

    def close(self) -> None:
        """Free the model."""
        ...


@dataclass(frozen=True)
class Backend:
    """A way to load a :class:`TextModel`."""

    name: str
    available: Callable[[], bool]
    load_model: Callable[..., TextModel]


_registry: dict[str, Backend] = {}


def register(backend: Backend) -> None:
    """Add ``backend`` (after those registered before; a name registered again is replaced)."""
    _registry[backend.name] = backend


def backends() -> list[Backend]:
    """Every registered backend, in the order :func:`load_model` tries them."""
    return list(_registry.values())


def available() -> list[str]:
    """The names of the backends that can load a model here."""
    return [b.name for b in _registry.values() if b.available()]


def load_model(
    path: str | os.PathLike[str], *, backend: str | None = None, **options: Any
) -> TextModel:
    """Load ``path`` with the first available backend, or the one named.

    Raises:
        ValueError: No backend has that name.
        LibraryNotFoundError: No backend (or not the named one) is available here.
    """
    if backend is not None:
        if backend not in _registry:
            msg = f"no backend named {backend!r}; registered: {', '.join(_registry) or 'none'}"
            raise ValueError(msg)
        chosen = _registry[backend]
        if not chosen.available():
            msg = f"the {backend!r} backend is not available here; see `nexabind doctor`"
            raise LibraryNotFoundError(msg)
        return chosen.load_model(path, **options)
    for b in _registry.values():
        if b.available():
            return b.load_model(path, **options)
    msg = (
        f"no backend can load models here (tried {', '.join(_registry) or 'none'}); "
        "run `nexabind fetch` for the llama.cpp library"
    )
    raise LibraryNotFoundError(msg)


def _llama_cpp_available() -> bool:
    from nexabind import lowlevel

    try:
        lowlevel.lib()
    except NexabindError:
        return False
    return True


register(Backend("llama.cpp", _llama_cpp_available, Engine))
