"""``Llama``: generation, streaming, chat, embeddings, KV-cache reuse and state.

The surface follows llama-cpp-python (``create_completion``, ``create_chat_completion``,
``create_embedding`` with the same OpenAI-shaped results), built on two iterators,
:meth:`Llama.generate` and :meth:`Llama.chat`, that yield :class:`Token` values.

The generation loop does O(1) work per token: one ``llama_decode`` of one token through a
batch allocated once, one ``llama_sampler_sample``, one ``llama_token_to_piece`` into a buffer
allocated once, an incremental UTF-8 decoder, and stop strings checked only on the tail window.
"""

from __future__ import annotations

import codecs
import functools
import os
import struct
import sys
import threading
import time
import uuid
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from nexabind import lowlevel
from nexabind.errors import (
    ContextError,
    ContextOverflowError,
    DecodeCancelled,
    NexabindError,
    StateError,
)
from nexabind.sampling import SamplingOptions, build_sampler

__all__ = ["Llama", "Token"]

_STATE_MAGIC = b"NXBSTAT1"
_EMBED_SEQS = 64  # most sequences packed into one decode by embed()
_SAMPLING_KEYS = frozenset(SamplingOptions.__dataclass_fields__)


class Token(NamedTuple):
    """One generated token.

    Attributes:
        id: Token id.
        text: Text this token completes (may be empty while a UTF-8 character or a possible
            stop string is pending; the held text comes with a later token).
        logprob: Log-probability of the token, when asked for (else None).
        top_logprobs: The most likely tokens at this position as ``{id: logprob}``, most
            likely first, when asked for with ``logprobs=N`` (else None).
    """

    id: int
    text: str
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None


class _StopMatcher:
    """Hold back text that could start a stop string; find stops across token boundaries."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""
        # Every proper prefix of every stop string: the longest one that ends the text is held.
        self.prefixes = {s[:i] for s in self.stops for i in range(1, len(s))}
        self.max_prefix = max((len(p) for p in self.prefixes), default=0)

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was hit)."""
        s = self.held + text
        best = -1
        for stop in self.stops:
            i = s.find(stop)
            if i >= 0 and (best < 0 or i < best):
                best = i
        if best >= 0:
            self.held = ""
            return s[:best], True
        for k in range(min(self.max_prefix, len(s)), 0, -1):
            if s[-k:] in self.prefixes:
                self.held = s[-k:]
                return s[:-k], False
        self.held = ""
        return s, False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


