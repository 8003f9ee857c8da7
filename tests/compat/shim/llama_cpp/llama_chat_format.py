"""llama-cpp-python's ``llama_cpp.llama_chat_format``: nexabind's chat formats and handlers."""

from nexabind.chat_formats import *  # noqa: F403
from nexabind.chat_formats import __all__  # noqa: F401
