"""llama-cpp-python's ``llama_cpp.llama_cache``: nexabind's prompt caches."""

from nexabind.prompt_cache import BaseLlamaCache, LlamaCache, LlamaDiskCache, LlamaRAMCache

__all__ = ["BaseLlamaCache", "LlamaCache", "LlamaDiskCache", "LlamaRAMCache"]
