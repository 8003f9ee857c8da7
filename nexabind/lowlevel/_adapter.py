"""``LoraAdapter``: a LoRA adapter file loaded onto a ``Model``, applied per ``Context``."""

from __future__ import annotations

import os
from pathlib import Path

from nexabind._ffi import ffi
from nexabind.errors import ModelLoadError
from nexabind.lowlevel._lib import lib, nonnull
from nexabind.lowlevel._model import Model
from nexabind.lowlevel._owned import Shared


class LoraAdapter(Shared):
    """A LoRA adapter (GGUF) loaded for ``model`` (``llama_adapter_lora_init``).

    Apply it to a context with :meth:`Context.set_lora_adapters`. The adapter keeps its model
    alive; :meth:`close` frees it once no context uses it any more (llama.cpp would otherwise
    read freed memory at the next decode).

    Args:
        model: The model the adapter was trained for.
        path: The adapter's ``.gguf`` file.

    Raises:
        ModelLoadError: The file is missing, or llama.cpp refused it (not a LoRA adapter, or
            made for another architecture or size).
    """

    _what = "LoRA adapter"

    def __init__(self, model: Model, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self._lib = L = lib()
        self.path = Path(path)
        self.model = model
        if not self.path.is_file():
            msg = f"LoRA adapter file not found: {self.path}; check the path"
            raise ModelLoadError(msg)
        model_ptr = model._add_user()
        try:
            with model._lock:
                ptr = L.llama_adapter_lora_init(model_ptr, str(self.path).encode())
            self._ptr = nonnull(
                ptr,
                ModelLoadError,
                f"llama.cpp could not load the LoRA adapter {self.path} for {model.path} (not "
                "a LoRA GGUF, or made for another model); the 'nexabind.llama' log says why",
            )
        except BaseException:
            model._release_user()
            raise

    def close(self) -> None:
        """Free the adapter (now, or when the last context using it lets go); idempotent."""
        super().close()

    def _free(self) -> None:
        with self.model._lock:
            self._lib.llama_adapter_lora_free(self._ptr)
        self.model._release_user()

    def metadata(self) -> dict[str, str]:
        """The adapter's GGUF metadata as strings."""
        L = self._lib
        out = {}
        buf = ffi.new("char[]", 4096)
        with self._lock:
            ptr = self._check()
            for i in range(L.llama_adapter_meta_count(ptr)):
                L.llama_adapter_meta_key_by_index(ptr, i, buf, 4096)
                key = ffi.string(buf).decode("utf-8", "replace")
                L.llama_adapter_meta_val_str_by_index(ptr, i, buf, 4096)
                out[key] = ffi.string(buf).decode("utf-8", "replace")
        return out