class Llama:
    """A model and its context, with llama-cpp-python's calls.

    Args:
        model_path: The ``.gguf`` file.
        n_ctx: Context length (None or 0: the model's training length, capped at 4096).
        n_batch: Most prompt tokens per decode.
        n_ubatch: Tokens per compute step inside a decode (None: ``n_batch``, at most 512).
        n_threads: Threads for generation (None: llama.cpp's default).
        n_threads_batch: Threads for prompt processing (None: as ``n_threads``).
        n_gpu_layers: Layers on the GPU (None: all, when a GPU backend is present).
        seed: Default sampling seed.
        embedding: Create an embedding context (pooled as the model says).
        flash_attn: Flash attention on (True) or off (False); None lets llama.cpp decide per
            device.
        use_mmap: Map the model file.
        use_mlock: Lock the weights in RAM so they are never swapped out.
        chat_template: A jinja template, or a llama.cpp built-in template name.
        verbose: Let llama.cpp's INFO and DEBUG lines through the ``nexabind.llama`` logger
            (to stderr when the application configured no logging); see
            :func:`nexabind.lowlevel.set_verbose`. Off, only warnings and errors reach
            ``logging``.
        kv_unified: One KV buffer for all sequences (None: on for an embedding context,
            llama.cpp's default otherwise). With it, :meth:`embed` packs texts of any lengths
            into one decode; without it, only texts of one length.
        lib_path: Folder of the llama.cpp libraries (see :func:`nexabind.loader.library_dir`).

    Raises:
        ModelLoadError: The model file is missing or invalid.
        ContextError: The context could not be created.
        ValueError: ``n_ubatch`` or a thread count is below 1.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        n_ctx: int | None = None,
        n_batch: int = 512,
        n_ubatch: int | None = None,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        n_gpu_layers: int | None = None,
        seed: int | None = None,
        embedding: bool = False,
        flash_attn: bool | None = None,
        use_mmap: bool = True,
        use_mlock: bool = False,
        chat_template: str | None = None,
        verbose: bool = False,
        kv_unified: bool | None = None,
        lib_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self._ctx: lowlevel.Context | None = None
        self._model: lowlevel.Model | None = None
        self._epoch = 0
        lowlevel.lib(lib_path)
        if verbose:
            lowlevel.set_verbose(True)
        if n_gpu_layers is None:
            n_gpu_layers = 999
        self.model_path = str(model_path)
        self._model = lowlevel.Model(
            model_path, n_gpu_layers=n_gpu_layers, use_mmap=use_mmap, use_mlock=use_mlock
        )
        if not n_ctx:
            n_ctx = min(self._model.n_ctx_train or 4096, 4096)
        # embed() packs texts into one decode as sequences. In one unified KV buffer any
        # sequence may use the whole context; split, each gets n_ctx / n_seq_max cells: pack
        # only as many as leave every one a full ubatch of room (a non-causal model needs a
        # whole sequence in one ubatch).
        if embedding and kv_unified is None:
            kv_unified = True
        ubatch = min(n_batch, n_ubatch or 512)
        room = _EMBED_SEQS if kv_unified else n_ctx // ubatch
        self._n_seqs = max(1, min(_EMBED_SEQS, room)) if embedding else 1
        try:
            self._ctx = lowlevel.Context(
                self._model,
                n_ctx=n_ctx,
                n_batch=n_batch,
                n_ubatch=n_ubatch,
                n_threads=n_threads,
                n_threads_batch=n_threads_batch,
                embeddings=embedding,
                n_seq_max=self._n_seqs,
                flash_attn=flash_attn,
                kv_unified=kv_unified,
            )
        except BaseException:
            self._model.close()
            self._model = None
            raise
        self.embedding = embedding
        self.seed = seed
        self.chat_template = chat_template
        self.verbose = verbose
        # The tokens in the KV cache, in order: one int32 slot per context cell, allocated once
        # and written in place, so the decode loop keeps no object per token.
        self._tokens = array("i", bytes(4 * self._ctx.n_ctx))
        self._n_tokens = 0
        self._cancel = threading.Event()
        self.n_decoded_tokens = 0
        """Tokens decoded by this object so far (prompt and generated)."""
        self.n_prompt_tokens_decoded = 0
        """Prompt tokens the last call had to decode (the rest came from the KV cache)."""
        self.n_completion_tokens = 0
        """Tokens the last generation produced."""
        self.last_finish_reason: str | None = None
        """Why the last generation ended: ``stop``, ``length`` or ``cancelled``."""
        self._metadata: dict[str, str] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._ctx is None

    def close(self) -> None:
        """Free the context and the model; safe to call more than once."""
        ctx, model = self._ctx, self._model
        self._ctx = self._model = None
        self._epoch += 1  # a generator still open notices at its next step
        if ctx is not None:
            ctx.close()
        if model is not None:
            model.close()

    def __enter__(self) -> Llama:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self) -> lowlevel.Context:
        if self._ctx is None:
            msg = f"this Llama ({self.model_path}) is closed; create a new one"
            raise ContextError(msg)
        return self._ctx

    # -- basic properties ----------------------------------------------------------------

    def n_ctx(self) -> int:
        """Context length in tokens."""
        return self._check().n_ctx

    def n_vocab(self) -> int:
        """Vocabulary size."""
        return self._check().n_vocab

    def n_embd(self) -> int:
        """Embedding width."""
        return self._check().model.n_embd

    def token_bos(self) -> int:
        """BOS token id (-1 if none)."""
        return self._check().model.bos

    def token_eos(self) -> int:
        """EOS token id (-1 if none)."""
        return self._check().model.eos

    @property
    def metadata(self) -> dict[str, str]:
        """GGUF metadata of the model as strings (arrays are left out by llama.cpp)."""
        ctx = self._check()
        if self._metadata is None:
            self._metadata = ctx.model.metadata()
        return dict(self._metadata)

    def tokenize(self, text: bytes | str, add_bos: bool = True, special: bool = False) -> list[int]:
        """Tokenize text (llama-cpp-python's signature)."""
        return self._check().model.tokenize(text, add_special=add_bos, parse_special=special)

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> bytes:
        """Turn tokens back into bytes (llama-cpp-python returns bytes)."""
        model = self._check().model
        return b"".join(model.token_to_piece(t, special=special) for t in tokens)

    def reset(self) -> None:
        """Forget the KV cache; the next call decodes its whole prompt."""
        self._check().clear()
        self._n_tokens = 0
        self._epoch += 1

    def cancel(self) -> None:
        """Stop a generation running in another thread (it ends with ``cancelled``)."""
        self._cancel.set()
        if self._ctx is not None:
            self._ctx.cancel()

    # -- prompt and KV cache -------------------------------------------------------------

    def _as_tokens(self, prompt: str | bytes | Sequence[int], special: bool = False) -> list[int]:
        if isinstance(prompt, (str, bytes)):
            return self._check().model.tokenize(prompt, add_special=True, parse_special=special)
        return [int(t) for t in prompt]

    def _ingest(self, tokens: list[int]) -> None:
        """Make the KV cache hold ``tokens``, decoding only what differs from what it holds."""
        ctx = self._check()
        if not tokens:
            msg = "the prompt is empty; give at least one token"
            raise ValueError(msg)
        if len(tokens) > ctx.n_ctx:
            msg = (
                f"the prompt has {len(tokens)} tokens but the context holds {ctx.n_ctx}; "
                "shorten the prompt or create the Llama with a larger n_ctx"
            )
            raise ContextOverflowError(msg)
        import numpy as np

        new = np.asarray(tokens, dtype=np.int32)
        hist = np.frombuffer(self._tokens, dtype=np.int32)
        n_old = self._n_tokens
        lim = min(n_old, len(new) - 1)  # always decode at least one token for logits
        diff = np.flatnonzero(hist[:lim] != new[:lim])
        n = int(diff[0]) if diff.size else lim
        if n < n_old and not ctx.seq_rm(0, n, -1):
            ctx.clear()
            n = 0
        m = len(new)
        self._n_tokens = n
        hist[n:m] = new[n:]
        step = ctx.n_batch
        self.n_prompt_tokens_decoded = 0
        try:
            for i in range(n, m, step):
                chunk = hist[i : min(i + step, m)]
                ctx.batch.set_array(chunk, i)
                ctx.decode()
                self._n_tokens = i + len(chunk)
                self.n_prompt_tokens_decoded += len(chunk)
                self.n_decoded_tokens += len(chunk)
        except BaseException:
            self.reset()
            raise

    # -- generation ----------------------------------------------------------------------

    def generate(
        self,
        prompt: str | bytes | Sequence[int],
        *,
        max_tokens: int | None = 16,
        stop: str | Sequence[str] | None = None,
        logprobs: bool | int = False,
        context_shift: bool = False,
        special: bool = False,
        **options: Any,
    ) -> Iterator[Token]:
        """Generate tokens after ``prompt``, one :class:`Token` at a time.

        Breaking out of the loop stops decoding; what was decoded stays in the KV cache for the
        next call.

        Args:
            prompt: Text or token ids.
            max_tokens: Most tokens to generate (None or <= 0: until the context is full).
            stop: Stop strings; matched across tokens and never emitted.
            logprobs: True fills ``Token.logprob``; a number N also fills
                ``Token.top_logprobs`` with the N most likely tokens at each position (their
                log-probabilities before sampling settings).
            context_shift: When the context is full, drop the oldest half (after the first
                token) instead of raising.
            special: Parse special-token text in a text prompt.
            **options: Sampling options (see :class:`nexabind.sampling.SamplingOptions`).

        Raises:
            ContextOverflowError: The prompt does not fit, or the context fills up with
                ``max_tokens`` asking for more and no ``context_shift``.
            ValueError: An unknown or out-of-range option, or a negative ``logprobs``.
        """
        unknown = set(options) - _SAMPLING_KEYS
        if unknown:
            msg = f"unknown sampling options {sorted(unknown)}; known: {sorted(_SAMPLING_KEYS)}"
            raise TypeError(msg)
        if isinstance(logprobs, bool):
            n_top = None
        elif logprobs is None or logprobs < 0:
            msg = f"logprobs={logprobs!r} is invalid; use True/False or a number of top tokens >= 0"
            raise ValueError(msg)
        else:
            n_top = int(logprobs)
        if options.get("seed") is None and self.seed is not None:
            options["seed"] = self.seed
        opts = SamplingOptions(**options)
        tokens = self._as_tokens(prompt, special)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        want = n_top is not None or bool(logprobs)
        return self._generate(tokens, opts, max_tokens, stops, want, n_top, context_shift)

    def _generate(
        self,
        tokens: list[int],
        opts: SamplingOptions,
        max_tokens: int | None,
        stops: list[str],
        want_logprobs: bool,
        n_top: int | None,
        context_shift: bool,
    ) -> Iterator[Token]:
        ctx = self._check()
        sampler = build_sampler(ctx.model, opts, ctx.n_ctx)
        self._cancel.clear()
        ctx.clear_cancel()
        self.last_finish_reason = None
        self.n_completion_tokens = 0
        self._epoch += 1
        try:
            self._ingest(tokens)
            yield from self._loop(
                ctx, sampler, max_tokens, stops, want_logprobs, n_top, context_shift
            )
        finally:
            sampler.close()

    def _loop(
        self,
        ctx: lowlevel.Context,
        sampler: lowlevel.SamplerChain,
        max_tokens: int | None,
        stops: list[str],
        want_logprobs: bool,
        n_top: int | None,
        context_shift: bool,
    ) -> Iterator[Token]:
        n_ctx = ctx.n_ctx
        limit = max_tokens if max_tokens and max_tokens > 0 else None
        if limit is None and not context_shift:
            limit = n_ctx - self._n_tokens
        # Hot-loop locals: the C calls are bound once by token_steps; nothing is allocated or
        # looked up by name per token.
        sample, is_eog, piece, feed = ctx.token_steps(sampler)
        logprobs_of = self._logprobs
        new = tuple.__new__  # Token(...) through its Python-level __new__ costs more
        dec = codecs.getincrementaldecoder("utf-8")("replace").decode
        matcher = _StopMatcher(stops) if stops else None
        hist = self._tokens  # n_ctx int32 slots: storing a token allocates nothing
        n_past = self._n_tokens
        n_gen = 0
        n_fed = 0
        epoch = self._epoch
        lp = top = None
        if limit is None:
            limit = 1 << 62
        try:
            while True:
                tok = sample()
                if want_logprobs:
                    lp, top = logprobs_of(ctx, tok, n_top)
                if is_eog(tok):
                    self.last_finish_reason = "stop"
                    tail = dec(b"", True) + (matcher.flush() if matcher else "")
                    if tail:
                        yield new(Token, (tok, tail, lp, top))
                    return
                text = dec(piece(tok))
                n_gen += 1
                last = n_gen >= limit
                if matcher is not None:
                    text, hit = matcher.feed(text)
                    if hit:
                        self.last_finish_reason = "stop"
                        yield new(Token, (tok, text, lp, top))
                        return
                    if last:
                        text += dec(b"", True) + matcher.flush()
                elif last:
                    text += dec(b"", True)
                if last:
                    self.last_finish_reason = "length"
                    yield new(Token, (tok, text, lp, top))
                    return
                yield new(Token, (tok, text, lp, top))
                if self._epoch != epoch:
                    self._check()
                    msg = (
                        "this generator was superseded by a later call on the same Llama (the "
                        "context now holds other tokens); finish one generation before the next"
                    )
                    raise ContextError(msg)
                if n_past >= n_ctx:
                    if not context_shift:
                        self.last_finish_reason = "length"
                        msg = (
                            f"the context of {n_ctx} tokens is full after {n_gen} generated "
                            "tokens; use a larger n_ctx, a smaller max_tokens, or "
                            "context_shift=True"
                        )
                        raise ContextOverflowError(msg)
                    n_past = self._shift(ctx)
                try:
                    feed(tok, n_past)
                except DecodeCancelled:
                    self._cancel.clear()
                    self.last_finish_reason = "cancelled"
                    return
                except NexabindError:
                    self.reset()
                    raise
                hist[n_past] = tok
                n_past += 1
                self._n_tokens = n_past  # in step with the cache even if the caller stops here
                n_fed += 1
        finally:
            # Counters are written once, not per token (also when the caller breaks out).
            self.n_completion_tokens = n_gen
            self.n_decoded_tokens += n_fed

    def _shift(self, ctx: lowlevel.Context) -> int:
        """Drop the older half of the context after the first token; return the new length."""
        n = self._n_tokens
        n_keep = 1
        n_discard = (n - n_keep) // 2
        ctx.seq_rm(0, n_keep, n_keep + n_discard)
        ctx.seq_add(0, n_keep + n_discard, n, -n_discard)
        hist = self._tokens
        hist[n_keep : n - n_discard] = hist[n_keep + n_discard : n]  # the tail moves down
        self._n_tokens = n - n_discard
        return self._n_tokens

    @staticmethod
    def _logprobs(
        ctx: lowlevel.Context, tok: int, n_top: int | None
    ) -> tuple[float, dict[int, float] | None]:
        """Log-probability of ``tok`` and the ``n_top`` most likely tokens, from the logits."""
        import numpy as np

        x = ctx.logits(-1)
        z = x - x.max()  # one float32 copy; the zero-copy view stays untouched
        lse = float(np.log(np.exp(z).sum(dtype=np.float64)))
        lp = float(z[tok]) - lse
        if n_top is None:
            return lp, None
        k = min(n_top, z.shape[0])
        if k == 0:
            return lp, {}
        idx = np.argpartition(z, -k)[-k:]
        idx = idx[np.argsort(-z[idx], kind="stable")]
        return lp, {int(i): float(z[i]) - lse for i in idx}

    # -- llama-cpp-python compatible completion ----------------------------------------------

    def __call__(self, prompt: str | Sequence[int], **kwargs: Any) -> Any:
        """Same as :meth:`create_completion`."""
        return self.create_completion(prompt, **kwargs)

    def create_completion(
        self,
        prompt: str | Sequence[int],
        *,
        suffix: str | None = None,
        max_tokens: int | None = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        logprobs: int | None = None,
        echo: bool = False,
        stop: str | Sequence[str] | None = None,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        top_k: int = 40,
        stream: bool = False,
        seed: int | None = None,
        logit_bias: dict[int, float] | None = None,
        grammar: str | None = None,
        model: str | None = None,
    ) -> Any:
        """Complete ``prompt``; returns a ``text_completion`` dict or an iterator of chunks.

        Args mirror llama-cpp-python's ``Llama.create_completion``; ``grammar`` is GBNF text.
        ``suffix`` is appended to the generated text (streamed as the last text chunk).
        ``logprobs=N`` gives, per generated token, its log-probability and the N most likely
        tokens' (``top_logprobs``: ``{text: logprob}``, most likely first, plus the chosen
        token), computed from the raw logits.

        Raises:
            ContextOverflowError: The prompt does not fit the context.
            ValueError: ``logprobs`` is negative, or a sampling option is out of range.
        """
        self._check()
        if logprobs is not None and (isinstance(logprobs, bool) or logprobs < 0):
            msg = f"logprobs={logprobs!r} is invalid; use None or a number of top tokens >= 0"
            raise ValueError(msg)
        tokens = self._as_tokens(prompt)
        sampling: dict[str, Any] = {
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "min_p": min_p,
            "typical_p": typical_p,
            "repeat_penalty": repeat_penalty,
            "frequency_penalty": frequency_penalty,
            "presence_penalty": presence_penalty,
            "seed": seed,
            "logit_bias": dict(logit_bias or {}),
            "grammar": grammar,
        }
        it = self.generate(
            tokens,
            max_tokens=max_tokens,
            stop=stop,
            logprobs=False if logprobs is None else logprobs,
            **sampling,
        )
        cid = f"cmpl-{uuid.uuid4()}"
        created = int(time.time())
        name = model or self.model_path
        prefix = self._check().model.detokenize(tokens, remove_special=True) if echo else ""
        if stream:
            return self._stream_completion(it, cid, created, name, prefix, logprobs, suffix)
        parts = [prefix]
        lps: list[Token] = []
        for t in it:
            parts.append(t.text)
            if logprobs is not None:
                lps.append(t)
        if suffix is not None:
            parts.append(suffix)
        text = "".join(parts)
        return {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": name,
            "choices": [
                {
                    "text": text,
                    "index": 0,
                    "logprobs": self._logprobs_dict(lps, len(prefix))
                    if logprobs is not None
                    else None,
                    "finish_reason": self._finish(),
                }
            ],
            "usage": {
                "prompt_tokens": len(tokens),
                "completion_tokens": self.n_completion_tokens,
                "total_tokens": len(tokens) + self.n_completion_tokens,
            },
        }

    def _finish(self) -> str:
        return "length" if self.last_finish_reason == "length" else "stop"

    def _piece_cache(self) -> Any:
        """Return ``piece(token) -> bytes``, remembering each token's bytes."""
        return functools.lru_cache(maxsize=None)(self._check().model.token_to_piece)

    def _logprobs_dict(self, toks: list[Token], offset: int = 0) -> dict[str, Any]:
        piece = self._piece_cache()

        def text_of(tok: int) -> str:
            return piece(tok).decode("utf-8", "replace")

        offsets = []
        tops = []
        pos = offset
        for t in toks:
            offsets.append(pos)
            pos += len(t.text)
            top: dict[str, float | None] = {
                text_of(i): lp for i, lp in (t.top_logprobs or {}).items()
            }
            top[t.text] = t.logprob
            tops.append(top)
        return {
            "tokens": [t.text for t in toks],
            "text_offset": offsets,
            "token_logprobs": [t.logprob for t in toks],
            "top_logprobs": tops,
        }

    def _stream_completion(
        self,
        it: Iterator[Token],
        cid: str,
        created: int,
        name: str,
        prefix: str,
        logprobs: int | None,
        suffix: str | None,
    ) -> Iterator[dict[str, Any]]:
        def chunk(text: str, lp: Any, finish: str | None) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": name,
                "choices": [{"text": text, "index": 0, "logprobs": lp, "finish_reason": finish}],
            }

        if prefix:
            yield chunk(prefix, None, None)
        offset = len(prefix)
        for t in it:
            if logprobs is not None:
                yield chunk(t.text, self._logprobs_dict([t], offset), None)
            elif t.text:
                yield chunk(t.text, None, None)
            offset += len(t.text)
        if suffix:
            yield chunk(suffix, None, None)
        yield chunk("", None, self._finish())

    # -- chat ----------------------------------------------------------------------------

    def _template_source(self) -> str | None:
        if self.chat_template:
            return self.chat_template
        return self._check().model.chat_template()

    def format_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """Render ``messages`` into a prompt with the chat template.

        The template is ``chat_template`` given to the constructor, else the model's own; a
        short name (``chatml``, ``llama3``, ...) uses llama.cpp's built-in template.

        Raises:
            ValueError: The model has no chat template and none was given.
        """
        from nexabind import chat as chat_mod

        src = self._template_source()
        if src is None:
            msg = (
                f"{self.model_path} has no chat template; pass chat_template= (a jinja "
                "template or a llama.cpp name such as 'chatml')"
            )
            raise ValueError(msg)
        if "{" not in src:
            return chat_mod.apply_builtin_template(
                src, messages, add_generation_prompt=add_generation_prompt
            )
        model = self._check().model
        bos = model.token_to_piece(model.bos, special=True).decode() if model.bos >= 0 else ""
        eos = model.token_to_piece(model.eos, special=True).decode() if model.eos >= 0 else ""
        return chat_mod.render_jinja(
            src, messages, bos_token=bos, eos_token=eos, add_generation_prompt=add_generation_prompt
        )

    def _chat_tokens(self, messages: list[dict[str, Any]]) -> list[int]:
        text = self.format_chat(messages)
        model = self._check().model
        bos = model.token_to_piece(model.bos, special=True).decode() if model.bos >= 0 else None
        add_bos = not (bos and text.startswith(bos))
        return model.tokenize(text, add_special=add_bos, parse_special=True)

    def chat(self, messages: list[dict[str, Any]], **options: Any) -> Iterator[Token]:
        """Generate the assistant's reply to ``messages``, one :class:`Token` at a time.

        Args:
            messages: ``[{"role": ..., "content": ...}, ...]``.
            **options: As for :meth:`generate` (``max_tokens``, ``stop``, sampling options).
        """
        return self.generate(self._chat_tokens(messages), **options)

    def create_chat_completion(
        self,
        messages: list[dict[str, Any]],
        *,
        temperature: float = 0.2,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        stream: bool = False,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        max_tokens: int | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        logit_bias: dict[int, float] | None = None,
        grammar: str | None = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
        model: str | None = None,
    ) -> Any:
        """Answer a conversation; returns a ``chat.completion`` dict or an iterator of chunks.

        Args mirror llama-cpp-python's ``Llama.create_chat_completion``. ``logprobs=True``
        fills each choice's (or chunk's) ``logprobs`` as OpenAI's chat API does: ``content``,
        one ``{token, logprob, bytes, top_logprobs}`` per generated token, with the
        ``top_logprobs`` most likely tokens at that position.

        Raises:
            ValueError: ``top_logprobs`` without ``logprobs=True``, or out of range.
        """
        if top_logprobs is not None and not logprobs:
            msg = "top_logprobs needs logprobs=True"
            raise ValueError(msg)
        if top_logprobs is not None and top_logprobs < 0:
            msg = f"top_logprobs={top_logprobs} is invalid; use a number of tokens >= 0"
            raise ValueError(msg)
        tokens = self._chat_tokens(messages)
        it = self.generate(
            tokens,
            max_tokens=max_tokens,
            stop=stop,
            logprobs=(top_logprobs or 0) if logprobs else False,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            typical_p=typical_p,
            seed=seed,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            repeat_penalty=repeat_penalty,
            logit_bias=dict(logit_bias or {}),
            grammar=grammar,
        )
        cid = f"chatcmpl-{uuid.uuid4()}"
        created = int(time.time())
        name = model or self.model_path
        if stream:
            return self._stream_chat(it, cid, created, name, bool(logprobs))
        toks = list(it)
        text = "".join(t.text for t in toks)
        return {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": self._chat_logprobs(toks) if logprobs else None,
                    "finish_reason": self._finish(),
                }
            ],
            "usage": {
                "prompt_tokens": len(tokens),
                "completion_tokens": self.n_completion_tokens,
                "total_tokens": len(tokens) + self.n_completion_tokens,
            },
        }

    def _chat_logprobs(self, toks: list[Token]) -> dict[str, Any]:
        piece = self._piece_cache()

        def entry(token: str, tok: int, lp: float | None) -> dict[str, Any]:
            return {"token": token, "logprob": lp, "bytes": list(piece(tok))}

        content = []
        for t in toks:
            e = entry(t.text, t.id, t.logprob)
            tops = (t.top_logprobs or {}).items()
            e["top_logprobs"] = [entry(piece(i).decode("utf-8", "replace"), i, v) for i, v in tops]
            content.append(e)
        return {"content": content, "refusal": None}

    def _stream_chat(
        self, it: Iterator[Token], cid: str, created: int, name: str, logprobs: bool
    ) -> Iterator[dict[str, Any]]:
        def chunk(delta: dict[str, Any], finish: str | None, lp: Any = None) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": name,
                "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}],
            }

        yield chunk({"role": "assistant"}, None)
        for t in it:
            if logprobs:
                yield chunk({"content": t.text}, None, self._chat_logprobs([t]))
            elif t.text:
                yield chunk({"content": t.text}, None)
        yield chunk({}, self._finish())

    # -- embeddings ----------------------------------------------------------------------

    def embed(
        self, input: str | Sequence[str], normalize: bool = False, truncate: bool = True
    ) -> Any:
        """Embed one text or a list of texts.

        Args:
            input: A text or a list of texts.
            normalize: Scale each vector to unit L2 norm.
            truncate: Cut texts longer than a ubatch (or a sequence's share of the context)
                instead of raising.

        Returns:
            A float32 numpy array of shape ``(n_texts, n_embd)``.

        Raises:
            ContextError: The Llama was not created with ``embedding=True``.
            ContextOverflowError: A text is longer than that and ``truncate`` is False.
        """
        import numpy as np

        ctx = self._check()
        if not self.embedding:
            msg = "create the Llama with embedding=True to compute embeddings"
            raise ContextError(msg)
        texts = [input] if isinstance(input, str) else list(input)
        out = np.empty((len(texts), ctx.model.n_embd), dtype=np.float32)
        max_len = min(ctx.n_ubatch, ctx.n_ctx_seq)
        seqs = []
        for i, text in enumerate(texts):
            toks = ctx.model.tokenize(text, add_special=True)
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
        self._n_tokens = 0
        self._epoch += 1
        batch = ctx.batch
        # One decode holds at most a ubatch of tokens (a sequence pooled across two ubatches
        # would be pooled wrongly). With a unified KV cache llama.cpp takes the sequences as
        # they come, so texts of any lengths share a decode; with one KV buffer per sequence
        # it cuts a batch into equal-length slices per sequence, so only texts of one length.
        mixed = ctx.n_ctx_seq == ctx.n_ctx
        order = sorted(range(len(seqs)), key=lambda k: len(seqs[k]))
        i = 0
        while i < len(order):
            ctx.clear()
            batch.clear()
            group: list[int] = []
            n_tok, first = 0, len(seqs[order[i]])
            while i < len(order) and len(group) < self._n_seqs:
                toks = seqs[order[i]]
                if n_tok + len(toks) > ctx.n_ubatch or not (mixed or len(toks) == first):
                    break
                for pos, tok in enumerate(toks):
                    batch.add(tok, pos, len(group), True)
                group.append(order[i])
                n_tok += len(toks)
                i += 1
            ctx.decode()
            self.n_decoded_tokens += n_tok
            for s_id, k in enumerate(group):
                out[k] = ctx.embeddings(s_id)
        ctx.clear()
        if normalize:
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out /= np.where(norms == 0, 1, norms)
        return out

    def create_embedding(
        self, input: str | Sequence[str], model: str | None = None
    ) -> dict[str, Any]:
        """Embed texts; returns llama-cpp-python's (OpenAI's) ``list`` of ``embedding`` dict."""
        texts = [input] if isinstance(input, str) else list(input)
        ctx = self._check()
        arr = self.embed(texts)
        n_tok = sum(len(ctx.model.tokenize(t)) for t in texts)
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "embedding": arr[i].tolist(), "index": i}
                for i in range(len(texts))
            ],
            "model": model or self.model_path,
            "usage": {"prompt_tokens": n_tok, "total_tokens": n_tok},
        }

    # -- state ---------------------------------------------------------------------------

    def save_state(self, path: str | os.PathLike[str] | None = None) -> bytes:
        """Save the context (KV cache and the tokens in it).

        Args:
            path: Also write the state to this file.

        Returns:
            The state as bytes (give it to :meth:`load_state`).
        """
        ctx = self._check()
        payload = ctx.state_get()
        n = self._n_tokens
        toks = self._tokens[:n]
        if sys.byteorder == "big":
            toks.byteswap()  # the state stores little-endian int32
        blob = _STATE_MAGIC + struct.pack("<I", n) + toks.tobytes() + payload
        if path is not None:
            Path(path).write_bytes(blob)
        return blob

    def load_state(self, state: bytes | str | os.PathLike[str]) -> None:
        """Restore a state from :meth:`save_state` (bytes or a file path).

        Raises:
            StateError: The data is not a nexabind state or llama.cpp refused it.
        """
        ctx = self._check()
        data = state if isinstance(state, (bytes, bytearray)) else Path(state).read_bytes()
        if not data.startswith(_STATE_MAGIC) or len(data) < 12:
            msg = "not a nexabind state (bad header); use bytes from Llama.save_state()"
            raise StateError(msg)
        (n,) = struct.unpack_from("<I", data, 8)
        if len(data) < 12 + 4 * n:
            msg = f"the state is cut short ({len(data)} bytes for {n} tokens); save it again"
            raise StateError(msg)
        if n > ctx.n_ctx:
            msg = (
                f"the state holds {n} tokens but this context holds {ctx.n_ctx}; load it into "
                "a Llama with the same n_ctx as the one that saved it"
            )
            raise StateError(msg)
        toks = array("i", data[12 : 12 + 4 * n])
        if sys.byteorder == "big":
            toks.byteswap()
        payload = data[12 + 4 * n :]
        try:
            ctx.state_set(payload)
        except StateError:
            self.reset()
            raise
        self._tokens[:n] = toks
        self._n_tokens = n
        self._epoch += 1
