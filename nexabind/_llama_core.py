"""The core of ``Llama``: construction, the context's lifecycle, tokens, the generation start
and saved states. :class:`~nexabind.Llama` adds llama-cpp-python's calls on top
(:mod:`nexabind._lcp`, :mod:`nexabind._chat_api`, :mod:`nexabind.llama`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from nexabind import _hooks, _llama_args, lowlevel
from nexabind._sequence import KVSequence, Request
from nexabind._state import LlamaState
from nexabind.errors import ClosedError, ContextOverflowError, StateError
from nexabind.grammar import GrammarMatcher, LlamaGrammar
from nexabind.processors import LogitsProcessorList, StoppingCriteriaList
from nexabind.sampling import SAMPLING_KEYS, SamplingOptions
from nexabind.tokenizer import detokenize
from nexabind.tokens import Outcome, Token

__all__ = ["LlamaCore"]

_L = TypeVar("_L", bound="LlamaCore")

logger = logging.getLogger("nexabind.llama")

_EMBED_SEQS = 64  # most sequences packed into one decode by embed()
#: The constructor's arguments that go to the model.
MODEL_ARGS = ("n_gpu_layers", "split_mode", "main_gpu", "tensor_split", "vocab_only", "use_mmap",
              "use_mlock", "kv_overrides", "rpc_servers")  # fmt: skip


class LlamaCore:
    """A model, its context and the decode loop's sequence (see :class:`nexabind.Llama`)."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        n_gpu_layers: int | None = None,
        split_mode: int | str | None = None,
        main_gpu: int = 0,
        tensor_split: list[float] | None = None,
        vocab_only: bool = False,
        use_mmap: bool = True,
        use_mlock: bool = False,
        kv_overrides: dict[str, bool | int | float | str] | None = None,
        rpc_servers: list[str] | str | None = None,
        seed: int | None = None,
        n_ctx: int | None = None,
        n_batch: int = 512,
        n_ubatch: int | None = None,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        rope_scaling_type: int | str | None = None,
        pooling_type: int | str | None = None,
        attention_type: int | str | None = None,
        rope_freq_base: float = 0.0,
        rope_freq_scale: float = 0.0,
        yarn_ext_factor: float | None = None,
        yarn_attn_factor: float | None = None,
        yarn_beta_fast: float | None = None,
        yarn_beta_slow: float | None = None,
        yarn_orig_ctx: int = 0,
        logits_all: bool = False,
        embedding: bool = False,
        offload_kqv: bool = True,
        flash_attn: bool | None = None,
        op_offload: bool | None = None,
        swa_full: bool | None = None,
        no_perf: bool = True,
        last_n_tokens_size: int = 64,
        lora_base: str | None = None,
        lora_scale: float = 1.0,
        lora_path: str | None = None,
        numa: bool | int = False,
        chat_format: str | None = None,
        chat_handler: Any = None,
        draft_model: Any = None,
        tokenizer: Any = None,
        type_k: int | str | None = None,
        type_v: int | str | None = None,
        spm_infill: bool = False,
        verbose: bool = False,
        chat_template: str | None = None,
        kv_unified: bool | None = None,
        check_tensors: bool = False,
        lib_path: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> None:
        self._init_args = {k: v for k, v in locals().items() if k not in ("self", "kwargs")}
        self._ctx: lowlevel.Context | None = None
        self._model: lowlevel.Model | None = None
        self._lora: lowlevel.LoraAdapter | None = None
        _llama_args.refuse(lora_base)
        _llama_args.warn_extra(kwargs)
        lowlevel.lib(lib_path)
        if verbose:
            lowlevel.set_verbose(True)
        lowlevel.numa_init(numa)
        self.model_path = str(model_path)
        if n_ctx is not None and n_ctx < 0:
            msg = f"n_ctx={n_ctx} is invalid; use 0 or None (the model's length, at most 4096)"
            raise ValueError(msg)
        args = self._init_args
        self._model = lowlevel.Model(
            model_path,
            **_llama_args.model_params(
                **{k: args[k] for k in MODEL_ARGS}, check_tensors=check_tensors
            ),
        )
        try:
            self._open_context(args, embedding, kv_unified)
        except BaseException:
            self.close()
            raise
        self._setup(args)

    def _open_context(self, args: dict[str, Any], embedding: bool, kv_unified: bool | None) -> None:
        model = self._model
        assert model is not None
        n_ctx = args["n_ctx"] or min(model.n_ctx_train or 4096, 4096)
        n_batch, n_ubatch = args["n_batch"], args["n_ubatch"]
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
        pooling = args["pooling_type"]
        self._ctx = lowlevel.Context(
            model,
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_ubatch=n_ubatch,
            n_threads=args["n_threads"],
            n_threads_batch=args["n_threads_batch"],
            embeddings=embedding,
            pooling=None
            if pooling is None
            else lowlevel.enum_value(lowlevel.PoolingType, "pooling_type", pooling),
            n_seq_max=self._n_seqs,
            flash_attn=args["flash_attn"],
            kv_unified=kv_unified,
            **_llama_args.context_params(args),
        )
        if args["lora_path"] is not None:
            self._lora = lowlevel.LoraAdapter(model, args["lora_path"])
            self._ctx.set_lora_adapters([(self._lora, float(args["lora_scale"]))])

    def _setup(self, args: dict[str, Any]) -> None:
        """The Python-side state, and llama-cpp-python's attributes."""
        ctx, model = self._ctx, self._model
        assert ctx is not None and model is not None
        self.embedding: bool = args["embedding"]
        self.verbose: bool = args["verbose"]
        self.n_batch = ctx.n_batch
        self.last_n_tokens_size: int = args["last_n_tokens_size"]
        self.lora_base: str | None = args["lora_base"]
        self.lora_path: str | None = args["lora_path"]
        self.lora_scale: float = args["lora_scale"]
        self.numa: bool | int = args["numa"]
        self.spm_infill: bool = args["spm_infill"]
        self.tensor_split: list[float] | None = args["tensor_split"]
        self.kv_overrides: dict[str, Any] | None = args["kv_overrides"]
        self.chat_template: str | None = args["chat_template"]
        self.tokenizer_: Any = args["tokenizer"]
        self.draft_model: Any = args["draft_model"]
        self.chat_handler: Any = args["chat_handler"]
        self._chat = _llama_args.chat_setup(model, args["chat_format"], args["chat_template"])
        self.chat_format: str = self._chat.chat_format
        self._fallback_warned = False
        self.cache: Any = None
        seed = args["seed"]
        self._seed: int | None = None if seed in (None, -1, 0xFFFFFFFF) else int(seed)
        self._seq = KVSequence(ctx, self._closed_message())
        self._outcome = Outcome()
        self._metadata: dict[str, str] | None = None
        self._logits_all: bool = args["logits_all"]
        self._scores_arr: Any = None
        if self._logits_all:
            import numpy as np

            self._scores_arr = np.zeros((ctx.n_ctx, ctx.n_vocab), dtype=np.float32)
        self._is_recurrent = model.is_recurrent
        self._is_hybrid = model.is_hybrid
        self._special = model.special_tokens()

    def _call_seed(self, seed: int | None, advance: bool) -> int | None:
        """The seed of a call: ``seed`` if given (it becomes the Llama's, as llama-cpp-python's
        ``set_seed``); else, with ``advance``, the next of the Llama's sequence of seeds."""
        if seed is not None and seed not in (-1, 0xFFFFFFFF):
            self._seed = int(seed)
            return self._seed & 0xFFFFFFFF
        if self._seed is None:
            return None
        if advance:  # llama-cpp-python: set_seed(random.Random(self._seed).randint(0, 2**32))
            import random

            self._seed = random.Random(self._seed).randint(0, 2**32)
        return self._seed & 0xFFFFFFFF

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
        ctx, model, lora = self._ctx, self._model, self._lora
        if ctx is not None:
            ctx.cancel()
            with ctx.lock:
                self._ctx = self._model = None
                if hasattr(self, "_seq"):
                    self._seq.invalidate()  # a generator still open notices at its next step
                ctx.close()
        self._model = None
        if lora is not None:
            lora.close()
        if model is not None:
            model.close()

    def __enter__(self: _L) -> _L:
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
        """Token ids of ``text`` (UTF-8 bytes, or a str); ``special`` parses special-token
        text such as ``</s>``. A ``tokenizer=`` given to the constructor does the work."""
        if self.tokenizer_ is not None:
            data = text.encode() if isinstance(text, str) else text
            return list(self.tokenizer_.tokenize(data, add_bos, special))
        return self._check().model.tokenize(text, add_special=add_bos, parse_special=special)

    def detokenize(
        self,
        tokens: Sequence[int],
        prev_tokens: Sequence[int] | None = None,
        special: bool = False,
    ) -> bytes:
        """The bytes of ``tokens``, as llama-cpp-python gives them.

        The pieces joined, the space SentencePiece puts after BOS dropped, control tokens only
        with ``special``. ``prev_tokens`` (the tokens before them) matter only to a
        ``tokenizer=`` that needs them; llama.cpp's pieces do not depend on them.
        """
        if self.tokenizer_ is not None:
            prev = None if prev_tokens is None else list(prev_tokens)
            return self.tokenizer_.detokenize(list(tokens), prev_tokens=prev, special=special)
        return detokenize(self._check().model, tokens, special)

    def reset(self) -> None:
        """Forget the KV cache; the next call decodes its whole prompt."""
        with self._check().lock:
            self._check()
            self._seq.reset()

    def cancel(self) -> None:
        """Stop the running generation, or the next one if none runs yet (any thread)."""
        if self._ctx is not None:
            self._ctx.cancel()

    def _as_tokens(self, prompt: str | bytes | Sequence[int], special: bool = False) -> list[int]:
        if isinstance(prompt, (str, bytes)):
            return self.tokenize(prompt, add_bos=True, special=special)
        tokens = [int(t) for t in prompt]
        self._check().model.check_tokens(tokens, "prompt token")
        return tokens

    def _budget(self, tokens: list[int], max_tokens: int | None) -> int:
        """``max_tokens`` cut to the room the context leaves after ``tokens`` (None or <= 0:
        all of it), as llama-cpp-python's completions do.

        Raises:
            ContextOverflowError: The prompt leaves no room.
        """
        n_ctx = self._check().n_ctx
        if len(tokens) >= n_ctx:
            msg = (
                f"the prompt has {len(tokens)} tokens but the context holds {n_ctx}; shorten "
                "the prompt or create the Llama with a larger n_ctx"
            )
            raise ContextOverflowError(msg)
        room = n_ctx - len(tokens)
        return room if max_tokens is None or max_tokens <= 0 else min(max_tokens, room)

    def _start(
        self,
        tokens: list[int],
        *,
        max_tokens: int | None,
        stop: str | Sequence[str] | None,
        logprobs: bool | int | None,
        context_shift: bool = False,
        options: dict[str, Any],
        processors: Any = None,
        criteria: Any = None,
        next_seed: bool = False,
        spelled: dict[int, str] | None = None,
    ) -> Iterator[Token]:
        """Validate the settings now (not at the first ``next``) and return the generator;
        ``spelled`` gives the text of control tokens that spell a tool-call marker."""
        ctx = self._check()
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
        options.setdefault("penalty_last_n", self.last_n_tokens_size)
        options["seed"] = self._call_seed(options.get("seed"), next_seed)
        opts = SamplingOptions(**options)
        if isinstance(processors, list) and not callable(processors):
            processors = LogitsProcessorList(processors)
        if isinstance(criteria, list) and not callable(criteria):
            criteria = StoppingCriteriaList(criteria)
        hooks = _hooks.Hooks(processors=processors or None, criteria=criteria or None)
        hooks.scores = self._scores_arr
        hooks.draft = self.draft_model
        g = opts.grammar
        if isinstance(g, str) and g.lstrip().startswith("%llguidance"):
            g = LlamaGrammar.from_string(g, verbose=False)
        if isinstance(g, LlamaGrammar) and g.engine == "llguidance":
            hooks.matcher = GrammarMatcher(g, ctx.model)
            hooks.reject_first = not opts.penalties
        req = Request(
            opts,
            max_tokens=max_tokens,
            stops=[stop] if isinstance(stop, str) else list(stop or []),
            want_logprobs=n_top is not None or bool(logprobs),
            n_top=n_top,
            context_shift=context_shift,
            hooks=hooks if hooks.active else None,
            spelled=spelled,
        )
        self._outcome = outcome = Outcome(prompt_tokens=len(tokens))
        return self._seq.generate(tokens, req, outcome)

    # -- state ---------------------------------------------------------------------------

    def save_state(self, path: str | os.PathLike[str] | None = None) -> LlamaState:
        """Save the context: its KV cache, the tokens in it, recorded logits and the seed.

        Args:
            path: Also write the state to this file (``bytes(state)``; :meth:`load_state`
                takes the path).

        Returns:
            A :class:`~nexabind.LlamaState` (llama-cpp-python's; it pickles).
        """
        import numpy as np

        ctx = self._check()
        with ctx.lock:
            n = self._seq.n
            payload = ctx.state_get()
            ids = np.frombuffer(self._seq.tokens, dtype=np.intc).copy()
            rows = self._scores_arr[:n].copy() if self._scores_arr is not None else None
        if rows is None:
            rows = np.zeros((0, ctx.n_vocab), dtype=np.float32)
        state = LlamaState(ids, rows, n, payload, len(payload), self._seed)
        if path is not None:
            Path(path).write_bytes(bytes(state))
        return state

    def load_state(self, state: LlamaState | bytes | str | os.PathLike[str]) -> None:
        """Restore a state from :meth:`save_state` (the state, its bytes or a file path).

        Raises:
            StateError: The data is not a nexabind state or llama.cpp refused it (a
                ``RuntimeError``).
        """
        ctx = self._check()
        if not isinstance(state, LlamaState):
            data = state if isinstance(state, (bytes, bytearray)) else Path(state).read_bytes()
            state = LlamaState.from_bytes(bytes(data), ctx.n_ctx)
        toks = state.tokens()
        if len(toks) > ctx.n_ctx:
            msg = (
                f"the state holds {len(toks)} tokens but this context holds {ctx.n_ctx}; load "
                "it into a Llama with the same n_ctx as the one that saved it"
            )
            raise StateError(msg)
        with ctx.lock:
            try:
                ctx.state_set(state.llama_state)
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
            rows = getattr(state.scores, "shape", (0,))[0]
            if self._scores_arr is not None and rows:
                self._scores_arr[:rows] = state.scores
        if state.seed is not None:
            self._seed = state.seed
