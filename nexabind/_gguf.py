"""Read a GGUF file's metadata without llama.cpp, and refuse values llama.cpp aborts on.

llama.cpp checks a model file's hyperparameters with assertions, which end the process. The
few that a damaged or hostile file can reach at load time are checked here first, from the
header alone (:func:`check`), so the caller gets a :class:`~nexabind.errors.ModelLoadError`.
The scan reads the key/value section only: arrays (the vocabulary) are skipped, not decoded.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from nexabind.errors import ModelLoadError

__all__ = ["MAX_LAYERS", "Summary", "check", "read_metadata", "summarize"]

#: llama.cpp's LLAMA_MAX_LAYERS and LLAMA_MAX_EXPERTS.
MAX_LAYERS = 512
MAX_EXPERTS = 512

_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
    12: "<d",
}  # fmt: skip
_STRING, _ARRAY = 8, 9


class _Truncated(Exception):
    pass


def _need(buf: Any, off: int, n: int) -> None:
    if n < 0 or off + n > len(buf):
        raise _Truncated


_TOKENS = "tokenizer.ggml.tokens"


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the scalar and string metadata of a GGUF file.

    Arrays are left out, but for their lengths (``"<key>#"``) and the vocabulary's token
    texts, collected as a set of bytes under ``"tokenizer.ggml.tokens"`` (with a count of
    duplicates under ``"tokenizer.ggml.tokens#dup"``).

    Raises:
        ModelLoadError: Not a GGUF file, or its header is cut short or malformed.
    """
    return _read(path, lambda buf, p: _scan(buf, p, vocab=True)[0])


class Summary(NamedTuple):
    """What a GGUF file's header says about the model, without its vocabulary.

    Attributes:
        metadata: Scalar and string keys, and ``"<key>#"`` array lengths (as
            :func:`read_metadata`, but the token texts are not collected).
        n_params: Elements of the tensors this file describes (the parameters; one part's
            share for a split model).
        n_tensors: Tensors this file describes.
        n_bytes: Bytes of those tensors' data as their types store it (what the weights take
            in memory; a type this reader does not know counts 4 bytes an element).
    """

    metadata: dict[str, Any]
    n_params: int
    n_tensors: int
    n_bytes: int = 0


def summarize(path: str | os.PathLike[str]) -> Summary:
    """Read a GGUF file's metadata and count its tensors' parameters, from the header alone.

    Faster than :func:`read_metadata` on a large vocabulary: the token texts are skipped.

    Raises:
        ModelLoadError: Not a GGUF file, or its header is cut short or malformed.
    """

    def scan(buf: Any, p: Path) -> Summary:
        meta, off, n_tensors = _scan(buf, p, vocab=False)
        n_params, n_bytes = _count_params(buf, off, n_tensors)
        return Summary(meta, n_params, n_tensors, n_bytes)

    return _read(path, scan)


_T = TypeVar("_T")


def _read(path: str | os.PathLike[str], scan: Callable[[Any, Path], _T]) -> _T:
    path = Path(path)
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return scan(buf, path)
    except (OSError, ValueError) as e:
        msg = f"cannot read {path} as a GGUF file: {e}"
        raise ModelLoadError(msg) from e
    except (_Truncated, struct.error, OverflowError):
        msg = f"{path} is not a valid GGUF file: its header is cut short or malformed"
        raise ModelLoadError(msg) from None


def _scan(buf: Any, path: Path, *, vocab: bool) -> tuple[dict[str, Any], int, int]:
    """The metadata, the offset where the tensor infos start, and the tensor count."""
    if buf[:4] != b"GGUF":
        msg = f"{path} is not a GGUF file (it does not start with 'GGUF')"
        raise ModelLoadError(msg)
    _need(buf, 0, 24)
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        msg = f"{path} is GGUF version {version}; llama.cpp reads versions 2 and 3"
        raise ModelLoadError(msg)
    off = 24
    out: dict[str, Any] = {}
    unpack = struct.unpack_from
    for _ in range(n_kv):
        _need(buf, off, 8)
        (n,) = unpack("<Q", buf, off)
        _need(buf, off + 8, n + 4)
        key = bytes(buf[off + 8 : off + 8 + n]).decode("utf-8", "replace")
        (vtype,) = unpack("<I", buf, off + 8 + n)
        off += 12 + n
        if vtype in _SCALARS:
            fmt = _SCALARS[vtype]
            _need(buf, off, struct.calcsize(fmt))
            (out[key],) = unpack(fmt, buf, off)
            off += struct.calcsize(fmt)
        elif vtype == _STRING:
            _need(buf, off, 8)
            (n,) = unpack("<Q", buf, off)
            _need(buf, off + 8, n)
            out[key] = bytes(buf[off + 8 : off + 8 + n]).decode("utf-8", "replace")
            off += 8 + n
        elif vtype == _ARRAY:
            _need(buf, off, 12)
            etype, count = unpack("<IQ", buf, off)
            off += 12
            out[key + "#"] = count
            if etype in _SCALARS:
                size = struct.calcsize(_SCALARS[etype]) * count
                _need(buf, off, size)
                off += size
            elif etype == _STRING and key == _TOKENS and vocab:
                off = _tokens(buf, off, count, out)
            elif etype == _STRING:
                off = _skip_strings(buf, off, count)
            else:
                raise _Truncated  # llama.cpp refuses nested arrays too
        else:
            raise _Truncated
    return out, off, n_tensors


