"""nexabind: llama.cpp for Python, prebuilt and verified, through a zero-copy cffi binding.

Importing nexabind loads no native library and no numpy: the library is loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nexabind._version import __version__
from nexabind.errors import (
    AbiMismatchError,
    BuildError,
    BusyError,
    CacheError,
    ChecksumMismatchError,
    ClosedError,
    ContextError,
    ContextOverflowError,
    DecodeCancelled,
    DecodeError,
    DownloadError,
    LibraryNotFoundError,
    ManifestError,
    ModelLoadError,
    ModelNotFoundError,
    NexabindError,
    SessionNotFoundError,
    StateError,
    TaskTimeoutError,
    TemplateError,
    UnsafeArchiveError,
)

# Public names that live in modules with heavy imports, resolved on first access (PEP 562).
_LAZY = {
    "Engine": "nexabind.engine",
    "Llama": "nexabind.llama",
    "Token": "nexabind.tokens",
    "check_model": "nexabind._probe",
    "fetch": "nexabind._fetch",
    "build": "nexabind._build",
}

if TYPE_CHECKING:
    from nexabind._build import build
    from nexabind._fetch import fetch
    from nexabind._probe import check_model
    from nexabind.engine import Engine
    from nexabind.llama import Llama
    from nexabind.tokens import Token

__all__ = [
    "AbiMismatchError",
    "BuildError",
    "BusyError",
    "CacheError",
    "ChecksumMismatchError",
    "ClosedError",
    "ContextError",
    "ContextOverflowError",
    "DecodeCancelled",
    "DecodeError",
    "DownloadError",
    "Engine",
    "LibraryNotFoundError",
    "Llama",
    "ManifestError",
    "ModelLoadError",
    "ModelNotFoundError",
    "NexabindError",
    "SessionNotFoundError",
    "StateError",
    "TaskTimeoutError",
    "TemplateError",
    "Token",
    "UnsafeArchiveError",
    "__version__",
    "build",
    "check_model",
    "fetch",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nexabind' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
