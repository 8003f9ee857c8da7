"""llama-cpp-python's ``llama_cpp._internals`` (its ctypes wrappers): no nexabind counterpart.

The module exists so that code importing it loads; using a name from it raises, saying what
to use instead.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    msg = (
        f"llama_cpp._internals.{name} wraps llama-cpp-python's ctypes binding, which has no "
        "counterpart in nexabind; nexabind.lowlevel (Model, Context, Batch, SamplerChain) is "
        "its low-level API"
    )
    raise AttributeError(msg)
