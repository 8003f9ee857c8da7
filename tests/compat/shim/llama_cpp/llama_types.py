"""llama-cpp-python's ``llama_cpp.llama_types``: nexabind's OpenAI shape types."""

from nexabind.llama_types import *  # noqa: F403
from nexabind.llama_types import __all__  # noqa: F401
