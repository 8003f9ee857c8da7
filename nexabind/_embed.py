"""Embeddings of many texts from one context: texts packed as sequences into few decodes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nexabind import lowlevel
from nexabind.errors import ContextOverflowError

__all__ = ["embed", "embed_tokens", "max_tokens", "normalize", "shorten"]


def _tokens(
    model: lowlevel.Model, texts: Sequence[str], max_len: int, truncate: bool
) -> list[list[int]]:
    seqs = []
    for i, text in enumerate(texts):
        toks = model.tokenize(text, add_special=True)
        if len(toks) > max_len:
            if not truncate:
                msg = (
                    f"text {i} has {len(toks)} tokens, more than the {max_len} an embedding "
                    "sequence holds; pass truncate=True, or a larger n_batch / n_ubatch "
                    "(and n_ctx)"
                )
                raise ContextOverflowError(msg)
            toks = toks[:max_len]
        seqs.append(toks)
    return seqs


def normalize(vectors: Any) -> None:
    """Scale each float32 row (of an array, or of each array of a list) to unit L2 norm, in
    place; a zero row stays zero."""
    import numpy as np

    for arr in [vectors] if isinstance(vectors, np.ndarray) else vectors:
        norms = np.linalg.norm(arr, axis=-1, keepdims=True)
        arr /= np.where(norms == 0, 1, norms)


def shorten(vectors: Any, dimensions: int | None, *, unit: bool) -> Any:
    """``vectors`` (a float32 array, one row each) cut to their first ``dimensions`` values
    (Matryoshka-style, as OpenAI's ``dimensions``) and scaled to unit L2 norm when ``unit``.

    Raises:
        ValueError: ``dimensions`` is more than the vectors have.
    """
    import numpy as np

    out = np.array(vectors, dtype=np.float32, ndmin=2)
    if dimensions is not None:
        if dimensions > out.shape[-1]:
            msg = (
                f"dimensions={dimensions} is more than this model's {out.shape[-1]}; "
                f"ask for {out.shape[-1]} or fewer"
            )
            raise ValueError(msg)
        out = np.ascontiguousarray(out[..., :dimensions])
    if unit:
        normalize(out)
    return out


def embed(
    ctx: lowlevel.Context,
    texts: Sequence[str],
    *,
    n_seqs: int,
    truncate: bool = True,
    per_token: bool = False,
) -> tuple[Any, int]:
    """Embed ``texts`` with an embedding context; its KV cache is cleared before and after.

    Args:
        ctx: A context created with ``embeddings=True``.
        texts: The texts.
        n_seqs: Most sequences one decode may hold (the context's ``n_seq_max``).
        truncate: Cut texts longer than a ubatch (or a sequence's share of the context)
            instead of raising.
        per_token: Read one embedding per token (a context without pooling).

    Returns:
        A float32 array of shape ``(len(texts), n_embd)`` (with ``per_token``, a list of
        ``(n_tokens, n_embd)`` arrays) and the number of tokens decoded.

    Raises:
        ContextOverflowError: A text is too long and ``truncate`` is False.
    """
    seqs = _tokens(ctx.model, texts, max_tokens(ctx), truncate)
    return embed_tokens(ctx, seqs, n_seqs=n_seqs, per_token=per_token)


def max_tokens(ctx: lowlevel.Context) -> int:
    """The longest sequence one embedding decode takes (a ubatch, or a sequence's share)."""
    return min(ctx.n_ubatch, ctx.n_ctx_seq)


def embed_tokens(
    ctx: lowlevel.Context, seqs: Sequence[Sequence[int]], *, n_seqs: int, per_token: bool = False
) -> tuple[Any, int]:
    """Embed token sequences (each at most :func:`max_tokens` long); see :func:`embed`.

    Raises:
        ValueError: A sequence is empty, too long, or holds a token outside the vocabulary.
    """
    import numpy as np

    limit = max_tokens(ctx)
    for i, toks in enumerate(seqs):
        if not 0 < len(toks) <= limit:
            msg = f"sequence {i} has {len(toks)} tokens; an embedding takes 1..{limit}"
            raise ValueError(msg)
        ctx.model.check_tokens(toks)
    n_embd = ctx.model.n_embd
    out: Any = (
        [np.empty((len(t), n_embd), dtype=np.float32) for t in seqs]
        if per_token
        else np.empty((len(seqs), n_embd), dtype=np.float32)
    )
    batch = ctx.batch
    # One decode holds at most a ubatch of tokens (a sequence pooled across two ubatches
    # would be pooled wrongly). With a unified KV cache llama.cpp takes the sequences as
    # they come, so texts of any lengths share a decode; with one KV buffer per sequence
    # it cuts a batch into equal-length slices per sequence, so only texts of one length.
    mixed = ctx.n_ctx_seq == ctx.n_ctx
    order = sorted(range(len(seqs)), key=lambda k: len(seqs[k]))
    n_decoded = 0
    i = 0
    with ctx.lock:
        while i < len(order):
            ctx.clear()
            batch.clear()
            group: list[int] = []
            n_tok, first = 0, len(seqs[order[i]])
            while i < len(order) and len(group) < n_seqs:
                toks = seqs[order[i]]
                if n_tok + len(toks) > ctx.n_ubatch or not (mixed or len(toks) == first):
                    break
                batch.append(toks, 0, len(group), logits_last=False)
                batch.logits[batch.n_tokens - len(toks) : batch.n_tokens] = 1
                group.append(order[i])
                n_tok += len(toks)
                i += 1
            ctx.decode()
            n_decoded += n_tok
            row = 0
            for s_id, k in enumerate(group):
                if per_token:
                    for j in range(len(seqs[k])):
                        out[k][j] = ctx.token_embeddings(row + j)
                    row += len(seqs[k])
                else:
                    out[k] = ctx.embeddings(s_id)
        ctx.clear()
    return out, n_decoded
