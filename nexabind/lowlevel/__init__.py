"""Python names over the llama.cpp C API; the only package that calls ``lib``.

Objects own their native handle and free it in an idempotent ``close()`` (also on ``with``
exit); a finalizer is only a backstop. A :class:`Context` keeps its :class:`Model` alive.
Logits and embeddings are read-only numpy views over llama.cpp memory, valid until the next
decode; reading a stale view through :meth:`Context.logits_view` raises. Every NULL result and
status code goes through one helper (:func:`nonnull`, :func:`raise_decode`) into the error tree.

``python -m nexabind.lowlevel LIBDIR`` loads and sets up a library folder in a fresh process and
prints JSON; the exit status is 0 on success (installers use it as a smoke test).
"""

from __future__ import annotations

from nexabind.lowlevel import _rpc as rpc
from nexabind.lowlevel._adapter import LoraAdapter
from nexabind.lowlevel._batch import Batch
from nexabind.lowlevel._context import Context, TokenSteps
from nexabind.lowlevel._lib import (
    AttentionType,
    DecodeResult,
    FlashAttention,
    GgmlType,
    LogLevel,
    NumaStrategy,
    PoolingType,
    RopeScalingType,
    SplitMode,
    builtin_chat_templates,
    chat_template_apply,
    devices,
    enum_value,
    ggml,
    lib,
    max_devices,
    nonnull,
    numa_init,
    raise_decode,
    set_verbose,
    system_info,
    time_us,
    version,
)
from nexabind.lowlevel._model import QUANT_FTYPES, Model, quantize
from nexabind.lowlevel._outputs import LogitsView
from nexabind.lowlevel._sampler import SamplerChain

__all__ = [
    "AttentionType",
    "Batch",
    "Context",
    "DecodeResult",
    "FlashAttention",
    "GgmlType",
    "LogLevel",
    "LogitsView",
    "LoraAdapter",
    "Model",
    "NumaStrategy",
    "PoolingType",
    "QUANT_FTYPES",
    "RopeScalingType",
    "SamplerChain",
    "SplitMode",
    "TokenSteps",
    "builtin_chat_templates",
    "chat_template_apply",
    "devices",
    "enum_value",
    "ggml",
    "lib",
    "max_devices",
    "nonnull",
    "numa_init",
    "quantize",
    "raise_decode",
    "rpc",
    "set_verbose",
    "system_info",
    "time_us",
    "version",
]
