"""What a context may be asked for: llama.cpp's limits, checked before the C call.

llama.cpp aborts the process on a thread count or a sequence count beyond its limits, and
allocates the whole KV cache at once; :func:`check_context` refuses such settings with a
message that names the value, before :class:`~nexabind.lowlevel.Context` calls llama.cpp.
"""

from __future__ import annotations

import os

from nexabind._ffi import ffi
from nexabind.errors import ContextError
from nexabind.lowlevel._lib import ggml
from nexabind.lowlevel._model import Model

#: ggml's limit on threads (GGML_MAX_N_THREADS); more aborts inside llama.cpp.
MAX_THREADS = 512
#: llama.cpp's limit on sequences in one context (LLAMA_MAX_SEQ).
MAX_SEQUENCES = 256
_UINT32_MAX = 0xFFFFFFFF


def physical_memory() -> int | None:
    """Bytes of RAM on this machine, or None when the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def device_memory() -> int:
    """Bytes of memory on the GPU devices ggml registered (0 on a CPU-only build)."""
    g = ggml()
    total = 0
    props = ffi.new("struct ggml_backend_dev_props *")
    for i in range(g.ggml_backend_dev_count()):
        dev = g.ggml_backend_dev_get(i)
        if g.ggml_backend_dev_type(dev) != g.GGML_BACKEND_DEVICE_TYPE_CPU:
            g.ggml_backend_dev_get_props(dev, props)
            total += props.memory_total
    return total


def check_threads(name: str, value: int | None) -> None:
    """Refuse a thread count ggml would abort on (None: llama.cpp's default)."""
    if value is not None and not 1 <= value <= MAX_THREADS:
        msg = f"{name}={value} is invalid; use 1..{MAX_THREADS} threads, or None"
        raise ValueError(msg)


def check_context(
    model: Model,
    n_ctx: int,
    n_batch: int,
    n_ubatch: int,
    n_threads: int | None,
    n_threads_batch: int | None,
    n_seq_max: int,
    embeddings: bool,
    kv_unified: bool | None,
) -> None:
    """Refuse what llama.cpp would abort on, or spend minutes allocating, before the call."""

    def bad(name: str, value: object, what: str) -> ValueError:
        return ValueError(f"{name}={value!r} is invalid; {what}")

    if not 0 <= n_ctx <= _UINT32_MAX:
        raise bad("n_ctx", n_ctx, "use 0 (the model's training length) or a positive length")
    if not 1 <= n_batch <= _UINT32_MAX:
        raise bad("n_batch", n_batch, "use a positive number of tokens per decode")
    if not 1 <= n_ubatch <= _UINT32_MAX:
        raise bad("n_ubatch", n_ubatch, "use a positive number (at most n_batch)")
    check_threads("n_threads", n_threads)
    check_threads("n_threads_batch", n_threads_batch)
    cells = n_ctx or model.n_ctx_train or 4096
    if not 1 <= n_seq_max <= MAX_SEQUENCES:
        raise bad("n_seq_max", n_seq_max, f"use 1..{MAX_SEQUENCES} sequences")
    # Each sequence takes at least one output row of a decode: more sequences than a batch
    # holds (llama.cpp caps n_batch at n_ctx) fail an assertion in llama.cpp.
    room = min(n_batch, cells)
    if n_seq_max > room:
        msg = f"use n_seq_max <= {room} (n_batch and n_ctx), or a larger n_batch / n_ctx"
        raise bad("n_seq_max", n_seq_max, msg)
    # Pooling reads one row per sequence from one ubatch.
    if embeddings and n_seq_max > min(n_ubatch, n_batch):
        msg = f"an embedding context needs n_ubatch >= n_seq_max ({n_seq_max})"
        raise bad("n_ubatch", n_ubatch, msg)
    # The KV cache is allocated at once: estimate it (f16 keys and values) before asking.
    if not kv_unified:
        cells = max(cells, 256 * n_seq_max)  # each sequence's share is padded to 256 cells
    need = cells * model.kv_bytes_per_cell()
    ram = physical_memory()
    if ram is not None and need > ram + device_memory():
        gib = 1 << 30
        msg = (
            f"n_ctx={n_ctx or cells} needs about {need / gib:.1f} GiB of KV cache, more than "
            f"this machine's {ram / gib:.1f} GiB of memory; use a smaller n_ctx"
        )
        raise ContextError(msg)


def check_seq(seq_id: int, n_seq_max: int) -> int:
    """``seq_id`` when a context of ``n_seq_max`` sequences has it, else ValueError."""
    if not 0 <= seq_id < n_seq_max:
        msg = f"sequence {seq_id} does not exist; this context has 0..{n_seq_max - 1}"
        raise ValueError(msg)
    return seq_id
