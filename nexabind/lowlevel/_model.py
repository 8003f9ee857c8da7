"""``Model``: a loaded GGUF file, its vocabulary and metadata."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nexabind import _gguf
from nexabind._ffi import ffi
from nexabind.errors import ModelLoadError
from nexabind.lowlevel._lib import SplitMode, enum_value, lib, max_devices, nonnull
from nexabind.lowlevel._owned import Shared
from nexabind.lowlevel._rpc import model_devices

#: What a ``kv_overrides`` value may be: llama.cpp's four override types.
KvOverride = bool | int | float | str
_KV_TEXT_MAX = 127  # char key[128] / val_str[128] in llama.h, NUL included


def _kv_overrides(overrides: dict[str, KvOverride]) -> Any:
    """``overrides`` as llama.cpp's array of ``llama_model_kv_override``, ended by an empty key.

    Raises:
        ValueError: A key or string value is too long, or a value has another type.
    """
    L = lib()
    arr = ffi.new("struct llama_model_kv_override[]", len(overrides) + 1)
    for i, (key, value) in enumerate(overrides.items()):
        kb = str(key).encode()
        if not kb or len(kb) > _KV_TEXT_MAX or b"\0" in kb:
            msg = f"kv_overrides key {key!r} is invalid; use 1..{_KV_TEXT_MAX} bytes of text"
            raise ValueError(msg)
        o = arr[i]
        o.key = kb
        if isinstance(value, bool):
            o.tag, o.val_bool = L.LLAMA_KV_OVERRIDE_TYPE_BOOL, value
        elif isinstance(value, int):
            if not -(1 << 63) <= value < 1 << 63:
                msg = f"kv_overrides[{key!r}]={value} does not fit a 64-bit integer"
                raise ValueError(msg)
            o.tag, o.val_i64 = L.LLAMA_KV_OVERRIDE_TYPE_INT, value
        elif isinstance(value, float):
            o.tag, o.val_f64 = L.LLAMA_KV_OVERRIDE_TYPE_FLOAT, value
        elif isinstance(value, str):
            vb = value.encode()
            if len(vb) > _KV_TEXT_MAX or b"\0" in vb:
                msg = (
                    f"kv_overrides[{key!r}] is {len(vb)} bytes; llama.cpp takes at most "
                    f"{_KV_TEXT_MAX} bytes of text without NUL"
                )
                raise ValueError(msg)
            o.tag, o.val_str = L.LLAMA_KV_OVERRIDE_TYPE_STR, vb
        else:
            msg = f"kv_overrides[{key!r}] is a {type(value).__name__}; use bool, int, float or str"
            raise ValueError(msg)
    return arr


def _tensor_split(split: Sequence[float]) -> Any:
    n = max_devices()
    values = [float(v) for v in split]
    if len(values) > n or any(v < 0 for v in values):
        msg = (
            f"tensor_split={list(split)!r} is invalid; give at most {n} non-negative "
            "proportions (one per device)"
        )
        raise ValueError(msg)
    return ffi.new("float[]", values + [0.0] * (n - len(values)))


class Model(Shared):
    """A loaded GGUF model (weights and vocabulary).

    Args:
        path: The ``.gguf`` file.
        n_gpu_layers: Layers to offload to a GPU device (0: CPU only).
        vocab_only: Load only the vocabulary (no weights: tokenizing only, no context).
        use_mmap: Map the file instead of reading it.
        use_mlock: Lock the weights in RAM (no swapping); llama.cpp warns when the system's
            locked-memory limit is too low.
        progress: Called with the load progress in [0, 1]; return False to abort the load.
        check_tensors: Validate every tensor's data while loading (slower; catches NaN/Inf
            and corrupt quantized blocks in a file of unknown origin).
        split_mode: How to split the model across GPUs (a :class:`SplitMode`, its value or
            name; None: llama.cpp's default, by layer).
        main_gpu: The GPU for the whole model (``split_mode`` none) or for intermediate
            results (row split).
        tensor_split: Proportion of the model for each GPU (at most
            :func:`~nexabind.lowlevel.max_devices` values; None: by free memory).
        kv_overrides: GGUF metadata to override while loading (``{"key": value}``; bool, int,
            float or str of at most 127 bytes), as llama.cpp's ``--override-kv``.
        rpc_servers: ``host:port`` of llama.cpp RPC servers (``nexabind rpc-server``) whose
            devices take layers too, beside this machine's GPUs, as llama.cpp's ``--rpc``
            (``n_gpu_layers`` says how many layers leave the CPU). Trusted networks only.

    A model is safe to share between threads: vocabulary calls and :meth:`close` exclude each
    other through the model's lock, and :meth:`tokenize` counts as a user of the model (as a
    context does) instead, so a long tokenization holds up no other call.

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
        check_tensors: bool = False,
        split_mode: SplitMode | int | str | None = None,
        main_gpu: int = 0,
        tensor_split: Sequence[float] | None = None,
        kv_overrides: dict[str, KvOverride] | None = None,
        rpc_servers: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self._lib = L = lib()
        self.path = Path(path)
        self._what = f"model {self.path}"
        if not self.path.is_file():
            msg = f"model file not found: {self.path}; check the path or download the model"
            raise ModelLoadError(msg)
        _gguf.check(self.path)  # what llama.cpp would abort on, refused before it reads
        params = L.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.vocab_only = vocab_only
        params.check_tensors = check_tensors
        if split_mode is not None:
            params.split_mode = enum_value(SplitMode, "split_mode", split_mode)
        if not 0 <= main_gpu < (1 << 31):
            msg = f"main_gpu={main_gpu} is invalid; use a device index >= 0"
            raise ValueError(msg)
        params.main_gpu = main_gpu
        # Kept referenced until the load returns: llama.cpp reads them during the load only.
        keep = []
        if tensor_split is not None:
            keep.append(_tensor_split(tensor_split))
            params.tensor_split = keep[-1]
        if kv_overrides:
            keep.append(_kv_overrides(kv_overrides))
            params.kv_overrides = keep[-1]
        if rpc_servers:
            keep.append(ffi.new("ggml_backend_dev_t[]", [*model_devices(rpc_servers), ffi.NULL]))
            params.devices = keep[-1]
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
        ptr = nonnull(
            L.llama_model_load_from_file(str(self.path).encode(), params),
            ModelLoadError,
            f"llama.cpp could not load {self.path} (not a valid GGUF model, truncated, or an "
            "unsupported architecture); enable logging.getLogger('nexabind.llama') for why",
        )
        self._ptr = ffi.gc(ptr, L.llama_model_free)
        self._vocab = L.llama_model_get_vocab(ptr)
        self.n_vocab: int = L.llama_vocab_n_tokens(self._vocab)
        self.n_embd: int = L.llama_model_n_embd(ptr)
        self.n_ctx_train: int = L.llama_model_n_ctx_train(ptr)
        self.n_layer: int = L.llama_model_n_layer(ptr)
        # A vocabulary-only model has no layers, and llama.cpp aborts on their head counts.
        self.n_head: int = L.llama_model_n_head(ptr) if self.n_layer else 0
        self.n_head_kv: int = L.llama_model_n_head_kv(ptr) if self.n_layer else 0
        self.vocab_only = vocab_only
        self.is_recurrent: bool = bool(L.llama_model_is_recurrent(ptr))
        """Whether the model keeps a recurrent state (Mamba, RWKV) instead of a KV cache."""
        self.is_hybrid: bool = bool(L.llama_model_is_hybrid(ptr))
        """Whether the model mixes attention and recurrent layers."""
        self._piece = ffi.new("char[]", 256)

    def close(self) -> None:
        """Free the model; safe to call more than once.

        While contexts (or LoRA adapters) still use the model, the memory is freed when the
        last one closes.
        """
        super().close()

    def _free(self) -> None:
        ffi.release(self._ptr)
        self._vocab = None

    def _checked_vocab(self) -> Any:
        self._check()
        return self._vocab

    def check_token(self, token: int, what: str = "token") -> int:
        """Return ``token`` if it is in the vocabulary.

        Raises:
            ValueError: It is not (llama.cpp would abort on it), naming it and the size.
        """
        if not 0 <= token < self.n_vocab:
            msg = (
                f"{what} {token} is outside the vocabulary of {self.n_vocab} tokens "
                f"(0..{self.n_vocab - 1})"
            )
            raise ValueError(msg)
        return token

    def check_tokens(self, tokens: Sequence[int], what: str = "token") -> None:
        """Check every id of ``tokens`` (see :meth:`check_token`) in one pass."""
        if len(tokens) and (min(tokens) < 0 or max(tokens) >= self.n_vocab):
            bad = next(t for t in tokens if not 0 <= t < self.n_vocab)
            self.check_token(bad, what)

    def kv_bytes_per_cell(self) -> int:
        """Bytes one KV cell takes with f16 keys and values (what a context of n cells costs)."""
        head_dim = self.n_embd // max(1, self.n_head)
        return 2 * 2 * self.n_layer * head_dim * self.n_head_kv

    @property
    def description(self) -> str:
        """llama.cpp's one-line description of the model (architecture, size, type)."""
        buf = ffi.new("char[]", 256)
        with self._lock:
            self._lib.llama_model_desc(self._check(), buf, 256)
        return ffi.string(buf).decode("utf-8", "replace")

    @property
    def n_params(self) -> int:
        """Number of weights."""
        with self._lock:
            return self._lib.llama_model_n_params(self._check())

    @property
    def size(self) -> int:
        """Total size of the weights in bytes."""
        with self._lock:
            return self._lib.llama_model_size(self._check())

    def metadata(self) -> dict[str, str]:
        """Return the GGUF metadata as strings (arrays are summarised by llama.cpp)."""
        with self._lock:
            return self._metadata()

    def _metadata(self) -> dict[str, str]:
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
        with self._lock:
            p = self._lib.llama_model_chat_template(
                self._check(), name.encode() if name else ffi.NULL
            )
            return None if p == ffi.NULL else ffi.string(p).decode("utf-8", "replace")

    @property
    def add_bos(self) -> bool:
        """Whether tokenization adds BOS."""
        with self._lock:
            return bool(self._lib.llama_vocab_get_add_bos(self._checked_vocab()))

    def token_text(self, token: int) -> str:
        """The vocabulary's text of ``token``.

        Raises:
            ValueError: ``token`` is not in the vocabulary.
        """
        self.check_token(token)
        with self._lock:
            text = self._lib.llama_vocab_get_text(self._checked_vocab(), token)
            return ffi.string(text).decode("utf-8", "replace")

    @property
    def bos(self) -> int:
        """Beginning-of-sequence token id (-1 if none)."""
        with self._lock:
            return self._lib.llama_vocab_bos(self._checked_vocab())

    @property
    def eos(self) -> int:
        """End-of-sequence token id (-1 if none)."""
        with self._lock:
            return self._lib.llama_vocab_eos(self._checked_vocab())

    def special_tokens(self) -> dict[str, int]:
        """The vocabulary's special tokens: ``bos``, ``eos``, ``eot``, ``sep``, ``nl``, ``pad``,
        ``fim_pre``, ``fim_suf``, ``fim_mid`` (-1 where the vocabulary has none)."""
        names = ("bos", "eos", "eot", "sep", "nl", "pad", "fim_pre", "fim_suf", "fim_mid")
        L = self._lib
        with self._lock:
            vocab = self._checked_vocab()
            return {n: int(getattr(L, f"llama_vocab_{n}")(vocab)) for n in names}

    @property
    def add_eos(self) -> bool:
        """Whether tokenization adds EOS."""
        with self._lock:
            return bool(self._lib.llama_vocab_get_add_eos(self._checked_vocab()))

    @property
    def ptr(self) -> Any:
        """The ``llama_model *`` (a cffi pointer) for calls through :func:`lib`; valid until
        :meth:`close`.

        Raises:
            ClosedError: The model is closed.
        """
        return self._check()

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends generation (EOS, EOT, ...).

        Raises:
            ValueError: ``token`` is not in the vocabulary.
        """
        self.check_token(token)
        with self._lock:
            return bool(self._lib.llama_vocab_is_eog(self._checked_vocab(), token))

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
        data = text.encode() if isinstance(text, str) else bytes(text)
        n_max = len(data) + 8
        buf = ffi.new("llama_token[]", n_max)
        tokenize = self._lib.llama_tokenize
        # A user of the model, not a holder of its lock: llama.cpp's tokenizers keep their state
        # per call (llama-server tokenizes in its HTTP threads), and one long tokenization (some
        # vocabularies take time that grows with the square of a run of rare characters) must
        # not hold up the other threads' vocabulary calls. close() waits for the last user.
        self._add_user()
        try:
            vocab = self._vocab
            n = tokenize(vocab, data, len(data), buf, n_max, add_special, parse_special)
            if n < 0:
                n_max = -n
                buf = ffi.new("llama_token[]", n_max)
                n = tokenize(vocab, data, len(data), buf, n_max, add_special, parse_special)
        finally:
            self._release_user()
        if n < 0:
            msg = f"tokenizing {len(data)} bytes failed ({n})"
            raise ValueError(msg)
        return list(buf[0:n])

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        """Return the bytes of one token (may be a partial UTF-8 sequence).

        Args:
            token: Token id.
            special: Render special tokens as their text.

        Raises:
            ValueError: ``token`` is not in the vocabulary.
        """
        self.check_token(token)
        to_piece = self._lib.llama_token_to_piece
        with self._lock:
            vocab = self._checked_vocab()
            buf = self._piece
            n = to_piece(vocab, token, buf, 256, 0, special)
            if n < 0:
                buf = ffi.new("char[]", -n)
                n = to_piece(vocab, token, buf, -n, 0, special)
            return ffi.unpack(buf, n)

    def detokenize(
        self, tokens: Sequence[int], *, remove_special: bool = False, unparse_special: bool = False
    ) -> str:
        """Turn token ids back into text.

        Args:
            tokens: Token ids.
            remove_special: Drop BOS/EOS tokens.
            unparse_special: Render special tokens as their text.

        Raises:
            ValueError: A token is not in the vocabulary.
        """
        ids = [int(t) for t in tokens]
        self.check_tokens(ids)
        toks = ffi.new("llama_token[]", ids)
        detok = self._lib.llama_detokenize
        cap = max(64, len(ids) * 8)
        buf = ffi.new("char[]", cap)
        with self._lock:
            vocab = self._checked_vocab()
            n = detok(vocab, toks, len(ids), buf, cap, remove_special, unparse_special)
            if n < 0:
                cap = -n
                buf = ffi.new("char[]", cap)
                n = detok(vocab, toks, len(ids), buf, cap, remove_special, unparse_special)
        return ffi.unpack(buf, n).decode("utf-8", "replace")


#: The ``llama_ftype`` of each weight type :func:`quantize` writes (every 2-D weight in it).
QUANT_FTYPES = {
    "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "bf16": "LLAMA_FTYPE_MOSTLY_BF16",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_k": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q5_k": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "iq4_nl": "LLAMA_FTYPE_MOSTLY_IQ4_NL",
}


def quantize(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], dtype: str, *, n_threads: int = 0
) -> None:
    """Quantize the GGUF model ``src`` into ``dst`` with llama.cpp's ``llama_model_quantize``.

    Every 2-D weight becomes ``dtype`` (``pure``: token embedding and output too, so each
    quantized kernel is exercised on its own); norms stay f32.

    Args:
        src: An f32/f16 GGUF model.
        dst: Where to write the quantized model.
        dtype: One of :data:`QUANT_FTYPES` (``q4_0``, ``q4_k``, ``q8_0``, ``iq4_nl``, ...).
        n_threads: Threads (0: llama.cpp's choice).

    Raises:
        ValueError: An unknown ``dtype``.
        ModelLoadError: llama.cpp could not quantize the file (its log says why; a row size
            that the type's blocks do not divide is the usual cause).
    """
    if dtype not in QUANT_FTYPES:
        msg = f"dtype must be one of {sorted(QUANT_FTYPES)}, got {dtype!r}"
        raise ValueError(msg)
    src_path = os.fspath(src)
    if not os.path.isfile(src_path):
        msg = f"no model file at {src_path}"
        raise ModelLoadError(msg)
    _gguf.check(Path(src_path))  # what llama.cpp's reader would abort on, refused first
    L = lib()
    params = ffi.new("llama_model_quantize_params *", L.llama_model_quantize_default_params())
    params.ftype = getattr(L, QUANT_FTYPES[dtype])
    params.nthread = n_threads
    params.pure = True
    rc = L.llama_model_quantize(src_path.encode(), os.fspath(dst).encode(), params)
    if rc != 0:
        msg = (
            f"llama_model_quantize({src_path} -> {dtype}) failed (status {rc}): check that "
            "every weight's row size is a multiple of the type's block (256 for K-quants, 32 "
            "for the others)"
        )
        raise ModelLoadError(msg)
