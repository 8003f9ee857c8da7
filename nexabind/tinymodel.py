"""Write small llama-architecture GGUF models with seeded random weights.

Used by ``nexabind doctor`` (a self-test that needs no download), by the tests and by the
benchmarks. The weights are random, so the text is gibberish, but every token goes through the
same code path as a real model: tokenizer, embedding, attention with a KV cache, sampling.

A tokenizer either comes from an existing GGUF (every ``tokenizer.*`` key is copied with its
value type, so llama.cpp's SPM, BPE or WPM tokenizers come along) or is a built-in byte-level
SPM vocabulary, which needs no file at all.

Quantized models (``ModelSpec(dtype="q4_k")``, ``q4_0``, ``q8_0``, ``iq4_nl``, ``bf16``, ...)
are written in f32 and then quantized by llama.cpp's own ``llama_model_quantize``
(:func:`nexabind.lowlevel.quantize`), so they need the library: real models are quantized, and
the quantized kernels (per-variant SIMD, REPACK, AMX) are different code from f32's.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nexabind.lowlevel import QUANT_FTYPES, quantize

__all__ = ["DTYPES", "ModelSpec", "write_random_lora", "write_random_mamba", "write_random_model"]


#: Row size (``ne0``) that each weight type's blocks need.
_BLOCK = {"f32": 1, "f16": 1, "bf16": 1, "q4_0": 32, "q8_0": 32, "iq4_nl": 32,
          "q4_k": 256, "q5_k": 256, "q6_k": 256}  # fmt: skip
#: Every weight type :func:`write_random_model` writes.
DTYPES = tuple(_BLOCK)


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a random llama model. The defaults give a model of a few MB.

    ``n_embd`` and ``n_ff`` left at 0 pick the smallest widths the weight type's blocks fit:
    64 and 128, or 256 and 512 for the K-quants (whose blocks hold 256 values).
    """

    n_embd: int = 0
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 0
    n_ctx_train: int = 2048
    seed: int = 42
    #: Weight type, one of :data:`DTYPES`: ``f32``, ``f16``, or (through llama.cpp's quantizer)
    #: ``bf16``, ``q4_0``, ``q4_k``, ``q5_k``, ``q6_k``, ``q8_0``, ``iq4_nl``.
    dtype: str = "f32"
    pooling: str | None = None  # None, "mean", "cls", "last" or "rank": an embedding model
    chat_template: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in _BLOCK:
            msg = f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}"
            raise ValueError(msg)
        block = _BLOCK[self.dtype]
        n_embd = self.n_embd or max(64, block)
        object.__setattr__(self, "n_embd", n_embd)
        object.__setattr__(self, "n_ff", self.n_ff or 2 * n_embd)
        if self.n_embd % block or self.n_ff % block:
            msg = (
                f"{self.dtype} needs n_embd and n_ff that are multiples of {block} (its block "
                f"size), got {self.n_embd} and {self.n_ff}; leave them at 0 to pick a fit"
            )
            raise ValueError(msg)


_POOLING = {"mean": 1, "cls": 2, "last": 3, "rank": 4}


def _byte_vocab() -> dict[str, tuple[Any, Any, Any]]:
    """A self-contained SPM vocabulary: three specials plus one token per byte (byte fallback)."""
    from gguf import GGUFValueType as T

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    # A few whole words make the output look less like noise and exercise merges.
    words = ["▁", "▁the", "▁a", "▁is", "▁of", "▁and", "▁to", "▁in", "▁Hello", "▁world", "."]
    tokens += words
    types = [2, 3, 3] + [6] * 256 + [1] * len(words)
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(words))]
    return {
        "tokenizer.ggml.model": ("llama", T.STRING, None),
        "tokenizer.ggml.pre": ("default", T.STRING, None),
        "tokenizer.ggml.tokens": (tokens, T.ARRAY, T.STRING),
        "tokenizer.ggml.scores": (scores, T.ARRAY, T.FLOAT32),
        "tokenizer.ggml.token_type": (types, T.ARRAY, T.INT32),
        "tokenizer.ggml.bos_token_id": (1, T.UINT32, None),
        "tokenizer.ggml.eos_token_id": (2, T.UINT32, None),
        "tokenizer.ggml.unknown_token_id": (0, T.UINT32, None),
        "tokenizer.ggml.add_bos_token": (True, T.BOOL, None),
        "tokenizer.ggml.add_eos_token": (False, T.BOOL, None),
    }


