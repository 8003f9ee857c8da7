"""llama-cpp-python's ``llama_cpp.llama_cpp`` (its ctypes declarations): no nexabind counterpart.

The module exists so that code importing it loads; using a name from it raises, saying what
to use instead.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    msg = (
        f"llama_cpp.llama_cpp.{name} is llama-cpp-python's ctypes binding, which has no "
        "counterpart in nexabind; nexabind.lowlevel is its low-level API (lowlevel.lib() "
        "gives the cffi library)"
    )
    raise AttributeError(msg)