def _count_params(buf: Any, off: int, n_tensors: int) -> tuple[int, int]:
    """Sum the element counts, and their bytes, of the tensor infos that start at ``off``."""
    from gguf.constants import GGML_QUANT_SIZES

    sizes = {int(t): size for t, size in GGML_QUANT_SIZES.items()}
    total = n_bytes = 0
    unpack = struct.unpack_from
    for _ in range(n_tensors):
        _need(buf, off, 8)
        (n,) = unpack("<Q", buf, off)
        off += 8 + n
        _need(buf, off, 4)
        (n_dims,) = unpack("<I", buf, off)
        if n_dims > 8:  # GGML_MAX_DIMS is 4
            raise _Truncated
        _need(buf, off + 4, 8 * n_dims + 12)
        dims = unpack(f"<{n_dims}Q", buf, off + 4)
        (kind,) = unpack("<I", buf, off + 4 + 8 * n_dims)
        off += 4 + 8 * n_dims + 12  # dims, then the type (u32) and the data offset (u64)
        n = math.prod(dims)
        block, size = sizes.get(kind, (1, 4))
        total += n
        n_bytes += -(-n // block) * size
    return total, n_bytes


_U64 = struct.Struct("<Q").unpack_from


def _skip_strings(buf: Any, off: int, count: int) -> int:
    """The offset after ``count`` strings that start at ``off``."""
    try:
        for _ in range(count):
            (n,) = _U64(buf, off)
            off += 8 + n
    except (struct.error, OverflowError):
        raise _Truncated from None
    _need(buf, 0, off)
    return off


def _tokens(buf: Any, off: int, count: int, out: dict[str, Any]) -> int:
    """Collect the vocabulary's texts (for the duplicate and byte-token checks)."""
    texts: set[bytes] = set()
    add = texts.add
    try:
        for _ in range(count):  # the hot loop of a load: ~0.6 us a token
            (n,) = _U64(buf, off)
            off += 8
            add(buf[off : off + n])
            off += n
    except (struct.error, OverflowError):
        raise _Truncated from None
    _need(buf, 0, off)
    out[_TOKENS] = texts
    out[_TOKENS + "#dup"] = count - len(texts)
    return off


#: The byte-fallback tokens an SPM vocabulary must have: llama.cpp looks them up for any
#: byte it cannot tokenize otherwise, and aborts when one is missing.
_SPM_BYTES = [f"<0x{b:02X}>".encode() for b in range(256)]


_passed: dict[tuple[str, int, int, int], None] = {}


def check(path: str | os.PathLike[str]) -> None:
    """Refuse a model whose header would make llama.cpp abort while loading or decoding.

    Checks the layer and expert counts against llama.cpp's limits, that every normalization
    epsilon is a finite, non-negative number, and that the vocabulary is consistent (no
    duplicate token texts, one score and type per token, every byte token of an SPM
    vocabulary). A file that passed is not read again in this process until it changes.

    Raises:
        ModelLoadError: Naming the key, its value and the allowed range.
    """
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key in _passed:
        return
    _check(path, read_metadata(path))
    _passed[key] = None


def _check(path: str | os.PathLike[str], meta: dict[str, Any]) -> None:
    arch = meta.get("general.architecture")

    def bad(key: str, what: str) -> ModelLoadError:
        return ModelLoadError(
            f"{path}: {key} is {meta[key]!r}, {what}; the file is damaged or not a model "
            "llama.cpp can load"
        )

    if isinstance(arch, str):
        key = f"{arch}.block_count"
        if key in meta and not 0 < meta[key] <= MAX_LAYERS:
            raise bad(key, f"outside 1..{MAX_LAYERS}")
        experts = meta.get(f"{arch}.expert_count", 0)
        if not 0 <= experts <= MAX_EXPERTS:
            raise bad(f"{arch}.expert_count", f"outside 0..{MAX_EXPERTS}")
        used = f"{arch}.expert_used_count"
        if used in meta and not 0 <= meta[used] <= experts:
            raise bad(used, f"more than the {experts} experts")
    for key, value in meta.items():
        finite = not isinstance(value, float) or (math.isfinite(value) and value >= 0)
        if key.endswith("epsilon") and not finite:
            raise bad(key, "not a finite number >= 0")
    n_tokens = meta.get(_TOKENS + "#")
    if n_tokens is not None:
        _check_vocab(path, meta, n_tokens)


def _check_vocab(path: str | os.PathLike[str], meta: dict[str, Any], n_tokens: int) -> None:
    def bad(what: str) -> ModelLoadError:
        return ModelLoadError(
            f"{path}: the vocabulary {what}; the file is damaged or not a model llama.cpp can load"
        )

    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        if meta.get(key + "#", n_tokens) != n_tokens:
            raise bad(f"has {n_tokens} tokens but {meta[key + '#']} entries in {key}")
    if meta[_TOKENS + "#dup"]:
        raise bad(f"has {meta[_TOKENS + '#dup']} duplicate token texts")
    if meta.get("tokenizer.ggml.model") == "llama":
        missing = [b.decode() for b in _SPM_BYTES if b not in meta[_TOKENS]]
        if missing:
            raise bad(f"lacks the byte token(s) {', '.join(missing[:4])}")
