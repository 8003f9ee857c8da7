"""Draft models for speculative decoding (``Llama(draft_model=...)``), llama-cpp-python's API.

A draft model guesses the next tokens from the tokens so far; the Llama decodes its guesses in
the same batch as the token it just sampled and keeps every guess its own sampling agrees with,
so a good guess saves one-token decodes and the output is what it would have been without.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = ["LlamaDraftModel", "LlamaPromptLookupDecoding"]


class LlamaDraftModel(abc.ABC):
    """Guesses the tokens that follow ``input_ids``."""

    @abc.abstractmethod
    def __call__(self, input_ids: npt.NDArray[np.intc], /, **kwargs: Any) -> npt.NDArray[np.intc]:
        """Return the guessed next tokens (possibly none)."""


class LlamaPromptLookupDecoding(LlamaDraftModel):
    """Prompt lookup decoding: guess that the text goes on as it did after the last n-gram's
    earlier occurrence (https://github.com/apoorvumang/prompt-lookup-decoding).

    Args:
        max_ngram_size: Longest n-gram to look for (shorter ones are tried next).
        num_pred_tokens: Most tokens to guess.
    """

    def __init__(self, max_ngram_size: int = 2, num_pred_tokens: int = 10) -> None:
        self.max_ngram_size = max_ngram_size
        self.num_pred_tokens = num_pred_tokens

    @staticmethod
    def find_candidate_pred_tokens(
        input_ids: npt.NDArray[np.intc], max_ngram_size: int, num_pred_tokens: int
    ) -> npt.NDArray[np.intc]:
        """The tokens after the first earlier occurrence of the longest final n-gram that has
        a continuation (at most ``num_pred_tokens``); an empty array when there is none."""
        import numpy as np

        ids = np.asarray(input_ids)
        n = ids.shape[0]
        for size in range(min(max_ngram_size, n - 1), 0, -1):
            windows = np.lib.stride_tricks.sliding_window_view(ids, (size,))
            hits = np.flatnonzero(np.all(windows == ids[-size:], axis=1))
            for start in hits + size:
                end = min(start + num_pred_tokens, n)
                if start < end:
                    return ids[start:end]
        return np.array([], dtype=np.intc)

    def __call__(self, input_ids: npt.NDArray[np.intc], /, **kwargs: Any) -> npt.NDArray[np.intc]:
        return self.find_candidate_pred_tokens(
            input_ids, max_ngram_size=self.max_ngram_size, num_pred_tokens=self.num_pred_tokens
        )
