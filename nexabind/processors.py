"""Logits processors and stopping criteria: Python callables run at each generated token.

llama-cpp-python's types, with its call conventions: a processor is called as
``processor(input_ids, scores)`` and returns the new scores; a stopping criterion is called as
``criterion(input_ids, logits)`` and returns True to stop. ``input_ids`` are the tokens in the
context so far (int32 numpy array), ``scores`` / ``logits`` one position's logits (float32,
the vocabulary's size).

Passing either to a generating call (``logits_processor=``, ``stopping_criteria=``) costs a
Python call per token; without them the decode loop does nothing extra.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "LogitsProcessor",
    "LogitsProcessorList",
    "MinTokensLogitsProcessor",
    "StoppingCriteria",
    "StoppingCriteriaList",
]

#: ``(input_ids, scores) -> scores``.
LogitsProcessor = Callable[[Any, Any], Any]
#: ``(input_ids, logits) -> bool``.
StoppingCriteria = Callable[[Any, Any], bool]


class LogitsProcessorList(list[LogitsProcessor]):
    """Processors applied in order, each to what the one before returned."""

    def __call__(
        self, input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]
    ) -> npt.NDArray[np.single]:
        for processor in self:
            scores = processor(input_ids, scores)
        return scores


class StoppingCriteriaList(list[StoppingCriteria]):
    """Stop when any criterion says so (every one is asked, as in llama-cpp-python)."""

    def __call__(self, input_ids: npt.NDArray[np.intc], logits: npt.NDArray[np.single]) -> bool:
        return any([criterion(input_ids, logits) for criterion in self])  # noqa: C419 - all run


class MinTokensLogitsProcessor:
    """Forbid the end-of-sequence token until ``min_tokens`` tokens were generated.

    Args:
        min_tokens: Tokens to generate before ``token_eos`` may come.
        token_eos: The end-of-sequence token (``llm.token_eos()``).
    """

    def __init__(self, min_tokens: int, token_eos: int) -> None:
        self.min_tokens = min_tokens
        self.token_eos = token_eos
        self.prompt_tokens: int | None = None

    def __call__(
        self, input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]
    ) -> npt.NDArray[np.single]:
        if self.prompt_tokens is None:
            self.prompt_tokens = len(input_ids)
        if len(input_ids) - self.prompt_tokens < self.min_tokens:
            scores[self.token_eos] = -float("inf")
        return scores
