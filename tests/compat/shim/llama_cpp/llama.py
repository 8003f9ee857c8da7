"""llama-cpp-python's ``llama_cpp.llama``: nexabind's ``Llama`` and the types around it."""

from nexabind import Llama, LlamaState
from nexabind.processors import (
    LogitsProcessor,
    LogitsProcessorList,
    MinTokensLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
)
from nexabind.prompt_cache import BaseLlamaCache, LlamaCache, LlamaDiskCache, LlamaRAMCache

__all__ = [
    "BaseLlamaCache",
    "Llama",
    "LlamaCache",
    "LlamaDiskCache",
    "LlamaRAMCache",
    "LlamaState",
    "LogitsProcessor",
    "LogitsProcessorList",
    "MinTokensLogitsProcessor",
    "StoppingCriteria",
    "StoppingCriteriaList",
]
