"""The loaded library, its one-time set-up, enums and the status helpers every call goes through."""

from __future__ import annotations

import enum
import logging
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from nexabind import _cdef, loader, settings
from nexabind._ffi import ffi
from nexabind.errors import (
    ContextOverflowError,
    DecodeCancelled,
    DecodeError,
    LibraryNotFoundError,
    NexabindError,
)

log = logging.getLogger(__name__)

_native_log = logging.getLogger("nexabind.llama")
# Quiet unless the application configures logging: no "last resort" printing of warnings.
_native_log.addHandler(logging.NullHandler())


class LogLevel(enum.IntEnum):
    """ggml's log levels (``CONT`` continues the previous message)."""

    NONE = ffi.integer_const("GGML_LOG_LEVEL_NONE")
    DEBUG = ffi.integer_const("GGML_LOG_LEVEL_DEBUG")
    INFO = ffi.integer_const("GGML_LOG_LEVEL_INFO")
    WARN = ffi.integer_const("GGML_LOG_LEVEL_WARN")
    ERROR = ffi.integer_const("GGML_LOG_LEVEL_ERROR")
    CONT = ffi.integer_const("GGML_LOG_LEVEL_CONT")


class PoolingType(enum.IntEnum):
    """How an embedding context pools token embeddings into one vector per sequence."""

    UNSPECIFIED = ffi.integer_const("LLAMA_POOLING_TYPE_UNSPECIFIED")
    NONE = ffi.integer_const("LLAMA_POOLING_TYPE_NONE")
    MEAN = ffi.integer_const("LLAMA_POOLING_TYPE_MEAN")
    CLS = ffi.integer_const("LLAMA_POOLING_TYPE_CLS")
    LAST = ffi.integer_const("LLAMA_POOLING_TYPE_LAST")
    RANK = ffi.integer_const("LLAMA_POOLING_TYPE_RANK")


class RopeScalingType(enum.IntEnum):
    """How RoPE frequencies are scaled for contexts longer than the training length."""

    UNSPECIFIED = ffi.integer_const("LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED")
    NONE = ffi.integer_const("LLAMA_ROPE_SCALING_TYPE_NONE")
    LINEAR = ffi.integer_const("LLAMA_ROPE_SCALING_TYPE_LINEAR")
    YARN = ffi.integer_const("LLAMA_ROPE_SCALING_TYPE_YARN")
    LONGROPE = ffi.integer_const("LLAMA_ROPE_SCALING_TYPE_LONGROPE")


class AttentionType(enum.IntEnum):
    """Causal or non-causal attention (for embeddings), or the model's own."""

    UNSPECIFIED = ffi.integer_const("LLAMA_ATTENTION_TYPE_UNSPECIFIED")
    CAUSAL = ffi.integer_const("LLAMA_ATTENTION_TYPE_CAUSAL")
    NON_CAUSAL = ffi.integer_const("LLAMA_ATTENTION_TYPE_NON_CAUSAL")


class SplitMode(enum.IntEnum):
    """How a model is split across several GPUs."""

    NONE = ffi.integer_const("LLAMA_SPLIT_MODE_NONE")
    LAYER = ffi.integer_const("LLAMA_SPLIT_MODE_LAYER")
    ROW = ffi.integer_const("LLAMA_SPLIT_MODE_ROW")
    TENSOR = ffi.integer_const("LLAMA_SPLIT_MODE_TENSOR")


#: ggml tensor types (``GGML_TYPE_*``), for the KV cache's ``type_k`` / ``type_v``.
GgmlType = enum.IntEnum(  # type: ignore[misc]
    "GgmlType",
    {
        name.removeprefix("GGML_TYPE_"): ffi.integer_const(name)
        for name in _cdef.ENUMS["ggml_type"]
        if name != "GGML_TYPE_COUNT"
    },
)


class NumaStrategy(enum.IntEnum):
    """ggml's NUMA strategies (``llama_numa_init``)."""

    DISABLED = ffi.integer_const("GGML_NUMA_STRATEGY_DISABLED")
    DISTRIBUTE = ffi.integer_const("GGML_NUMA_STRATEGY_DISTRIBUTE")
    ISOLATE = ffi.integer_const("GGML_NUMA_STRATEGY_ISOLATE")
    NUMACTL = ffi.integer_const("GGML_NUMA_STRATEGY_NUMACTL")
    MIRROR = ffi.integer_const("GGML_NUMA_STRATEGY_MIRROR")


