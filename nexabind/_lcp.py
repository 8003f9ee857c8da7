"""llama-cpp-python's lower-level ``Llama`` calls: ``eval``/``sample``, the token and logits
arrays, seeds, prompt caches, pickling and ``from_pretrained``.

They keep llama-cpp-python's signatures and results; nexabind's decode loop does the work.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

from nexabind import hub, prompt_cache
from nexabind._llama_core import LlamaCore
from nexabind.errors import ContextError
from nexabind.grammar import LlamaGrammar
from nexabind.sampling import SamplingOptions, build_sampler
from nexabind.tokenizer import LlamaTokenizer
from nexabind.tokens import Token

__all__ = ["LlamaCompat"]


class LlamaCompat(LlamaCore):
    """llama-cpp-python's lower-level calls (see :class:`nexabind.Llama`)."""

    # -- the tokens and logits of the context ------------------------------------------------

    @property
    def n_tokens(self) -> int:
        """Tokens in the KV cache (setting a smaller number forgets the ones after it)."""
        return self._seq.n

    @n_tokens.setter
    def n_tokens(self, n: int) -> None:
        ctx = self._check()
        with ctx.lock:
            if not 0 <= n <= self._seq.n:
                msg = f"n_tokens={n} is invalid; use 0..{self._seq.n} (the tokens held now)"
                raise ValueError(msg)
            if n < self._seq.n and not ctx.seq_rm(0, n, -1):
                self._seq.reset()
                return
            self._seq.n = n
            self._seq.invalidate()

    @property
    def input_ids(self) -> Any:
        """The context's token slots: an int32 numpy view of ``n_ctx`` slots, the first
        :attr:`n_tokens` in the KV cache (zero-copy: it changes as the context does)."""
        import numpy as np

        self._check()
        return np.frombuffer(self._seq.tokens, dtype=np.intc)

    @input_ids.setter
    def input_ids(self, value: Any) -> None:
        import numpy as np

        arr = np.asarray(value, dtype=np.intc).ravel()
        ids = self.input_ids
        ids[: min(len(arr), len(ids))] = arr[: len(ids)]

    @property
    def scores(self) -> Any:
        """Logits: with ``logits_all=True`` an ``(n_ctx, n_vocab)`` float32 array, row ``i``
        the logits after token ``i``; without, one row, the last decode's logits."""
        if self._scores_arr is not None:
            return self._scores_arr
        import numpy as np

        ctx = self._check()
        with ctx.lock:
            if self._seq.n == 0:
                return np.zeros((0, ctx.n_vocab), dtype=np.float32)
            try:
                return ctx.logits(-1).copy().reshape(1, -1)
            except Exception:  # noqa: BLE001 - no decode since the state was loaded
                return np.zeros((0, ctx.n_vocab), dtype=np.float32)

    @property
    def _input_ids(self) -> Any:
        return self.input_ids[: self.n_tokens]

    @property
    def _scores(self) -> Any:
        scores = self.scores
        return scores[: self.n_tokens] if self._scores_arr is not None else scores

    @property
    def eval_tokens(self) -> deque[int]:
        """The tokens in the KV cache."""
        return deque(self._input_ids.tolist(), maxlen=self.n_ctx())

    @property
    def eval_logits(self) -> deque[list[float]]:
        """The recorded logits rows (the last one only, without ``logits_all``)."""
        return deque(self._scores.tolist(), maxlen=self.n_ctx() if self._logits_all else 1)

    def eval(self, tokens: Sequence[int]) -> None:
        """Decode ``tokens`` after the ones the KV cache holds.

        Raises:
            ContextOverflowError: They do not fit.
            ValueError: A token outside the vocabulary.
        """
        ctx = self._check()
        with ctx.lock:
            self._check()
            self._seq.extend([int(t) for t in tokens], self._scores_arr)

    def sample(
        self,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        temp: float = 0.80,
        repeat_penalty: float = 1.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_eta: float = 0.1,
        mirostat_tau: float = 5.0,
        penalize_nl: bool = True,
        logits_processor: Any = None,
        grammar: LlamaGrammar | str | None = None,
        idx: int | None = None,
    ) -> int:
        """Sample a token from the logits after position ``idx`` of the last :meth:`eval`
        (default: its last token), with a sampler chain made for this one call.

        Raises:
            ContextError: Nothing was decoded yet.
            DecodeError: Position ``idx`` has no logits (only the last one has, unless
                ``logits_all=True``).
        """
        import numpy as np

        ctx = self._check()
        opts = SamplingOptions(
            temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p,
            repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty, tfs_z=tfs_z, mirostat_mode=mirostat_mode,
            mirostat_eta=mirostat_eta, mirostat_tau=mirostat_tau, penalize_nl=penalize_nl,
            grammar=grammar, seed=self._call_seed(None, False),
            penalty_last_n=self.last_n_tokens_size,
        )  # fmt: skip
        with ctx.lock:
            n = self._seq.n
            if n == 0:
                msg = "nothing was decoded yet: eval() the prompt before sample()"
                raise ContextError(msg)
            ridx = -1 if idx is None else idx - n
            with build_sampler(ctx.model, opts, ctx.n_ctx) as chain:
                if logits_processor is None:
                    return chain.sample(ctx, ridx)
                logits = ctx.logits(ridx)
                logits.setflags(write=True)
                saved = logits.copy()
                new = logits_processor(self._input_ids, saved.copy())
                np.copyto(logits, np.asarray(new, dtype=np.float32))
                try:
                    return chain.sample(ctx, ridx)
                finally:
                    np.copyto(logits, saved)

    # -- seeds, caches, tokenizer, special tokens --------------------------------------------

    def set_seed(self, seed: int) -> None:
        """Seed the next calls (each call without a ``seed`` takes the next of a sequence
        that starts here, as in llama-cpp-python; -1: random again)."""
        self._seed = None if seed in (-1, 0xFFFFFFFF) else int(seed)

    def set_cache(self, cache: prompt_cache.BaseLlamaCache | None) -> None:
        """Use ``cache`` (e.g. :class:`~nexabind.LlamaRAMCache`) for completions: the state
        sharing the longest prefix with a prompt is loaded first, and the state after each
        completion is saved into it."""
        self.cache = cache

    def _cache_load(self, tokens: list[int]) -> None:
        if not self.cache:
            return
        try:
            item = self.cache[tokens]
        except KeyError:
            return
        cached = prompt_cache.longest_prefix(item.input_ids[: item.n_tokens].tolist(), tokens)
        held = prompt_cache.longest_prefix(self._input_ids.tolist(), tokens)
        if cached > held:
            self.load_state(item)

    def _cache_store(self, it: Iterator[Token], tokens: list[int]) -> Iterator[Token]:
        if self.cache is None:
            return it

        def store() -> Iterator[Token]:
            out = list(tokens)
            for t in it:
                out.append(int(t))
                yield t
            self.cache[out] = self.save_state()

        return store()

    def tokenizer(self) -> LlamaTokenizer:
        """The model's own tokenizer."""
        self._check()
        return LlamaTokenizer(self)

    def token_nl(self) -> int:
        """The newline token (-1 if none)."""
        return self._special["nl"]

    def pooling_type(self) -> int:
        """How this context pools embeddings (a :class:`~nexabind.lowlevel.PoolingType`)."""
        return self._check().pooling

    @property
    def n_threads(self) -> int:
        """Threads for one-token decodes."""
        return self._check().n_threads

    @property
    def n_threads_batch(self) -> int:
        """Threads for prompt batches."""
        return self._check().n_threads_batch

    @property
    def ctx(self) -> Any:
        """The ``llama_context *`` (a cffi pointer, for :func:`nexabind.lowlevel.lib`)."""
        return self._check().ptr

    @property
    def model(self) -> Any:
        """The ``llama_model *`` (a cffi pointer, for :func:`nexabind.lowlevel.lib`)."""
        return self._check().model.ptr

    @staticmethod
    def logits_to_logprobs(logits: Any, axis: int = -1) -> Any:
        """Log-softmax of ``logits`` along ``axis`` (float32)."""
        import numpy as np

        arr = np.asarray(logits, dtype=np.float32)
        top = np.amax(arr, axis=axis, keepdims=True)
        top = np.where(np.isfinite(top), top, 0)
        z = arr - top
        with np.errstate(divide="ignore"):
            return (z - np.log(np.sum(np.exp(z), axis=axis, keepdims=True))).astype(np.float32)

    @staticmethod
    def longest_token_prefix(a: Sequence[int], b: Sequence[int]) -> int:
        """How many leading tokens ``a`` and ``b`` share."""
        return prompt_cache.longest_prefix(a, b)

    # -- pickling, OpenAI client types, the hub -----------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """The constructor's arguments: unpickling loads the model again (llama-cpp-python's
        way; the context's contents are not kept, see :meth:`save_state`)."""
        args = dict(self._init_args)
        args["seed"] = self._seed
        return args

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def create_chat_completion_openai_v1(self, *args: Any, **kwargs: Any) -> Any:
        """:meth:`create_chat_completion` as the ``openai`` package's types (``ChatCompletion``
        or an iterator of ``ChatCompletionChunk``).

        Raises:
            ImportError: The ``openai`` package is not installed.
        """
        try:
            from openai.types.chat import ChatCompletion, ChatCompletionChunk
        except ImportError as e:
            msg = "create_chat_completion_openai_v1 needs the openai package: pip install openai"
            raise ImportError(msg) from e
        result = self.create_chat_completion(*args, **kwargs)  # type: ignore[attr-defined]
        if kwargs.get("stream", False):
            return (ChatCompletionChunk(**chunk) for chunk in result)
        return ChatCompletion(**result)

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
    ) -> Any:
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
        del local_dir_use_symlinks
        path = hub.from_pretrained(repo_id, filename, additional_files, local_dir, cache_dir)
        hub.mark_used(path)
        return cls(path, **kwargs)
