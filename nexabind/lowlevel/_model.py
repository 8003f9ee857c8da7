"""``Model``: a loaded GGUF file, its vocabulary and metadata."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nexabind import _gguf
from nexabind._ffi import ffi
from nexabind.errors import ModelLoadError
from nexabind.lowlevel._lib import lib, nonnull
from nexabind.lowlevel._owned import Owned


class Model(Owned):
    """A loaded GGUF model (weights and vocabulary).

    Args:
        path: The ``.gguf`` file.
        n_gpu_layers: Layers to offload to a GPU device (0: CPU only).
        vocab_only: Load only the vocabulary.
        use_mmap: Map the file instead of reading it.
        use_mlock: Lock the weights in RAM (no swapping); llama.cpp warns when the system's
            locked-memory limit is too low.
        progress: Called with the load progress in [0, 1]; return False to abort the load.
        check_tensors: Validate every tensor's data while loading (slower; catches NaN/Inf
            and corrupt quantized blocks in a file of unknown origin).

    A model is safe to share between threads: vocabulary calls and :meth:`close` exclude each
    other through the model's lock.

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
    ) -> None:
        self._lock = threading.RLock()
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
        self.n_head: int = L.llama_model_n_head(ptr) if self.n_layer else 0
        self.n_head_kv: int = L.llama_model_n_head_kv(ptr) if self.n_layer else 0
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
        with self._lock:
            self._closing = True
            if self._users == 0 and self._ptr is not None:
                ffi.release(self._ptr)
                self._ptr = None
                self._vocab = None

    def _add_user(self) -> Any:
        """Count a context that uses the model (it is freed after the last one); return it."""
        with self._lock:
            ptr = self._check()
            self._users += 1
            return ptr

    def _release_user(self) -> None:
        with self._lock:
            self._users -= 1
            if self._closing and self._users == 0:
                self.close()

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
        with self._lock:
            vocab = self._checked_vocab()
            n = tokenize(vocab, data, len(data), buf, n_max, add_special, parse_special)
            if n < 0:
                n_max = -n
                buf = ffi.new("llama_token[]", n_max)
                n = tokenize(vocab, data, len(data), buf, n_max, add_special, parse_special)
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