def enum_value(kind: type[enum.IntEnum], name: str, value: object) -> int:
    """``value`` (a member, its int or its name, any case) as a member of ``kind``.

    llama.cpp reads these as C enums and indexes tables with some of them: a value outside the
    enum is refused here.

    Raises:
        ValueError: ``value`` is not a member, naming the argument and the members.
    """
    if isinstance(value, str) and value.upper() in kind.__members__:
        return kind[value.upper()]
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return kind(value)
        except ValueError:
            pass
    names = ", ".join(f"{m.name.lower()} ({m.value})" for m in kind)
    msg = f"{name}={value!r} is invalid; use one of {names}"
    raise ValueError(msg)


class FlashAttention(enum.IntEnum):
    """Flash attention: on, off, or llama.cpp's choice per device."""

    AUTO = ffi.integer_const("LLAMA_FLASH_ATTN_TYPE_AUTO")
    DISABLED = ffi.integer_const("LLAMA_FLASH_ATTN_TYPE_DISABLED")
    ENABLED = ffi.integer_const("LLAMA_FLASH_ATTN_TYPE_ENABLED")

    @classmethod
    def of(cls, value: FlashAttention | bool | str | None) -> FlashAttention:
        """Map True/False/None (or "enabled"/"disabled"/"auto") to a member.

        Raises:
            ValueError: Any other value.
        """
        if isinstance(value, FlashAttention):
            return value
        if value is None:
            return cls.AUTO
        if isinstance(value, bool):
            return cls.ENABLED if value else cls.DISABLED
        if isinstance(value, str) and value.upper() in cls.__members__:
            return cls[value.upper()]
        names = sorted(m.name.lower() for m in cls)
        msg = f"flash_attn={value!r} is invalid; use True, False, None or one of {names}"
        raise ValueError(msg)


class DecodeResult(enum.IntEnum):
    """What ``llama_decode`` / ``llama_encode`` return (llama.h); below -1: a fatal error."""

    OK = 0
    NO_KV_SLOT = 1
    ABORTED = 2
    INVALID_BATCH = -1


_LOG_LEVELS: dict[int, int] = {
    LogLevel.DEBUG: logging.DEBUG,
    LogLevel.INFO: logging.INFO,
    LogLevel.WARN: logging.WARNING,
    LogLevel.ERROR: logging.ERROR,
}


def nonnull(ptr: Any, error: type[NexabindError] | type[Exception], msg: str) -> Any:
    """Return ``ptr``, or raise ``error(msg)`` when llama.cpp returned NULL."""
    if ptr == ffi.NULL:
        raise error(msg)
    return ptr


def raise_decode(rc: int, *, n_ctx: int, cancelled: bool = False) -> NoReturn:
    """Raise the error for a non-zero ``llama_decode`` / ``llama_encode`` status."""
    if rc == DecodeResult.ABORTED or cancelled:
        msg = "decode cancelled"
        raise DecodeCancelled(msg)
    if rc == DecodeResult.NO_KV_SLOT:
        msg = (
            f"no KV cache slot for the batch (context of {n_ctx} tokens is full); "
            "use a larger n_ctx or clear the memory"
        )
        raise ContextOverflowError(msg)
    if rc == DecodeResult.INVALID_BATCH:
        msg = (
            "llama.cpp refused the batch as invalid (status -1); the 'nexabind.llama' log says why"
        )
        raise DecodeError(msg)
    msg = f"llama_decode failed with status {rc}; the 'nexabind.llama' log says why"
    raise DecodeError(msg)


class _Loaded:
    """The library handles after the one-time set-up (log routing, backends, init)."""

    lib: Any = None
    ggml: Any = None
    log_cb: Any = None  # the ffi.callback llama.cpp holds: referenced for the life of the process
    last_level = logging.DEBUG


_state = _Loaded()
_lock = threading.Lock()


