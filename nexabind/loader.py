"""Find, load and ABI-check the llama.cpp shared libraries, once per process.

``python -m nexabind.loader [LIBDIR]`` loads and checks a library folder in a fresh process and
prints JSON; the exit status is 0 on success (installers use it as a smoke test).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

from nexabind.errors import AbiMismatchError, LibraryNotFoundError

__all__ = ["check_abi", "library_dir", "load", "loaded_dir"]

log = logging.getLogger("nexabind.loader")

_lock = threading.Lock()
_lib: Any = None
_libdir: Path | None = None

if sys.platform == "win32":
    _NAMES = ("ggml-base.dll", "ggml.dll", "llama.dll")
elif sys.platform == "darwin":
    _NAMES = ("libggml-base.dylib", "libggml.dylib", "libllama.dylib")
else:
    _NAMES = ("libggml-base.so", "libggml.so", "libllama.so")


def _cache_entry() -> Path:
    """The ``lib`` folder of the cache entry to load: see :func:`nexabind.cache.best_installed`."""
    from nexabind import cache, pin
    from nexabind.platform import target

    found = cache.best_installed(pin.RELEASE)
    if found is not None:
        return found.lib
    # Nothing installed: name the folder `nexabind fetch` installs by default, for the message.
    os_name, arch = target()
    variant = os.environ.get("NEXABIND_VARIANT") or "cpu"
    return cache.entry_dir(pin.RELEASE, f"{os_name}-{arch}-{variant}") / "lib"


def _candidates(lib_path: str | os.PathLike[str] | None) -> list[tuple[str, Path]]:
    if lib_path is not None:
        return [("explicit lib_path", Path(lib_path))]
    out = []
    env = os.environ.get("NEXABIND_LIB_PATH")
    if env:
        out.append(("NEXABIND_LIB_PATH", Path(env)))
    out.append(("cache entry for this release and platform", _cache_entry()))
    return out


def _missing(folder: Path) -> str | None:
    if not folder.is_dir():
        return "no such folder"
    absent = [n for n in _NAMES if not (folder / n).exists()]
    return f"missing {', '.join(absent)}" if absent else None


def library_dir(lib_path: str | os.PathLike[str] | None = None) -> Path:
    """Resolve the folder holding the llama.cpp libraries, without loading anything.

    Order: ``lib_path``, then ``NEXABIND_LIB_PATH``, then the cache entry of the pinned release
    for this platform.

    Args:
        lib_path: An explicit folder; when given, nothing else is tried.

    Returns:
        The absolute folder that holds ``libllama`` and its ggml libraries.

    Raises:
        LibraryNotFoundError: No candidate holds the libraries; lists every place tried and why.
    """
    tried = []
    for label, folder in _candidates(lib_path):
        folder = folder.expanduser().resolve()
        why = _missing(folder)
        if why is None:
            return folder
        tried.append(f"  {folder} ({label}): {why}")
    msg = (
        "no llama.cpp library found; tried:\n"
        + "\n".join(tried)
        + "\nrun `nexabind fetch` (or `nexabind build --install`), or set NEXABIND_LIB_PATH"
    )
    raise LibraryNotFoundError(msg)


def _abi_file(libdir: Path) -> Path | None:
    for cand in (libdir.parent / "abi.json", libdir / "abi.json"):
        if cand.is_file():
            return cand
    return None


def check_abi(abi: dict[str, Any], source: str = "abi.json") -> None:
    """Compare a probe's ``abi.json`` with the generated declarations.

    Args:
        abi: The parsed ``abi.json``.
        source: Where it came from, for the message.

    Raises:
        AbiMismatchError: Naming the first field (commit, cdef hash, pointer size, struct size or
            offset, enum value) that differs.
    """
    from nexabind import _cdef
    from nexabind._ffi import ffi

    def fail(what: str, want: object, got: object) -> None:
        msg = (
            f"ABI mismatch in {source}: {what} is {got!r} in the library but {want!r} in "
            f"nexabind's declarations; install the matching library with `nexabind fetch` "
            f"or rebuild with `nexabind build --install`"
        )
        raise AbiMismatchError(msg)

    if abi.get("llama_commit") != _cdef.LLAMA_COMMIT:
        fail("llama_commit", _cdef.LLAMA_COMMIT, abi.get("llama_commit"))
    if abi.get("cdef_sha256") != _cdef.CDEF_SHA256:
        fail("cdef_sha256", _cdef.CDEF_SHA256, abi.get("cdef_sha256"))
    if abi.get("pointer_size") != ffi.sizeof("void *"):
        fail("pointer_size", ffi.sizeof("void *"), abi.get("pointer_size"))
    structs = abi.get("structs", {})
    for tag, fields in _cdef.STRUCTS.items():
        got = structs.get(tag)
        if got is None:
            fail(f"struct {tag}", "present", None)
        size = ffi.sizeof(f"struct {tag}")
        if got.get("size") != size:
            fail(f"sizeof(struct {tag})", size, got.get("size"))
        offsets = got.get("offsets", {})
        for field in fields:
            off = ffi.offsetof(f"struct {tag}", field)
            if offsets.get(field) != off:
                fail(f"offsetof(struct {tag}, {field})", off, offsets.get(field))
    enums = abi.get("enums", {})
    for consts in _cdef.ENUMS.values():
        for name in consts:
            want = ffi.integer_const(name)
            if enums.get(name) != want:
                fail(f"enum value {name}", want, enums.get(name))


_native_log = logging.getLogger("nexabind.llama")
# Quiet unless the application configures logging: no "last resort" printing of warnings.
_native_log.addHandler(logging.NullHandler())
_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_log_cb: Any = None
_last_level = logging.DEBUG


def _log_callback() -> Any:
    """Route llama.cpp and ggml logs to the ``nexabind.llama`` logger (quiet by default)."""
    global _log_cb
    from nexabind._ffi import ffi

    if _log_cb is None:

        @ffi.callback("void(enum ggml_log_level, const char *, void *)")
        def cb(level: int, text: Any, _ud: Any) -> None:
            global _last_level
            # GGML_LOG_LEVEL_CONT continues the previous message at its level.
            lvl = _last_level if level == 5 else _LEVELS.get(level, logging.DEBUG)
            _last_level = lvl
            if _native_log.isEnabledFor(lvl):
                _native_log.log(lvl, "%s", ffi.string(text).decode("utf-8", "replace").rstrip())

        _log_cb = cb  # kept alive for the life of the process
    return _log_cb


def _open(libdir: Path) -> Any:
    import ctypes

    from nexabind._ffi import ffi

    if sys.platform == "win32":
        os.add_dll_directory(str(libdir))  # type: ignore[attr-defined]
    # Load the ggml libraries first, globally, so libllama and the backend modules that
    # ggml_backend_load_all_from_path dlopens later resolve against these exact copies.
    mode = getattr(os, "RTLD_GLOBAL", 0) | getattr(os, "RTLD_NOW", 0)
    for name in _NAMES[:-1]:
        ctypes.CDLL(str(libdir / name), mode=mode)
    lib = ffi.dlopen(str(libdir / _NAMES[-1]), ffi.RTLD_NOW | ffi.RTLD_GLOBAL)
    ggml = ffi.dlopen(str(libdir / _NAMES[1]), ffi.RTLD_NOW | ffi.RTLD_GLOBAL)
    lib.llama_log_set(_log_callback(), ffi.NULL)
    ggml.ggml_backend_load_all_from_path(str(libdir).encode())
    lib.llama_backend_init()
    return lib, ggml


def load(lib_path: str | os.PathLike[str] | None = None) -> Any:
    """Load llama.cpp once per process and return the cffi ``lib``.

    The ABI is checked against ``abi.json`` (next to ``lib/`` or in the folder itself) before
    the library is first used; a local build without ``abi.json`` loads with a warning.

    Args:
        lib_path: Library folder; see :func:`library_dir`. Once loaded, only the same folder
            (or None) is accepted.

    Returns:
        The cffi library object of ``libllama``.

    Raises:
        LibraryNotFoundError: Nothing to load, or the libraries failed to load.
        AbiMismatchError: The library's ABI differs from the declarations.
    """
    global _lib, _libdir
    if _lib is not None:
        if lib_path is not None and Path(lib_path).expanduser().resolve() != _libdir:
            msg = (
                f"llama.cpp is already loaded from {_libdir} in this process; it cannot also "
                f"load {lib_path}: use a new process"
            )
            raise LibraryNotFoundError(msg)
        return _lib
    with _lock:
        if _lib is not None:
            return _lib
        libdir = library_dir(lib_path)
        abi_path = _abi_file(libdir)
        if abi_path is None:
            log.warning("no abi.json next to %s: ABI not checked (local build?)", libdir)
        else:
            try:
                abi = json.loads(abi_path.read_text())
            except (OSError, ValueError) as e:
                msg = f"cannot read {abi_path}: {e}; reinstall with `nexabind fetch`"
                raise AbiMismatchError(msg) from e
            check_abi(abi, str(abi_path))
        try:
            lib, ggml = _open(libdir)
        except OSError as e:
            msg = f"loading llama.cpp from {libdir} failed: {e}; run `nexabind fetch`"
            raise LibraryNotFoundError(msg) from e
        global _ggml
        _ggml = ggml
        _libdir = libdir
        _lib = lib
        return lib


_ggml: Any = None


def ggml() -> Any:
    """Return the cffi handle of ``libggml`` (backend registry), loading if needed."""
    load()
    return _ggml


def loaded_dir() -> Path | None:
    """Return the folder the library was loaded from, or None before :func:`load`."""
    return _libdir


def _main(argv: list[str]) -> int:
    try:
        lib = load(argv[0] if argv else None)
    except (LibraryNotFoundError, AbiMismatchError) as e:
        print(json.dumps({"ok": False, "error": str(e)}))
        return 1
    from nexabind._ffi import ffi

    info = {
        "ok": True,
        "libdir": str(_libdir),
        "abi_checked": _abi_file(_libdir) is not None,  # type: ignore[arg-type]
        "system_info": ffi.string(lib.llama_print_system_info()).decode(),
    }
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
