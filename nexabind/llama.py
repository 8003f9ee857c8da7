"""``Llama``: generation, streaming, chat, embeddings, KV-cache reuse and state.

The surface is llama-cpp-python's (every constructor argument, ``create_completion``,
``create_chat_completion``, ``create_embedding``, ``generate``, ``eval``/``sample``, states and
prompt caches, with the same OpenAI-shaped results, built by :mod:`nexabind.openai`) on top of
two iterators, :meth:`Llama.generate` and :meth:`Llama.chat`, that yield
:class:`~nexabind.tokens.Token` values (ints carrying their text) from the decode loop of
:mod:`nexabind._sequence`. The class is built in layers: :mod:`nexabind._llama_core`
(construction, lifecycle, tokens, states), :mod:`nexabind._lcp` (llama-cpp-python's lower-level
calls), :mod:`nexabind._chat_api` (chat), and this module (generation, completions,
embeddings).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from nexabind import _embed, lowlevel, openai
from nexabind._chat_api import LlamaChat
from nexabind.errors import ContextError
from nexabind.grammar import LlamaGrammar, response_format_grammar
from nexabind.tokenizer import detokenize
from nexabind.tokens import Token, logprobs_of

__all__ = ["Llama", "Token"]


class Llama(LlamaChat):
    """A model and its context, with llama-cpp-python's calls.

    Every argument of llama-cpp-python's ``Llama`` is taken; the README's table says where a
    default or a behaviour differs. nexabind's own arguments follow.

    Args:
        model_path: The ``.gguf`` file.
        n_gpu_layers: Layers on the GPU (None or -1: all, when a GPU backend is present).
        split_mode, main_gpu, tensor_split: How the model is split across GPUs.
        vocab_only: Load only the vocabulary (tokenizing only).
        use_mmap: Map the model file.
        use_mlock: Lock the weights in RAM so they are never swapped out.
        kv_overrides: GGUF metadata to override while loading (bool, int, float or str).
        rpc_servers: ``host:port`` of llama.cpp RPC servers (``nexabind rpc-server``, a list or
            llama-cpp-python's comma-separated string): their devices take layers as a GPU's
            do. Trusted networks only.
        seed: Sampling seed (None, -1: a fresh random seed per call; a number: the seeds of
            the calls follow from it, as in llama-cpp-python).
        n_ctx: Context length (None or 0: the model's training length, capped at 4096).
        n_batch: Most prompt tokens per decode.
        n_ubatch: Tokens per compute step inside a decode (None: ``n_batch``, at most 512).
        n_threads: Threads for generation (None: llama.cpp's default).
        n_threads_batch: Threads for prompt processing (None: as ``n_threads``).
        rope_scaling_type, rope_freq_base, rope_freq_scale, yarn_ext_factor, yarn_attn_factor,
            yarn_beta_fast, yarn_beta_slow, yarn_orig_ctx: RoPE and YaRN (0 or None: the
            model's).
        pooling_type: How an embedding context pools (None or -1: the model's).
        attention_type: Causal or non-causal attention (None or -1: the model's).
        logits_all: Keep the logits of every position (:attr:`scores`; ``echo=True`` with
            ``logprobs`` scores the prompt).
        embedding: Create an embedding context (pooled as the model says).
        offload_kqv, op_offload, swa_full: llama.cpp's context switches (None: its default).
        flash_attn: Flash attention on (True) or off (False); None lets llama.cpp decide.
        no_perf: Skip llama.cpp's timing counters.
        last_n_tokens_size: The repetition penalties' window (``penalty_last_n``'s default).
        lora_path: A LoRA adapter to apply, with ``lora_scale``.
        lora_base: Not supported (llama.cpp has no separate base model for an adapter).
        numa: ggml's NUMA strategy (True: distribute), process-wide.
        chat_format: A llama-cpp-python format name (``llama-2``, ``chatml``, ...) or a
            llama.cpp built-in template name (``phi3``, ``llama3``, ...).
        chat_handler: A chat handler (``handler(llama=..., messages=..., **request)``), e.g.
            ``Jinja2ChatFormatter(...).to_chat_handler()``.
        draft_model: A draft model for speculative decoding (e.g.
            :class:`~nexabind.speculative.LlamaPromptLookupDecoding`).
        tokenizer: A tokenizer to use instead of the model's (prompts and ``tokenize``).
        type_k, type_v: The KV cache's types (:class:`~nexabind.lowlevel.GgmlType`, its
            value or name).
        spm_infill: Infill prompts in suffix-prefix-middle order.
        verbose: Let llama.cpp's INFO and DEBUG lines through the ``nexabind.llama`` logger.
        chat_template: A jinja template, or a llama.cpp built-in template name.
        kv_unified: One KV buffer for all sequences (None: on for an embedding context).
        check_tensors: Validate every tensor's data while loading.
        lib_path: Folder of the llama.cpp libraries.
        **kwargs: Anything else is logged as a warning and ignored, as llama-cpp-python
            ignores it.

    A ``Llama`` is safe to share between threads: every call into llama.cpp holds the
    context's lock, so calls from two threads run one after the other. A generation holds it
    for one token at a time; a call that changes the KV cache under a running generator makes
    that generator raise ``ContextError`` at its next step. :meth:`close` from another thread
    cancels a running prompt decode, waits for the current step, then frees.

    Raises:
        ModelLoadError: The model file is missing or invalid (a ``ValueError``).
        ContextError: The context could not be created (or would not fit in memory).
        ValueError: A size, thread count or enum value is out of range (the message names it).
        NotImplementedError: ``lora_base``, which llama.cpp cannot apply.
    """

    def generate(
        self,
        tokens: str | bytes | Sequence[int],
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        temp: float | None = None,
        repeat_penalty: float = 1.0,
        reset: bool = True,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        penalize_nl: bool = True,
        logits_processor: Any = None,
        stopping_criteria: Any = None,
        grammar: LlamaGrammar | str | None = None,
        *,
        max_tokens: int | None = None,
        stop: str | Sequence[str] | None = None,
        logprobs: bool | int = False,
        context_shift: bool = False,
        special: bool = False,
        **options: Any,
    ) -> Iterator[Token]:
        """Generate tokens after ``tokens``, one :class:`Token` at a time.

        llama-cpp-python's arguments, in its order; each :class:`Token` is the token id (an
        ``int``) carrying its ``.text`` and, when asked, ``.logprob``. The generation ends
        at an end-of-generation token (not yielded; llama-cpp-python yields it and goes on,
        so its ``if token == llm.token_eos(): break`` loops end the same way), at
        ``max_tokens``, at a stop string, or when a stopping criterion says so. Breaking out
        of the loop stops decoding; what was decoded stays in the KV cache.

        Args:
            tokens: The prompt: token ids, or text.
            temp: Temperature (``temperature=`` is taken too); 0 is greedy.
            reset: False continues after what the context holds instead of matching the
                prompt against it.
            logits_processor: Called on each position's logits before sampling.
            stopping_criteria: Asked after each sampled token; true ends the generation.
            grammar: A :class:`LlamaGrammar` or GBNF text the output must follow.
            max_tokens: Most tokens to generate (None or <= 0: until the context is full).
            stop: Stop strings; matched across tokens and never emitted.
            logprobs: True fills ``Token.logprob``; a number N also ``Token.top_logprobs``.
            context_shift: When the context is full, drop the oldest half instead of raising.
            special: Parse special-token text in a text prompt.
            **options: More sampling options (:class:`nexabind.sampling.SamplingOptions`).

        Raises:
            ContextOverflowError: The prompt does not fit, or the context fills up with
                ``max_tokens`` asking for more and no ``context_shift``.
            ValueError: An out-of-range option.
            TypeError: An unknown option.
        """
        if temp is not None:
            options.setdefault("temperature", temp)
        sampling = dict(
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            typical_p=typical_p,
            repeat_penalty=repeat_penalty,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            tfs_z=tfs_z,
            mirostat_mode=mirostat_mode,
            mirostat_tau=mirostat_tau,
            mirostat_eta=mirostat_eta,
            penalize_nl=penalize_nl,
            grammar=grammar,
        )
        prompt = self._as_tokens(tokens, special)
        if not reset:
            prompt = self._seq.tokens[: self._seq.n].tolist() + prompt
        return self._start(
            prompt,
            max_tokens=max_tokens,
            stop=stop,
            logprobs=logprobs,
            context_shift=context_shift,
            options={**sampling, **options},
            processors=logits_processor,
            criteria=stopping_criteria,
        )

    # -- llama-cpp-python compatible completion ----------------------------------------------

    def __call__(self, prompt: str | Sequence[int], *args: Any, **kwargs: Any) -> Any:
        """Same as :meth:`create_completion`."""
        return self.create_completion(prompt, *args, **kwargs)

    def create_completion(
        self,
        prompt: str | Sequence[int],
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
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        model: str | None = None,
        stopping_criteria: Any = None,
        logits_processor: Any = None,
        grammar: LlamaGrammar | str | None = None,
        logit_bias: dict[int, float] | None = None,
        *,
        response_format: dict[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        """Complete ``prompt``; returns a ``text_completion`` dict or an iterator of chunks.

        llama-cpp-python's arguments, in its order (``**options``: more sampling options of
        :class:`nexabind.sampling.SamplingOptions`, e.g. ``penalty_last_n``). A text prompt's
        special-token text is parsed, as llama-cpp-python does. ``suffix`` makes an infill
        prompt when the model has fill-in-the-middle tokens (``spm_infill`` orders it
        suffix-first), else it is appended to the text. ``max_tokens`` is cut to what the
        context holds. ``logprobs=N`` gives each generated token's log-probability and the N
        most likely tokens' (``text_offset`` counts from the start of the prompt); with
        ``echo=True`` the prompt's tokens are scored too, which needs ``logits_all=True``.
        ``response_format`` (nexabind's, as on chats: ``{"type": "json_object"}`` or
        ``{"type": "json_schema", "json_schema": {"schema": ...}}``) makes the text valid JSON
        under the schema whenever the completion stops by itself.

        Raises:
            ContextOverflowError: The prompt fills the context (a ``ValueError``).
            ValueError: ``logprobs`` is negative, a sampling option is out of range, or
                ``echo`` with ``logprobs`` without ``logits_all``.
        """
        ctx = self._check()
        if logprobs is not None and (isinstance(logprobs, bool) or logprobs < 0):
            msg = f"logprobs={logprobs!r} is invalid; use None or a number of top tokens >= 0"
            raise ValueError(msg)
        if echo and logprobs is not None and self._scores_arr is None:
            msg = "echo=True with logprobs scores the prompt: create the Llama with logits_all=True"
            raise ValueError(msg)
        constraint = response_format_grammar(response_format)
        if constraint is not None:
            if grammar is not None:
                msg = "give grammar or response_format, not both"
                raise ValueError(msg)
            grammar = constraint
        tokens, fim = self._completion_tokens(prompt, suffix)
        max_tokens = self._budget(tokens, max_tokens)
        sampling = dict(
            temperature=temperature,
            top_p=top_p,
            min_p=min_p,
            typical_p=typical_p,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            repeat_penalty=repeat_penalty,
            top_k=top_k,
            seed=seed,
            tfs_z=tfs_z,
            mirostat_mode=mirostat_mode,
            mirostat_tau=mirostat_tau,
            mirostat_eta=mirostat_eta,
            grammar=grammar,
            logit_bias=logit_bias,
        )
        self._cache_load(tokens)
        scored = None
        if echo and logprobs is not None:
            with ctx.lock:  # every prompt position decoded now, so every one is scored
                self._seq.reset()
                self._seq.ingest(tokens, self._scores_arr)
            scored = self._prompt_logprobs(tokens, logprobs)
        it = self._start(
            tokens,
            max_tokens=max_tokens,
            stop=stop,
            logprobs=logprobs,
            options={**sampling, **options},
            processors=logits_processor,
            criteria=stopping_criteria,
            next_seed=True,
        )
        it = self._cache_store(it, tokens)
        model_ = ctx.model
        text = (
            prompt
            if isinstance(prompt, str)
            else detokenize(model_, tokens).decode("utf-8", "ignore")
        )
        shape = openai.completion_chunks if stream else openai.completion
        return shape(
            it,
            self._outcome,
            model=model or self.model_path,
            prefix=text if echo else "",
            suffix=None if fim else suffix,
            logprobs=logprobs,
            piece=model_.token_to_piece,
            offset=None if echo else len(text),
            prompt_tokens=scored,
        )

    def _completion_tokens(
        self, prompt: str | Sequence[int], suffix: str | None
    ) -> tuple[list[int], bool]:
        """The prompt's tokens, and whether ``suffix`` went into them as an infill prompt."""
        sp = self._special
        fim = suffix is not None and min(sp["fim_pre"], sp["fim_suf"], sp["fim_mid"]) >= 0
        if isinstance(prompt, str):
            tokens = self.tokenize(prompt.encode(), add_bos=not fim, special=not fim)
        else:
            tokens = self._as_tokens(prompt)
        if fim:
            assert suffix is not None
            after = self.tokenize(suffix.encode(), add_bos=False, special=False)
            pre, suf = [sp["fim_pre"], *tokens], [sp["fim_suf"], *after]
            bos = [sp["bos"]] if sp["bos"] >= 0 and self._check().model.add_bos else []
            tokens = bos + (suf + pre if self.spm_infill else pre + suf) + [sp["fim_mid"]]
        return tokens, fim

    def _prompt_logprobs(self, tokens: list[int], n_top: int) -> list[Token]:
        """The prompt's tokens with their text and their log-probabilities from the recorded
        logits (BOS is left out; the first token has no log-probability)."""
        import codecs

        model = self._check().model
        dec = codecs.getincrementaldecoder("utf-8")("ignore").decode
        start = 1 if tokens and tokens[0] == model.bos else 0
        out = []
        for i in range(start, len(tokens)):
            piece = model.token_to_piece(tokens[i])
            if i == start == 1 and piece[:1] == b" ":
                piece = piece[1:]  # the space SentencePiece puts after BOS (see detokenize)
            lp, top = None, None
            if i > start:
                lp, top = logprobs_of(self._scores_arr[i - 1], tokens[i], n_top)
            out.append(Token(tokens[i], dec(piece), lp, top))
        return out

    # -- embeddings ----------------------------------------------------------------------

    def embed(
        self,
        input: str | Sequence[str],
        normalize: bool = False,
        truncate: bool = True,
        return_count: bool = False,
        *,
        as_array: bool = False,
    ) -> Any:
        """Embed one text or a list of texts.

        Args:
            input: A text or a list of texts.
            normalize: Scale each vector to unit L2 norm.
            truncate: Cut texts longer than a ubatch (or a sequence's share of the context)
                instead of raising.
            return_count: Also return the number of tokens embedded.
            as_array: Return one float32 numpy array of shape ``(n_texts, n_embd)`` (no
                lists built; a text's row is a view), for any ``input``.

        Returns:
            As llama-cpp-python: for a str a list of floats, for a list of texts a list of
            them; with pooling ``none`` each text gives a list per token. With
            ``return_count``, ``(embeddings, n_tokens)``.

        Raises:
            ContextError: The Llama was not created with ``embedding=True``.
            ContextOverflowError: A text is too long and ``truncate`` is False.
        """
        ctx = self._check()
        if not self.embedding:
            msg = "create the Llama with embedding=True to compute embeddings"
            raise ContextError(msg)
        texts = [input] if isinstance(input, str) else list(input)
        per_token = ctx.pooling == lowlevel.PoolingType.NONE
        with ctx.lock:
            self._check()
            self._seq.reset()
            out, n_tok = _embed.embed(
                ctx, texts, n_seqs=self._n_seqs, truncate=truncate, per_token=per_token
            )
            self._seq.n_decoded += n_tok
        if normalize:
            _embed.normalize(out)
        if not as_array:
            out = [a.tolist() for a in out] if per_token else out.tolist()
            if isinstance(input, str):
                out = out[0]
        return (out, n_tok) if return_count else out

    def create_embedding(
        self, input: str | Sequence[str], model: str | None = None
    ) -> dict[str, Any]:
        """Embed texts; returns llama-cpp-python's (OpenAI's) ``list`` of ``embedding`` dict."""
        texts = [input] if isinstance(input, str) else list(input)
        arr, n_tok = self.embed(texts, return_count=True, as_array=True)
        return openai.embedding_list(arr, model=model or self.model_path, prompt_tokens=n_tok)
