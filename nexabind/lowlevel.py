"""Python names over the llama.cpp C API; the only module that calls ``lib``.

Objects own their native handle and free it in an idempotent ``close()`` (also on ``with``
exit); a finalizer is only a backstop. A :class:`Context` keeps its :class:`Model` alive.
Logits and embeddings are read-only numpy views over llama.cpp memory, valid until the next
decode; reading a stale view through :meth:`Context.logits` raises.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from nexabind import loader
from nexabind._ffi import ffi
from nexabind.errors import (
    ContextError,
    ContextOverflowError,
    DecodeCancelled,
    DecodeError,
    ModelLoadError,
    StateError,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    import numpy as np

__all__ = [
    "Batch",
    "Context",
    "Model",
    "Sampler",
    "SamplerChain",
    "TokenSteps",
    "chat_template_apply",
    "devices",
    "lib",
    "set_verbose",
    "system_info",
    "time_us",
    "version",
]


def lib(lib_path: str | os.PathLike[str] | None = None) -> Any:
    """Return the loaded llama.cpp library (loading it on first use).

    Args:
        lib_path: Library folder for the first load; see :func:`nexabind.loader.library_dir`.
    """
    return loader.load(lib_path)


_native_log = logging.getLogger("nexabind.llama")
_O = TypeVar("_O", bound="_Owned")
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


def system_info() -> str:
    """Return llama.cpp's system info line (CPU features of the loaded backend)."""
    return ffi.string(lib().llama_print_system_info()).decode()


def version() -> str:
    """Return llama.cpp's version string as compiled into the loaded library."""
    return ffi.string(lib().llama_version()).decode()


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


def time_us() -> int:
    """Return llama.cpp's monotonic clock in microseconds (a trivial C call)."""
    return lib().llama_time_us()


def devices() -> list[dict[str, str]]:
    """Return the ggml backend devices registered after loading, as name/description dicts."""
    lib()
    g = loader.ggml()
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


_FLASH_ATTN = {
    "auto": ffi.integer_const("LLAMA_FLASH_ATTN_TYPE_AUTO"),
    "disabled": ffi.integer_const("LLAMA_FLASH_ATTN_TYPE_DISABLED"),
    "enabled": ffi.integer_const("LLAMA_FLASH_ATTN_TYPE_ENABLED"),
}


def _flash_attn_name(value: bool | str | None) -> str:
    if value is None:
        return "auto"
    if isinstance(value, bool):
        return "enabled" if value else "disabled"
    if value in _FLASH_ATTN:
        return value
    msg = f"flash_attn={value!r} is invalid; use True, False, None or one of {sorted(_FLASH_ATTN)}"
    raise ValueError(msg)


class _Owned:
    """``closed``, ``with`` and the closed check of an object that owns a llama.cpp pointer."""

    _ptr: Any = None

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._ptr is None

    def close(self) -> None:
        raise NotImplementedError

    def _closed_error(self) -> Exception:
        raise NotImplementedError

    def __enter__(self: _O) -> _O:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self) -> Any:
        if self.closed:
            raise self._closed_error()
        return self._ptr


