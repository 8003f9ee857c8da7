"""``python -m nexabind.lowlevel [LIBDIR]``: load and set up a library folder, print JSON.

The exit status is 0 when the library loaded, passed the ABI check and initialized its
backends; installers run this in a child process, so a library that crashes takes only the
child down.
"""

from __future__ import annotations

import json
import sys

from nexabind import loader
from nexabind.errors import AbiMismatchError, LibraryNotFoundError
from nexabind.lowlevel._lib import lib, system_info


def main(argv: list[str]) -> int:
    """Load ``argv[0]`` (or the default folder); print ``{"ok": ..., ...}``; return the status."""
    try:
        lib(argv[0] if argv else None)
    except (LibraryNotFoundError, AbiMismatchError) as e:
        print(json.dumps({"ok": False, "error": str(e)}))
        return 1
    libdir = loader.loaded_dir()
    info = {
        "ok": True,
        "libdir": str(libdir),
        "abi_checked": libdir is not None and loader.abi_file(libdir) is not None,
        "system_info": system_info(),
    }
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
