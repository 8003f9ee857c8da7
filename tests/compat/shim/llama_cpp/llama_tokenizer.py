"""llama-cpp-python's ``llama_cpp.llama_tokenizer``: nexabind's tokenizers."""

from nexabind.tokenizer import BaseLlamaTokenizer, LlamaHFTokenizer, LlamaTokenizer

__all__ = ["BaseLlamaTokenizer", "LlamaHFTokenizer", "LlamaTokenizer"]