def _log_callback() -> Any:
    @ffi.callback("void(enum ggml_log_level, const char *, void *)")
    def cb(level: int, text: Any, _ud: Any) -> None:
        lvl = _state.last_level if level == LogLevel.CONT else _LOG_LEVELS.get(level, logging.DEBUG)
        _state.last_level = lvl
        if _native_log.isEnabledFor(lvl):
            _native_log.log(lvl, "%s", ffi.string(text).decode("utf-8", "replace").rstrip())

    return cb


def lib(lib_path: str | os.PathLike[str] | None = None) -> Any:
    """Return the loaded llama.cpp library, loading and setting it up on first use.

    The first call loads the libraries (:func:`nexabind.loader.load`: search, ABI check,
    dlopen), routes llama.cpp's log to the ``nexabind.llama`` logger, loads the ggml backend
    modules of the library folder (the best CPU variant for this machine, GPU backends) and
    initializes llama.cpp.

    Args:
        lib_path: Library folder for the first load; see :func:`nexabind.loader.library_dir`.
    """
    if _state.lib is not None and lib_path is None:
        return _state.lib
    with _lock:
        # ggml's assertion handler attaches gdb to print a backtrace when gdb is installed,
        # which can hang for minutes before the abort; a value the user set is kept.
        os.environ.setdefault("GGML_NO_BACKTRACE", "1")
        handles = loader.load(lib_path)  # checks that lib_path matches what is loaded
        if _state.lib is None:
            L, ggml = handles.lib, handles.ggml
            _state.log_cb = _log_callback()
            L.llama_log_set(_state.log_cb, ffi.NULL)
            _load_backends(ggml, handles.libdir)
            L.llama_backend_init()
            _state.ggml = ggml
            _state.lib = L
        return _state.lib


def _load_backends(ggml: Any, libdir: Path) -> None:
    """Load the backend modules of ``libdir``: ggml's best CPU variant, or the one
    :func:`nexabind.loader.cpu_variant_choice` names, plus every other backend."""
    variant, why = loader.cpu_variant_choice(libdir)
    if variant is None:
        ggml.ggml_backend_load_all_from_path(str(libdir).encode())
        return
    cpu, others = loader.backend_modules(libdir)
    if variant not in cpu:
        have = ", ".join(sorted(cpu)) or "none (a build without GGML_BACKEND_DL)"
        msg = (
            f"CPU variant {variant!r} (from {why}) is not in {libdir}; it has: {have}. Unset "
            f"{settings.CPU_VARIANT.env} or name one of those"
        )
        raise LibraryNotFoundError(msg)
    if ggml.ggml_backend_load(str(cpu[variant]).encode()) == ffi.NULL:
        msg = (
            f"CPU variant {variant!r} (from {why}) does not run on this CPU (ggml scores it 0, "
            f"or it failed to load: {cpu[variant]}); unset {settings.CPU_VARIANT.env} or name "
            "a variant this CPU has the instructions for"
        )
        raise LibraryNotFoundError(msg)
    log.info("CPU variant %s (from %s)", variant, why)
    for path in others:
        ggml.ggml_backend_load(str(path).encode())  # NULL: a GPU backend without its runtime


def ggml() -> Any:
    """Return the cffi handle of ``libggml`` (the backend registry), loading if needed."""
    lib()
    return _state.ggml


_verbose_handler: logging.Handler | None = None


def set_verbose(verbose: bool = True) -> None:
    """Let llama.cpp's INFO and DEBUG log lines through (the ``nexabind.llama`` logger).

    llama.cpp logs through one process-wide callback, so this is process-wide: the logger's
    level goes to DEBUG. When the application has configured no logging at all, the lines go
    to stderr, as llama.cpp prints them. ``set_verbose(False)`` undoes both.
    """
    global _verbose_handler
    if not verbose:
        _native_log.setLevel(logging.NOTSET)
        if _verbose_handler is not None:
            _native_log.removeHandler(_verbose_handler)
            _verbose_handler = None
        return
    _native_log.setLevel(logging.DEBUG)
    if _verbose_handler is None and not logging.getLogger().handlers:
        _verbose_handler = logging.StreamHandler(sys.stderr)
        _native_log.addHandler(_verbose_handler)


