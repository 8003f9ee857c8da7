"""``Llama``: generation, streaming, chat, embeddings, KV-cache reuse and state.

The surface follows llama-cpp-python (``create_completion``, ``create_chat_completion``,
``create_embedding`` with the same OpenAI-shaped results, built by :mod:`nexabind.openai`) on
top of two iterators, :meth:`Llama.generate` and :meth:`Llama.chat`, that yield
:class:`~nexabind.tokens.Token` values from the decode loop of :mod:`nexabind._sequence`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from nexabind import _embed, _state, hub, lowlevel, openai
from nexabind import chat as chat_mod
from nexabind._sequence import KVSequence, Request
from nexabind.errors import ClosedError, ContextError, StateError
from nexabind.sampling import SAMPLING_KEYS, SamplingOptions
from nexabind.tokens import Outcome, Token

__all__ = ["Llama", "Token"]

_EMBED_SEQS = 64  # most sequences packed into one decode by embed()


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
        check_tensors: Validate every tensor's data while loading (for files of unknown
            origin; see also :func:`nexabind.check_model`, which loads in a child process).
        lib_path: Folder of the llama.cpp libraries (see :func:`nexabind.loader.library_dir`).

    A ``Llama`` is safe to share between threads: every call into llama.cpp holds the
    context's lock, so calls from two threads run one after the other. A generation holds it
    for one token at a time, so another call may run between two tokens; if that call changes
    the KV cache (another generation, :meth:`reset`, :meth:`load_state`), the first generator
    raises ``ContextError`` at its next step instead of continuing on the wrong tokens.
    :meth:`close` from another thread cancels a running prompt decode, waits for the current
    step, then frees; the generator then raises ``ClosedError``.

    Raises:
        ModelLoadError: The model file is missing or invalid.
        ContextError: The context could not be created (or would not fit in memory).
        ValueError: A size or thread count is out of range (the message names it).
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
        check_tensors: bool = False,
        lib_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self._ctx: lowlevel.Context | None = None
        self._model: lowlevel.Model | None = None
        lowlevel.lib(lib_path)
        if verbose:
            lowlevel.set_verbose(True)
        if n_gpu_layers is None:
            n_gpu_layers = 999
        self.model_path = str(model_path)
        if n_ctx is not None and n_ctx < 0:
            msg = f"n_ctx={n_ctx} is invalid; use 0 or None (the model's length, at most 4096)"
            raise ValueError(msg)
        self._model = lowlevel.Model(
            model_path,
            n_gpu_layers=n_gpu_layers,
            use_mmap=use_mmap,
            use_mlock=use_mlock,
            check_tensors=check_tensors,
        )
        if not n_ctx:
            n_ctx = min(self._model.n_ctx_train or 4096, 4096)
        # embed() packs texts into one decode as sequences. In one unified KV buffer any
        # sequence may use the whole context; split, each gets n_ctx / n_seq_max cells: pack
        # only as many as leave every one a full ubatch of room (a non-causal model needs a
        # whole sequence in one ubatch).
        if embedding and kv_unified is None:
            kv_unified = True
        # A sequence takes an output row of a ubatch: never more sequences than it has rows.
        ubatch = max(1, min(n_batch, n_ubatch or 512, n_ctx))
        room = _EMBED_SEQS if kv_unified else n_ctx // ubatch
        self._n_seqs = max(1, min(_EMBED_SEQS, room, ubatch)) if embedding else 1
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
        self._seq = KVSequence(self._ctx, self._closed_message())
        self._outcome = Outcome()
        self._metadata: dict[str, str] | None = None

    @classmethod
    def from_pretrained(
        cls,
        repo_id: str,
        filename: str | None = None,
        additional_files: list[str] | None = None,
        local_dir: str | os.PathLike[str] | None = None,
        local_dir_use_symlinks: bool | str = "auto",
        cache_dir: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> Llama:
        """Create a Llama from a model on the Hugging Face hub (llama-cpp-python's call).

        Args:
            repo_id: ``OWNER/REPO``.
            filename: The model file, or a glob that matches exactly one file of the
                repository (``"*Q4_K_M.gguf"``); a split model's other parts come along.
                None chooses as ``nexabind pull`` does (Q4_K_M, else Q8_0, else the first).
            additional_files: More files or globs to download beside it.
            local_dir: Download into this folder instead of the hub cache.
            local_dir_use_symlinks: Ignored (huggingface_hub no longer uses it).
            cache_dir: The hub cache (default: as huggingface_hub finds it, ``HF_HUB_CACHE``).
            **kwargs: For the constructor (``n_ctx``, ``n_gpu_layers``, ...).

        Unlike llama-cpp-python, a model already in the cache (or in ``local_dir``) is loaded
        without asking the hub anything; ``nexabind pull`` looks for newer versions.

        Raises:
            ModelNotFoundError: No file or several match ``filename``, or the repository does
                not exist (also a ``ValueError``).
            DownloadError: The download failed (see :func:`nexabind.hub.pull`).
        """
        path = hub.from_pretrained(repo_id, filename, additional_files, local_dir, cache_dir)
        hub.mark_used(path)
        return cls(path, **kwargs)

    @property
    def n_decoded_tokens(self) -> int:
        """Tokens decoded by this object so far (prompt and generated)."""
        return self._seq.n_decoded

    @property
    def n_prompt_tokens_decoded(self) -> int:
        """Prompt tokens the last call had to decode (the rest came from the KV cache)."""
        return self._seq.n_prompt_decoded

    @property
    def last_finish_reason(self) -> str | None:
        """Why the last generation ended: ``stop``, ``length`` or ``cancelled``."""
        return self._outcome.finish_reason

    @property
    def model_type(self) -> str:
        """The model's architecture (``general.architecture``), as ``TextModel`` names it."""
        return self.metadata.get("general.architecture", "unknown")

    @property
    def err(self) -> BaseException | None:
        """The error that ended the last generation, if one did (``TextModel``'s ``err``)."""
        return self._seq.err

    @property
    def n_completion_tokens(self) -> int:
        """Tokens the last generation produced."""
        return self._outcome.completion_tokens

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._ctx is None

    def close(self) -> None:
        """Free the context and the model; safe to call more than once, from any thread.

        A prompt decode running in another thread is cancelled; a generation step is waited
        for. A generator still open raises ``ClosedError`` at its next step.
        """
        ctx, model = self._ctx, self._model
        if ctx is not None:
            ctx.cancel()
            with ctx.lock:
                self._ctx = self._model = None
                self._seq.invalidate()  # a generator still open notices at its next step
                ctx.close()
        if model is not None:
            model.close()

    def __enter__(self) -> Llama:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _closed_message(self) -> str:
        return f"this Llama ({self.model_path}) is closed; create a new one"

    def _check(self) -> lowlevel.Context:
        if self._ctx is None:
            raise ClosedError(self._closed_message())
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
        with self._check().lock:
            self._check()
            self._seq.reset()

    def cancel(self) -> None:
        """Stop the running generation, or the next one if none runs yet.

        Callable from any thread. The generation ends with ``finish_reason`` "cancelled" at
        its next step (a prompt being decoded stops within a few graph nodes); a cancel that
        arrives before a call starts applies to that call.
        """
        if self._ctx is not None:
            self._ctx.cancel()

    # -- prompt and KV cache -------------------------------------------------------------

    def _as_tokens(self, prompt: str | bytes | Sequence[int], special: bool = False) -> list[int]:
        if isinstance(prompt, (str, bytes)):
            return self._check().model.tokenize(prompt, add_special=True, parse_special=special)
        tokens = [int(t) for t in prompt]
        self._check().model.check_tokens(tokens, "prompt token")
        return tokens

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
            ValueError: An out-of-range option, or a negative ``logprobs``.
            TypeError: An unknown option.
        """
        return self._start(
            self._as_tokens(prompt, special), max_tokens, stop, logprobs, context_shift, options
        )

    def _start(
        self,
        tokens: list[int],
        max_tokens: int | None,
        stop: str | Sequence[str] | None,
        logprobs: bool | int | None,
        context_shift: bool,
        options: dict[str, Any],
    ) -> Iterator[Token]:
        """Validate the settings now (not at the first ``next``) and return the generator."""
        unknown = set(options) - SAMPLING_KEYS
        if unknown:
            msg = f"unknown sampling options {sorted(unknown)}; known: {sorted(SAMPLING_KEYS)}"
            raise TypeError(msg)
        if logprobs is None or isinstance(logprobs, bool):
            n_top = None
        elif logprobs < 0:
            msg = f"logprobs={logprobs!r} is invalid; use True/False or a number of top tokens >= 0"
            raise ValueError(msg)
        else:
            n_top = int(logprobs)
        if options.get("seed") is None and self.seed is not None:
            options["seed"] = self.seed
        req = Request(
            SamplingOptions(**options),
            max_tokens=max_tokens,
            stops=[stop] if isinstance(stop, str) else list(stop or []),
            want_logprobs=n_top is not None or bool(logprobs),
            n_top=n_top,
            context_shift=context_shift,
        )
        self._check()
        self._outcome = outcome = Outcome(prompt_tokens=len(tokens))
        return self._seq.generate(tokens, req, outcome)

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
        logprobs: int | None = None,
        echo: bool = False,
        stop: str | Sequence[str] | None = None,
        stream: bool = False,
        model: str | None = None,
        **sampling: Any,
    ) -> Any:
        """Complete ``prompt``; returns a ``text_completion`` dict or an iterator of chunks.

        Args mirror llama-cpp-python's ``Llama.create_completion``; the sampling options
        (``temperature``, ``top_p``, ``top_k``, ``min_p``, ``typical_p``, the penalties,
        ``seed``, ``logit_bias``, ``grammar`` as GBNF text) are those of
        :class:`nexabind.sampling.SamplingOptions`, with its defaults. ``suffix`` is appended
        to the generated text (streamed as the last text chunk). ``logprobs=N`` gives, per
        generated token, its log-probability and the N most likely tokens' (``top_logprobs``:
        ``{text: logprob}``, most likely first, plus the chosen token), computed from the raw
        logits.

        Raises:
            ContextOverflowError: The prompt does not fit the context.
            ValueError: ``logprobs`` is negative, or a sampling option is out of range.
        """
        ctx = self._check()
        if logprobs is not None and (isinstance(logprobs, bool) or logprobs < 0):
            msg = f"logprobs={logprobs!r} is invalid; use None or a number of top tokens >= 0"
            raise ValueError(msg)
        tokens = self._as_tokens(prompt)
        sampling = {**openai.COMPLETION_DEFAULTS, **sampling}
        it = self._start(tokens, max_tokens, stop, logprobs, False, sampling)
        shape = openai.completion_chunks if stream else openai.completion
        return shape(
            it,
            self._outcome,
            model=model or self.model_path,
            prefix=ctx.model.detokenize(tokens, remove_special=True) if echo else "",
            suffix=suffix,
            logprobs=logprobs,
            piece=ctx.model.token_to_piece,
        )

    # -- chat ----------------------------------------------------------------------------

    def format_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """Render ``messages`` into a prompt with the chat template.

        The template is ``chat_template`` given to the constructor, else the model's own; a
        short name (``chatml``, ``llama3``, ...) uses llama.cpp's built-in template.

        Raises:
            TemplateError: The model has no chat template and none was given, or the
                template refused the messages.
        """
        return chat_mod.format_chat(
            self._check().model,
            messages,
            template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
        )

    def _chat_tokens(self, messages: list[dict[str, Any]]) -> list[int]:
        return chat_mod.prompt_tokens(self._check().model, messages, template=self.chat_template)

    def chat_tokens(self, text: str, seen: tuple[str, Sequence[int]] | None = None) -> list[int]:
        """Tokenize a prompt :meth:`format_chat` rendered, continuing from what the model saw.

        With ``seen`` (the text of the previous prompt and its reply, and the tokens the model
        saw for them: the prompt's, then the generated ids) and a ``text`` that starts with
        that text, the result is those tokens plus only the tokens of what follows, so a
        follow-up turn passed to :meth:`generate` decodes only its new tokens (see
        :func:`nexabind.chat.continue_prompt`).
        """
        return chat_mod.continue_prompt(self._check().model, text, seen)

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
        max_tokens: int | None = None,
        stop: str | Sequence[str] | None = None,
        stream: bool = False,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
        model: str | None = None,
        **sampling: Any,
    ) -> Any:
        """Answer a conversation; returns a ``chat.completion`` dict or an iterator of chunks.

        Args mirror llama-cpp-python's ``Llama.create_chat_completion``; the sampling
        options are those of :class:`nexabind.sampling.SamplingOptions`, with
        llama-cpp-python's chat defaults (``temperature=0.2``). ``logprobs=True`` fills each
        choice's (or chunk's) ``logprobs`` as OpenAI's chat API does: ``content``, one
        ``{token, logprob, bytes, top_logprobs}`` per generated token, with the
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
        sampling = {**openai.CHAT_DEFAULTS, **sampling}
        n_top = (top_logprobs or 0) if logprobs else False
        it = self._start(tokens, max_tokens, stop, n_top, False, sampling)
        shape = openai.chat_chunks if stream else openai.chat_completion
        return shape(
            it,
            self._outcome,
            model=model or self.model_path,
            logprobs=bool(logprobs),
            piece=self._check().model.token_to_piece,
        )

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
        ctx = self._check()
        if not self.embedding:
            msg = "create the Llama with embedding=True to compute embeddings"
            raise ContextError(msg)
        texts = [input] if isinstance(input, str) else list(input)
        with ctx.lock:
            self._check()
            self._seq.reset()
            out, n_decoded = _embed.embed(ctx, texts, n_seqs=self._n_seqs, truncate=truncate)
            self._seq.n_decoded += n_decoded
        if normalize:
            import numpy as np

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
        return openai.embedding_list(arr, model=model or self.model_path, prompt_tokens=n_tok)

    # -- state ---------------------------------------------------------------------------

    def save_state(self, path: str | os.PathLike[str] | None = None) -> bytes:
        """Save the context (KV cache and the tokens in it).

        Args:
            path: Also write the state to this file.

        Returns:
            The state as bytes (give it to :meth:`load_state`).
        """
        ctx = self._check()
        with ctx.lock:
            blob = _state.pack(self._seq.tokens[: self._seq.n], ctx.state_get())
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
        toks, payload = _state.unpack(data, ctx.n_ctx)
        with ctx.lock:
            try:
                ctx.state_set(payload)
                held = ctx.seq_pos_max(0) + 1
                if held != len(toks):
                    msg = (
                        f"the state names {len(toks)} tokens but its KV cache holds {held}; "
                        "it was not saved by Llama.save_state() over this model"
                    )
                    raise StateError(msg)
            except StateError:
                self.reset()
                raise
            self._seq.restore(toks)
