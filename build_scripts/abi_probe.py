"""Print the C ABI probe for the generated declarations (nexabind._cdef) to stdout.

Usage: python build_scripts/abi_probe.py > abi_probe.c
       cc -I<llama.cpp>/include -I<llama.cpp>/ggml/include abi_probe.c -o abi_probe

``nexabind build`` compiles and runs the same program to write each artifact's abi.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nexabind import _cdef  # noqa: E402
from nexabind._artifact import probe_source  # noqa: E402

if __name__ == "__main__":
    sys.stdout.write(probe_source(_cdef.STRUCTS, _cdef.ENUMS))
