"""Tokenizers a ``Llama`` can use: the model's own, or one of Hugging Face's (``tokenizer=``).

llama-cpp-python's classes. A tokenizer takes UTF-8 bytes and gives token ids
(``tokenize(text, add_bos=True, special=True)``), and gives bytes back for ids
(``detokenize(tokens, prev_tokens=None, special=False)``).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

from nexabind import lowlevel

__all__ = ["BaseLlamaTokenizer", "LlamaHFTokenizer", "LlamaTokenizer", "detokenize"]


def detokenize(model: lowlevel.Model, tokens: Sequence[int], special: bool = False) -> bytes:
    """The bytes of ``tokens``, as llama-cpp-python's ``Llama.detokenize`` gives them.

    The pieces joined; a leading space is dropped when the first token is BOS (SentencePiece
    vocabularies start the text after BOS with a space that was never typed). Control tokens
    are rendered only with ``special``.

    Raises:
        ValueError: A token is not in the vocabulary.
    """
    ids = [int(t) for t in tokens]
    model.check_tokens(ids)
    out = b"".join([model.token_to_piece(t, special=special) for t in ids])
    if ids and ids[0] == model.bos and out[:1] == b" ":
        return out[1:]
    return out


class BaseLlamaTokenizer(abc.ABC):
    """What a ``Llama`` asks of a tokenizer."""

    @abc.abstractmethod
    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = True) -> list[int]:
        """Token ids of ``text`` (UTF-8 bytes); ``special`` parses special-token text."""

    @abc.abstractmethod
    def detokenize(
        self, tokens: list[int], prev_tokens: list[int] | None = None, special: bool = False
    ) -> bytes:
        """The bytes of ``tokens`` (after ``prev_tokens``, where the tokenizer needs them)."""


class LlamaTokenizer(BaseLlamaTokenizer):
    """The model's own (llama.cpp) tokenizer.

    Args:
        llama: A ``Llama`` (the tokenizer uses its model) or a :class:`nexabind.lowlevel.Model`.
    """

    def __init__(self, llama: Any) -> None:
        self._model: lowlevel.Model = llama if isinstance(llama, lowlevel.Model) else llama._model

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = True) -> list[int]:
        return self._model.tokenize(text, add_special=add_bos, parse_special=special)

    def detokenize(
        self, tokens: list[int], prev_tokens: list[int] | None = None, special: bool = False
    ) -> bytes:
        """The bytes of ``tokens`` (see :func:`detokenize`); ``prev_tokens`` changes nothing
        for llama.cpp's tokenizers, whose pieces do not depend on what came before."""
        return detokenize(self._model, tokens, special)

    def encode(self, text: str, add_bos: bool = True, special: bool = True) -> list[int]:
        """Token ids of a str."""
        return self.tokenize(text.encode("utf-8", errors="ignore"), add_bos, special)

    def decode(self, tokens: list[int]) -> str:
        """The text of ``tokens`` (bytes that are not UTF-8 dropped)."""
        return self.detokenize(tokens).decode("utf-8", errors="ignore")

    @classmethod
    def from_ggml_file(cls, path: str) -> LlamaTokenizer:
        """The tokenizer of a GGUF file (its vocabulary only is loaded)."""
        return cls(lowlevel.Model(path, vocab_only=True))


class LlamaHFTokenizer(BaseLlamaTokenizer):
    """A Hugging Face ``transformers`` tokenizer.

    Args:
        hf_tokenizer: The tokenizer (``AutoTokenizer.from_pretrained(...)``).
    """

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf_tokenizer = hf_tokenizer

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = True) -> list[int]:
        return list(
            self.hf_tokenizer.encode(
                text.decode("utf-8", errors="ignore"), add_special_tokens=special
            )
        )

    def detokenize(
        self, tokens: list[int], prev_tokens: list[int] | None = None, special: bool = False
    ) -> bytes:
        """The bytes of ``tokens``; with ``prev_tokens``, those that ``tokens`` add to them
        (a Hugging Face tokenizer may render a token differently after others)."""
        skip = not special
        if prev_tokens is None:
            return self.hf_tokenizer.decode(tokens, skip_special_tokens=skip).encode(
                "utf-8", errors="ignore"
            )
        both = self.hf_tokenizer.decode(prev_tokens + tokens, skip_special_tokens=skip)
        prev = self.hf_tokenizer.decode(prev_tokens, skip_special_tokens=skip)
        return both.encode("utf-8", errors="ignore")[len(prev.encode("utf-8", errors="ignore")) :]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str) -> LlamaHFTokenizer:
        """Load a tokenizer with ``transformers.AutoTokenizer`` (``pip install transformers``).

        Raises:
            ImportError: ``transformers`` is not installed.
        """
        try:
            from transformers import AutoTokenizer  # type: ignore[import-not-found]
        except ImportError as e:
            msg = "LlamaHFTokenizer.from_pretrained needs transformers: pip install transformers"
            raise ImportError(msg) from e
        return cls(AutoTokenizer.from_pretrained(pretrained_model_name_or_path))
