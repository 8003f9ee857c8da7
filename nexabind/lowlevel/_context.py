"""``Context``: a llama.cpp context over a ``Model``: creating and closing it, threads, LoRA
adapters, cancelling, and decoding (the one-token hot path of :meth:`Context.token_steps`).

Its other calls come from its parts: the KV cells and saved states (:mod:`._memory`), the logits
and embeddings a decode produced (:mod:`._outputs`); what it may be asked for is checked before
llama.cpp sees it (:mod:`._limits`).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from nexabind._ffi import ffi
from nexabind.errors import ContextError, DecodeError
from nexabind.lowlevel._adapter import LoraAdapter
from nexabind.lowlevel._batch import Batch
from nexabind.lowlevel._lib import FlashAttention, PoolingType, lib, nonnull, raise_decode
from nexabind.lowlevel._limits import check_context, check_threads
from nexabind.lowlevel._memory import ContextMemory
from nexabind.lowlevel._model import Model
from nexabind.lowlevel._outputs import ContextOutputs
from nexabind.lowlevel._params import set_params
from nexabind.lowlevel._sampler import SamplerChain


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


class Context(ContextMemory, ContextOutputs):
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
        check_context(model, n_ctx, n_batch, n_ubatch, n_threads, n_threads_batch, n_seq_max,
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
        check_threads("n_threads", n_threads)
        check_threads("n_threads_batch", n_batch)
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