def _vocab_from(path: str | os.PathLike[str]) -> dict[str, tuple[Any, Any, Any]]:
    """Every ``tokenizer.*`` key of a GGUF file, with its value type."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(path)
    keys: dict[str, tuple[Any, Any, Any]] = {}
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == GGUFValueType.ARRAY else None
        keys[name] = (field.contents(), vtype, sub)
    if "tokenizer.ggml.tokens" not in keys:
        msg = f"{path} has no tokenizer.ggml.tokens: pass a GGUF file that holds a vocabulary"
        raise ValueError(msg)
    return keys


def _finish(writer: Any, path: Path) -> Path:
    """Write ``writer``'s file (or split parts) and return the path of the first.

    Written in a folder of its own beside the result, then renamed into place: nothing
    half-written ever has the final name.
    """
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        staged = Path(tmp) / path.name
        writer.write_header_to_file(staged)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        parts = writer.format_shard_names(staged)
        for part in parts:
            os.replace(part, path.with_name(part.name))
    return path.with_name(parts[0].name)


def write_random_model(
    path: str | os.PathLike[str],
    spec: ModelSpec | None = None,
    *,
    vocab: str | os.PathLike[str] | None = None,
    split_max_tensors: int = 0,
) -> Path:
    """Write a llama-architecture GGUF with seeded random weights.

    Args:
        path: Where to write the model.
        spec: Model shape and seed; ``ModelSpec()`` when omitted.
        vocab: A GGUF file to copy the tokenizer from (e.g. one of llama.cpp's
            ``models/ggml-vocab-*.gguf``); a built-in byte-level vocabulary when omitted.
        split_max_tensors: Split the model into files of at most this many tensors, named
            as llama.cpp's gguf-split names them (``NAME-00001-of-0000N.gguf`` beside
            ``path``); 0 writes one file.

    Returns:
        The path written (the first part of a split model).
    """
    import numpy as np
    from gguf import GGUFValueType as T
    from gguf import GGUFWriter

    spec = spec or ModelSpec()
    if spec.n_embd % spec.n_head or spec.n_head % spec.n_head_kv:
        msg = (
            f"n_embd ({spec.n_embd}) must divide by n_head ({spec.n_head}), and n_head by n_head_kv"
        )
        raise ValueError(msg)
    tok = _vocab_from(vocab) if vocab is not None else _byte_vocab()
    n_vocab = len(tok["tokenizer.ggml.tokens"][0])
    head_dim = spec.n_embd // spec.n_head
    dtype = np.float16 if spec.dtype == "f16" else np.float32
    rng = np.random.default_rng(spec.seed)

    path = Path(path)
    writer = GGUFWriter(None, "llama", split_max_tensors=split_max_tensors)
    writer.add_name(f"nexabind-random-{spec.n_embd}x{spec.n_layer}-seed{spec.seed}")
    writer.add_context_length(spec.n_ctx_train)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(1 if spec.dtype == "f16" else 0)
    if spec.pooling is not None:
        from gguf import PoolingType

        writer.add_pooling_type(PoolingType(_POOLING[spec.pooling]))
    for key, (value, vtype, sub) in tok.items():
        if key == "tokenizer.chat_template" and spec.chat_template is not None:
            continue
        writer.add_key_value(key, value, vtype, sub_type=sub)
    if spec.chat_template is not None:
        writer.add_key_value("tokenizer.chat_template", spec.chat_template, T.STRING)

    def weight(*shape: int, scale: float = 0.02) -> Any:
        # gguf takes numpy's row-major shape, the reverse of ggml's ne[]: (rows, cols) = (ne1, ne0).
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(dtype)

    def norm() -> Any:
        return np.ones(spec.n_embd, dtype=np.float32)  # norms stay f32, as llama.cpp expects

    kv_dim = head_dim * spec.n_head_kv
    writer.add_tensor("token_embd.weight", weight(n_vocab, spec.n_embd, scale=1.0))
    for i in range(spec.n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", norm())
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(spec.n_embd, spec.n_embd))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(kv_dim, spec.n_embd))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(kv_dim, spec.n_embd))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(spec.n_embd, spec.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", norm())
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(spec.n_ff, spec.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(spec.n_ff, spec.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(spec.n_embd, spec.n_ff))
    writer.add_tensor("output_norm.weight", norm())
    writer.add_tensor("output.weight", weight(n_vocab, spec.n_embd, scale=1.0))

    if spec.dtype not in QUANT_FTYPES or spec.dtype == "f16":
        return _finish(writer, path)
    if split_max_tensors:
        msg = "a quantized random model is written as one file (split_max_tensors=0)"
        raise ValueError(msg)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        f32 = _finish(writer, Path(tmp) / "f32.gguf")
        staged = Path(tmp) / path.name
        quantize(f32, staged, spec.dtype)
        os.replace(staged, path)
    return path


def write_random_lora(
    path: str | os.PathLike[str],
    spec: ModelSpec | None = None,
    *,
    rank: int = 4,
    alpha: float = 4.0,
    seed: int = 7,
    scale: float = 0.5,
) -> Path:
    """Write a LoRA adapter GGUF with seeded random weights for a model of ``spec``.

    The adapter changes every attention projection (``attn_q/k/v/output``) of every layer, as
    llama.cpp's ``convert_lora_to_gguf.py`` writes one: ``lora_a`` (``ne = [n_in, rank]``) and
    ``lora_b`` (``ne = [rank, n_out]``) per tensor, ``general.type = adapter``.

    Args:
        path: Where to write the adapter.
        spec: The shape of the model it is for (``ModelSpec()`` when omitted).
        rank: The LoRA rank.
        alpha: ``adapter.lora.alpha`` (the update is scaled by alpha / rank).
        seed: Seed of the random weights.
        scale: Standard deviation of the weights.

    Returns:
        The path written.
    """
    import numpy as np
    from gguf import GGUFValueType as T
    from gguf import GGUFWriter

    spec = spec or ModelSpec()
    rng = np.random.default_rng(seed)
    kv_dim = spec.n_embd // spec.n_head * spec.n_head_kv
    path = Path(path)
    writer = GGUFWriter(None, "llama")
    writer.add_key_value("general.type", "adapter", T.STRING)
    writer.add_key_value("adapter.type", "lora", T.STRING)
    writer.add_key_value("adapter.lora.alpha", float(alpha), T.FLOAT32)
    outs = {"attn_q": spec.n_embd, "attn_k": kv_dim, "attn_v": kv_dim, "attn_output": spec.n_embd}
    for i in range(spec.n_layer):
        for name, n_out in outs.items():
            a = rng.standard_normal((rank, spec.n_embd), dtype=np.float32) * scale
            b = rng.standard_normal((n_out, rank), dtype=np.float32) * scale
            writer.add_tensor(f"blk.{i}.{name}.weight.lora_a", a)
            writer.add_tensor(f"blk.{i}.{name}.weight.lora_b", b)
    return _finish(writer, path)


def write_random_mamba(
    path: str | os.PathLike[str],
    *,
    n_embd: int = 64,
    n_layer: int = 2,
    d_state: int = 16,
    d_conv: int = 4,
    n_ctx_train: int = 2048,
    seed: int = 11,
    vocab: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a Mamba (recurrent, no KV cache) GGUF with seeded random weights.

    A recurrent model keeps one state per sequence instead of a cache of positions, so it cannot
    drop a suffix of what it decoded: what a caller does with a prompt that shares only a prefix
    with the last one is tested against it.

    Args:
        path: Where to write the model.
        n_embd: Width (the inner width is twice that, as llama.cpp requires for Mamba).
        n_layer: Layers.
        d_state: SSM state size.
        d_conv: Convolution kernel size.
        n_ctx_train: The training context length written to the metadata.
        seed: Seed of the random weights.
        vocab: A GGUF file to copy the tokenizer from; a byte-level vocabulary when omitted.

    Returns:
        The path written.
    """
    import numpy as np
    from gguf import GGUFWriter

    tok = _vocab_from(vocab) if vocab is not None else _byte_vocab()
    n_vocab = len(tok["tokenizer.ggml.tokens"][0])
    d_inner, dt_rank = 2 * n_embd, max(1, n_embd // 16)
    rng = np.random.default_rng(seed)
    path = Path(path)
    writer = GGUFWriter(None, "mamba")
    writer.add_name(f"nexabind-random-mamba-{n_embd}x{n_layer}-seed{seed}")
    writer.add_context_length(n_ctx_train)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(0)
    writer.add_head_count(0)
    writer.add_ssm_conv_kernel(d_conv)
    writer.add_ssm_inner_size(d_inner)
    writer.add_ssm_state_size(d_state)
    writer.add_ssm_time_step_rank(dt_rank)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(0)
    for key, (value, vtype, sub) in tok.items():
        writer.add_key_value(key, value, vtype, sub_type=sub)

    def weight(*shape: int, scale: float = 0.02) -> Any:
        return rng.standard_normal(shape, dtype=np.float32) * scale

    writer.add_tensor("token_embd.weight", weight(n_vocab, n_embd, scale=1.0))
    for i in range(n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ssm_in.weight", weight(2 * d_inner, n_embd))
        writer.add_tensor(f"blk.{i}.ssm_conv1d.weight", weight(d_inner, d_conv, scale=0.5))
        writer.add_tensor(f"blk.{i}.ssm_conv1d.bias", np.zeros(d_inner, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ssm_x.weight", weight(dt_rank + 2 * d_state, d_inner))
        writer.add_tensor(f"blk.{i}.ssm_dt.weight", weight(d_inner, dt_rank, scale=0.5))
        writer.add_tensor(f"blk.{i}.ssm_dt.bias", np.full(d_inner, -4.0, dtype=np.float32))
        # A = -exp(A_log) with A_log = log(1..d_state), as Mamba initializes it
        a = -np.tile(np.arange(1, d_state + 1, dtype=np.float32), (d_inner, 1))
        writer.add_tensor(f"blk.{i}.ssm_a", a)
        writer.add_tensor(f"blk.{i}.ssm_d", np.ones(d_inner, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ssm_out.weight", weight(n_embd, d_inner))
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    writer.add_tensor("output.weight", weight(n_vocab, n_embd, scale=1.0))
    return _finish(writer, path)
