"""llama-cpp-python's ``llama_cpp.llama_speculative``: nexabind's draft models."""

from nexabind.speculative import LlamaDraftModel, LlamaPromptLookupDecoding

__all__ = ["LlamaDraftModel", "LlamaPromptLookupDecoding"]
