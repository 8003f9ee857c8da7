"""OpenAI's response shapes, from a stream of :class:`~nexabind.tokens.Token` and its outcome.

Pure functions: no model, no context. :class:`nexabind.Llama`'s llama-cpp-python methods and
the server call the same ones, so a completion looks the same from Python and over HTTP.

Each takes the tokens as they come (an iterator is consumed once), the
:class:`~nexabind.tokens.Outcome` the generator fills in when it ends, and ``piece(token) ->
bytes`` when top log-probabilities must name tokens other than the ones generated.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from nexabind.tokens import Outcome, Token
from nexabind.tool_calls import Call, ToolOutput

__all__ = [
    "CHAT_DEFAULTS",
    "COMPLETION_DEFAULTS",
    "chat_chunks",
    "chat_completion",
    "completion",
    "completion_chunks",
    "embedding_list",
    "error",
    "finish_reason",
    "indexed_chunks",
    "merge_choices",
    "model_list",
    "rerank_list",
    "with_usage",
]

Piece = Callable[[int], bytes]

#: Sampling defaults of llama-cpp-python's ``create_completion`` (SamplingOptions' own).
COMPLETION_DEFAULTS: dict[str, Any] = {}
#: ``create_chat_completion`` samples cooler by default, as llama-cpp-python does.
CHAT_DEFAULTS: dict[str, Any] = {"temperature": 0.2}


def finish_reason(outcome: Outcome) -> str:
    """The ``finish_reason`` of an outcome: ``stop``, ``length`` or ``cancelled``.

    OpenAI has no word for a cancelled generation (its server just stops sending); a local
    caller who cancels needs to tell it apart from a natural stop.
    """
    return outcome.finish_reason or "stop"


def _usage(outcome: Outcome) -> dict[str, int]:
    return {
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
    }


def _head(kind: str, prefix: str, model: str, rid: str | None, created: int | None) -> Any:
    return {
        "id": rid or f"{prefix}-{uuid.uuid4()}",
        "object": kind,
        "created": int(time.time()) if created is None else created,
        "model": model,
    }


def _cached(piece: Piece | None) -> Piece:
    if piece is None:

        def missing(_tok: int) -> bytes:
            msg = "top logprobs need piece(token) to name the tokens"
            raise ValueError(msg)

        return missing
    return functools.lru_cache(maxsize=None)(piece)


# -- completions ---------------------------------------------------------------------------------


def _completion_logprobs(toks: Sequence[Token], offset: int, piece: Piece) -> dict[str, Any]:
    offsets = []
    tops: list[dict[str, float | None] | None] = []
    pos = offset
    for t in toks:
        offsets.append(pos)
        pos += len(t.text)
        if t.logprob is None and t.top_logprobs is None:
            tops.append(None)  # a prompt's first token: nothing came before it
            continue
        top: dict[str, float | None] = {
            piece(i).decode("utf-8", "replace"): lp for i, lp in (t.top_logprobs or {}).items()
        }
        top[t.text] = t.logprob
        tops.append(top)
    return {
        "tokens": [t.text for t in toks],
        "text_offset": offsets,
        "token_logprobs": [t.logprob for t in toks],
        "top_logprobs": tops,
    }


def completion(
    tokens: Iterable[Token],
    outcome: Outcome,
    *,
    model: str,
    prefix: str = "",
    suffix: str | None = None,
    logprobs: int | None = None,
    piece: Piece | None = None,
    id: str | None = None,
    created: int | None = None,
    offset: int | None = None,
    prompt_tokens: Sequence[Token] | None = None,
) -> dict[str, Any]:
    """A ``text_completion``: the prompt's echo (``prefix``), the generated text, ``suffix``.

    Args:
        tokens: The generated tokens.
        outcome: Filled in when ``tokens`` ends: finish reason and token counts.
        model: The ``model`` field.
        prefix: Text before the generated text (the echoed prompt).
        suffix: Text after it.
        logprobs: When not None, each token's log-probability and its top alternatives
            (``{text: logprob}``, the chosen token included).
        piece: Bytes of a token, to name the top alternatives.
        id: The response id (default: a new ``cmpl-`` uuid).
        created: Unix time (default: now).
        offset: The first generated token's ``text_offset`` (default: ``len(prefix)``);
            llama-cpp-python counts from the start of the prompt, echoed or not.
        prompt_tokens: The echoed prompt's tokens with their log-probabilities, listed
            before the generated ones (a token without any gets None, as OpenAI's first).
    """
    head = _head("text_completion", "cmpl", model, id, created)
    parts = [prefix]
    kept: list[Token] = list(prompt_tokens or [])
    for t in tokens:
        parts.append(t.text)
        if logprobs is not None:
            kept.append(t)
    if suffix is not None:
        parts.append(suffix)
    start = (0 if prompt_tokens else len(prefix)) if offset is None else offset
    lp = _completion_logprobs(kept, start, _cached(piece)) if logprobs is not None else None
    choice = {
        "text": "".join(parts),
        "index": 0,
        "logprobs": lp,
        "finish_reason": finish_reason(outcome),
    }
    return {**head, "choices": [choice], "usage": _usage(outcome)}


def completion_chunks(
    tokens: Iterable[Token],
    outcome: Outcome,
    *,
    model: str,
    prefix: str = "",
    suffix: str | None = None,
    logprobs: int | None = None,
    piece: Piece | None = None,
    id: str | None = None,
    created: int | None = None,
    offset: int | None = None,
    prompt_tokens: Sequence[Token] | None = None,
) -> Iterator[dict[str, Any]]:
    """The chunks of a streamed ``text_completion`` (arguments as :func:`completion`; the
    echoed prompt comes first, in one chunk with its tokens' log-probabilities)."""
    head = _head("text_completion", "cmpl", model, id, created)
    named = _cached(piece)

    def chunk(text: str, lp: Any, finish: str | None) -> dict[str, Any]:
        choice = {"text": text, "index": 0, "logprobs": lp, "finish_reason": finish}
        return {**head, "choices": [choice]}

    start = len(prefix) if offset is None else offset
    if prefix:
        lp = None
        if logprobs is not None and prompt_tokens:
            lp = _completion_logprobs(prompt_tokens, 0, named)
        yield chunk(prefix, lp, None)
    offset = start
    for t in tokens:
        if logprobs is not None:
            yield chunk(t.text, _completion_logprobs([t], offset, named), None)
        elif t.text:
            yield chunk(t.text, None, None)
        offset += len(t.text)
    if suffix:
        yield chunk(suffix, None, None)
    yield chunk("", None, finish_reason(outcome))


# -- chat ----------------------------------------------------------------------------------------


def _chat_logprobs(toks: Sequence[Token], piece: Piece) -> dict[str, Any]:
    def entry(token: str, tok: int, lp: float | None) -> dict[str, Any]:
        return {"token": token, "logprob": lp, "bytes": list(piece(tok))}

    content = []
    for t in toks:
        e = entry(t.text, t.id, t.logprob)
        tops = (t.top_logprobs or {}).items()
        e["top_logprobs"] = [entry(piece(i).decode("utf-8", "replace"), i, v) for i, v in tops]
        content.append(e)
    return {"content": content, "refusal": None}


def _calls_message(content: str | None, calls: list[Call], legacy: bool) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if legacy:
        message["function_call"] = {"name": calls[0].name, "arguments": calls[0].arguments}
    else:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls
        ]
    return message


def _calls_finish(legacy: bool) -> str:
    return "function_call" if legacy else "tool_calls"


def chat_completion(
    tokens: Iterable[Token],
    outcome: Outcome,
    *,
    model: str,
    logprobs: bool = False,
    piece: Piece | None = None,
    id: str | None = None,
    created: int | None = None,
    tools: ToolOutput | None = None,
) -> dict[str, Any]:
    """A ``chat.completion`` with the assistant's message.

    Args:
        tokens: The generated tokens.
        outcome: Filled in when ``tokens`` ends.
        model: The ``model`` field.
        logprobs: Fill ``logprobs.content``: one ``{token, logprob, bytes, top_logprobs}``
            per generated token, as OpenAI's chat API does.
        piece: Bytes of a token (needed with ``logprobs``).
        id: The response id (default: a new ``chatcmpl-`` uuid).
        created: Unix time (default: now).
        tools: Read the text for tool calls: when it holds valid ones, the message carries
            ``tool_calls`` (or the legacy ``function_call``) and the finish reason says so;
            otherwise the text is the content.
    """
    head = _head("chat.completion", "chatcmpl", model, id, created)
    toks = list(tokens)
    text = "".join(t.text for t in toks)
    message: dict[str, Any] = {"role": "assistant", "content": text}
    finish = finish_reason(outcome)
    parsed = tools.parse(text) if tools is not None else None
    if parsed is not None and tools is not None:
        message = _calls_message(*parsed, tools.legacy)
        finish = _calls_finish(tools.legacy)
    choice = {
        "index": 0,
        "message": message,
        "logprobs": _chat_logprobs(toks, _cached(piece)) if logprobs else None,
        "finish_reason": finish,
    }
    return {**head, "choices": [choice], "usage": _usage(outcome)}


def _marker_at(text: str, tools: ToolOutput, at_start: bool) -> tuple[int, int]:
    """Where held-back text starts in ``text`` (a marker, or a possible start of one), and
    whether a marker (or a JSON start) was found: ``(index, found)``; ``(len(text), 0)`` when
    all of it can go out."""
    if tools.buffer_all:
        return 0, 1
    if at_start and tools.json_start and text.lstrip()[:1] in ("{", "["):
        return 0, 1
    best = len(text)
    for m in tools.markers:
        i = text.find(m)
        if i >= 0:
            return i, 1
        for k in range(min(len(m) - 1, len(text)), 0, -1):
            if text.endswith(m[:k]):
                best = min(best, len(text) - k)
                break
    if at_start and tools.json_start and not text.strip():
        best = 0  # only whitespace so far: a JSON call may still come
    return best, 0


def chat_chunks(
    tokens: Iterable[Token],
    outcome: Outcome,
    *,
    model: str,
    logprobs: bool = False,
    piece: Piece | None = None,
    id: str | None = None,
    created: int | None = None,
    tools: ToolOutput | None = None,
) -> Iterator[dict[str, Any]]:
    """The chunks of a streamed ``chat.completion`` (arguments as :func:`chat_completion`).

    The first delta carries the role, the last one is empty with the finish reason. With
    ``tools``, text is streamed as content until a call's marker appears; what follows is
    held back and sent at the end as ``tool_calls`` deltas (one per call, arguments whole)
    when it holds valid calls, else as content.
    """
    head = _head("chat.completion.chunk", "chatcmpl", model, id, created)
    named = _cached(piece)

    def chunk(delta: dict[str, Any], finish: str | None, lp: Any = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
        return {**head, "choices": [choice]}

    yield chunk({"role": "assistant"}, None)
    if tools is None:
        for t in tokens:
            if logprobs:
                yield chunk({"content": t.text}, None, _chat_logprobs([t], named))
            elif t.text:
                yield chunk({"content": t.text}, None)
        yield chunk({}, finish_reason(outcome))
        return
    sent, pending, held = "", "", False
    for t in tokens:
        if held:
            pending += t.text
            continue
        pending += t.text
        cut, found = _marker_at(pending, tools, not sent)
        if cut:
            yield chunk({"content": pending[:cut]}, None)
            sent += pending[:cut]
            pending = pending[cut:]
        held = bool(found)
    parsed = tools.parse(sent + pending) if held else None
    if parsed is None:
        if pending:
            yield chunk({"content": pending}, None)
        yield chunk({}, finish_reason(outcome))
        return
    for i, c in enumerate(parsed[1]):
        fn = {"name": c.name, "arguments": c.arguments}
        delta: dict[str, Any] = (
            {"function_call": fn}
            if tools.legacy
            else {"tool_calls": [{"index": i, "id": c.id, "type": "function", "function": fn}]}
        )
        yield chunk(delta, None)
        if tools.legacy:
            break
    yield chunk({}, _calls_finish(tools.legacy))


# -- embeddings ----------------------------------------------------------------------------------


def _floats(v: Sequence[float]) -> list[float]:
    tolist = getattr(v, "tolist", None)  # a numpy row converts in C
    return tolist() if tolist is not None else [float(x) for x in v]


def _base64(v: Sequence[float]) -> str:
    import base64

    import numpy as np

    return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii")


def embedding_list(
    vectors: Iterable[Sequence[float]],
    *,
    model: str,
    prompt_tokens: int,
    encoding_format: str = "float",
) -> dict[str, Any]:
    """The ``list`` of ``embedding`` objects, one per input, in input order.

    Args:
        vectors: One vector per input.
        model: The ``model`` field.
        prompt_tokens: Tokens read, for ``usage``.
        encoding_format: ``float`` (lists of numbers) or ``base64`` (the little-endian float32
            bytes, base64-encoded: what OpenAI's Python client asks for by default).
    """
    encode = _base64 if encoding_format == "base64" else _floats
    data = [
        {"object": "embedding", "embedding": encode(v), "index": i} for i, v in enumerate(vectors)
    ]
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


# -- server shapes -------------------------------------------------------------------------------


def merge_choices(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``n`` answers to one request (``completion`` or ``chat.completion`` dicts) as one: the
    first's fields, every choice in order with ``index`` 0 to n-1, the prompt counted once."""
    first = results[0]
    choices = [{**c, "index": i} for i, r in enumerate(results) for c in r["choices"]]
    out = {**first, "choices": choices}
    prompt = first["usage"]["prompt_tokens"]
    generated = sum(r["usage"]["completion_tokens"] for r in results)
    out["usage"] = {"prompt_tokens": prompt, "completion_tokens": generated,
                    "total_tokens": prompt + generated}  # fmt: skip
    return out


def indexed_chunks(streams: Sequence[Iterable[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    """The stream chunks of ``n`` answers to one request as one stream: each answer's chunks
    in turn, their choices' ``index`` the answer's place."""
    for i, chunks in enumerate(streams):
        for c in chunks:
            yield {**c, "choices": [{**choice, "index": i} for choice in c["choices"]]}


def with_usage(chunks: Iterable[dict[str, Any]], outcome: Outcome) -> Iterator[dict[str, Any]]:
    """Stream chunks as ``stream_options.include_usage`` asks: ``"usage": null`` on each, then
    one more chunk with no choices and the usage of the whole request (read from ``outcome``
    once the chunks are done)."""
    last = None
    for c in chunks:
        last = c
        yield {**c, "usage": None}
    if last is not None:
        yield {**last, "choices": [], "usage": _usage(outcome)}


def error(
    message: str, *, type: str = "invalid_request_error", param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def model_list(ids: Iterable[str], *, created: int, owned_by: str = "nexabind") -> dict[str, Any]:
    """``GET /v1/models``: the ``list`` of ``model`` objects."""
    data = [{"id": i, "object": "model", "created": created, "owned_by": owned_by} for i in ids]
    return {"object": "list", "data": data}


def rerank_list(
    scores: Sequence[float],
    *,
    model: str,
    prompt_tokens: int,
    documents: Sequence[str] | None = None,
    top_n: int | None = None,
) -> dict[str, Any]:
    """A rerank response (llama.cpp's server and Jina's shape): ``results`` sorted by
    ``relevance_score``, best first, each with the document's ``index`` (and the document
    itself when ``documents`` is given), at most ``top_n`` of them."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[: top_n or len(scores)]
    results: list[dict[str, Any]] = []
    for i in order:
        r: dict[str, Any] = {"index": i, "relevance_score": float(scores[i])}
        if documents is not None:
            r["document"] = {"text": documents[i]}
        results.append(r)
    return {
        "object": "list",
        "model": model,
        "results": results,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