_numa_done: list[int] = []


def numa_init(strategy: NumaStrategy | int | str | bool) -> None:
    """Set ggml's NUMA strategy; process-wide, set once.

    Args:
        strategy: A :class:`NumaStrategy`, its value or name; True is ``distribute`` and False
            ``disabled`` (llama-cpp-python's ``numa=True``).

    Raises:
        ValueError: ``strategy`` is not a :class:`NumaStrategy`, or differs from the one a
            previous call set (ggml reads it once).
    """
    if isinstance(strategy, bool):
        strategy = NumaStrategy.DISTRIBUTE if strategy else NumaStrategy.DISABLED
    value = enum_value(NumaStrategy, "numa", strategy)
    with _lock:
        if _numa_done:
            if _numa_done[0] != value:
                msg = (
                    f"numa={NumaStrategy(value).name.lower()} cannot apply: this process "
                    f"already set numa={NumaStrategy(_numa_done[0]).name.lower()} (ggml "
                    "reads it once per process)"
                )
                raise ValueError(msg)
            return
        _numa_done.append(value)
    if value != NumaStrategy.DISABLED:
        lib().llama_numa_init(value)


def max_devices() -> int:
    """How many devices a model may be split across (the length of a ``tensor_split``)."""
    return int(lib().llama_max_devices())


def system_info() -> str:
    """Return llama.cpp's system info line (CPU features of the loaded backend)."""
    return ffi.string(lib().llama_print_system_info()).decode()


def version() -> str:
    """Return llama.cpp's version string as compiled into the loaded library."""
    return ffi.string(lib().llama_version()).decode()


def time_us() -> int:
    """Return llama.cpp's monotonic clock in microseconds (a trivial C call)."""
    return lib().llama_time_us()


def devices() -> list[dict[str, str]]:
    """Return the ggml backend devices registered after loading, as name/description dicts."""
    g = ggml()
    out = []
    for i in range(g.ggml_backend_dev_count()):
        dev = g.ggml_backend_dev_get(i)
        out.append(
            {
                "name": ffi.string(g.ggml_backend_dev_name(dev)).decode(),
                "description": ffi.string(g.ggml_backend_dev_description(dev)).decode(),
            }
        )
    return out


def builtin_chat_templates() -> list[str]:
    """Names of llama.cpp's built-in chat templates (``chatml``, ``llama3``, ``phi3``, ...)."""
    L = lib()
    n = L.llama_chat_builtin_templates(ffi.NULL, 0)
    names = ffi.new("const char *[]", max(n, 1))
    n = L.llama_chat_builtin_templates(names, n)
    return [ffi.string(names[i]).decode() for i in range(n)]


def chat_template_apply(
    template: str,
    messages: Sequence[tuple[str, str]],
    *,
    add_assistant: bool = True,
) -> str:
    """Format messages with one of llama.cpp's built-in chat templates.

    Args:
        template: A Jinja template text or a built-in template name (``chatml``, ``llama3``...).
        messages: ``(role, content)`` pairs.
        add_assistant: End with the opening of an assistant turn.

    Raises:
        ValueError: llama.cpp does not recognise the template.
    """
    L = lib()
    keep = [(ffi.new("char[]", r.encode()), ffi.new("char[]", c.encode())) for r, c in messages]
    chat = ffi.new("struct llama_chat_message[]", len(keep))
    for i, (r, c) in enumerate(keep):
        chat[i].role = r
        chat[i].content = c
    tmpl = template.encode()
    cap = 256 + 2 * sum(len(c) + len(r) for r, c in messages)
    buf = ffi.new("char[]", cap)
    n = L.llama_chat_apply_template(tmpl, chat, len(keep), add_assistant, buf, cap)
    if n > cap:
        buf = ffi.new("char[]", n)
        n = L.llama_chat_apply_template(tmpl, chat, len(keep), add_assistant, buf, n)
    if n < 0:
        msg = f"llama.cpp does not support the chat template {template[:60]!r}"
        raise ValueError(msg)
    return ffi.unpack(buf, n).decode("utf-8", "replace")
