"""pytest plugin for running llama-cpp-python itself on nexabind's library folder.

llama-cpp-python loads ``$LLAMA_CPP_LIB_PATH``'s libllama at import; the CPU backends of
nexabind's builds are modules (GGML_BACKEND_DL) that it does not load, so this plugin loads the
folder's backends as nexabind does (as benchmarks/worker.py does for the benchmarks).
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import llama_cpp  # noqa: F401 - loads libllama from LLAMA_CPP_LIB_PATH first

_libdir = os.environ["LLAMA_CPP_LIB_PATH"]
_name = {"darwin": "libggml.dylib", "win32": "ggml.dll"}.get(sys.platform, "libggml.so")
_ggml = ctypes.CDLL(str(Path(_libdir) / _name), mode=ctypes.RTLD_GLOBAL)
_ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
_ggml.ggml_backend_load_all_from_path(_libdir.encode())
