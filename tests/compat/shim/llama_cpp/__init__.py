"""``llama_cpp`` made of nexabind: llama-cpp-python's import path for scripts and tests that
change nothing but what they import. Only names, no logic: each one is nexabind's own.

llama-cpp-python's ctypes binding (``llama_cpp.llama_cpp``, the ``llama_*`` C functions) and
its ``_internals`` wrappers have no counterpart here: nexabind's low-level API is
``nexabind.lowlevel``. The enum constants users pass to ``Llama(...)`` are nexabind's enums
under llama-cpp-python's names.
"""

from __future__ import annotations

from typing import Any

from nexabind import __version__, lowlevel  # noqa: F401
from nexabind.llama_types import *  # noqa: F403
from nexabind.sampling import DEFAULT_SEED as LLAMA_DEFAULT_SEED  # noqa: F401

from .llama import *  # noqa: F403
from .llama_cache import *  # noqa: F403
from .llama_grammar import LlamaGrammar  # noqa: F401
from .llama_speculative import LlamaDraftModel, LlamaPromptLookupDecoding  # noqa: F401
from .llama_tokenizer import BaseLlamaTokenizer, LlamaHFTokenizer, LlamaTokenizer  # noqa: F401


def _constants() -> dict[str, int]:
    out = {}
    for prefix, kind in (
        ("LLAMA_POOLING_TYPE_", lowlevel.PoolingType),
        ("LLAMA_ROPE_SCALING_TYPE_", lowlevel.RopeScalingType),
        ("LLAMA_ATTENTION_TYPE_", lowlevel.AttentionType),
        ("LLAMA_SPLIT_MODE_", lowlevel.SplitMode),
        ("LLAMA_FLASH_ATTN_TYPE_", lowlevel.FlashAttention),
        ("GGML_TYPE_", lowlevel.GgmlType),
        ("GGML_NUMA_STRATEGY_", lowlevel.NumaStrategy),
    ):
        out.update({prefix + m.name: int(m) for m in kind})
    return out


globals().update(_constants())


def __getattr__(name: str) -> Any:
    msg = (
        f"llama_cpp.{name} is part of llama-cpp-python's ctypes binding, which has no "
        "counterpart in nexabind; nexabind.lowlevel is its low-level API"
    )
    raise AttributeError(msg)
