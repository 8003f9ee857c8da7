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
    DownloadTimeoutError,
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
    "BaseLlamaCache": "nexabind.prompt_cache",
    "BaseLlamaTokenizer": "nexabind.tokenizer",
    "Engine": "nexabind.engine",
    "Jinja2ChatFormatter": "nexabind.chat_formats",
    "Llama": "nexabind.llama",
    "LlamaCache": "nexabind.prompt_cache",
    "LlamaDiskCache": "nexabind.prompt_cache",
    "LlamaDraftModel": "nexabind.speculative",
    "LlamaGrammar": "nexabind.grammar",
    "LlamaHFTokenizer": "nexabind.tokenizer",
    "LlamaPromptLookupDecoding": "nexabind.speculative",
    "LlamaRAMCache": "nexabind.prompt_cache",
    "LlamaState": "nexabind._state",
    "LlamaTokenizer": "nexabind.tokenizer",
    "LogitsProcessorList": "nexabind.processors",
    "MinTokensLogitsProcessor": "nexabind.processors",
    "StoppingCriteriaList": "nexabind.processors",
    "Token": "nexabind.tokens",
    "check_model": "nexabind._probe",
    "fetch": "nexabind._fetch",
    "build": "nexabind._build",
}

if TYPE_CHECKING:
    from nexabind._build import build
    from nexabind._fetch import fetch
    from nexabind._probe import check_model
    from nexabind._state import LlamaState
    from nexabind.chat_formats import Jinja2ChatFormatter
    from nexabind.engine import Engine
    from nexabind.grammar import LlamaGrammar
    from nexabind.llama import Llama
    from nexabind.processors import (
        LogitsProcessorList,
        MinTokensLogitsProcessor,
        StoppingCriteriaList,
    )
    from nexabind.prompt_cache import BaseLlamaCache, LlamaCache, LlamaDiskCache, LlamaRAMCache
    from nexabind.speculative import LlamaDraftModel, LlamaPromptLookupDecoding
    from nexabind.tokenizer import BaseLlamaTokenizer, LlamaHFTokenizer, LlamaTokenizer
    from nexabind.tokens import Token

__all__ = [
    "AbiMismatchError",
    "BaseLlamaCache",
    "BaseLlamaTokenizer",
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
    "DownloadTimeoutError",
    "Engine",
    "Jinja2ChatFormatter",
    "LibraryNotFoundError",
    "Llama",
    "LlamaCache",
    "LlamaDiskCache",
    "LlamaDraftModel",
    "LlamaGrammar",
    "LlamaHFTokenizer",
    "LlamaPromptLookupDecoding",
    "LlamaRAMCache",
    "LlamaState",
    "LlamaTokenizer",
    "LogitsProcessorList",
    "ManifestError",
    "MinTokensLogitsProcessor",
    "ModelLoadError",
    "ModelNotFoundError",
    "NexabindError",
    "SessionNotFoundError",
    "StateError",
    "StoppingCriteriaList",
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