class Model(_Owned):
    """A loaded GGUF model (weights and vocabulary).

    Args:
        path: The ``.gguf`` file.
        n_gpu_layers: Layers to offload to a GPU device (0: CPU only).
        vocab_only: Load only the vocabulary.
        use_mmap: Map the file instead of reading it.
        use_mlock: Lock the weights in RAM (no swapping); llama.cpp warns when the system's
            locked-memory limit is too low.
        progress: Called with the load progress in [0, 1]; return False to abort the load.

    Raises:
        ModelLoadError: The file is missing, or llama.cpp cannot load it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        n_gpu_layers: int = 0,
        vocab_only: bool = False,
        use_mmap: bool = True,
        use_mlock: bool = False,
        progress: Callable[[float], bool | None] | None = None,
    ) -> None:
        self._lib = L = lib()
        self.path = Path(path)
        if not self.path.is_file():
            msg = f"model file not found: {self.path}; check the path or download the model"
            raise ModelLoadError(msg)
        params = L.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.vocab_only = vocab_only
        if use_mlock:
            params.load_mode = L.LLAMA_LOAD_MODE_MMAP_MLOCK if use_mmap else L.LLAMA_LOAD_MODE_MLOCK
        elif not use_mmap:
            params.load_mode = L.LLAMA_LOAD_MODE_NONE
        cb = None
        if progress is not None:

            @ffi.callback("bool(float, void *)")
            def cb(p: float, _ud: Any) -> bool:
                return progress(p) is not False

            params.progress_callback = cb
        ptr = L.llama_model_load_from_file(str(self.path).encode(), params)
        if ptr == ffi.NULL:
            msg = (
                f"llama.cpp could not load {self.path} (not a valid GGUF model, truncated, or an "
                f"unsupported architecture); enable logging.getLogger('nexabind.llama') for why"
            )
            raise ModelLoadError(msg)
        self._ptr = ffi.gc(ptr, L.llama_model_free)
        self._vocab = L.llama_model_get_vocab(ptr)
        self.n_vocab = L.llama_vocab_n_tokens(self._vocab)
        self.n_embd = L.llama_model_n_embd(ptr)
        self.n_ctx_train = L.llama_model_n_ctx_train(ptr)
        self._piece = ffi.new("char[]", 256)
        self._users = 0
        self._closing = False

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._ptr is None or self._closing

    def close(self) -> None:
        """Free the model; safe to call more than once.

        While contexts still use the model, the memory is freed when the last one closes.
        """
        if getattr(self, "_ptr", None) is None:
            return
        self._closing = True
        if self._users == 0:
            ffi.release(self._ptr)
            self._ptr = None
            self._vocab = None

    def _release_user(self) -> None:
        self._users -= 1
        if self._closing and self._users == 0:
            self.close()

    def _closed_error(self) -> Exception:
        return ModelLoadError(f"model {self.path} is closed; load it again")

    def _checked_vocab(self) -> Any:
        self._check()
        return self._vocab

    @property
    def description(self) -> str:
        """llama.cpp's one-line description of the model (architecture, size, type)."""
        buf = ffi.new("char[]", 256)
        self._lib.llama_model_desc(self._check(), buf, 256)
        return ffi.string(buf).decode("utf-8", "replace")

    @property
    def n_params(self) -> int:
        """Number of weights."""
        return self._lib.llama_model_n_params(self._check())

    @property
    def size(self) -> int:
        """Total size of the weights in bytes."""
        return self._lib.llama_model_size(self._check())

    def metadata(self) -> dict[str, str]:
        """Return the GGUF metadata as strings (arrays are summarised by llama.cpp)."""
        L, ptr = self._lib, self._check()
        out = {}
        buf = ffi.new("char[]", 4096)
        for i in range(L.llama_model_meta_count(ptr)):
            L.llama_model_meta_key_by_index(ptr, i, buf, 4096)
            key = ffi.string(buf).decode("utf-8", "replace")
            n = L.llama_model_meta_val_str_by_index(ptr, i, buf, 4096)
            if n >= 4096:
                big = ffi.new("char[]", n + 1)
                L.llama_model_meta_val_str_by_index(ptr, i, big, n + 1)
                out[key] = ffi.string(big).decode("utf-8", "replace")
            else:
                out[key] = ffi.string(buf).decode("utf-8", "replace")
        return out

    def chat_template(self, name: str | None = None) -> str | None:
        """Return the model's chat template (Jinja text), or None if it has none."""
        p = self._lib.llama_model_chat_template(self._check(), name.encode() if name else ffi.NULL)
        return None if p == ffi.NULL else ffi.string(p).decode("utf-8", "replace")

    @property
    def add_bos(self) -> bool:
        """Whether tokenization adds BOS."""
        self._check()
        return bool(self._lib.llama_vocab_get_add_bos(self._vocab))

    def token_text(self, token: int) -> str:
        """The vocabulary's text of ``token``."""
        self._check()
        if not 0 <= token < self.n_vocab:
            msg = f"token {token} is outside the vocabulary (0..{self.n_vocab - 1})"
            raise ValueError(msg)
        return ffi.string(self._lib.llama_vocab_get_text(self._vocab, token)).decode(
            "utf-8", "replace"
        )

    @property
    def bos(self) -> int:
        """Beginning-of-sequence token id (-1 if none)."""
        self._check()
        return self._lib.llama_vocab_bos(self._vocab)

    @property
    def eos(self) -> int:
        """End-of-sequence token id (-1 if none)."""
        self._check()
        return self._lib.llama_vocab_eos(self._vocab)

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends generation (EOS, EOT, ...)."""
        self._check()
        return bool(self._lib.llama_vocab_is_eog(self._vocab, token))

    def tokenize(
        self, text: str | bytes, *, add_special: bool = True, parse_special: bool = False
    ) -> list[int]:
        """Tokenize text.

        Args:
            text: str (UTF-8 encoded) or bytes.
            add_special: Add BOS/EOS as the model's vocabulary asks.
            parse_special: Treat special-token text (``<|im_start|>``) as special tokens.

        Returns:
            The token ids.
        """
        self._check()
        data = text.encode() if isinstance(text, str) else bytes(text)
        n_max = len(data) + 8
        buf = ffi.new("llama_token[]", n_max)
        n = self._lib.llama_tokenize(
            self._vocab, data, len(data), buf, n_max, add_special, parse_special
        )
        if n < 0:
            n_max = -n
            buf = ffi.new("llama_token[]", n_max)
            n = self._lib.llama_tokenize(
                self._vocab, data, len(data), buf, n_max, add_special, parse_special
            )
        if n < 0:
            msg = f"tokenizing {len(data)} bytes failed ({n})"
            raise ValueError(msg)
        return list(buf[0:n])

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        """Return the bytes of one token (may be a partial UTF-8 sequence).

        Args:
            token: Token id.
            special: Render special tokens as their text.
        """
        self._check()
        buf = self._piece
        n = self._lib.llama_token_to_piece(self._vocab, token, buf, 256, 0, special)
        if n < 0:
            buf = ffi.new("char[]", -n)
            n = self._lib.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
        return ffi.unpack(buf, n)

    def detokenize(
        self, tokens: Sequence[int], *, remove_special: bool = False, unparse_special: bool = False
    ) -> str:
        """Turn token ids back into text.

        Args:
            tokens: Token ids.
            remove_special: Drop BOS/EOS tokens.
            unparse_special: Render special tokens as their text.
        """
        self._check()
        toks = ffi.new("llama_token[]", list(tokens))
        cap = max(64, len(tokens) * 8)
        buf = ffi.new("char[]", cap)
        n = self._lib.llama_detokenize(
            self._vocab, toks, len(tokens), buf, cap, remove_special, unparse_special
        )
        if n < 0:
            cap = -n
            buf = ffi.new("char[]", cap)
            n = self._lib.llama_detokenize(
                self._vocab, toks, len(tokens), buf, cap, remove_special, unparse_special
            )
        return ffi.unpack(buf, n).decode("utf-8", "replace")


class Batch:
    """A reusable ``llama_batch`` of up to ``capacity`` tokens, allocated once.

    Args:
        capacity: Maximum number of tokens.
        n_seq_max: Maximum sequences a token may belong to.
    """

    def __init__(self, capacity: int, n_seq_max: int = 1) -> None:
        L = lib()
        if capacity < 1:
            msg = f"batch capacity must be >= 1, got {capacity}"
            raise ValueError(msg)
        self.capacity = capacity
        raw = L.llama_batch_init(capacity, 0, n_seq_max)
        self._holder = ffi.new("struct llama_batch *", raw)
        self._free = L.llama_batch_free
        self._raw = raw
        self.b = self._holder[0]

    def close(self) -> None:
        """Free the batch; safe to call more than once."""
        if self._raw is not None:
            self._free(self._raw)
            self._raw = None

    def set(
        self, tokens: Sequence[int], pos0: int, *, seq_id: int = 0, logits_last: bool = True
    ) -> None:
        """Fill the batch with ``tokens`` at positions ``pos0..`` in sequence ``seq_id``.

        Args:
            tokens: Token ids (at most ``capacity``).
            pos0: Position of the first token.
            seq_id: Sequence id.
            logits_last: Request logits for the last token only (else for every token).
        """
        n = len(tokens)
        if n > self.capacity:
            msg = f"{n} tokens do not fit in a batch of {self.capacity}"
            raise ValueError(msg)
        b = self.b
        tok, pos, nseq, sid, lg = b.token, b.pos, b.n_seq_id, b.seq_id, b.logits
        for i in range(n):
            tok[i] = tokens[i]
            pos[i] = pos0 + i
            nseq[i] = 1
            sid[i][0] = seq_id
            lg[i] = not logits_last
        lg[n - 1] = True
        b.n_tokens = n

    def set_array(self, tokens: Any, pos0: int, *, seq_id: int = 0) -> None:
        """Fill the batch from an int32 buffer (numpy int32, ``array('i')``) in one copy.

        Only the last token requests logits.
        """
        src = ffi.from_buffer("llama_token[]", tokens)
        n = len(src)
        if not 0 < n <= self.capacity:
            msg = f"{n} tokens do not fit in a batch of {self.capacity}"
            raise ValueError(msg)
        b = self.b
        ffi.memmove(b.token, src, 4 * n)
        pos, nseq, sid, lg = b.pos, b.n_seq_id, b.seq_id, b.logits
        for i in range(n):
            pos[i] = pos0 + i
            nseq[i] = 1
            sid[i][0] = seq_id
            lg[i] = False
        lg[n - 1] = True
        b.n_tokens = n

    def clear(self) -> None:
        """Empty the batch before :meth:`add`."""
        self.b.n_tokens = 0

    def add(self, token: int, pos: int, seq_id: int = 0, logits: bool = False) -> None:
        """Append one token (e.g. several sequences in one decode for embeddings)."""
        b = self.b
        i = b.n_tokens
        if i >= self.capacity:
            msg = f"the batch is full ({self.capacity} tokens)"
            raise ValueError(msg)
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq_id
        b.logits[i] = logits
        b.n_tokens = i + 1

    def set_one(self, token: int, pos: int, seq_id: int = 0) -> None:
        """Fill the batch with a single token that requests logits (the generation step)."""
        b = self.b
        b.token[0] = token
        b.pos[0] = pos
        b.n_seq_id[0] = 1
        b.seq_id[0][0] = seq_id
        b.logits[0] = True
        b.n_tokens = 1


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


class CancelFlag:
    """A thread-safe enough boolean (one attribute store) that a decode polls."""

    __slots__ = ("on",)

    def __init__(self) -> None:
        self.on = False

    def set(self) -> None:
        """Request cancellation."""
        self.on = True

    def clear(self) -> None:
        """Withdraw the request."""
        self.on = False

    def is_set(self) -> bool:
        """Whether cancellation was requested."""
        return self.on

    def __getitem__(self, _i: int) -> bool:
        return self.on

    def __setitem__(self, _i: int, value: bool) -> None:
        self.on = value


class Context(_Owned):
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
        pooling: llama.cpp pooling type value for embeddings (None: the model's).
        n_seq_max: Sequences the context (and its :attr:`batch`) can hold at once.
        flash_attn: Use flash attention: True, False, or None to let llama.cpp decide per
            device (``"enabled"``, ``"disabled"`` and ``"auto"`` are accepted too).
        kv_unified: One KV buffer shared by all sequences, so any sequence may use the whole
            context (None: llama.cpp's default); without it each of the ``n_seq_max``
            sequences gets ``n_ctx / n_seq_max`` cells (see :attr:`n_ctx_seq`).

    Raises:
        ValueError: ``n_ubatch``, a thread count or ``flash_attn`` is invalid.
        ContextError: The model is closed or llama.cpp could not create the context.
    """

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
        pooling: int | None = None,
        n_seq_max: int = 1,
        flash_attn: bool | str | None = None,
        kv_unified: bool | None = None,
    ) -> None:
        self._lib = L = lib()
        if model.closed:
            msg = "cannot create a context on a closed model"
            raise ContextError(msg)
        self.model = model
        p = L.llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = n_batch
        if n_ubatch is None:
            p.n_ubatch = min(n_batch, p.n_ubatch) if p.n_ubatch else n_batch
        elif n_ubatch < 1:
            msg = f"n_ubatch={n_ubatch} is invalid; use a positive number (at most n_batch)"
            raise ValueError(msg)
        else:
            p.n_ubatch = n_ubatch
        for name, value in (("n_threads", n_threads), ("n_threads_batch", n_threads_batch)):
            if value is not None and value < 1:
                msg = f"{name}={value} is invalid; use a positive number of threads or None"
                raise ValueError(msg)
        if n_threads is not None:
            p.n_threads = n_threads
        if n_threads_batch is not None or n_threads is not None:
            p.n_threads_batch = n_threads_batch or n_threads
        self.flash_attn = _flash_attn_name(flash_attn)
        p.flash_attn_type = _FLASH_ATTN[self.flash_attn]
        if kv_unified is not None:
            p.kv_unified = kv_unified
        p.embeddings = embeddings
        p.n_seq_max = n_seq_max
        if pooling is not None:
            p.pooling_type = pooling
        p.no_perf = True
        # The callback holds the flag, not self: no reference cycle.
        flag = self._cancel = self._cancel_flag = CancelFlag()

        @ffi.callback("bool(void *)")
        def abort_cb(_ud: Any) -> bool:
            return flag.on

        # ggml calls the abort callback between graph nodes, and a Python callback costs a
        # GIL round trip each time: it is only installed for multi-token batches (prompt
        # processing); single-token steps check the flag before the call instead.
        self._abort_cb = abort_cb  # referenced for as long as the context lives
        self._abort_on = False
        ptr = L.llama_init_from_model(model._check(), p)
        if ptr == ffi.NULL:
            msg = (
                f"llama.cpp could not create a context (n_ctx={n_ctx}, n_batch={n_batch}); "
                "try a smaller n_ctx"
            )
            raise ContextError(msg)
        self._ptr = ffi.gc(ptr, L.llama_free)
        model._users += 1
        self.n_ctx = L.llama_n_ctx(ptr)
        self.n_batch = L.llama_n_batch(ptr)
        self.n_ubatch = L.llama_n_ubatch(ptr)
        """Tokens per compute step, as llama.cpp settled it."""
        self.n_ctx_seq = L.llama_n_ctx_seq(ptr)
        """KV cells one sequence can use (``n_ctx`` with a unified KV cache)."""
        self.n_vocab = model.n_vocab
        self.batch = Batch(self.n_batch, n_seq_max)
        self.generation = 0
        self._decode = L.llama_decode
        self._get_logits_ith = L.llama_get_logits_ith

    def close(self) -> None:
        """Free the context now (the model stays open); safe to call more than once."""
        if getattr(self, "_ptr", None) is not None:
            ffi.release(self._ptr)
            self._ptr = None
            self.batch.close()
            self.model._release_user()

    def _closed_error(self) -> Exception:
        return ContextError("context is closed; create a new one")

    @property
    def n_threads(self) -> int:
        """Threads llama.cpp uses for one-token decodes."""
        return self._lib.llama_n_threads(self._check())

    @property
    def n_threads_batch(self) -> int:
        """Threads llama.cpp uses for multi-token batches."""
        return self._lib.llama_n_threads_batch(self._check())

    def set_threads(self, n_threads: int, n_threads_batch: int | None = None) -> None:
        """Change the thread counts (``n_threads_batch`` None: as ``n_threads``).

        Raises:
            ValueError: A count is below 1.
        """
        n_batch = n_threads if n_threads_batch is None else n_threads_batch
        if n_threads < 1 or n_batch < 1:
            msg = (
                f"thread counts must be >= 1, got n_threads={n_threads}, n_threads_batch={n_batch}"
            )
            raise ValueError(msg)
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

        Args:
            sampler: The chain ``sample`` uses; keep it open while the steps are used.

        Returns:
            A :class:`TokenSteps` of the four callables.

        Raises:
            ContextError: The context or the sampler is closed (also from ``sample`` and
                ``feed`` when that happens later).
        """
        ptr = self._check()
        chain = sampler._check()
        model = self.model
        vocab = model._checked_vocab()
        L = self._lib
        self.prepare_single_token()
        b = self.batch.b
        b.n_seq_id[0] = 1
        b.seq_id[0][0] = 0
        b.logits[0] = True
        b.n_tokens = 1
        btok, bpos = b.token, b.pos
        sample_c, decode, to_piece = L.llama_sampler_sample, L.llama_decode, L.llama_token_to_piece
        unpack = ffi.unpack
        buf = ffi.new("char[]", 256)
        flag = self._cancel

        def sample() -> int:
            if self._ptr is None or sampler._ptr is None:
                self._check()
                sampler._check()
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
            rc = decode(ptr, b)
            if rc:
                self._raise_decode(rc)

        return TokenSteps(sample, functools.partial(L.llama_vocab_is_eog, vocab), piece, feed)

    def decode(self, batch: Batch | None = None) -> None:
        """Run the model on a batch (default: this context's own :attr:`batch`).

        A :meth:`cancel` from another thread stops a multi-token decode between graph nodes,
        and any decode before it starts.

        Raises:
            ContextError: The context is closed.
            DecodeCancelled: :meth:`cancel` was called.
            ContextOverflowError: No room left in the KV cache.
            DecodeError: Any other llama.cpp failure.
        """
        ptr = self._check()
        b = (batch or self.batch).b
        if self._cancel.on:
            self._raise_decode(2)
        if (b.n_tokens > 1) is not self._abort_on:
            self._set_abort(ptr, b.n_tokens > 1)
        self.generation += 1
        rc = self._decode(ptr, b)
        if rc != 0:
            self._raise_decode(rc)

    def _set_abort(self, ptr: Any, on: bool) -> None:
        self._abort_on = on
        self._lib.llama_set_abort_callback(ptr, self._abort_cb if on else ffi.NULL, ffi.NULL)

    def _raise_decode(self, rc: int) -> None:
        if rc == 2 or self._cancel.on:
            self._cancel.on = False
            msg = "decode cancelled"
            raise DecodeCancelled(msg)
        if rc == 1:
            msg = (
                f"no KV cache slot for the batch (context of {self.n_ctx} tokens is full); "
                "use a larger n_ctx or clear the memory"
            )
            raise ContextOverflowError(msg)
        msg = f"llama_decode failed with status {rc}; the 'nexabind.llama' log says why"
        raise DecodeError(msg)

    def encode(self, batch: Batch | None = None) -> None:
        """Run an encoder (or embedding model) on a batch; same errors as :meth:`decode`."""
        ptr = self._check()
        b = (batch or self.batch).b
        if self._cancel.on:
            self._raise_decode(2)
        if not self._abort_on:
            self._set_abort(ptr, True)
        self.generation += 1
        rc = self._lib.llama_encode(ptr, b)
        if rc != 0:
            self._raise_decode(rc)

    def clear(self) -> None:
        """Clear the KV cache (all sequences)."""
        L = self._lib
        L.llama_memory_clear(L.llama_get_memory(self._check()), True)

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        """Remove positions ``[p0, p1)`` of a sequence (-1: open end); False if impossible."""
        L = self._lib
        return bool(L.llama_memory_seq_rm(L.llama_get_memory(self._check()), seq_id, p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        """Copy positions ``[p0, p1)`` of sequence ``src`` to ``dst``."""
        L = self._lib
        L.llama_memory_seq_cp(L.llama_get_memory(self._check()), src, dst, p0, p1)

    def seq_add(self, seq_id: int, p0: int, p1: int, delta: int) -> None:
        """Shift positions ``[p0, p1)`` of a sequence by ``delta`` (-1 ends: open)."""
        L = self._lib
        L.llama_memory_seq_add(L.llama_get_memory(self._check()), seq_id, p0, p1, delta)

    def seq_keep(self, seq_id: int) -> None:
        """Drop every sequence but ``seq_id``."""
        L = self._lib
        L.llama_memory_seq_keep(L.llama_get_memory(self._check()), seq_id)

    def seq_pos_max(self, seq_id: int = 0) -> int:
        """Highest position stored for a sequence (-1 when empty)."""
        L = self._lib
        return L.llama_memory_seq_pos_max(L.llama_get_memory(self._check()), seq_id)

    def state_get(self) -> bytes:
        """Serialize the context state (KV cache, logits, RNG).

        Raises:
            StateError: llama.cpp wrote fewer bytes than it announced.
        """
        L, ptr = self._lib, self._check()
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
        ptr = self._check()
        self.generation += 1
        n = self._lib.llama_state_set_data(ptr, ffi.from_buffer("uint8_t[]", data), len(data))
        if n != len(data):
            msg = (
                f"restoring the context state failed (read {n} of {len(data)} bytes); "
                "the state must come from a context over the same model"
            )
            raise StateError(msg)

    def logits(self, i: int = -1) -> np.ndarray:
        """Return a read-only float32 view of the logits of batch token ``i`` (default: last).

        The view aliases llama.cpp memory and is only valid until the next decode; use
        :class:`LogitsView` through :meth:`logits_view` to detect stale use.
        """
        import numpy as np

        ptr = self._get_logits_ith(self._check(), i)
        if ptr == ffi.NULL:
            msg = f"no logits for output {i}; request logits for that token in the batch"
            raise DecodeError(msg)
        arr = np.frombuffer(ffi.buffer(ptr, 4 * self.n_vocab), dtype=np.float32)
        arr.flags.writeable = False
        return arr

    def logits_view(self, i: int = -1) -> LogitsView:
        """Return logits that raise when read after the next decode."""
        return LogitsView(self, self.logits(i), self.generation)

    def embeddings(self, seq_id: int = 0) -> np.ndarray:
        """Return a read-only view of the pooled embedding of sequence ``seq_id``."""
        import numpy as np

        L = self._lib
        ptr = L.llama_get_embeddings_seq(self._check(), seq_id)
        if ptr == ffi.NULL:
            ptr = L.llama_get_embeddings_ith(self._ptr, -1)
        if ptr == ffi.NULL:
            msg = "no embeddings: create the context with embeddings=True"
            raise DecodeError(msg)
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


class SamplerChain(_Owned):
    """A llama.cpp sampler chain, built step by step in the order the samplers are added.

    Each ``add_*`` method appends one llama.cpp sampler (the chain owns it) and returns the
    chain, so calls can be chained. A chain is not thread-safe; use one per generation.

    Example:
        >>> chain = SamplerChain().add_top_k(40).add_temp(0.8).add_dist(1234)
        >>> token = chain.sample(ctx)  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self._lib = L = lib()
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        self._ptr = ffi.gc(chain, L.llama_sampler_free)
        self._add = L.llama_sampler_chain_add
        self._sample = L.llama_sampler_sample

    def close(self) -> None:
        """Free the chain and its samplers; safe to call more than once."""
        if self._ptr is not None:
            ffi.release(self._ptr)
            self._ptr = None

    def _closed_error(self) -> Exception:
        return ContextError("the sampler chain is closed; build a new one")

    def _append(self, sampler: Any) -> SamplerChain:
        self._add(self._check(), sampler)
        return self

    def add_logit_bias(self, n_vocab: int, bias: dict[int, float]) -> SamplerChain:
        """Add ``bias[token]`` to the logit of each token.

        Raises:
            ValueError: A token is outside ``0..n_vocab-1``.
        """
        items = list(bias.items())
        arr = ffi.new("llama_logit_bias[]", max(1, len(items)))
        for i, (tok, value) in enumerate(items):
            tok = int(tok)
            if not 0 <= tok < n_vocab:
                msg = f"logit_bias token {tok} is outside the vocabulary (0..{n_vocab - 1})"
                raise ValueError(msg)
            arr[i].token = tok
            arr[i].bias = float(value)
        return self._append(self._lib.llama_sampler_init_logit_bias(n_vocab, len(items), arr))

    def add_penalties(
        self, n_vocab: int, last_n: int, repeat: float, frequency: float, presence: float
    ) -> SamplerChain:
        """Penalize tokens seen in the last ``last_n`` accepted tokens.

        Args:
            n_vocab: Vocabulary size of the model.
            last_n: Window of accepted tokens the penalties look at (0: off).
            repeat: Divide positive logits (multiply negative ones) by this (1.0: off).
            frequency: Subtract this times the token's count in the window (0.0: off).
            presence: Subtract this once if the token is in the window (0.0: off).
        """
        return self._append(
            self._lib.llama_sampler_init_penalties(n_vocab, last_n, repeat, frequency, presence)
        )

    def add_grammar(self, model: Model, grammar: str, root: str = "root") -> SamplerChain:
        """Constrain the output to a GBNF grammar.

        Raises:
            ValueError: The grammar does not parse or has no ``root`` rule (llama.cpp's log
                says where).
        """
        g = self._lib.llama_sampler_init_grammar(
            model._checked_vocab(), grammar.encode(), root.encode()
        )
        if g == ffi.NULL:
            msg = (
                f"the GBNF grammar does not parse (it needs a {root!r} rule); check its syntax "
                "(enable logging.getLogger('nexabind.llama') for the parser's message)"
            )
            raise ValueError(msg)
        return self._append(g)

    def add_top_k(self, k: int) -> SamplerChain:
        """Keep the ``k`` most likely tokens."""
        return self._append(self._lib.llama_sampler_init_top_k(k))

    def add_top_p(self, p: float, min_keep: int = 1) -> SamplerChain:
        """Keep the most likely tokens whose probabilities add up to ``p`` (nucleus)."""
        return self._append(self._lib.llama_sampler_init_top_p(p, min_keep))

    def add_min_p(self, p: float, min_keep: int = 1) -> SamplerChain:
        """Drop tokens less likely than ``p`` times the most likely one."""
        return self._append(self._lib.llama_sampler_init_min_p(p, min_keep))

    def add_typical(self, p: float, min_keep: int = 1) -> SamplerChain:
        """Locally typical sampling with mass ``p``."""
        return self._append(self._lib.llama_sampler_init_typical(p, min_keep))

    def add_temp(self, t: float) -> SamplerChain:
        """Divide the logits by the temperature ``t``."""
        return self._append(self._lib.llama_sampler_init_temp(t))

    def add_dist(self, seed: int = 0xFFFFFFFF) -> SamplerChain:
        """Draw the token at random from what is left (the default seed is random)."""
        return self._append(self._lib.llama_sampler_init_dist(seed))

    def add_greedy(self) -> SamplerChain:
        """Pick the most likely token."""
        return self._append(self._lib.llama_sampler_init_greedy())

    def __len__(self) -> int:
        return self._lib.llama_sampler_chain_n(self._check())

    def reset(self) -> None:
        """Reset the chain's state (penalty window, grammar position, RNG)."""
        self._lib.llama_sampler_reset(self._check())

    def accept(self, token: int) -> None:
        """Tell the chain that ``token`` was emitted without :meth:`sample` (e.g. a prompt).

        Penalties and grammars advance on accepted tokens.
        """
        self._lib.llama_sampler_accept(self._check(), token)

    def sample(self, ctx: Context, i: int = -1) -> int:
        """Sample (and accept) the next token from output ``i`` of the last decode."""
        return self._sample(self._check(), ctx._check(), i)


class Sampler(SamplerChain):
    """A sampler chain from the usual settings.

    Args:
        greedy: Pick the most likely token (ignores the other settings).
        temperature, top_k, top_p, min_p: Usual sampling settings.
        seed: Seed of the final random draw.
    """

    def __init__(
        self,
        *,
        greedy: bool = False,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        seed: int = 0xFFFFFFFF,
    ) -> None:
        super().__init__()
        if greedy:
            self.add_greedy()
            return
        if top_k > 0:
            self.add_top_k(top_k)
        if top_p < 1.0:
            self.add_top_p(top_p)
        if min_p > 0.0:
            self.add_min_p(min_p)
        self.add_temp(temperature)
        self.add_dist(seed)
