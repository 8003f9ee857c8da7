"""``Context``: the KV cache, decoding, logits and embeddings over a ``Model``."""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from nexabind._ffi import ffi
from nexabind.errors import ContextError, DecodeError, StateError
from nexabind.lowlevel._adapter import LoraAdapter
from nexabind.lowlevel._batch import Batch
from nexabind.lowlevel._lib import FlashAttention, PoolingType, lib, nonnull, raise_decode
from nexabind.lowlevel._model import Model
from nexabind.lowlevel._owned import Owned
from nexabind.lowlevel._params import set_params
from nexabind.lowlevel._sampler import SamplerChain

if TYPE_CHECKING:
    import numpy as np

#: ggml's limit on threads (GGML_MAX_N_THREADS); more aborts inside llama.cpp.
MAX_THREADS = 512
#: llama.cpp's limit on sequences in one context (LLAMA_MAX_SEQ).
MAX_SEQUENCES = 256
_UINT32_MAX = 0xFFFFFFFF


def _physical_memory() -> int | None:
    """Bytes of RAM on this machine, or None when the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _device_memory() -> int:
    """Bytes of memory on the GPU devices ggml registered (0 on a CPU-only build)."""
    from nexabind.lowlevel._lib import ggml

    g = ggml()
    total = 0
    props = ffi.new("struct ggml_backend_dev_props *")
    for i in range(g.ggml_backend_dev_count()):
        dev = g.ggml_backend_dev_get(i)
        if g.ggml_backend_dev_type(dev) != g.GGML_BACKEND_DEVICE_TYPE_CPU:
            g.ggml_backend_dev_get_props(dev, props)
            total += props.memory_total
    return total


class TokenSteps(NamedTuple):
    """The per-token calls of a generation loop, from :meth:`Context.token_steps`."""

    sample: Callable[[], int]
    """Sample (and accept) the next token from the last decode."""
    is_eog: Callable[[int], bool]
    """Whether a token ends generation."""
    piece: Callable[[int], bytes]
    """The bytes of a token."""
    feed: Callable[[int, int], None]
    """Decode one token at a position (same errors as :meth:`Context.decode`)."""


class _CancelFlag:
    """One attribute that another thread sets and a decode polls (a store is atomic)."""

    __slots__ = ("on",)

    def __init__(self) -> None:
        self.on = False


class Context(Owned):
    """An inference context (KV cache, threads) over a :class:`Model`.

    Args:
        model: The model; the context keeps it alive.
        n_ctx: Context length in tokens (0: the model's training length).
        n_batch: Maximum tokens per decode call.
        n_ubatch: Tokens per compute step inside a decode (None: ``n_batch``, at most 512);
            llama.cpp caps it at ``n_batch``.
        n_threads: CPU threads for one-token decodes (None: llama.cpp's default).
        n_threads_batch: CPU threads for multi-token batches (None: as ``n_threads``).
        embeddings: Compute embeddings instead of (only) logits.
        pooling: How embeddings are pooled (None: the model's).
        n_seq_max: Sequences the context (and its :attr:`batch`) can hold at once.
        flash_attn: Use flash attention: True, False, or None to let llama.cpp decide per
            device (a :class:`FlashAttention` or its name is accepted too).
        kv_unified: One KV buffer shared by all sequences, so any sequence may use the whole
            context (None: llama.cpp's default); without it each of the ``n_seq_max``
            sequences gets ``n_ctx / n_seq_max`` cells (see :attr:`n_ctx_seq`).
        **params: More of llama.cpp's context parameters, by their ``llama_context_params``
            names (None or absent: llama.cpp's default): ``rope_scaling_type``
            (:class:`RopeScalingType`), ``rope_freq_base``, ``rope_freq_scale``,
            ``yarn_ext_factor``, ``yarn_attn_factor``, ``yarn_beta_fast``, ``yarn_beta_slow``,
            ``yarn_orig_ctx``, ``attention_type`` (:class:`AttentionType`), ``type_k`` and
            ``type_v`` (the KV cache's :class:`GgmlType`), ``offload_kqv``, ``op_offload``,
            ``swa_full``, ``no_perf`` (default True: no timings).

    Every call that reaches llama.cpp holds :attr:`lock`, so a context may be shared between
    threads and closed from any of them; :meth:`cancel` needs no lock. The callables of
    :meth:`token_steps` are the exception: the caller holds :attr:`lock` around them.

    Raises:
        ValueError: A size, a thread count or ``flash_attn`` is invalid (the message names
            it and its range); checked here, since llama.cpp aborts the process on them.
        ClosedError: The model is closed.
        ContextError: The KV cache would not fit in this machine's memory, or llama.cpp could
            not create the context.
    """

    _what = "context"

    def __init__(
        self,
        model: Model,
        *,
        n_ctx: int = 512,
        n_batch: int = 512,
        n_ubatch: int | None = None,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        embeddings: bool = False,
        pooling: PoolingType | int | None = None,
        n_seq_max: int = 1,
        flash_attn: FlashAttention | bool | str | None = None,
        kv_unified: bool | None = None,
        **params: Any,
    ) -> None:
        self.lock = threading.RLock()
        """Held by every call into llama.cpp on this context (reentrant)."""
        self._lib = L = lib()
        model._check()
        p = L.llama_context_default_params()
        if n_ubatch is None:
            n_ubatch = min(n_batch, p.n_ubatch) if p.n_ubatch else n_batch
        _validate(model, n_ctx, n_batch, n_ubatch, n_threads, n_threads_batch, n_seq_max,
                  embeddings, kv_unified)  # fmt: skip
        self.model = model
        p.n_ctx = n_ctx
        p.n_batch = n_batch
        p.n_ubatch = n_ubatch
        if n_threads is not None:
            p.n_threads = n_threads
        if n_threads_batch is not None or n_threads is not None:
            p.n_threads_batch = n_threads_batch or n_threads
        self.flash_attn = FlashAttention.of(flash_attn)
        p.flash_attn_type = self.flash_attn
        if kv_unified is not None:
            p.kv_unified = kv_unified
        p.embeddings = embeddings
        p.n_seq_max = n_seq_max
        if pooling is not None:
            p.pooling_type = PoolingType(pooling)
        p.no_perf = True
        set_params(p, params)
        # The callback holds the flag, not self: no reference cycle.
        flag = self._cancel = _CancelFlag()

        @ffi.callback("bool(void *)")
        def abort_cb(_ud: Any) -> bool:
            return flag.on

        # ggml calls the abort callback between graph nodes, and a Python callback costs a
        # GIL round trip each time: it is only installed for multi-token batches (prompt
        # processing); single-token steps check the flag before the call instead.
        self._abort_cb = abort_cb  # referenced for as long as the context lives
        self._abort_on = False
        model_ptr = model._add_user()
        try:
            ptr = nonnull(
                L.llama_init_from_model(model_ptr, p),
                ContextError,
                f"llama.cpp could not create a context (n_ctx={n_ctx}, n_batch={n_batch}); "
                "try a smaller n_ctx (the 'nexabind.llama' log says why)",
            )
        except BaseException:
            model._release_user()
            raise
        self._ptr = ffi.gc(ptr, L.llama_free)
        self.n_ctx: int = L.llama_n_ctx(ptr)
        self.n_batch: int = L.llama_n_batch(ptr)
        self.n_ubatch: int = L.llama_n_ubatch(ptr)
        """Tokens per compute step, as llama.cpp settled it."""
        self.n_ctx_seq: int = L.llama_n_ctx_seq(ptr)
        """KV cells one sequence can use (``n_ctx`` with a unified KV cache)."""
        self.n_seq_max: int = L.llama_n_seq_max(ptr)
        self.pooling = PoolingType(L.llama_pooling_type(ptr))
        """How embeddings are pooled, as llama.cpp settled it."""
        self.n_vocab = model.n_vocab
        self.batch = Batch(self.n_batch, n_seq_max)
        self.generation = 0
        self._has_logits = False  # whether output -1 of the last decode has logits to sample
        self._decode = L.llama_decode
        self._get_logits_ith = L.llama_get_logits_ith
        self._loras: list[LoraAdapter] = []
        self._vocab_only = model.vocab_only

    def close(self) -> None:
        """Free the context now (the model stays open); safe to call more than once.

        A decode running in another thread is finished first (call :meth:`cancel` before to
        stop a long one sooner).
        """
        if getattr(self, "_ptr", None) is None:
            return
        with self.lock:
            if self._ptr is None:
                return
            ffi.release(self._ptr)
            self._ptr = None
            self.batch.close()
            for adapter in self._loras:
                adapter._release_user()
            self._loras = []
            self.model._release_user()

    @property
    def ptr(self) -> Any:
        """The ``llama_context *`` (a cffi pointer) for calls through :func:`lib`; valid until
        :meth:`close`. Hold :attr:`lock` around such calls.

        Raises:
            ClosedError: The context is closed.
        """
        return self._check()

    ctx = ptr  # llama-cpp-python's name for it (``Llama._ctx.ctx``)

    def set_lora_adapters(self, adapters: list[tuple[LoraAdapter, float]]) -> None:
        """Apply these LoRA adapters with their scales (replacing any applied before).

        Raises:
            ClosedError: The context or an adapter is closed.
            ValueError: An adapter was loaded for another model.
            ContextError: llama.cpp refused them.
        """
        for adapter, _ in adapters:
            if adapter.model is not self.model:
                msg = f"the LoRA adapter {adapter.path} was loaded for another model"
                raise ValueError(msg)
        with self.lock:
            ptr = self._check()
            taken = []
            try:
                for adapter, _ in adapters:
                    taken.append(adapter._add_user())
            except BaseException:
                for adapter, _ in adapters[: len(taken)]:
                    adapter._release_user()
                raise
            n = len(adapters)
            arr = ffi.new("struct llama_adapter_lora *[]", taken or [ffi.NULL])
            scales = ffi.new("float[]", [float(s) for _, s in adapters] or [0.0])
            rc = self._lib.llama_set_adapters_lora(ptr, arr if n else ffi.NULL, n, scales)
            old, self._loras = self._loras, [a for a, _ in adapters]
            if rc != 0:
                self._loras = old
                for adapter, _ in adapters:
                    adapter._release_user()
                msg = f"llama.cpp refused the LoRA adapters (status {rc})"
                raise ContextError(msg)
            for adapter in old:
                adapter._release_user()

    @property
    def n_threads(self) -> int:
        """Threads llama.cpp uses for one-token decodes."""
        with self.lock:
            return self._lib.llama_n_threads(self._check())

    @property
    def n_threads_batch(self) -> int:
        """Threads llama.cpp uses for multi-token batches."""
        with self.lock:
            return self._lib.llama_n_threads_batch(self._check())

    def set_threads(self, n_threads: int, n_threads_batch: int | None = None) -> None:
        """Change the thread counts (``n_threads_batch`` None: as ``n_threads``).

        Raises:
            ValueError: A count is below 1.
        """
        n_batch = n_threads if n_threads_batch is None else n_threads_batch
        _check_threads("n_threads", n_threads)
        _check_threads("n_threads_batch", n_batch)
        with self.lock:
            self._lib.llama_set_n_threads(self._check(), n_threads, n_batch)

    def cancel(self) -> None:
        """Ask a decode running in another thread to stop (it raises DecodeCancelled)."""
        self._cancel.on = True

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was requested and not yet reported by a decode."""
        return self._cancel.on

    def clear_cancel(self) -> None:
        """Forget a :meth:`cancel` request that no decode has consumed yet."""
        self._cancel.on = False

    def prepare_single_token(self) -> None:
        """Turn the abort callback off before a caller-driven loop of one-token decodes.

        Such a loop should check :attr:`cancelled` itself between steps; :meth:`decode`
        turns the callback back on for the next multi-token batch.
        """
        with self.lock:
            ptr = self._check()
            if self._abort_on:
                self._set_abort(ptr, False)

    def token_steps(self, sampler: SamplerChain) -> TokenSteps:
        """Bind the calls of a one-token-at-a-time generation loop once, for the hot path.

        The returned callables look nothing up per token: ``sample()`` samples (and accepts)
        the next token from the last decode's logits with ``sampler``; ``is_eog(token)`` says
        whether it ends generation; ``piece(token)`` returns its bytes (possibly a partial
        UTF-8 character); ``feed(token, pos)`` decodes it at ``pos`` of sequence 0 through
        :attr:`batch`, whose header this call sets to one token (call again after using the
        batch for anything else). The abort callback is turned off as for
        :meth:`prepare_single_token`: ``feed`` checks for :meth:`cancel` before each decode.
        The callables take no lock: hold :attr:`lock` around them when other threads may use
        or close this context.

        Args:
            sampler: The chain ``sample`` uses; keep it open while the steps are used.

        Returns:
            A :class:`TokenSteps` of the four callables.

        Raises:
            ClosedError: The context or the sampler is closed (also from ``sample`` and
                ``feed`` when that happens later).
        """
        ptr = self._check()
        self._weights()
        chain = sampler._check()
        model = self.model
        vocab = model._checked_vocab()
        L = self._lib
        self.prepare_single_token()
        self.batch.set_one(0, 0)
        b = self.batch.b
        btok, bpos = b.token, b.pos
        sample_c, decode, to_piece = L.llama_sampler_sample, L.llama_decode, L.llama_token_to_piece
        unpack = ffi.unpack
        buf = ffi.new("char[]", 256)
        flag = self._cancel

        def sample() -> int:
            if self._ptr is None or sampler._ptr is None or not self._has_logits:
                self._check()
                sampler._check()
                self._no_logits()
            return sample_c(chain, ptr, -1)

        def piece(token: int) -> bytes:
            n = to_piece(vocab, token, buf, 256, 0, False)
            return unpack(buf, n) if n >= 0 else model.token_to_piece(token)

        def feed(token: int, pos: int) -> None:
            if self._ptr is None:
                self._check()
            if flag.on:
                self._raise_decode(2)
            btok[0] = token
            bpos[0] = pos
            self.generation += 1
            self._has_logits = False
            rc = decode(ptr, b)
            if rc:
                self._raise_decode(rc)
            self._has_logits = True

        return TokenSteps(sample, functools.partial(L.llama_vocab_is_eog, vocab), piece, feed)

    def vocab_steps(self) -> tuple[Callable[[int], bool], Callable[[int], bytes]]:
        """``is_eog(token)`` and ``piece(token)`` bound once, for a scheduler's hot path.

        No checks per call: give them tokens that sampling produced, while this context (and
        so its model) is open.
        """
        vocab = self.model._checked_vocab()
        L = self._lib
        to_piece, unpack, model = L.llama_token_to_piece, ffi.unpack, self.model
        buf = ffi.new("char[]", 256)

        def piece(token: int) -> bytes:
            n = to_piece(vocab, token, buf, 256, 0, False)
            return unpack(buf, n) if n >= 0 else model.token_to_piece(token)

        return functools.partial(L.llama_vocab_is_eog, vocab), piece

    def sampler_step(self, sampler: SamplerChain) -> Callable[[int], int]:
        """``sample(i)``: sample (and accept) output ``i`` of the last decode with ``sampler``.

        Bound once, no checks per call: hold :attr:`lock`, keep ``sampler`` open, and ask only
        for outputs the last batch computed logits for.
        """
        ptr, chain = self._check(), sampler._check()
        sample_c = self._lib.llama_sampler_sample
        return lambda i: sample_c(chain, ptr, i)

    def decode(self, batch: Batch | None = None) -> None:
        """Run the model on a batch (default: this context's own :attr:`batch`).

        A :meth:`cancel` from another thread stops a multi-token decode between graph nodes,
        and any decode before it starts.

        Raises:
            ClosedError: The context is closed.
            DecodeCancelled: :meth:`cancel` was called.
            ContextOverflowError: No room left in the KV cache.
            DecodeError: Any other llama.cpp failure.
        """
        with self.lock:
            ptr = self._check()
            self._weights()
            b = (batch or self.batch).b
            if self._cancel.on:
                self._raise_decode(2)
            n = b.n_tokens
            if (n > 1) is not self._abort_on:
                self._set_abort(ptr, n > 1)
            self.generation += 1
            self._has_logits = False
            rc = self._decode(ptr, b)
            if rc != 0:
                self._raise_decode(rc)
            self._has_logits = n > 0 and ffi.buffer(b.logits, n)[:].count(0) < n

    def _weights(self) -> None:
        if self._vocab_only:
            msg = (
                f"{self.model.path} was loaded with vocab_only=True: it has no weights to "
                "decode with; load it without vocab_only to generate"
            )
            raise ContextError(msg)

    def _no_logits(self) -> None:
        if not self._has_logits:
            msg = "no logits to sample from: decode a batch that asks for them first"
            raise DecodeError(msg)

    def _set_abort(self, ptr: Any, on: bool) -> None:
        self._abort_on = on
        self._lib.llama_set_abort_callback(ptr, self._abort_cb if on else ffi.NULL, ffi.NULL)

    def _raise_decode(self, rc: int) -> None:
        cancelled = self._cancel.on
        self._cancel.on = False
        raise_decode(rc, n_ctx=self.n_ctx, cancelled=cancelled)

    def encode(self, batch: Batch | None = None) -> None:
        """Run an encoder (or embedding model) on a batch; same errors as :meth:`decode`."""
        with self.lock:
            ptr = self._check()
            self._weights()
            b = (batch or self.batch).b
            if self._cancel.on:
                self._raise_decode(2)
            if not self._abort_on:
                self._set_abort(ptr, True)
            self.generation += 1
            self._has_logits = False
            rc = self._lib.llama_encode(ptr, b)
            if rc != 0:
                self._raise_decode(rc)

    def _memory(self) -> Any:
        return self._lib.llama_get_memory(self._check())

    def _seq(self, seq_id: int) -> int:
        if not 0 <= seq_id < self.n_seq_max:
            msg = f"sequence {seq_id} does not exist; this context has 0..{self.n_seq_max - 1}"
            raise ValueError(msg)
        return seq_id

    def clear(self) -> None:
        """Clear the KV cache (all sequences)."""
        with self.lock:
            self._lib.llama_memory_clear(self._memory(), True)

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        """Remove positions ``[p0, p1)`` of a sequence (-1: open end); False if impossible."""
        with self.lock:
            return bool(self._lib.llama_memory_seq_rm(self._memory(), self._seq(seq_id), p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        """Copy positions ``[p0, p1)`` of sequence ``src`` to ``dst``."""
        with self.lock:
            mem = self._memory()
            self._lib.llama_memory_seq_cp(mem, self._seq(src), self._seq(dst), p0, p1)

    def seq_add(self, seq_id: int, p0: int, p1: int, delta: int) -> None:
        """Shift positions ``[p0, p1)`` of a sequence by ``delta`` (-1 ends: open)."""
        with self.lock:
            self._lib.llama_memory_seq_add(self._memory(), self._seq(seq_id), p0, p1, delta)

    def seq_keep(self, seq_id: int) -> None:
        """Drop every sequence but ``seq_id``."""
        with self.lock:
            self._lib.llama_memory_seq_keep(self._memory(), self._seq(seq_id))

    def seq_pos_max(self, seq_id: int = 0) -> int:
        """Highest position stored for a sequence (-1 when empty)."""
        with self.lock:
            return self._lib.llama_memory_seq_pos_max(self._memory(), self._seq(seq_id))

    def state_get(self) -> bytes:
        """Serialize the context state (KV cache, logits, RNG).

        Raises:
            StateError: llama.cpp wrote fewer bytes than it announced.
        """
        L = self._lib
        with self.lock:
            ptr = self._check()
            size = L.llama_state_get_size(ptr)
            buf = ffi.new("uint8_t[]", size)
            n = L.llama_state_get_data(ptr, buf, size)
        if n == 0 and size:
            msg = f"saving the context state failed ({size} bytes announced)"
            raise StateError(msg)
        return ffi.unpack(ffi.cast("char *", buf), n)

    def state_set(self, data: bytes) -> None:
        """Restore a state from :meth:`state_get` of a context over the same model.

        Raises:
            StateError: llama.cpp rejected the data.
        """
        src = ffi.from_buffer("uint8_t[]", data)
        with self.lock:
            ptr = self._check()
            self.generation += 1
            self._has_logits = False
            n = self._lib.llama_state_set_data(ptr, src, len(data))
        if n != len(data):
            msg = (
                f"restoring the context state failed (read {n} of {len(data)} bytes); "
                "the state must come from a context over the same model"
            )
            raise StateError(msg)

    def state_seq_get(self, seq_id: int) -> bytes:
        """Serialize one sequence's KV cells (to move it out of the cache and back later).

        Raises:
            StateError: llama.cpp wrote fewer bytes than it announced.
        """
        L = self._lib
        with self.lock:
            ptr = self._check()
            seq = self._seq(seq_id)
            size = L.llama_state_seq_get_size(ptr, seq)
            buf = ffi.new("uint8_t[]", size)
            n = L.llama_state_seq_get_data(ptr, buf, size, seq)
        if n != size:
            msg = f"saving sequence {seq_id} failed ({n} of {size} bytes written)"
            raise StateError(msg)
        return ffi.unpack(ffi.cast("char *", buf), n)

    def state_seq_set(self, data: bytes, seq_id: int) -> None:
        """Restore :meth:`state_seq_get` data into sequence ``seq_id`` (emptied first).

        Raises:
            StateError: llama.cpp refused the data (another model, or no room in the cache).
        """
        src = ffi.from_buffer("uint8_t[]", data)
        with self.lock:
            ptr = self._check()
            seq = self._seq(seq_id)
            self._lib.llama_memory_seq_rm(self._memory(), seq, -1, -1)
            n = self._lib.llama_state_seq_set_data(ptr, src, len(data), seq)
        if n != len(data):
            msg = (
                f"restoring sequence {seq_id} failed (read {n} of {len(data)} bytes); the "
                "data must come from a context over the same model, with room in its cache"
            )
            raise StateError(msg)

    def logits(self, i: int = -1) -> np.ndarray:
        """Return a read-only float32 view of the logits of batch token ``i`` (default: last).

        The view aliases llama.cpp memory and is only valid until the next decode; use
        :class:`LogitsView` through :meth:`logits_view` to detect stale use.
        """
        import numpy as np

        with self.lock:
            ptr = nonnull(
                self._get_logits_ith(self._check(), i),
                DecodeError,
                f"no logits for output {i}; request logits for that token in the batch",
            )
        arr = np.frombuffer(ffi.buffer(ptr, 4 * self.n_vocab), dtype=np.float32)
        arr.flags.writeable = False
        return arr

    def logits_view(self, i: int = -1) -> LogitsView:
        """Return logits that raise when read after the next decode."""
        return LogitsView(self, self.logits(i), self.generation)

    def logits_rows(self, n: int) -> np.ndarray:
        """A read-only ``(n, n_vocab)`` view of the logits of the last decode's ``n`` outputs
        (every token that asked for logits, in batch order); valid until the next decode.

        Raises:
            DecodeError: The last decode produced fewer than ``n`` outputs.
        """
        import numpy as np

        with self.lock:
            ptr = self._check()
            if n < 1 or self._get_logits_ith(ptr, n - 1) == ffi.NULL:
                msg = f"the last decode has fewer than {n} outputs with logits"
                raise DecodeError(msg)
            base = self._lib.llama_get_logits(ptr)
        arr = np.frombuffer(ffi.buffer(base, 4 * n * self.n_vocab), dtype=np.float32)
        arr = arr.reshape(n, self.n_vocab)
        arr.flags.writeable = False
        return arr

    def token_embeddings(self, i: int) -> np.ndarray:
        """A read-only view of the embedding of output ``i`` of the last decode (an embedding
        context without pooling gives one per token).

        Raises:
            DecodeError: Output ``i`` has no embedding.
        """
        import numpy as np

        with self.lock:
            ptr = self._lib.llama_get_embeddings_ith(self._check(), i)
        ptr = nonnull(ptr, DecodeError, f"no embedding for output {i} of the last decode")
        arr = np.frombuffer(ffi.buffer(ptr, 4 * self.model.n_embd), dtype=np.float32)
        arr.flags.writeable = False
        return arr

    def embeddings(self, seq_id: int = 0) -> np.ndarray:
        """Return a read-only view of the pooled embedding of sequence ``seq_id``."""
        import numpy as np

        L = self._lib
        with self.lock:
            ptr = L.llama_get_embeddings_seq(self._check(), self._seq(seq_id))
            if ptr == ffi.NULL:
                ptr = L.llama_get_embeddings_ith(self._ptr, -1)
        ptr = nonnull(ptr, DecodeError, "no embeddings: create the context with embeddings=True")
        arr = np.frombuffer(ffi.buffer(ptr, 4 * self.model.n_embd), dtype=np.float32)
        arr.flags.writeable = False
        return arr


class LogitsView:
    """Logits tied to the decode that produced them; :attr:`array` raises once stale."""

    def __init__(self, ctx: Context, arr: np.ndarray, generation: int) -> None:
        self._ctx = ctx
        self._arr = arr
        self._gen = generation

    @property
    def array(self) -> np.ndarray:
        """The zero-copy view. Raises ContextError after the next decode or close."""
        if self._ctx.closed or self._ctx.generation != self._gen:
            msg = (
                "these logits are stale (a later decode or close overwrote them); "
                "copy them with .copy() to keep them"
            )
            raise ContextError(msg)
        return self._arr


def _check_threads(name: str, value: int | None) -> None:
    if value is not None and not 1 <= value <= MAX_THREADS:
        msg = f"{name}={value} is invalid; use 1..{MAX_THREADS} threads, or None"
        raise ValueError(msg)


def _validate(
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
    _check_threads("n_threads", n_threads)
    _check_threads("n_threads_batch", n_threads_batch)
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
    ram = _physical_memory()
    if ram is not None and need > ram + _device_memory():
        gib = 1 << 30
        msg = (
            f"n_ctx={n_ctx or cells} needs about {need / gib:.1f} GiB of KV cache, more than "
            f"this machine's {ram / gib:.1f} GiB of memory; use a smaller n_ctx"
        )
        raise ContextError(msg)
